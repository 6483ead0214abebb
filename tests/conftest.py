"""Shared pytest fixtures (kept small: tiny seeded models only)."""

from __future__ import annotations

import pytest
import torch

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
