"""Chunk eviction policies, one per file (kvpress style), registered by name.

``POLICIES`` (:mod:`kv_vla.cache.registry`) maps a policy name to its class; extensions register
theirs with :func:`register_policy` (e.g. the low-precision ``zipvl`` policies) so configuration
validation and the cache pick them up.
"""

from __future__ import annotations

from kv_vla.cache.policies.attention import AttentionPolicy
from kv_vla.cache.policies.base import ChunkPolicy, PolicyContext
from kv_vla.cache.policies.full import FullPolicy
from kv_vla.cache.policies.gated import GatedPolicy
from kv_vla.cache.policies.none import NoHistoryPolicy
from kv_vla.cache.policies.random_eviction import RandomPolicy
from kv_vla.cache.policies.sinks import SinksPolicy
from kv_vla.cache.policies.window import WindowPolicy
from kv_vla.cache.registry import POLICIES, register_policy

for _cls in (
    FullPolicy,
    NoHistoryPolicy,
    WindowPolicy,
    SinksPolicy,
    AttentionPolicy,
    RandomPolicy,
    GatedPolicy,
):
    register_policy(_cls)


# Extensions that live in this package register themselves on import (optional files).
_EXTENSIONS = ("kv_vla.cache.policies.zipvl",)


def _load_extensions() -> None:
    import importlib

    for module in _EXTENSIONS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


_load_extensions()

__all__ = [
    "POLICIES",
    "AttentionPolicy",
    "ChunkPolicy",
    "FullPolicy",
    "GatedPolicy",
    "NoHistoryPolicy",
    "PolicyContext",
    "RandomPolicy",
    "SinksPolicy",
    "WindowPolicy",
    "register_policy",
]
