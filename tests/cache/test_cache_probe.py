"""The attention probe changes nothing in the outputs and measures the attention actually paid."""

from __future__ import annotations

import pytest
import torch

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig, disable_attention_probe, enable_attention_probe
from kv_vla.cache.probe import newest_query_mass
from kv_vla.cache.testing import FAMILIES, run_episode


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_outputs_equal_sdpa(tiny_models, family):
    model = tiny_models(family)
    cfg = EpisodeCacheConfig(policy="window", chunk_size=15, recent_chunks=1)
    plain = run_episode(model, EpisodeCache(cfg, model.config), list(range(10)), 4, 12, 3)
    enable_attention_probe(model)
    try:
        probed_cache = EpisodeCache(cfg, model.config)
        probed = run_episode(model, probed_cache, list(range(10)), 4, 12, 3)
    finally:
        disable_attention_probe(model)
    for a, b in zip(plain.logits, probed.logits):
        assert torch.equal(a, b)
    assert probed_cache._attn is not None  # the probe reported to the cache


def test_newest_query_mass_matches_explicit_softmax():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 8, generator=gen)
    k = torch.randn(1, 2, 9, 8, generator=gen)
    mass = newest_query_mass(q, k, None, 8**-0.5, window=2)
    kk = k.repeat_interleave(2, dim=1)
    scores = (q[:, :, 3:] @ kk.transpose(-1, -2)) * 8**-0.5  # queries 3, 4 -> absolute rows 7, 8
    scores[:, :, 0, 8] = float("-inf")  # query 3 (kv row 7) cannot see kv 8
    expected = scores.softmax(-1).mean(dim=(0, 1, 2))
    assert torch.allclose(mass, expected, atol=1e-6)
    assert torch.isclose(mass.sum(), torch.tensor(1.0))


def test_attention_policy_without_probe_says_how_to_enable_it(tiny_models):
    model = tiny_models("llama")
    cfg = EpisodeCacheConfig(policy="attention", chunk_size=15, recent_chunks=1, max_tokens=60)
    with pytest.raises(RuntimeError, match="enable_attention_probe"):
        run_episode(model, EpisodeCache(cfg, model.config), list(range(10)), 6, 12, 3)


@pytest.mark.parametrize("family", ["llama_eager", "gemma2_softcap", "gpt_oss_sinks"])
def test_probe_keeps_the_attention_it_found_and_restores_it(family):
    """Eager stays eager (softcapping, attention sinks), outputs are unchanged, and disable restores."""
    import transformers as T

    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    base.update(num_key_value_heads=2, vocab_size=96, max_position_embeddings=512)
    configs = {
        "llama_eager": lambda: T.LlamaConfig(**base, attn_implementation="eager"),
        "gemma2_softcap": lambda: T.Gemma2Config(**base, head_dim=8, sliding_window=12),
        "gpt_oss_sinks": lambda: T.GptOssConfig(
            **base, head_dim=8, sliding_window=12, num_local_experts=4, num_experts_per_tok=2
        ),
    }
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(configs[family](), dtype=torch.float32).eval()
    found = model.config._attn_implementation
    assert found == "eager"
    cfg = EpisodeCacheConfig(policy="window", chunk_size=15, recent_chunks=1)
    plain = run_episode(model, EpisodeCache(cfg, model.config), list(range(10)), 4, 12, 3)
    enable_attention_probe(model)
    try:
        probed_cache = EpisodeCache(cfg, model.config)
        probed = run_episode(model, probed_cache, list(range(10)), 4, 12, 3)
    finally:
        disable_attention_probe(model)
    assert model.config._attn_implementation == found
    for a, b in zip(plain.logits, probed.logits):
        assert torch.equal(a, b)  # the same eager kernels on the same tensors
    assert probed_cache._attn is not None
    again = run_episode(model, EpisodeCache(cfg, model.config), list(range(10)), 4, 12, 3)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, again.logits))


def test_probe_refuses_a_family_it_cannot_observe():
    import transformers as T
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(
        T.GPTJConfig(n_embd=32, n_layer=1, n_head=4, vocab_size=96, rotary_dim=4)
    )
    with pytest.raises(ValueError, match="gptj computes attention inside its own modules"):
        enable_attention_probe(model)
    assert model.config._attn_implementation == "eager"


def test_a_copy_of_a_probed_model_restores_what_the_probe_wrapped():
    import copy

    import transformers as T
    from transformers import AutoModelForCausalLM

    from kv_vla.cache import is_probing

    cfg = T.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        attn_implementation="eager",
    )
    model = AutoModelForCausalLM.from_config(cfg)
    enable_attention_probe(model)
    twin = copy.deepcopy(model)
    twin.__dict__.pop("_kv_vla_probe_previous", None)  # what a reloaded or re-wrapped model lacks
    assert is_probing(model) and is_probing(twin)
    disable_attention_probe(twin)
    disable_attention_probe(model)
    assert model.config._attn_implementation == twin.config._attn_implementation == "eager"
    assert not is_probing(model)
