"""Every registered cache policy against its reference, on tiny random decoders (kvpress style).

One row per policy in ``MATRIX``: its options (chosen so that it really evicts or compresses within
30 steps) and its reference. ``full`` equals ``DynamicCache``; an evicting policy equals full
attention with the evicted positions masked out; a low-precision policy equals a lockstep reference
over dequantised KV (tests/cache/lockstep.py). A policy in the registry without a row fails
``test_matrix_covers_every_registered_policy``: add the row (docs/ARCHITECTURE.md, "How to add a
cache policy").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from lockstep import CHUNK, DECODE, OBS, PROMPT, STEPS, run_lockstep
from transformers import DynamicCache

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig, disable_attention_probe, enable_attention_probe
from kv_vla.cache.policies import POLICIES
from kv_vla.cache.testing import FAMILIES, EpisodeRecord, reference_logits, run_episode


@dataclass(frozen=True)
class Case:
    """Options of one policy and the reference it must equal ("dynamic", "masked", "dequantized")."""

    reference: str
    options: dict[str, Any] = field(default_factory=dict)
    low_bits: int = 16  # bits of the low-precision tier (dequantized reference only)


MATRIX: dict[str, Case] = {
    "full": Case("dynamic"),
    "none": Case("masked"),
    "window": Case("masked", dict(recent_chunks=3, max_tokens=None)),
    "sinks": Case("masked", dict(sink_tokens=4, recent_chunks=2, max_tokens=None)),
    "attention": Case("masked", dict(sink_tokens=4, recent_chunks=2, max_tokens=120)),
    "random": Case("masked", dict(recent_chunks=1, max_tokens=100, seed=3)),
    "gated": Case("masked", dict(recent_chunks=2, max_tokens=130, gate_threshold=0.45)),
    "zipvl": Case("dequantized", dict(recent_chunks=2, max_tokens=None, tau=0.6, low_bits=4), low_bits=4),
    # the seeded untrained gate's utilities on this episode lie in 0.46-0.48: these thresholds
    # put some chunks in each tier (evicted / int4 / full)
    "gated_tiered": Case(
        "dequantized",
        dict(recent_chunks=2, max_tokens=None, seed=0, gate_threshold=0.472, full_threshold=0.476, low_bits=4),
        low_bits=4,
    ),
}


def test_matrix_covers_every_registered_policy():
    missing = sorted(set(POLICIES) - set(MATRIX))
    assert not missing, f"policies without a row in MATRIX (add one): {missing}"
    assert not sorted(set(MATRIX) - set(POLICIES)), "MATRIX lists policies that are not registered"


def _episode(model, cache) -> EpisodeRecord:
    return run_episode(model, cache, PROMPT, STEPS, OBS, DECODE, seed=1)


def _cases(reference: str) -> list[str]:
    return sorted(name for name, case in MATRIX.items() if case.reference == reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_policy_equals_dynamic_cache(tiny_models, family):
    assert _cases("dynamic") == ["full"]
    model = tiny_models(family)
    ref = _episode(model, DynamicCache(config=model.config))
    cache = EpisodeCache(EpisodeCacheConfig(policy="full", chunk_size=CHUNK), model.config)
    got = _episode(model, cache)
    assert got.ids == ref.ids
    for a, b in zip(got.logits, ref.logits):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).abs().max().item() <= 1e-6  # same kernels, different KV storage order
    stats = cache.stats()
    assert stats.kept_tokens == stats.seen_tokens == len(ref.ids)
    assert stats.evicted_tokens == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", _cases("masked"))
def test_evicting_policy_equals_masked_reference(tiny_models, family, policy):
    model = tiny_models(family)
    cfg = EpisodeCacheConfig(policy=policy, chunk_size=CHUNK, **MATRIX[policy].options)
    cache = EpisodeCache(cfg, model.config)
    if POLICIES[policy].needs_attention:
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
    assert (got - ref).abs().max().item() <= 1e-5  # float32, masked full attention vs cached


@pytest.mark.parametrize("policy", _cases("dequantized"))
def test_low_precision_policy_equals_dequantized_reference(tiny_models, policy):
    model = tiny_models("llama")
    case = MATRIX[policy]
    cache = EpisodeCache(EpisodeCacheConfig(policy=policy, chunk_size=CHUNK, **case.options), model.config)
    if POLICIES[policy].needs_attention:
        enable_attention_probe(model)
    try:
        worst, _, ref = run_lockstep(model, cache, case.low_bits, 32)
    finally:
        disable_attention_probe(model)
    assert worst <= 1e-5  # float32, same dequantised KV through DynamicCache vs the mixed store
    assert len(ref.low) > 0 and ref.max_change > 1e-2  # it really stored something at low precision
