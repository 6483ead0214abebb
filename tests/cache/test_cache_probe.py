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
