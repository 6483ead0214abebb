"""Batch operations of DynamicCache (beam reordering, repeat, select, iteration) on the episode cache,
including chunks held at low precision."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig, disable_attention_probe, enable_attention_probe

POLICIES = {
    "window": dict(recent_chunks=1),
    "zipvl": dict(recent_chunks=1, tau=0.5),
    "gated_tiered": dict(recent_chunks=1, gate_threshold=0.2, full_threshold=0.9),
}


@torch.no_grad()
def _batch_episode(model, cache, steps: int = 6, batch: int = 2):
    gen = torch.Generator().manual_seed(3)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        start = cache.get_seq_length()
        pos = torch.arange(start, start + ids.shape[1]).expand(batch, -1)
        return model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits

    forward(torch.randint(0, 96, (batch, 10), generator=gen))
    cache.pin_prefix()
    for _ in range(steps):
        logits = forward(torch.randint(0, 96, (batch, 12), generator=gen))
        for _ in range(3):
            logits = forward(logits[:, -1:].argmax(-1))
    cache.maybe_evict()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_reorder_cache_moves_every_chunk_with_its_row(tiny_models, policy):
    model = tiny_models("llama")
    cache = EpisodeCache(EpisodeCacheConfig(policy=policy, chunk_size=15, **POLICIES[policy]), model.config)
    enable_attention_probe(model)
    try:
        _batch_episode(model, cache)
        if policy != "window":  # the low-precision store really holds chunks
            assert any(c.precision != "full" for c in cache.chunks if not c.evicted)
        before = copy.deepcopy(cache)
        beam_idx = torch.tensor([1, 1])  # beam search: both beams continue row 1
        cache.reorder_cache(beam_idx)
        block = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(9)).expand(2, -1)
        pos = torch.arange(cache.get_seq_length(), cache.get_seq_length() + 5).expand(2, -1)
        with torch.no_grad():
            got = model(input_ids=block, position_ids=pos, past_key_values=cache).logits
            ref = model(input_ids=block, position_ids=pos, past_key_values=before).logits
    finally:
        disable_attention_probe(model)
    # same kernels on the same rows, batch computed together: equal within float32 rounding
    assert (got[0] - ref[1]).abs().max().item() <= 1e-6
    assert (got[1] - ref[1]).abs().max().item() <= 1e-6
    assert (got[0] - ref[0]).abs().max().item() > 1e-3  # the rows really differ


@pytest.mark.parametrize("policy", ["window", "zipvl"])
def test_repeat_select_and_iterate_like_dynamic_cache(tiny_models, policy):
    model = tiny_models("llama")
    cache = EpisodeCache(EpisodeCacheConfig(policy=policy, chunk_size=15, **POLICIES[policy]), model.config)
    enable_attention_probe(model)
    try:
        _batch_episode(model, cache, steps=4)
    finally:
        disable_attention_probe(model)
    original = [(k.clone(), v.clone()) for k, v, _ in cache]
    assert len(original) == model.config.num_hidden_layers
    cache.batch_repeat_interleave(3)
    assert all(k.shape[0] == 6 for k, _, _ in cache)
    cache.batch_select_indices(torch.tensor([0, 3]))
    for (k0, v0), (k, v, window) in zip(original, cache):
        assert window is None
        assert torch.equal(k, k0) and torch.equal(v, v0)
    # DynamicCache's own iteration has the same shape: (keys, values, sliding-window tensor or None)
    dc = DynamicCache()
    dc.update(*original[0], 0)
    assert len(next(iter(dc))) == len(next(iter(cache)))


def test_beam_search_generate_runs_on_low_precision_chunks(tiny_models):
    model = tiny_models("llama")
    cache = EpisodeCache(EpisodeCacheConfig(policy="zipvl", chunk_size=15, recent_chunks=1), model.config)
    enable_attention_probe(model)
    try:
        ids = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(2))
        out = model.generate(ids, past_key_values=cache, num_beams=2, max_new_tokens=12, do_sample=False)
    finally:
        disable_attention_probe(model)
    assert out.shape == (1, 72)
