"""Hugging Face VLM adapters on tiny random Llava and PaliGemma models (configs built locally).

The strongest check: the runtime's cached, step-by-step path (prompt, then per step image tokens
and greedily decoded action tokens) gives the same action logits as the model's own stock
``forward`` over the whole episode with ``<image>`` placeholders at the image slots.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipVisionConfig,
)

from kv_vla.cache import EpisodeCacheConfig
from kv_vla.model import build_prompt
from kv_vla.model.adapters import LlavaAdapter, PaliGemmaAdapter, adapt
from kv_vla.model.text_tokenizer import DEFAULT_WORDS, build_text_tokenizer
from kv_vla.runtime import EpisodeRuntime

TOK = build_text_tokenizer(DEFAULT_WORDS)
VOCAB = len(TOK)
IMAGE_TOKEN = TOK.convert_tokens_to_ids("</s>")  # never in a prompt; stands in for <image>
INSTR = "touch the red cube"


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=16,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_paligemma(seed: int = 0) -> PaliGemmaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=GemmaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        ),
        image_token_index=IMAGE_TOKEN,
        projection_dim=32,
        hidden_size=32,
        vocab_size=VOCAB,
    )
    return PaliGemmaForConditionalGeneration(cfg).eval()


def tiny_paligemma2(seed: int = 0) -> PaliGemmaForConditionalGeneration:
    """PaliGemma 2: a Gemma 2 decoder (sliding-window and full layers); the window is shorter than
    the episode, so it masks."""
    torch.manual_seed(seed)
    cfg = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=24,
        ),
        image_token_index=IMAGE_TOKEN,
        projection_dim=32,
        hidden_size=32,
        vocab_size=VOCAB,
    )
    return PaliGemmaForConditionalGeneration(cfg).eval()


BUILDERS = {
    "llava": (tiny_llava, LlavaAdapter),
    "paligemma": (tiny_paligemma, PaliGemmaAdapter),
    "paligemma2": (tiny_paligemma2, PaliGemmaAdapter),
}


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 48, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_adapter_runs_runtime_and_matches_stock_forward(kind):
    build, cls = BUILDERS[kind]
    hf = build()
    adapter = adapt(hf, TOK, action_dim=4)
    assert isinstance(adapter, cls) and adapter.num_image_tokens == 16
    step = adapter.num_image_tokens + adapter.action_dim
    rt = EpisodeRuntime(adapter, EpisodeCacheConfig(policy="full", chunk_size=step))
    fr = frames(3, 0)
    rt.reset(INSTR)
    logits, ids = [], []
    for f in fr:
        res = rt.step(f)
        logits.append(rt.last_action_logits.clone())
        ids.append(torch.as_tensor(res.action_token_ids))
        assert np.all(np.abs(res.action) <= 1)
    rt_logits = torch.stack(logits)  # [T, D, 256]

    # stock forward over the whole episode: <image> placeholders at the image slots
    prompt = adapter.prompt_ids(build_prompt(INSTR))[0]
    parts = [prompt]
    for t in range(len(fr)):
        parts += [torch.full((16,), IMAGE_TOKEN), ids[t]]
    input_ids = torch.cat(parts)[None]
    pixels = adapter.pixel_values(fr)
    with torch.no_grad():
        full = hf(input_ids=input_ids, pixel_values=pixels).logits[0]
    begin = adapter.action_tokenizer.action_token_begin_idx
    ref = []
    for t in range(len(fr)):
        start = prompt.numel() + t * step + 16 - 1
        ref.append(full[start : start + 4, begin:])
    torch.testing.assert_close(rt_logits, torch.stack(ref).float(), atol=2e-5, rtol=1e-4)
    # the image matters
    rt.reset(INSTR)
    rt.step(fr[1])
    assert (rt.last_action_logits - rt_logits[0]).abs().max() > 1e-5


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_adapter_with_eviction_reports_cache_stats(kind):
    build, _ = BUILDERS[kind]
    adapter = adapt(build(1), TOK, action_dim=4)
    cfg = EpisodeCacheConfig(policy="window", chunk_size=20, recent_chunks=1)
    rt = EpisodeRuntime(adapter, cfg)
    rt.reset(INSTR)
    for f in frames(5, 2):
        res = rt.step(f)
        assert res.cache_stats == rt.cache.stats()
    assert res.cache_stats.evicted_chunks >= 3
    assert res.cache_stats.kept_tokens == rt.cache.layers[0].keys.shape[-2]


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="no adapter"):
        adapt(torch.nn.Linear(2, 2), TOK)
