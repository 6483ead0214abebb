"""Shared pytest fixtures (kept small: tiny seeded models only)."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread unless the caller chose a count: tiny models gain nothing from threads, and on
# two cores shared with node subprocesses OpenMP spin-waits slow the suite severalfold. With
# OMP_NUM_THREADS set, torch keeps that count (the suite must pass with 1 and 2).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models():
    """Factory of cached tiny random decoders: ``tiny_models(family, seed=0)`` (float32, eval)."""
    from kv_vla.cache.testing import tiny_model

    built = {}

    def get(family: str, seed: int = 0):
        if (family, seed) not in built:
            built[(family, seed)] = tiny_model(family, seed=seed)
        return built[(family, seed)]

    return get
