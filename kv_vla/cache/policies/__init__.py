"""Chunk eviction policies, one per file (kvpress style), and their registry.

``POLICIES`` maps a policy name to its class; extensions register theirs with
:func:`register_policy` (e.g. a low-precision ``zipvl`` policy) so configuration validation and the
cache pick them up.
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

POLICIES: dict[str, type[ChunkPolicy]] = {
    cls.name: cls
    for cls in (
        FullPolicy,
        NoHistoryPolicy,
        WindowPolicy,
        SinksPolicy,
        AttentionPolicy,
        RandomPolicy,
        GatedPolicy,
    )
}


def register_policy(cls: type[ChunkPolicy]) -> type[ChunkPolicy]:
    """Add ``cls`` to ``POLICIES`` under ``cls.name`` (usable as a class decorator)."""
    POLICIES[cls.name] = cls
    return cls


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
