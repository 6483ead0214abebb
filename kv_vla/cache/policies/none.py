"""``none``: keep only the pinned prefix (OpenVLA's per-step reset)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kv_vla.cache.chunks import Chunk
from kv_vla.cache.policies.base import ChunkPolicy, PolicyContext


@dataclass
class NoHistoryPolicy(ChunkPolicy):
    """Evict every complete chunk at once, recent ones included (``recent_chunks`` is forced to 0).

    OpenVLA (Kim et al., 2024, "OpenVLA: An Open-Source Vision-Language-Action Model") predicts each
    action from the current frame only; with a pinned instruction prefix this policy reproduces that.
    The open (incomplete) chunk stays, so tokens of the current step still see each other.

    It is memoryless about content, not about time: positions are kept (as for every policy), so the
    current frame sits further from the prompt each step and a policy can read the step count from
    it. OpenVLA proper re-encodes each step from position 0; ``kv-vla eval --policies stateless``
    (:mod:`kv_vla.eval.stateless`) is that baseline.
    """

    name: ClassVar[str] = "none"
    bounded_by_window: ClassVar[bool] = True
    keeps_recent: ClassVar[bool] = False
    uses_sinks: ClassVar[bool] = False

    def keep(self, candidates: list[Chunk], utilities: list[float], ctx: PolicyContext) -> list[bool]:
        return [False] * len(candidates)
