"""``full``: keep the whole episode (eviction off)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kv_vla.cache.policies.base import ChunkPolicy


@dataclass
class FullPolicy(ChunkPolicy):
    """Keep every token: the reference "full history" behaviour (equals ``DynamicCache``).

    It never evicts, so a ``max_tokens`` budget is refused rather than silently ignored.
    """

    name: ClassVar[str] = "full"
    uses_sinks: ClassVar[bool] = False
    allows_budget: ClassVar[bool] = False
