"""Static storage (preallocated slots) equals the dynamic storage, and allocates no KV per step."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig, disable_attention_probe, enable_attention_probe
from kv_vla.cache.testing import FAMILIES, run_episode

PROMPT = list(range(3, 13))  # 10 pinned tokens
STEPS, OBS, DECODE = 40, 12, 3
CHUNK = OBS + DECODE

BOUNDED = {
    "none": dict(),
    "window": dict(recent_chunks=3),
    "sinks": dict(sink_tokens=4, recent_chunks=2),
    "attention": dict(sink_tokens=4, recent_chunks=2, max_tokens=120),
    "random": dict(recent_chunks=1, max_tokens=100, seed=3),
    "gated": dict(recent_chunks=2, max_tokens=130, gate_threshold=0.45),
}
CASES = [("llama", p) for p in sorted(BOUNDED)] + [(f, "gated") for f in FAMILIES if f != "llama"]


def _episode(model, policy: str, storage: str, steps: int = STEPS, on_step=None, **options):
    cfg = EpisodeCacheConfig(policy=policy, chunk_size=CHUNK, storage=storage, **BOUNDED[policy], **options)
    cache = EpisodeCache(cfg, model.config)
    if policy == "attention":
        enable_attention_probe(model)
    try:
        record = run_episode(model, cache, PROMPT, steps, OBS, DECODE, seed=1, on_step=on_step)
    finally:
        disable_attention_probe(model)
    return cache, record


@pytest.mark.parametrize("family,policy", CASES)
def test_static_storage_equals_dynamic(tiny_models, family, policy):
    model = tiny_models(family)
    bytes_seen: dict[str, list[int]] = {"dynamic": [], "static": []}
    out = {}
    for storage in ("dynamic", "static"):
        out[storage] = _episode(
            model, policy, storage, on_step=lambda s, c, k=storage: bytes_seen[k].append(c.stats().kv_bytes)
        )
    (dyn, ref), (sta, got) = out["dynamic"], out["static"]
    assert got.ids == ref.ids
    # same kernels on the same values; only the summation order over (masked) slots differs
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, ref.logits)) <= 1e-6
    assert bytes_seen["static"] == bytes_seen["dynamic"]  # KV accounting unchanged, step by step
    s, d = sta.stats(), dyn.stats()
    assert d.evicted_chunks > 5 and s.evicted_tokens == d.evicted_tokens
    assert torch.equal(sta.kept_positions(), dyn.kept_positions())
    assert s.kv_bytes_reserved >= s.kv_bytes and d.kv_bytes_reserved == d.kv_bytes
    assert all(layer.grows == 0 for layer in sta.layers)


@pytest.mark.parametrize("policy", ["sinks", "gated"])
def test_static_storage_equals_dynamic_in_cache_positions(tiny_models, policy):
    """``cache`` positions re-rotate kept keys when a gap closes: in their slots for static storage."""
    model = tiny_models("llama")
    (dyn, ref), (sta, got) = (_episode(model, policy, s, positions="cache") for s in ("dynamic", "static"))
    assert got.ids == ref.ids and dyn.stats().evicted_chunks > 5
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, ref.logits)) <= 1e-6
    assert sta.stats().kv_bytes == dyn.stats().kv_bytes


class _KVAllocations(TorchDispatchMode):
    """Counts freshly allocated tensors shaped like a layer's KV ``[B, H_kv, L, D]`` with ``L`` longer
    than the forward's block (a concatenated or gathered history), and the bytes of all fresh tensors."""

    def __init__(self, kv_heads: int, head_dim: int, block: int):
        super().__init__()
        self.kv_heads, self.head_dim, self.block = kv_heads, head_dim, block
        self.kv = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in inputs:
                continue
            if (
                t.ndim == 4
                and t.shape[1] == self.kv_heads
                and t.shape[3] == self.head_dim
                and t.shape[2] > self.block
            ):
                self.kv += 1
        return out


@torch.no_grad()
def _continue(model, cache, steps: int) -> int:
    """``steps`` more control steps of an episode (as run_episode drives them); returns tokens fed."""
    gen = torch.Generator().manual_seed(5)
    fed = 0
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (1, OBS), generator=gen)
        for _ in range(DECODE + 1):
            start = cache.get_seq_length()
            pos = torch.arange(start, start + ids.shape[1])[None]
            mask = cache.attention_mask(ids.shape[1])
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
            fed += ids.shape[1]
            ids = out.logits[:, -1:].argmax(-1)
    return fed


