"""``sinks``: attention sinks plus a recent window (StreamingLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kv_vla.cache.chunks import Chunk
from kv_vla.cache.policies.base import ChunkPolicy, PolicyContext

if TYPE_CHECKING:
    from kv_vla.cache.config import EpisodeCacheConfig


@dataclass
class SinksPolicy(ChunkPolicy):
    """Keep ``sink_tokens`` initial tokens after the prefix plus the recent chunks.

    Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks" (StreamingLLM).
    Needs ``sink_tokens > 0`` (with 0 it would be ``window``).
    """

    name: ClassVar[str] = "sinks"
    bounded_by_window: ClassVar[bool] = True

    @classmethod
    def check_config(cls, config: EpisodeCacheConfig) -> None:
        if config.sink_tokens <= 0:
            raise ValueError(
                f"sink_tokens: policy 'sinks' needs sink tokens; got {config.sink_tokens}, allowed values: an integer >= 1"
            )

    def score(self, candidates: list[Chunk], ctx: PolicyContext) -> list[float]:
        return [float(c.index) for c in candidates]

    def keep(self, candidates: list[Chunk], utilities: list[float], ctx: PolicyContext) -> list[bool]:
        return [False] * len(candidates)
