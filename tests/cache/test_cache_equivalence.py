"""The episode cache equals DynamicCache with eviction off, and the masked reference with it on."""

from __future__ import annotations

import pytest
import torch
from numerics import near_ties
from transformers import DynamicCache

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig
from kv_vla.cache.testing import FAMILIES, EpisodeRecord, reference_logits, run_episode

PROMPT = list(range(3, 13))  # 10-token instruction prefix, pinned
STEPS, OBS, DECODE = 30, 12, 3
CHUNK = OBS + DECODE  # one chunk = one control step

# Every policy, configured so that it really evicts within 30 steps.
POLICY_CONFIGS = {
    "none": dict(),
    "window": dict(recent_chunks=3),
    "sinks": dict(sink_tokens=4, recent_chunks=2),
    "attention": dict(sink_tokens=4, recent_chunks=2, max_tokens=120),
    "random": dict(recent_chunks=1, max_tokens=100, seed=3),
    "gated": dict(recent_chunks=2, max_tokens=130, gate_threshold=0.45),
}


def _episode(model, cache) -> EpisodeRecord:
    return run_episode(model, cache, PROMPT, STEPS, OBS, DECODE, seed=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_policy_equals_dynamic_cache(tiny_models, family):
    model = tiny_models(family)
    ref = _episode(model, DynamicCache(config=model.config))
    cache = EpisodeCache(EpisodeCacheConfig(policy="full", chunk_size=CHUNK), model.config)
    got = _episode(model, cache)
    assert got.ids == ref.ids
    for a, b in zip(got.logits, ref.logits):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).abs().max().item() <= 1e-6
    stats = cache.stats()
    assert stats.kept_tokens == stats.seen_tokens == len(ref.ids)
    assert stats.evicted_tokens == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", sorted(POLICY_CONFIGS))
def test_evicting_policy_equals_masked_reference(tiny_models, family, policy):
    from kv_vla.cache import disable_attention_probe, enable_attention_probe

    model = tiny_models(family)
    cfg = EpisodeCacheConfig(policy=policy, chunk_size=CHUNK, **POLICY_CONFIGS[policy])
    cache = EpisodeCache(cfg, model.config)
    if policy == "attention":
        enable_attention_probe(model)
    try:
        record = _episode(model, cache)
    finally:
        disable_attention_probe(model)
    stats = cache.stats()
    assert stats.evicted_chunks > 0 and stats.evicted_tokens > 0
    assert stats.kept_tokens + stats.evicted_tokens == stats.seen_tokens == len(record.ids)
    # the pinned prompt survives every policy
    assert torch.equal(cache.kept_positions()[: len(PROMPT)], torch.arange(len(PROMPT)))
    ref = reference_logits(model, record)
    got = torch.cat(record.logits, dim=1)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_generate_continues_from_evicted_cache(tiny_models, family):
    model = tiny_models(family)
    cfg = EpisodeCacheConfig(policy="window", chunk_size=CHUNK, recent_chunks=2)
    cache = EpisodeCache(cfg, model.config)
    record = run_episode(model, cache, PROMPT, 8, OBS, DECODE, seed=2)
    assert cache.stats().evicted_tokens > 0

    # record what the cache holds at the start of each forward that generate() makes
    seen: list[tuple[int, torch.Tensor]] = []

    def pre_hook(module, args, kwargs):
        seen.append((cache.get_seq_length(), cache.kept_positions()))

    new_ids = [5, 17, 29, 41, 53, 7, 19, 31, 43, 55, 8, 20]  # 12 observation tokens
    ids = torch.tensor([record.ids + new_ids])
    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=20,
            do_sample=False,
        )
    finally:
        handle.remove()
    generated = out[0, ids.shape[1] :].tolist()
    assert len(generated) == 20
    assert any(kept.numel() < start for start, kept in seen[1:])  # evictions happened during generate

    # the reference: one uncached forward with the masks the cache implied, greedy at each step
    full = EpisodeRecord(ids=record.ids + new_ids + generated[:-1])
    full.blocks, full.kept_before = list(record.blocks), list(record.kept_before)
    starts = [s for s, _ in seen] + [len(full.ids)]
    for (start, kept), end in zip(seen, starts[1:]):
        full.blocks.append((start, end))
        full.kept_before.append(kept)
    logits = reference_logits(model, full)
    # greedy tokens match the reference's argmax except at near ties (other kernels: stated bound)
    for end, token in zip(starts[1:], generated, strict=True):
        row = logits[0, end - 1]
        assert token == int(row.argmax()) or bool(near_ties(row)), (end, token, int(row.argmax()))


def test_live_config_changes_keep_reference_semantics(tiny_models):
    """Changing policy, budget and chunk size mid-episode still equals the masked reference."""
    model = tiny_models("qwen2")
    cache = EpisodeCache(EpisodeCacheConfig(policy="full", chunk_size=CHUNK), model.config)

    def change(step, cache):
        if step == 5:
            cache.update_config(policy="random", max_tokens=110, recent_chunks=1)
        elif step == 12:
            cache.update_config(policy="window", max_tokens=None, recent_chunks=2, chunk_size=2 * CHUNK)

    record = run_episode(model, cache, PROMPT, 20, OBS, DECODE, seed=4, on_step=change)
    assert cache.stats().evicted_chunks > 0
    assert cache.chunks[-1].length == 2 * CHUNK
    ref = reference_logits(model, record)
    assert (torch.cat(record.logits, dim=1) - ref).abs().max().item() <= 1e-5


def test_reset_cache_equals_fresh_cache(tiny_models):
    model = tiny_models("llama")
    cfg = EpisodeCacheConfig(policy="sinks", chunk_size=CHUNK, sink_tokens=4, recent_chunks=1)
    reused = EpisodeCache(cfg, model.config)
    run_episode(model, reused, PROMPT, 6, OBS, DECODE, seed=5)
    reused.reset()
    again = run_episode(model, reused, PROMPT, 6, OBS, DECODE, seed=6)
    fresh = run_episode(model, EpisodeCache(cfg, model.config), PROMPT, 6, OBS, DECODE, seed=6)
    assert again.ids == fresh.ids
    for a, b in zip(again.logits, fresh.logits):
        assert torch.equal(a, b)
