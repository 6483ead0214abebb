"""``zipvl`` and ``gated_tiered``: mixed-precision chunk storage.

``zipvl`` (He et al., 2024, "ZipVL: Efficient Large Vision-Language Models with Dynamic Token
Sparsification", arXiv 2410.08584): per layer, the newest queries' normalised attention picks the
smallest set of chunks holding a share ``tau`` of the attention mass; those stay at full precision
and every other evictable chunk is stored at ``low_bits`` (keys per channel, values per token, as in
KIVI and ZipCache). The ratio of important tokens therefore differs per layer and per step. zipvl
evicts nothing itself; a ``max_tokens`` budget still evicts the least-attended chunks.

``gated_tiered``: the recurrent gate's utility ``u`` of a chunk chooses one of three fates:
full precision (``u >= full_threshold``), ``low_bits`` precision (``gate_threshold <= u <
full_threshold``) or eviction (``u < gate_threshold``), the same in every layer.

Options are fields of the policy dataclasses, named and defaulted as in :mod:`kv_vla.settings`
(``tau``, ``low_bits``, ``quant_group_size``, ``full_threshold``) and read at every decision (live
updates apply at the next one). Both policies swap the cache's layers for
:class:`kv_vla.cache.quant.store.MixedPrecisionLayer` when attached, so memory is counted as packed
codes plus scales. A low-precision chunk is never restored to full precision.

Both need the cache to call ``policy.attach(cache)`` after it creates the policy, and ``zipvl``
needs ``EpisodeCache.record_attention`` to hand each layer its own probe report
(``layer.record_attention(mass)``); see the module docstring of ``kv_vla.cache.quant.store``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kv_vla.cache.chunks import Chunk
from kv_vla.cache.policies.base import ChunkPolicy, PolicyContext, option
from kv_vla.cache.policies.gated import GatedPolicy
from kv_vla.cache.registry import register_policy

RATIO_HISTORY = 1000  # decisions whose per-layer ratios are kept for inspection


@dataclass
class _MixedPrecisionMixin:
    """Shared options and plumbing: attach to the cache, locate chunk columns, quantise a chunk."""

    low_bits: int = option("low_bits")
    """Bits of a low-precision chunk: 2, 4 or 8."""
    quant_group_size: int = option("quant_group_size")
    """Quantisation group size (tokens for values, channels for keys)."""
    _cache: Any = field(default=None, init=False, repr=False)
    low_precision: ClassVar[bool] = True  # packed low-bit chunks: refused by storage='static'

    def attach(self, cache: Any) -> None:
        """Bind to ``cache`` and make every layer a :class:`MixedPrecisionLayer` (keeps its data)."""
        from kv_vla.cache.quant.store import MixedPrecisionLayer

        self._cache = cache
        cache.layers = [MixedPrecisionLayer.adopt(layer) for layer in cache.layers]

    def _cache_or_raise(self) -> Any:
        if self._cache is None:
            raise RuntimeError(
                f"policy {self.name!r} stores chunks at low precision and must be attached to its cache "
                "(EpisodeCache calls policy.attach(cache) after creating the policy)"
            )
        return self._cache

    def _columns(self, chunks: list[Chunk]) -> list[tuple[int, int]]:
        """Each chunk's logical column range ``[a, b)``, from one lookup for all of them."""
        if not chunks:
            return []
        positions = self._cache_or_raise().kept_positions()
        bounds = torch.tensor([(c.start, c.end) for c in chunks], dtype=positions.dtype)
        return [tuple(ab) for ab in torch.searchsorted(positions, bounds).tolist()]

    @staticmethod
    def _starts(cols: list[tuple[int, int]]) -> torch.Tensor:
        """The first column of each chunk range, for ``layer.chunk_bits``."""
        return torch.tensor([a for a, _ in cols], dtype=torch.long)

    def _chunk_bits(self, layers: list[Any], cols: list[tuple[int, int]]) -> list[list[int]]:
        """``[chunk][layer]`` bit widths of the chunks at ``cols`` (16: full precision)."""
        starts = self._starts(cols)
        return torch.stack([layer.chunk_bits(starts) for layer in layers], dim=1).tolist()

    def _store_low(self, layer: Any, chunk: Chunk, cols: tuple[int, int]) -> bool:
        """Quantise ``chunk`` in ``layer`` unless it already is; returns whether it changed."""
        a, b = cols
        if b <= a or layer.keys is None or layer.is_low_precision(a, b):
            return False
        layer.quantize_columns(a, b, int(self.low_bits), int(self.quant_group_size))
        return True

    def _mark(self, chunk: Chunk, layer_bits: list[int]) -> None:
        chunk.meta["layer_bits"] = layer_bits
        widths = set(layer_bits)
        chunk.precision = (
            "full" if widths == {16} else (f"int{layer_bits[0]}" if len(widths) == 1 else "mixed")
        )


