"""Plain records shared by the cache, its policies and its statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Chunk:
    """One chunk of the episode timeline: ``length`` consecutive positions from ``start``.

    ``utility`` is the policy's last score (higher = more worth keeping). ``precision`` names how the
    chunk is stored ("full" here; a low-precision store may set e.g. "int4" and swap the storage of
    its positions, see :class:`kv_vla.cache.episode_cache.EpisodeLayer`). ``summary`` is the
    per-layer key/value summary the gate read when the chunk completed (gated policy only).
    """

    index: int
    start: int
    length: int
    utility: float = 1.0
    precision: str = "full"
    evicted: bool = False
    summary: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def end(self) -> int:
        """One past the last position of the chunk."""
        return self.start + self.length


@dataclass
class CacheStats:
    """Memory and token accounting of an :class:`EpisodeCache`, in bytes actually held.

    ``kv_bytes`` sums ``kv_bytes_per_layer``; each layer reports the bytes of the tensors it holds
    (packed bytes plus scales for chunks stored at low precision). ``max_position`` shows whether
    position ids stay bounded (``cache`` positions) or grow with the episode (``episode``).
    ``kv_bytes_reserved`` is what the storage has allocated: equal to ``kv_bytes`` for the dynamic
    storage, the whole preallocated bound for the static one.
    """

    seen_tokens: int
    kept_tokens: int
    evicted_tokens: int
    kept_chunks: int
    evicted_chunks: int
    pinned_tokens: int
    kv_bytes: int
    kv_bytes_per_layer: list[int]
    max_position: int = -1  # largest position id used so far (before the model's own offset)
    kv_bytes_reserved: int = 0

    def as_dict(self) -> dict:
        """JSON-friendly copy (for diagnostics and logs)."""
        return {
            "seen_tokens": self.seen_tokens,
            "kept_tokens": self.kept_tokens,
            "evicted_tokens": self.evicted_tokens,
            "kept_chunks": self.kept_chunks,
            "evicted_chunks": self.evicted_chunks,
            "pinned_tokens": self.pinned_tokens,
            "kv_bytes": self.kv_bytes,
            "kv_bytes_per_layer": list(self.kv_bytes_per_layer),
            "max_position": self.max_position,
            "kv_bytes_reserved": self.kv_bytes_reserved,
        }
