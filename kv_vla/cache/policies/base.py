"""The interface every chunk eviction policy implements.

A policy never touches tensors: the cache hands it the chunk records and a context, the policy
returns utilities (higher = more worth keeping) and which candidates it wants kept. The cache then
applies the decision identically to every layer and enforces ``max_tokens`` by evicting the
lowest-utility candidates first (ties: older first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kv_vla.cache.chunks import Chunk

if TYPE_CHECKING:
    from kv_vla.cache.config import EpisodeCacheConfig


@dataclass
class PolicyContext:
    """What a policy may read at a decision.

    Attributes:
        config: the cache configuration in force at this decision.
        seen_tokens: tokens seen in the episode so far.
        attention_mass: per chunk, the mean attention mass its tokens received from the probed
            queries so far, or None when the attention probe is not enabled.
        summary: per chunk, its per-layer key/value summary (1-D float tensor, see
            :func:`kv_vla.cache.summary.chunk_summary`); computed on demand.
    """

    config: EpisodeCacheConfig
    seen_tokens: int
    attention_mass: Callable[[Chunk], float] | None
    summary: Callable[[Chunk], torch.Tensor]


@dataclass
class ChunkPolicy:
    """Base class: keep everything (subclasses override the hooks they need)."""

    name: ClassVar[str] = "base"
    keeps_recent: ClassVar[bool] = True  # False: recent_chunks is forced to 0
    uses_sinks: ClassVar[bool] = True  # False: sink_tokens is forced to 0
    needs_attention: ClassVar[bool] = False  # True: the attention probe must be enabled
    allows_budget: ClassVar[bool] = True  # False: max_tokens is refused
    bounded_by_window: ClassVar[bool] = False  # True: evicts every unprotected chunk (bounded without max_tokens)

    @classmethod
    def validate_config(cls, config: EpisodeCacheConfig) -> None:
        """Raise ValueError (naming field and allowed values) for options this policy refuses."""
        if not cls.allows_budget and config.max_tokens is not None:
            raise ValueError(
                f"max_tokens: policy {cls.name!r} never evicts, so it takes no budget; allowed values: None"
            )

    def reset(self) -> None:
        """Forget per-episode state (called by ``EpisodeCache.reset``)."""

    def observe(self, chunk: Chunk, ctx: PolicyContext) -> None:
        """Called once for every newly completed chunk, in episode order, before the decision."""

    def score(self, candidates: list[Chunk], ctx: PolicyContext) -> list[float]:
        """Utilities of the eviction candidates (higher = keep); default: each chunk's last utility."""
        return [c.utility for c in candidates]

    def keep(self, candidates: list[Chunk], utilities: list[float], ctx: PolicyContext) -> list[bool]:
        """Which candidates the policy keeps before the budget is applied; default: all."""
        return [True] * len(candidates)
