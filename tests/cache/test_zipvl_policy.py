"""``zipvl`` and ``gated_tiered`` on a tiny Llama: logits equal a reference over dequantised KV.

The reference (tests/cache/lockstep.py) mirrors the cache's decisions on a full-precision copy of
the KV (evicted columns dropped, low-precision chunks replaced by ``dequantize(quantize(...))``)
and runs each block through a plain ``DynamicCache``. Logits must agree to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from lockstep import CHUNK, DECODE, OBS, PROMPT, STEPS, LockstepReference, run_lockstep

import kv_vla.cache.policies.zipvl  # noqa: F401  (registers zipvl and gated_tiered)
from kv_vla.cache import EpisodeCache, EpisodeCacheConfig, disable_attention_probe, enable_attention_probe
from kv_vla.cache.testing import run_episode


def _layer_bits(cache: EpisodeCache) -> list[list[int]]:
    return [c.meta.get("layer_bits", [16] * cache.num_layers) for c in cache.chunks if not c.evicted]


@pytest.mark.parametrize("bits", [4, 2])
def test_zipvl_logits_equal_dequantized_reference(tiny_models, bits):
    model = tiny_models("llama")
    cfg = EpisodeCacheConfig(
        policy="zipvl", chunk_size=CHUNK, recent_chunks=2, max_tokens=None, tau=0.6, low_bits=bits
    )
    cache = EpisodeCache(cfg, model.config)
    enable_attention_probe(model)
    try:
        worst, _, ref = run_lockstep(model, cache, bits, 32)
    finally:
        disable_attention_probe(model)
    assert worst <= 1e-5
    layer_bits = _layer_bits(cache)
    flat = [b for row in layer_bits for b in row]
    assert bits in flat and 16 in flat  # some chunks low, some full
    # per-layer decisions: at least one chunk is low in one layer and full in another
    assert any(len(set(row)) > 1 for row in layer_bits)
    assert len(ref.low) > 0
    # the reference really attends to different KV (so a store that skipped quantising would fail)
    assert ref.max_change > 1e-2
    stats = cache.stats()
    assert stats.evicted_tokens == 0 and stats.kept_tokens == stats.seen_tokens  # zipvl never evicts
    dense_bytes = cache.num_layers * 2 * stats.kept_tokens * cache.layers[0].keys[0, :, 0].numel() * 4
    assert stats.kv_bytes < dense_bytes
    # layer-adaptive ratio: one p per layer per decision, in (0, 1]
    hist = cache.policy.ratio_history
    assert len(hist) == STEPS - cfg.recent_chunks and all(len(r) == cache.num_layers for r in hist)
    assert all(0.0 < p <= 1.0 for r in hist for p in r)


def test_zipvl_with_budget_evicts_and_still_matches(tiny_models):
    model = tiny_models("llama")
    cfg = EpisodeCacheConfig(
        policy="zipvl", chunk_size=CHUNK, recent_chunks=2, max_tokens=150, tau=0.7, low_bits=2
    )
    cache = EpisodeCache(cfg, model.config)
    enable_attention_probe(model)
    try:
        worst, _, _ = run_lockstep(model, cache, 2, 32)
    finally:
        disable_attention_probe(model)
    assert worst <= 1e-5
    stats = cache.stats()
    assert stats.evicted_chunks > 0 and stats.kept_tokens <= 150


def test_tiered_gate_chooses_full_low_or_evicted(tiny_models):
    model = tiny_models("llama")
    base = dict(policy="gated_tiered", chunk_size=CHUNK, recent_chunks=2, seed=0, max_tokens=None)
    # First pass: learn the (untrained, seeded) gate's utilities, to set thresholds at tertiles.
    probe_cache = EpisodeCache(
        EpisodeCacheConfig(**base, gate_threshold=0.0, full_threshold=1.0), model.config
    )
    run_episode(model, probe_cache, PROMPT, STEPS, OBS, DECODE, seed=1)
    utilities = torch.tensor([c.utility for c in probe_cache.chunks])
    low, high = (float(q) for q in torch.quantile(utilities, torch.tensor([0.33, 0.66])))
    cfg = EpisodeCacheConfig(**base, gate_threshold=low, full_threshold=high, low_bits=4)
    cache = EpisodeCache(cfg, model.config)
    worst, _, _ = run_lockstep(model, cache, 4, 32)
    assert worst <= 1e-5
    cache.maybe_evict()  # the decision left pending by the last chunk
    # evicted chunks leave no record behind, only a count; every kept one has the fate of its utility
    fates = {"full": 0, "int4": 0, "evicted": cache.stats().evicted_chunks}
    for c in cache.chunks[: -cfg.recent_chunks]:
        fates[c.precision] += 1
        expected = "evicted" if c.utility < low else ("int4" if c.utility < high else "full")
        assert c.precision == expected
    assert all(n > 0 for n in fates.values()), fates


def test_tiered_thresholds_are_validated():
    with pytest.raises(ValueError, match="full_threshold"):
        EpisodeCacheConfig(policy="gated_tiered", gate_threshold=0.6, full_threshold=0.5)
    with pytest.raises(ValueError, match="low_bits"):
        EpisodeCacheConfig(policy="zipvl", low_bits=3)
    with pytest.raises(ValueError, match="tau"):
        EpisodeCacheConfig(policy="zipvl", tau=0.0)


def test_zipvl_without_probe_says_how_to_enable_it(tiny_models):
    model = tiny_models("llama")
    cache = EpisodeCache(
        EpisodeCacheConfig(policy="zipvl", chunk_size=CHUNK, recent_chunks=0, max_tokens=None), model.config
    )
    with torch.no_grad(), pytest.raises(RuntimeError, match="enable_attention_probe"):
        for _ in range(3):
            model(input_ids=torch.tensor([list(range(CHUNK))]), past_key_values=cache, use_cache=True)
            cache.maybe_evict()


def _drive_hand_made(cache: EpisodeCache, n_chunks: int, chunk: int, heads: int, dim: int, g) -> None:
    """Decode-like forwards straight into the cache: layer 0 peaked on the first chunk, layer 1 flat."""
    for _ in range(n_chunks):
        for _ in range(chunk):
            kept = cache.kept_positions().numel()
            for layer in range(2):
                k = torch.randn(1, heads, 1, dim, generator=g)
                cache.update(k, k, layer)
                if layer == 0:
                    mass = torch.zeros(kept + 1)
                    mass[: min(chunk, kept + 1)] = 1.0
                else:
                    mass = torch.ones(kept + 1)
                cache.record_attention(layer, mass / mass.sum())


def test_ratio_adapts_per_layer_to_hand_made_attention():
    """Layer 0 attends to one chunk, layer 1 spreads evenly: p is small in 0, large in 1, and only
    layer 0 stores the unattended chunks at low precision."""
    from kv_vla.cache.testing import tiny_config

    heads, dim, chunk, n_chunks = 2, 8, 5, 8
    cfg = EpisodeCacheConfig(
        policy="zipvl",
        chunk_size=chunk,
        recent_chunks=0,
        probe_queries=1,
        max_tokens=None,
        tau=0.8,
        low_bits=2,
    )
    cache = EpisodeCache(cfg, tiny_config("llama", layers=2))
    _drive_hand_made(cache, n_chunks, chunk, heads, dim, torch.Generator().manual_seed(0))
    cache.maybe_evict()
    p0, p1 = cache.policy.last_ratios
    assert p0 == pytest.approx(1 / n_chunks)  # one chunk of eight holds all of layer 0's attention
    assert p1 >= 0.75  # a flat layer needs ~tau of its chunks
    bits = {c.index: c.meta["layer_bits"] for c in cache.chunks}
    assert bits[0] == [16, 16]
    assert all(bits[i][0] == 2 for i in range(1, n_chunks))
    assert sum(bits[i][1] == 16 for i in range(n_chunks)) >= 6
    stats = cache.stats()
    assert stats.kv_bytes_per_layer[0] < stats.kv_bytes_per_layer[1]


def test_bfloat16_model_matches_reference_and_policy_switch_mid_episode_adopts_layers(tiny_models):
    """bf16 weights and KV (scales stay float16); the cache starts as ``full`` and switches to
    ``zipvl`` mid-episode, so its layers are swapped for mixed-precision ones holding the data."""
    from kv_vla.cache.quant.store import MixedPrecisionLayer
    from kv_vla.cache.testing import tiny_model

    model = tiny_model("llama", seed=1).to(torch.bfloat16)
    cache = EpisodeCache(EpisodeCacheConfig(policy="full", chunk_size=CHUNK, max_tokens=None), model.config)
    enable_attention_probe(model)
    try:
        worst, _, _ = run_lockstep(model, cache, 4, 32, steps=4)
        cache.update_config(policy="zipvl", recent_chunks=1, tau=0.5, low_bits=4)
        assert all(isinstance(layer, MixedPrecisionLayer) for layer in cache.layers)
        assert cache.layers[0].held_tokens() == cache.stats().kept_tokens
        ref = LockstepReference(cache, 4, 32)
        # continue the same episode in lockstep: seed the reference with the cache's tensors
        ref.keys = [layer.keys.clone() for layer in cache.layers]
        ref.values = [layer.values.clone() for layer in cache.layers]
        ref.positions = cache.kept_positions()
        gen = torch.Generator().manual_seed(5)
        for _ in range(8):
            for tokens in (torch.randint(0, 96, (OBS,), generator=gen).tolist(), [1], [2], [3]):
                start = cache.get_seq_length()
                ref.sync(cache.kept_positions())
                ids = torch.tensor([tokens])
                pos = torch.arange(start, start + len(tokens)).unsqueeze(0)
                with torch.no_grad():
                    expected = ref.forward(model, ids, pos)
                    got = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits
                assert got.dtype == torch.bfloat16
                assert torch.equal(got, expected)
    finally:
        disable_attention_probe(model)
    assert worst == 0.0
    assert ref.low, "nothing was stored at low precision"


def test_live_option_changes_apply_at_the_next_decision():
    from kv_vla.cache.testing import tiny_config

    cfg = EpisodeCacheConfig(
        policy="zipvl", chunk_size=5, recent_chunks=0, probe_queries=1, max_tokens=None, low_bits=4
    )
    cache = EpisodeCache(cfg, tiny_config("llama", layers=2))
    g = torch.Generator().manual_seed(1)
    _drive_hand_made(cache, 4, 5, 2, 8, g)
    cache.maybe_evict()
    before = {c.index: c.meta["layer_bits"][0] for c in cache.chunks}
    assert before[0] == 16 and set(before.values()) == {4, 16}
    with pytest.raises(ValueError, match="low_bits"):
        cache.update_config(low_bits=3)
    cache.update_config(low_bits=2)
    _drive_hand_made(cache, 4, 5, 2, 8, g)
    cache.maybe_evict()
    after = {c.index: c.meta["layer_bits"][0] for c in cache.chunks}
    assert all(after[i] == before[i] for i in before)  # earlier chunks keep their storage
    assert {after[i] for i in after if i not in before} == {2}  # new ones use the new width
    layer = cache.layers[0]
    assert {s.keys.bits for s in layer.segments} == {2, 4}
