"""``random``: evict random chunks when over budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kv_vla.cache.chunks import Chunk
from kv_vla.cache.policies.base import ChunkPolicy, PolicyContext, option


@dataclass
class RandomPolicy(ChunkPolicy):
    """Each completed chunk draws a fixed uniform utility from a generator seeded by ``seed``; over
    ``max_tokens`` the lowest go first, i.e. a random subset of old chunks survives.

    The random-eviction control used across the KV-compression literature (e.g. kvpress's
    ``RandomPress``; Zhang et al., 2023, "H2O", Sec. 5 ablations). Without a budget it keeps all.
    """

    name: ClassVar[str] = "random"
    seed: int = option("seed")
    """Seeds the generator of the utilities (the same seed, the same evictions)."""
    _gen: torch.Generator | None = field(default=None, init=False, repr=False)

    def reset(self) -> None:
        self._gen = None

    def observe(self, chunk: Chunk, ctx: PolicyContext) -> None:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(int(self.seed))
        chunk.utility = float(torch.rand((), generator=self._gen))
