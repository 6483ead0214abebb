"""Bounds and accounting over long synthetic episodes (direct cache updates, no model)."""

from __future__ import annotations

import pytest
import torch

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig
from kv_vla.cache.testing import tiny_config

LAYERS, HEADS, DIM = 2, 2, 8
PROMPT, OBS, DECODE = 10, 12, 3


def _forward(cache: EpisodeCache, n: int, gen: torch.Generator, probe: bool) -> None:
    """What a model's forward does to the cache: one update per layer (+ the probe's report)."""
    kept = cache.kept_positions().numel()
    for layer in range(LAYERS):
        k = torch.randn(1, HEADS, n, DIM, generator=gen)
        cache.update(k, -k, layer)
        if probe:
            cache.record_attention(layer, torch.rand(kept + n, generator=gen))


def _config() -> object:
    return tiny_config("llama", hidden=32, layers=LAYERS)  # 4 heads of 8 dims, 2 kv heads


BUDGETS = {
    "none": dict(max_tokens=40),
    "window": dict(recent_chunks=2, max_tokens=70),
    "sinks": dict(sink_tokens=4, recent_chunks=2, max_tokens=90),
    "attention": dict(sink_tokens=4, recent_chunks=1, max_tokens=90),
    "random": dict(recent_chunks=2, max_tokens=100),
    "gated": dict(recent_chunks=1, max_tokens=80, gate_threshold=0.2),
}


@pytest.mark.slow  # 5000 steps per policy
@pytest.mark.parametrize("policy", sorted(BUDGETS))
def test_kept_tokens_never_exceed_budget_over_5000_steps(policy):
    gen = torch.Generator().manual_seed(0)
    cfg = EpisodeCacheConfig(policy=policy, chunk_size=OBS + DECODE, **BUDGETS[policy])
    cache = EpisodeCache(cfg, _config())
    probe = policy == "attention"
    _forward(cache, PROMPT, gen, probe)
    cache.pin_prefix()
    peak = 0
    for _ in range(5000):
        _forward(cache, OBS, gen, probe)
        peak = max(peak, cache.stats().kept_tokens)
        _forward(cache, DECODE, gen, probe)
        kept = cache.stats().kept_tokens
        peak = max(peak, kept)
        assert kept <= cfg.max_tokens
    stats = cache.stats()
    assert stats.seen_tokens == PROMPT + 5000 * (OBS + DECODE)
    assert stats.evicted_tokens == stats.seen_tokens - stats.kept_tokens > 0
    assert peak <= cfg.max_tokens
    assert torch.equal(cache.kept_positions()[:PROMPT], torch.arange(PROMPT))


@pytest.mark.parametrize("policy", ["full", "window", "gated"])
def test_stats_match_tensors_held(policy):
    gen = torch.Generator().manual_seed(1)
    cfg = EpisodeCacheConfig(policy=policy, chunk_size=OBS + DECODE, recent_chunks=2)
    cache = EpisodeCache(cfg, _config())
    _forward(cache, PROMPT, gen, False)
    cache.pin_prefix()
    for _ in range(7):
        _forward(cache, OBS, gen, False)
        _forward(cache, DECODE, gen, False)
    stats = cache.stats()
    positions = cache.kept_positions()
    assert stats.kept_tokens == positions.numel()
    per_layer = []
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (1, HEADS, stats.kept_tokens, DIM)
        per_layer.append(layer.keys.numel() * layer.keys.element_size() * 2)
    assert stats.kv_bytes_per_layer == per_layer
    assert stats.kv_bytes == sum(per_layer) == LAYERS * 2 * HEADS * DIM * 4 * stats.kept_tokens
    assert stats.pinned_tokens == PROMPT
    assert stats.kept_chunks + stats.evicted_chunks == 7
    if policy == "window":
        assert stats.kept_chunks == 2 and stats.kept_tokens == PROMPT + 2 * (OBS + DECODE)
    if policy == "full":
        assert stats.evicted_tokens == 0 and stats.kept_tokens == stats.seen_tokens


def test_eviction_keeps_the_right_columns():
    """Surviving columns hold exactly the keys written at their positions."""
    gen = torch.Generator().manual_seed(2)
    cfg = EpisodeCacheConfig(policy="window", chunk_size=5, recent_chunks=1)
    cache = EpisodeCache(cfg, _config())
    written = []
    for n in [4, 5, 3, 7, 5, 1, 9]:
        k = torch.randn(1, HEADS, n, DIM, generator=gen)
        written.append(k)
        for layer in range(LAYERS):
            cache.update(k, k + layer, layer)
        if len(written) == 1:
            cache.pin_prefix()
    all_keys = torch.cat(written, dim=2)
    pos = cache.kept_positions()
    # 34 seen: prefix 0..3, chunks [4,9) [9,14) ... [29,34); recent chunk [29,34), open: none
    assert pos.tolist() == [0, 1, 2, 3, *range(29, 34)]
    for layer_idx, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys, all_keys[:, :, pos])
        assert torch.equal(layer.values, all_keys[:, :, pos] + layer_idx)


def test_reset_starts_a_new_episode():
    gen = torch.Generator().manual_seed(3)
    cache = EpisodeCache(EpisodeCacheConfig(policy="window", chunk_size=5, recent_chunks=1), _config())
    _forward(cache, 30, gen, False)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert cache.stats().kv_bytes == 0 and cache.kept_positions().numel() == 0
    _forward(cache, 6, gen, False)
    assert cache.kept_positions().tolist() == [0, 1, 2, 3, 4, 5][:6]


def test_chunks_stay_aligned_with_steps_when_sinks_shorten_the_first():
    gen = torch.Generator().manual_seed(4)
    cfg = EpisodeCacheConfig(policy="sinks", chunk_size=15, sink_tokens=4, recent_chunks=1)
    cache = EpisodeCache(cfg, _config())
    _forward(cache, PROMPT, gen, False)
    cache.pin_prefix()
    for _ in range(4):
        _forward(cache, OBS, gen, False)
        _forward(cache, DECODE, gen, False)
    # kept chunks only (evicted ones are counted); the last decision is still pending here
    bounds = [(c.start, c.end) for c in cache.chunks]
    assert bounds == [(40, 55), (55, 70)] and cache.stats().evicted_chunks == 3
    assert cache.kept_positions().tolist() == [*range(14), *range(55, 70)]
    assert [(c.start, c.end) for c in cache.chunks] == [(55, 70)]
    cache.update_config(chunk_size=5)  # re-cut from the open chunk on
    _forward(cache, 12, gen, False)
    assert [(c.start, c.end) for c in cache.chunks[-2:]] == [(70, 75), (75, 80)]
    assert cache.kept_positions().tolist() == [*range(14), *range(75, 82)]


@pytest.mark.parametrize("recent", [0, 1, 3, 8])
def test_window_holds_exactly_the_recent_chunks_at_every_step(recent):
    gen = torch.Generator().manual_seed(5)
    cfg = EpisodeCacheConfig(policy="window", chunk_size=OBS + DECODE, recent_chunks=recent, max_tokens=None)
    cache = EpisodeCache(cfg, _config())
    _forward(cache, PROMPT, gen, False)
    cache.pin_prefix()
    for step in range(1, 13):
        _forward(cache, OBS, gen, False)
        _forward(cache, DECODE, gen, False)
        kept_chunks = min(step, recent)
        first = PROMPT + (step - kept_chunks) * (OBS + DECODE)
        assert cache.kept_positions().tolist() == [*range(PROMPT), *range(first, cache.get_seq_length())]
        assert cache.stats().kept_chunks == kept_chunks
