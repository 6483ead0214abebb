"""One row per decoder family (tiny random configs, 2 layers, float32): the episode cache is either
checked against DynamicCache and the masked reference, or refused with the message that says why.

Checked means: with eviction off the logits equal DynamicCache's; every evicting policy of the row
equals the masked full-attention reference (evicted and out-of-window positions masked) within
1e-5; ``generate()`` continues from the evicted cache exactly as a hand-driven greedy loop does.
docs/FAMILIES.md lists the same rows. Add a family: one entry in CHECKED or REFUSED.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as T
from lockstep import CHUNK as LOCKSTEP_CHUNK
from lockstep import run_lockstep
from numerics import assert_logits_close
from transformers import AutoModelForCausalLM, DynamicCache

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig, disable_attention_probe, enable_attention_probe
from kv_vla.cache.compat import layer_windows, text_config
from kv_vla.cache.testing import reference_logits, run_episode

H, V, WINDOW = 32, 96, 12  # the window is shorter than the episode, so it really masks
BASE = dict(
    hidden_size=H,
    intermediate_size=2 * H,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=V,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,  # generate() runs its full length
)
HYBRID = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
PROMPT, STEPS, OBS, DECODE = list(range(3, 9)), 7, 6, 2
CHUNK = OBS + DECODE

# policy -> options; each evicts within the episode above
POLICY_OPTIONS = {
    "none": dict(),
    "window": dict(recent_chunks=1),
    "sinks": dict(sink_tokens=2, recent_chunks=1),
    "attention": dict(recent_chunks=1, max_tokens=30),
    "random": dict(recent_chunks=1, max_tokens=30, seed=3),
    "gated": dict(recent_chunks=1, max_tokens=30, gate_threshold=0.45),
}
EXACT_POLICIES = sorted(POLICY_OPTIONS)
# low-precision policies: equal to the dequantised lockstep reference instead (Llama row)
LOW_PRECISION_OPTIONS = {
    "zipvl": dict(recent_chunks=1, tau=0.5),
    "gated_tiered": dict(recent_chunks=1, max_tokens=60, gate_threshold=0.0, full_threshold=1.0),
}


def _cfg(cls, **kw):
    return lambda: cls(**{**BASE, **kw})


# family -> (config factory, evicting policies checked on that row)
CHECKED = {
    "llama": (_cfg(T.LlamaConfig), EXACT_POLICIES),
    "qwen2": (_cfg(T.Qwen2Config), ["window"]),
    "qwen3_window": (
        _cfg(T.Qwen3Config, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        ["sinks", "attention"],
    ),
    "mistral_window": (_cfg(T.MistralConfig, sliding_window=WINDOW), ["window", "gated"]),
    "mixtral_window": (_cfg(T.MixtralConfig, sliding_window=WINDOW, **MOE), ["random"]),
    "gemma": (_cfg(T.GemmaConfig, head_dim=8), ["sinks"]),
    "gemma2": (_cfg(T.Gemma2Config, head_dim=8, sliding_window=WINDOW), ["window", "attention"]),
    "gemma3_text": (_cfg(T.Gemma3TextConfig, head_dim=8, **HYBRID), ["sinks", "random"]),
    "cohere": (_cfg(T.CohereConfig), ["window"]),
    "cohere2": (_cfg(T.Cohere2Config, **HYBRID), ["window"]),
    "olmo2": (_cfg(T.Olmo2Config), ["random"]),
    "granite": (_cfg(T.GraniteConfig), ["window"]),
    "stablelm": (_cfg(T.StableLmConfig), ["sinks"]),
    "gpt_neox": (_cfg(T.GPTNeoXConfig), ["window"]),
    "phi": (_cfg(T.PhiConfig), ["window"]),
    "phi3_window": (_cfg(T.Phi3Config, sliding_window=WINDOW), ["sinks"]),
    "qwen3_moe": (
        _cfg(T.Qwen3MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
        ["window"],
    ),
    "smollm3": (_cfg(T.SmolLM3Config), ["window"]),
    "starcoder2_window": (_cfg(T.Starcoder2Config, sliding_window=WINDOW), ["random"]),
    "glm": (_cfg(T.GlmConfig, head_dim=8), ["window"]),
    "deepseek_v3_mla": (
        _cfg(
            T.DeepseekV3Config,
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            moe_intermediate_size=16,
            n_group=1,
            topk_group=1,
        ),
        ["gated"],
    ),
    "gpt2": (lambda: T.GPT2Config(n_embd=H, n_layer=2, n_head=4, vocab_size=V, n_positions=512), ["window"]),
    "gpt_oss_sinks": (_cfg(T.GptOssConfig, head_dim=8, sliding_window=WINDOW, **MOE), ["attention"]),
}

# family -> (config factory, a fragment of the ValueError raised when the cache is built)
REFUSED = {
    "bloom_alibi": (lambda: T.BloomConfig(hidden_size=H, n_layer=2, n_head=4, vocab_size=V), "ALiBi"),
    "mpt_alibi": (lambda: T.MptConfig(d_model=H, n_layers=2, n_heads=4, vocab_size=V), "ALiBi"),
    "falcon_alibi": (
        lambda: T.FalconConfig(
            hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=V, alibi=True
        ),
        "ALiBi",
    ),
    "gpt_neo_local": (
        lambda: T.GPTNeoConfig(
            hidden_size=H, num_layers=2, num_heads=4, vocab_size=V, attention_types=[[["global", "local"], 1]]
        ),
        "local layers",
    ),
    "lfm2_conv": (
        lambda: T.Lfm2Config(**{**BASE, "layer_types": ["conv", "full_attention"]}),
        "recurrent",
    ),
    "qwen3_next_linear": (
        lambda: T.Qwen3NextConfig(
            **{**BASE, "layer_types": ["linear_attention", "full_attention"]},
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            head_dim=8,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
        "recurrent",
    ),
    "llama4_chunked": (
        lambda: T.Llama4TextConfig(
            **{**BASE, "layer_types": ["chunked_attention", "full_attention"]}, head_dim=8
        ),
        "chunked_attention",
    ),
}

# families whose attention does not go through transformers' AttentionInterface: no probe
NO_PROBE = {
    "gptj": lambda: T.GPTJConfig(n_embd=H, n_layer=2, n_head=4, vocab_size=V, rotary_dim=4),
    "codegen": lambda: T.CodeGenConfig(n_embd=H, n_layer=2, n_head=4, vocab_size=V, rotary_dim=4),
    "falcon": lambda: T.FalconConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=V),
}


def _model(factory) -> torch.nn.Module:
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(factory(), dtype=torch.float32).eval()


def _episode(model, cache):
    return run_episode(model, cache, PROMPT, STEPS, OBS, DECODE, seed=1)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("family", sorted(CHECKED))
def test_family_is_exact(family):
    factory, policies = CHECKED[family]
    model = _model(factory)
    sliding = any(w is not None for w in layer_windows(text_config(model.config)))

    # eviction off: the same logits as DynamicCache (sliding layers: DynamicCache keeps only the
    # window, so the kernels see other shapes; the bound is float32 rounding)
    ref = _episode(model, DynamicCache(config=model.config))
    got = _episode(model, EpisodeCache(EpisodeCacheConfig(policy="full", chunk_size=CHUNK), model.config))
    if sliding:
        assert _max_diff(got.logits, ref.logits) <= 1e-6
    else:
        assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))

    for policy in policies:
        cache = EpisodeCache(
            EpisodeCacheConfig(policy=policy, chunk_size=CHUNK, **POLICY_OPTIONS[policy]), model.config
        )
        if policy == "attention":
            enable_attention_probe(model)
        try:
            record = _episode(model, cache)
        finally:
            disable_attention_probe(model)
        assert cache.stats().evicted_tokens > 0, policy
        assert (
            torch.cat(record.logits, dim=1) - reference_logits(model, record)
        ).abs().max().item() <= 1e-5, policy

    # generate() continues from the evicted cache as a hand-driven greedy loop over a copy does
    hand = copy.deepcopy(cache)
    ids = torch.tensor([[*record.ids, 5, 7, 11]])
    with torch.no_grad():
        mask = torch.ones_like(ids)  # else generate() takes token 0 (pad_token_id) for padding
        out = model.generate(
            ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, do_sample=False
        )
        block, expected = [5, 7, 11], []
        for _ in range(4):
            start = hand.get_seq_length()
            pos = torch.arange(start, start + len(block)).unsqueeze(0)
            logits = model(input_ids=torch.tensor([block]), position_ids=pos, past_key_values=hand).logits
            block = [int(logits[0, -1].argmax())]
            expected += block
    assert out[0, ids.shape[1] :].tolist() == expected
    if sliding:  # the window really masked something: plain kept-token attention differs
        assert any(w is not None and w < len(record.ids) for w in layer_windows(text_config(model.config)))


@pytest.mark.parametrize(
    "family,policy", [("llama", "zipvl"), ("llama", "gated_tiered"), ("deepseek_v3_mla", "gated_tiered")]
)
def test_low_precision_policies_equal_the_dequantised_reference(family, policy):
    model = _model(CHECKED[family][0])
    cfg = EpisodeCacheConfig(policy=policy, chunk_size=LOCKSTEP_CHUNK, **LOW_PRECISION_OPTIONS[policy])
    cache = EpisodeCache(cfg, model.config)
    enable_attention_probe(model)
    try:
        worst, _, _ = run_lockstep(model, cache, 4, 32, steps=8)
    finally:
        disable_attention_probe(model)
    assert any(c.precision != "full" for c in cache.chunks)
    assert worst <= 1e-5


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_is_refused_when_the_cache_is_built(family):
    factory, message = REFUSED[family]
    with pytest.raises(ValueError, match=message):
        EpisodeCache(EpisodeCacheConfig(policy="window", chunk_size=CHUNK), factory())


@pytest.mark.parametrize("family", sorted(NO_PROBE))
def test_family_without_attention_interface_is_exact_but_refuses_the_probe(family):
    model = _model(NO_PROBE[family])
    cache = EpisodeCache(EpisodeCacheConfig(policy="window", chunk_size=CHUNK, recent_chunks=1), model.config)
    record = _episode(model, cache)
    assert cache.stats().evicted_tokens > 0
    assert_logits_close(torch.cat(record.logits, dim=1), reference_logits(model, record))
    implementation = model.config._attn_implementation
    with pytest.raises(
        ValueError, match=f"{model.config.model_type} computes attention inside its own modules"
    ):
        enable_attention_probe(model)
    assert model.config._attn_implementation == implementation
