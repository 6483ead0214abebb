"""Nothing grows with the episode but counters: after many steps a bounded cache holds records of
its kept chunks only, and in ``cache`` mode its position ids stay bounded."""

from __future__ import annotations

import gc

import pytest
import torch

from kv_vla.cache import Chunk, EpisodeCache, EpisodeCacheConfig
from kv_vla.cache.testing import run_episode

PROMPT = list(range(3, 13))
OBS, DECODE = 6, 2
CHUNK = OBS + DECODE
BUDGET = 60


def _alive(cls: type) -> int:
    gc.collect()
    return sum(type(o) is cls for o in gc.get_objects())


@pytest.mark.parametrize("mode", ["episode", "cache"])
def test_long_gated_episode_keeps_only_kept_chunk_records(tiny_models, mode):
    model = tiny_models("llama")
    cfg = EpisodeCacheConfig(
        policy="gated",
        chunk_size=CHUNK,
        recent_chunks=2,
        max_tokens=BUDGET,
        gate_threshold=0.0,
        positions=mode,
    )
    cache = EpisodeCache(cfg, model.config)
    steps = 100
    before = _alive(Chunk)
    counts = []

    def check(step, cache):
        counts.append(len(cache.chunks))

    run_episode(model, cache, PROMPT, steps, OBS, DECODE, seed=7, on_step=check)
    stats = cache.stats()
    max_kept_chunks = (BUDGET - len(PROMPT)) // CHUNK + 1
    assert stats.evicted_chunks >= steps - max_kept_chunks - 1  # the budget really evicted
    assert stats.kept_chunks == len(cache.chunks) <= max_kept_chunks
    assert max(counts) <= max_kept_chunks  # never more than the budget holds, at any step
    # no Chunk object, and no gate summary, outlives its eviction
    assert _alive(Chunk) - before <= max_kept_chunks
    held = [c.summary for c in cache.chunks if c.summary is not None]
    assert len(held) <= max_kept_chunks
    assert cache.chunk_summaries().shape[0] == len(held)
    assert cache._positions.numel() == stats.kept_tokens <= BUDGET
    if mode == "cache":
        assert stats.max_position < BUDGET + OBS  # kept tokens + one forward's block
        assert cache.get_seq_length() == stats.kept_tokens
    else:
        assert stats.max_position == len(PROMPT) + steps * CHUNK - 1


def test_record_summaries_keeps_every_summary_for_training(tiny_models):
    """A trainer's recording is the one deliberate exception: it keeps every chunk's summary."""
    model = tiny_models("llama")
    cfg = EpisodeCacheConfig(policy="window", chunk_size=CHUNK, recent_chunks=1)
    cache = EpisodeCache(cfg, model.config, record_summaries=True)
    run_episode(model, cache, PROMPT, 12, OBS, DECODE, seed=8)
    summaries = cache.chunk_summaries()
    assert summaries.shape[0] == 12 and cache.stats().evicted_chunks >= 10
    assert torch.isfinite(summaries).all()
