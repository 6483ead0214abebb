"""``window``: keep only the most recent chunks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kv_vla.cache.chunks import Chunk
from kv_vla.cache.policies.base import ChunkPolicy, PolicyContext


@dataclass
class WindowPolicy(ChunkPolicy):
    """Sliding window over chunks: the ``recent_chunks`` newest complete chunks plus the open one.

    The classic local-attention baseline (Beltagy et al., 2020, "Longformer"), at chunk granularity.
    No sink tokens (``sinks`` adds them).
    """

    name: ClassVar[str] = "window"
    bounded_by_window: ClassVar[bool] = True
    uses_sinks: ClassVar[bool] = False

    def score(self, candidates: list[Chunk], ctx: PolicyContext) -> list[float]:
        return [float(c.index) for c in candidates]  # newer = more useful

    def keep(self, candidates: list[Chunk], utilities: list[float], ctx: PolicyContext) -> list[bool]:
        return [False] * len(candidates)
