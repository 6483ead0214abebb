"""The interface every chunk eviction policy implements.

A policy never touches tensors: the cache hands it the chunk records and a context, the policy
returns utilities (higher = more worth keeping) and which candidates it wants kept. The cache then
applies the decision identically to every layer and enforces ``max_tokens`` by evicting the
lowest-utility candidates first (ties: older first).

A policy's options are its dataclass fields named as in :mod:`kv_vla.settings` (defaults from
there), checked in ``__post_init__`` (kvpress style). The cache builds a policy from its config with
:meth:`ChunkPolicy.from_config` and hands it live option changes with :meth:`ChunkPolicy.set_options`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kv_vla import settings
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


def check_options(policy: Any) -> None:
    """Raise ValueError for an option field of ``policy`` outside its ``kv_vla.settings`` range."""
    for name in policy.option_names():
        reason = settings.check(name, getattr(policy, name))
        if reason:
            raise ValueError(reason)


@dataclass
class ChunkPolicy:
    """Base class: keep everything (subclasses override the hooks they need)."""

    name: ClassVar[str] = "base"
    keeps_recent: ClassVar[bool] = True  # False: recent_chunks is forced to 0
    uses_sinks: ClassVar[bool] = True  # False: sink_tokens is forced to 0
    needs_attention: ClassVar[bool] = False  # True: the attention probe must be enabled
    allows_budget: ClassVar[bool] = True  # False: the policy never evicts; max_tokens does not apply
    # True: evicts every unprotected chunk (bounded without max_tokens)
    bounded_by_window: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_options(self)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The knobs this policy reads: its init fields that are ``kv_vla.settings`` names."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name in settings.SETTINGS)

    @classmethod
    def from_config(cls, config: EpisodeCacheConfig) -> ChunkPolicy:
        """A fresh policy with its options taken from ``config`` (validated by ``__post_init__``)."""
        return cls(**{n: getattr(config, n) for n in cls.option_names()})

    @classmethod
    def check_config(cls, config: EpisodeCacheConfig) -> None:
        """Raise ValueError for cache knobs this policy cannot work with (default: none)."""

    def set_options(self, config: EpisodeCacheConfig) -> None:
        """Take a live change of this policy's options from ``config`` (state is kept)."""
        for n in self.option_names():
            setattr(self, n, getattr(config, n))
        self.__post_init__()

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


def option(name: str) -> Any:
    """A dataclass field for knob ``name``: its ``kv_vla.settings`` default, help as metadata."""
    return dataclasses.field(default=settings.default(name), metadata={"help": settings.SETTINGS[name].help})
