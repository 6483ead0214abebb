"""``full``: keep the whole episode (eviction off)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kv_vla.cache.policies.base import ChunkPolicy


@dataclass
class FullPolicy(ChunkPolicy):
    """Keep every token: the reference "full history" behaviour (equals ``DynamicCache``).

    It never evicts, so ``max_tokens`` does not apply to it (``EpisodeCacheConfig.effective_max_tokens``
    is None): the default budget, tuned for the evicting policies, must not stop a full-history run.
    """

    name: ClassVar[str] = "full"
    uses_sinks: ClassVar[bool] = False
    allows_budget: ClassVar[bool] = False
