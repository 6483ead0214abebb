"""EpisodeRuntime hands the model the position ids of the cache's position mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_vla.cache import EpisodeCacheConfig
from kv_vla.model import CompactVLA, CompactVLAConfig
from kv_vla.runtime import EpisodeRuntime

STEP = 20  # 16 image tokens + 4 action tokens (CompactVLAConfig.tiny)
INSTR = "touch the cube that was lit at the start"


@pytest.fixture(scope="module")
def model() -> CompactVLA:
    torch.manual_seed(0)
    return CompactVLA(CompactVLAConfig.tiny()).eval()


def _frames(n: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


def _episode(model, cfg: EpisodeCacheConfig, n: int):
    """Per step: the first position id of its frame block, and its result and logits."""
    rt = EpisodeRuntime(model, cache_config=cfg)
    firsts: list[int] = []

    def hook(module, args, kwargs):
        firsts.append(int(kwargs["position_ids"][0, 0]))

    handle = model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        rt.reset(INSTR)
        prompt = rt.cache.pinned_tokens
        starts, out = [], []
        for f in _frames(n):
            first = len(firsts)  # the step's first forward is its frame's prefill
            out.append((rt.step(f), rt.last_action_logits.clone()))
            starts.append(firsts[first])
    finally:
        handle.remove()
    return prompt, starts, out


def test_cache_positions_are_bounded_and_contiguous_in_the_runtime(model):
    cfg = EpisodeCacheConfig(
        policy="window", chunk_size=STEP, recent_chunks=2, max_tokens=None, positions="cache"
    )
    prompt, firsts, out = _episode(model, cfg, 10)
    # every step's frame starts right after the kept tokens: prompt + the 2 recent steps, at most
    assert firsts == [prompt + STEP * min(t, 2) for t in range(10)]
    assert max(r.cache_stats.max_position for r, _ in out) == prompt + 3 * STEP - 1
    episode = cfg.replace(positions="episode")
    _, firsts_ep, _ = _episode(model, episode, 10)
    assert firsts_ep == [prompt + STEP * t for t in range(10)]


def test_without_eviction_both_modes_give_the_same_actions(model):
    base = EpisodeCacheConfig(policy="full", chunk_size=STEP, max_tokens=None)
    _, _, ep = _episode(model, base, 6)
    _, _, ca = _episode(model, base.replace(positions="cache"), 6)
    for (r1, l1), (r2, l2) in zip(ep, ca):
        assert torch.equal(l1, l2)  # nothing evicted: the same kernels on the same tensors
        assert np.array_equal(r1.action_token_ids, r2.action_token_ids)


def test_step_result_reports_the_largest_position_the_model_saw(model):
    cfg = EpisodeCacheConfig(policy="window", chunk_size=STEP, recent_chunks=2, max_tokens=None)
    rt = EpisodeRuntime(model, cache_config=cfg)
    seen: list[int] = []

    def hook(module, args, kwargs):
        seen.append(int(kwargs["position_ids"].max()))

    handle = model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        rt.reset(INSTR)
        for f in _frames(5):
            assert rt.step(f).max_position_id == max(seen)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def short_range_model() -> CompactVLA:
    """A model whose ``max_position_embeddings`` an episode passes within a few steps."""
    torch.manual_seed(0)
    return CompactVLA(CompactVLAConfig.tiny(max_position_embeddings=128)).eval()


def test_episode_positions_past_the_model_range_warn_once_per_episode(short_range_model):
    from kv_vla.cache.positions import PositionRangeWarning

    cfg = EpisodeCacheConfig(policy="window", chunk_size=STEP, recent_chunks=2, max_tokens=None)
    rt = EpisodeRuntime(short_range_model, cache_config=cfg)
    assert rt.position_limit == 128
    for _ in range(2):  # the note is per episode: a new episode warns again
        rt.reset(INSTR)
        with pytest.warns(PositionRangeWarning, match="max_position_embeddings 128") as caught:
            results = [rt.step(f) for f in _frames(10)]
        assert len([w for w in caught if w.category is PositionRangeWarning]) == 1
        first_out = next(r.step_index for r in results if r.max_position_id >= 128)
        assert "positions:=cache" in rt.position_note and results[first_out - 1].max_position_id < 128


def test_cache_positions_stay_in_range_and_do_not_warn(short_range_model):
    import warnings

    from kv_vla.cache.positions import PositionRangeWarning

    cfg = EpisodeCacheConfig(
        policy="window", chunk_size=STEP, recent_chunks=2, max_tokens=None, positions="cache"
    )
    rt = EpisodeRuntime(short_range_model, cache_config=cfg)
    rt.reset(INSTR)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PositionRangeWarning)
        results = [rt.step(f) for f in _frames(10)]
    assert max(r.max_position_id for r in results) < 128 and rt.position_note is None