@register_policy
@dataclass
class ZipVLPolicy(_MixedPrecisionMixin, ChunkPolicy):
    """Layer-adaptive mixed precision (ZipVL); see the module docstring.

    After every decision, ``last_ratios`` holds each layer's ZipVL ratio ``p`` (tokens of the
    smallest chunk set holding ``tau`` of the newest attention / candidate tokens; ``ratio_history``
    keeps the last ``RATIO_HISTORY`` of them, so nothing grows with the episode) and ``last_full_fractions`` the share of candidate tokens actually at full
    precision in each layer. Demotion is irreversible, so the mass already at low precision is
    charged against the ``1 - tau`` allowance (:func:`kv_vla.cache.quant.ratio.demote_within_allowance`).
    """

    name: ClassVar[str] = "zipvl"
    needs_attention: ClassVar[bool] = True
    tau: float = option("tau")
    """Share of the newest attention mass whose chunks stay at full precision, in (0, 1]."""
    last_ratios: list[float] = field(default_factory=list, init=False)
    ratio_history: deque[list[float]] = field(default_factory=lambda: deque(maxlen=RATIO_HISTORY), init=False)
    last_full_fractions: list[float] = field(default_factory=list, init=False)

    def reset(self) -> None:
        self.last_ratios = []
        self.ratio_history = deque(maxlen=RATIO_HISTORY)
        self.last_full_fractions = []

    def _layer_chunk_mass(self, layer: Any, cols: list[tuple[int, int]]) -> torch.Tensor | None:
        scores = layer.normalized_scores()
        if scores is None:
            return None
        # prefix sums: one vectorised lookup per chunk instead of a Python-level sum per chunk
        cum = torch.nn.functional.pad(torch.cumsum(scores.double(), 0), (1, 0))
        a = torch.tensor([c[0] for c in cols], dtype=torch.long)
        b = torch.tensor([c[1] for c in cols], dtype=torch.long)
        return (cum[b] - cum[a]).clamp(min=0).float()

    def score(self, candidates: list[Chunk], ctx: PolicyContext) -> list[float]:
        """Utility = the chunk's normalised attention, averaged over its tokens and the layers."""
        if ctx.attention_mass is None:
            raise RuntimeError(
                "policy 'zipvl' needs the attention probe: call "
                "kv_vla.cache.enable_attention_probe(model) before running the model"
            )
        cache = self._cache_or_raise()
        cols = self._columns(candidates)
        total = torch.zeros(len(candidates))
        for layer in cache.layers:
            mass = self._layer_chunk_mass(layer, cols)
            if mass is not None:
                total += mass
        lengths = torch.tensor([max(1, b - a) for a, b in cols], dtype=torch.float32)
        utilities = (total / lengths / max(1, len(cache.layers))).tolist()
        for c, u in zip(candidates, utilities):
            c.utility = u
        return utilities

    def keep(self, candidates: list[Chunk], utilities: list[float], ctx: PolicyContext) -> list[bool]:
        from kv_vla.cache.quant.ratio import demote_within_allowance, select_important

        cache = self._cache_or_raise()
        tau = float(self.tau)
        cols = self._columns(candidates)
        lengths = torch.tensor([b - a for a, b in cols], dtype=torch.float32)
        n_tokens = max(1.0, float(lengths.sum()))
        bits_per_chunk = [[16] * len(cache.layers) for _ in candidates]
        ratios, full_fractions = [], []
        starts = self._starts(cols)
        for li, layer in enumerate(cache.layers):
            mass = self._layer_chunk_mass(layer, cols)
            is_low = layer.chunk_bits(starts) != 16
            if mass is None or float(mass.sum()) <= 0:
                ratios.append(1.0)  # no evidence in this window: change nothing
            else:
                ratios.append(float(lengths[select_important(mass, tau).indices].sum()) / n_tokens)
                for i in demote_within_allowance(mass, is_low, tau).tolist():
                    self._store_low(layer, candidates[i], cols[i])
            layer_bits = layer.chunk_bits(starts)  # after this layer's demotions
            for i, bits in enumerate(layer_bits.tolist()):
                bits_per_chunk[i][li] = bits
            full = layer_bits == 16
            full_fractions.append(float(lengths[full].sum()) / n_tokens)
            layer.reset_attention()
        for chunk, bits in zip(candidates, bits_per_chunk):
            self._mark(chunk, bits)
        self.last_ratios = ratios
        self.ratio_history.append(ratios)
        self.last_full_fractions = full_fractions
        return [True] * len(candidates)


@register_policy
@dataclass
class TieredGatedPolicy(_MixedPrecisionMixin, GatedPolicy):
    """The gate's utility picks full precision, low precision or eviction; see the module docstring."""

    name: ClassVar[str] = "gated_tiered"
    full_threshold: float = option("full_threshold")
    """Chunks with utility >= this stay at full precision; in [gate_threshold, 1]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not float(self.gate_threshold) <= float(self.full_threshold) <= 1.0:
            raise ValueError(
                f"full_threshold: {self.full_threshold} is not allowed; allowed values: "
                f"[gate_threshold={self.gate_threshold}, 1]"
            )

    def keep(self, candidates: list[Chunk], utilities: list[float], ctx: PolicyContext) -> list[bool]:
        from kv_vla.cache.quant.store import quantize_chunk_in_layers

        cache = self._cache_or_raise()
        evict_below = float(self.gate_threshold)
        full_from = float(self.full_threshold)
        cols = self._columns(candidates)
        bits = self._chunk_bits(cache.layers, cols)
        keep = []
        for i, (chunk, u, c) in enumerate(zip(candidates, utilities, cols)):
            keep.append(u >= evict_below)
            if evict_below <= u < full_from and 16 in bits[i]:
                # the same chunk in every layer still at full precision: one quantisation for all
                layers = [ly for ly, w in zip(cache.layers, bits[i]) if w == 16 and ly.keys is not None]
                quantize_chunk_in_layers(
                    layers, [c] * len(layers), int(self.low_bits), int(self.quant_group_size)
                )
                bits[i] = [ly.stored_bits(*c) for ly in cache.layers]
            self._mark(chunk, bits[i])
        return keep
