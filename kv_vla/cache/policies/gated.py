"""``gated``: a learned recurrent gate scores each completed chunk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from kv_vla.cache.chunks import Chunk
from kv_vla.cache.policies.base import ChunkPolicy, PolicyContext, option

if TYPE_CHECKING:
    from kv_vla.cache.gate import ChunkGate


@dataclass
class GatedPolicy(ChunkPolicy):
    """A recurrent gate (:class:`kv_vla.cache.gate.ChunkGate`, GRU or LSTM) reads the per-layer
    key/value summary of every completed chunk in episode order, carrying its hidden state causally,
    and writes a utility in [0, 1] for that chunk once, when it completes (a write gate: older chunks
    are not re-scored, so a chunk's fate depends only on what was seen up to its completion).
    Chunks under ``gate_threshold`` are evicted once they leave the recent window; over
    ``max_tokens`` the lowest utilities go first. The threshold is read at every decision, so a
    change takes effect at the next one.

    This is kv_vla's own method (see DESIGN.md); the recurrent cell is a GRU (Cho et al., 2014,
    "Learning Phrase Representations using RNN Encoder-Decoder for Statistical Machine
    Translation") or an LSTM (Hochreiter & Schmidhuber, 1997, "Long Short-Term Memory").
    Without a gate set, a randomly initialised gate seeded by the cache's ``seed`` is used (an untrained gate is
    a random gate).
    """

    name: ClassVar[str] = "gated"
    gate_threshold: float = option("gate_threshold")
    """Evict a chunk whose utility is below this once it leaves the recent window (0: budget only)."""
    gate: ChunkGate | None = None
    _state: object = field(default=None, init=False, repr=False)

    def reset(self) -> None:
        self._state = None

    def observe(self, chunk: Chunk, ctx: PolicyContext) -> None:
        if self.gate is None:
            raise RuntimeError("policy 'gated' has no gate: call EpisodeCache.set_gate(gate)")
        summary = ctx.summary(chunk)
        with torch.no_grad():
            utility, self._state = self.gate.step(summary, self._state)
        chunk.utility = float(utility)

    def keep(self, candidates: list[Chunk], utilities: list[float], ctx: PolicyContext) -> list[bool]:
        return [u >= self.gate_threshold for u in utilities]