@pytest.mark.parametrize("policy", ["window", "random", "gated"])
def test_static_steady_state_allocates_no_kv(tiny_models, policy):
    model = tiny_models("llama")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    counts = {}
    for storage in ("dynamic", "static"):
        cache, _ = _episode(model, policy, storage, steps=12)
        ptrs = [(ly.keys.data_ptr(), ly.values.data_ptr()) for ly in cache.layers]
        mode = _KVAllocations(cfg.num_key_value_heads, head_dim, OBS)
        with mode:
            assert _continue(model, cache, 6) == 6 * CHUNK  # the same episode, 6 steps on
        counts[storage] = mode.kv
        if storage == "static":
            assert [(ly.keys.data_ptr(), ly.values.data_ptr()) for ly in cache.layers] == ptrs
    assert counts["dynamic"] > 0  # the counter sees the dynamic storage's concatenations
    assert counts["static"] == 0


def test_static_refusals_and_missing_mask(tiny_models):
    with pytest.raises(ValueError, match="storage: 'static' needs a bounded policy"):
        EpisodeCacheConfig(policy="full", storage="static")
    with pytest.raises(ValueError, match="needs a bounded policy"):
        EpisodeCacheConfig(policy="gated", max_tokens=None, storage="static")
    with pytest.raises(ValueError, match="low-bit codes"):
        EpisodeCacheConfig(policy="gated_tiered", max_tokens=200, storage="static")
    with pytest.raises(ValueError, match="storage: 'paged' is not allowed; allowed values: dynamic, static"):
        EpisodeCacheConfig(policy="window", storage="paged")
    cfg = EpisodeCacheConfig(policy="window", chunk_size=CHUNK, storage="static")
    with pytest.raises(ValueError, match="max_tokens=None keeps an unbounded"):
        EpisodeCacheConfig(policy="random", max_tokens=100, storage="static").replace(max_tokens=None)
    model = tiny_models("llama")
    cache = EpisodeCache(cfg, model.config)
    with pytest.raises(ValueError, match=r"attention_mask=cache\.attention_mask"):
        model(input_ids=torch.tensor([PROMPT]), past_key_values=cache, use_cache=True)


def test_static_buffers_grow_once_on_a_larger_budget(tiny_models):
    model = tiny_models("llama")
    logits = {}
    for storage in ("dynamic", "static"):
        cfg = EpisodeCacheConfig(
            policy="random", chunk_size=CHUNK, recent_chunks=1, max_tokens=60, storage=storage
        )
        cache = EpisodeCache(cfg, model.config)

        def grow(step, c):
            if step == 10:
                c.update_config(max_tokens=160)

        record = run_episode(model, cache, PROMPT, 30, OBS, DECODE, seed=2, on_step=grow)
        logits[storage] = torch.cat(record.logits, dim=1)
        if storage == "static":
            assert [ly.grows for ly in cache.layers] == [1] * len(cache.layers)
            assert (
                cache.stats().kv_bytes_reserved >= 160 * cache.stats().kv_bytes // cache.stats().kept_tokens
            )
    assert (logits["static"] - logits["dynamic"]).abs().max().item() <= 1e-6


def test_block_mask_shows_held_slots_and_the_block_causally(tiny_models):
    """The additive mask, checked slot by slot after an episode of random evictions (held slots
    scattered, free slots between them): query i sees every held slot and block tokens 0..i."""
    cache, _ = _episode(tiny_models("llama"), "random", "static", steps=25)
    layer = cache.layers[0]
    for n in (OBS, 1):
        reserved = layer.reserve(n, layer.capacity).tolist()
        mask = layer.block_mask(n, torch.float32, torch.device("cpu"))
        assert mask.shape == (1, 1, n, layer.span)
        held = set(layer.slots.tolist())
        assert len(held) > 0 and len(held) + n < layer.span  # free slots inside the span too
        want = torch.full((n, layer.span), torch.finfo(torch.float32).min)
        for i in range(n):
            for s in range(layer.span):
                if s in held or (s in reserved and reserved.index(s) <= i):
                    want[i, s] = 0.0
        assert torch.equal(mask[0, 0], want)
        layer.truncate(layer.held_tokens())  # drop the reservation
