"""Mixed-precision storage for one layer of the episode cache.

:class:`MixedPrecisionLayer` is a drop-in :class:`kv_vla.cache.episode_cache.EpisodeLayer` whose
columns (kept tokens, in episode-position order) are either held densely in the model dtype or, per
chunk, as packed low-bit codes with group scales (:mod:`kv_vla.cache.quant.quantize`: keys per
channel, values per token). A quantised chunk is dequantised when the layer is attended, i.e. in
:meth:`update`, which returns the full ``[B, H, kept + new, D]`` keys and values in position order;
the dequantised copy lives only as long as that forward's attention holds it. :meth:`nbytes` counts
the dense tensors plus the packed codes, scales and zero points actually held.

The layer also accumulates, per column, the attention its newest queries gave it (from the
attention probe) and how many of those queries could see it, which is what ZipVL's normalised
score needs (:func:`kv_vla.cache.quant.ratio.normalized_scores`). Quantisation is one-way: a chunk
stored at low precision cannot be restored to full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kv_vla.cache.quant.packing import pack_codes, unpack_codes
from kv_vla.cache.quant.quantize import (
    QuantizedTensor,
    _padded_numel,
    dequantize_many,
    quantize_keys,
    quantize_values,
)
from kv_vla.cache.quant.ratio import visible_query_counts
from kv_vla.cache.storage.dynamic import EpisodeLayer


@dataclass
class QuantSegment:
    """A run of ``length`` consecutive columns from ``start`` held as quantised keys and values."""

    start: int
    length: int
    keys: QuantizedTensor
    values: QuantizedTensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def batch_rows(q: QuantizedTensor, index: torch.Tensor) -> QuantizedTensor:
    """``q`` with only batch rows ``index`` (in that order), codes untouched: groups never span the
    batch axis, so each row's codes, scales and zero points are its own."""
    codes = unpack_codes(q.data, q.bits, _padded_numel(q.shape, q.group_size, q.axis))
    idx = index.to(q.data.device)
    rows = codes.view(q.shape[0], -1).index_select(0, idx)
    return QuantizedTensor(
        data=pack_codes(rows.reshape(-1), q.bits, check=False),
        scale=q.scale.index_select(0, idx.to(q.scale.device)),
        zero=q.zero.index_select(0, idx.to(q.zero.device)),
        shape=(int(idx.numel()), *q.shape[1:]),
        dtype=q.dtype,
        bits=q.bits,
        group_size=q.group_size,
        axis=q.axis,
    )


def balanced_group(n: int, group_size: int) -> int:
    """The group size <= ``group_size`` that splits ``n`` into the fewest, most even groups.

    A 71-token chunk with ``group_size`` 32 gets 3 groups of 24 (1 padded token) instead of 3
    groups of 32 (25 padded tokens, whose codes would be stored and counted).
    """
    groups = -(-n // group_size)
    return -(-n // groups)


def _same_layout(segments: list[QuantSegment]) -> list[list[QuantSegment]]:
    """Segments grouped by storage layout (length, bits, group sizes), in order of appearance."""
    groups: dict[tuple, list[QuantSegment]] = {}
    for s in segments:
        key = (
            s.length,
            s.keys.bits,
            s.keys.group_size,
            s.values.group_size,
            s.keys.scale.dtype,
            s.values.scale.dtype,
        )
        groups.setdefault(key, []).append(s)
    return list(groups.values())


class MixedPrecisionLayer(EpisodeLayer):
    """Episode-cache layer with per-chunk low-precision storage (see module docstring).

    ``keys``/``values`` hold the full-precision columns only (in order); ``_is_low`` marks, for every
    logical column, whether it lives in one of ``segments`` instead.
    """

    supports_rotation = False  # re-rotating quantised keys would re-quantise them: not exact

    def __init__(self, owner, layer_idx: int):
        super().__init__(owner, layer_idx)
        self._init_extra()

    def _init_extra(self) -> None:
        self.segments: list[QuantSegment] = []
        self._is_low = torch.zeros(0, dtype=torch.bool)
        self._recv: torch.Tensor | None = None  # attention received per column (sum over queries)
        self._vis: torch.Tensor | None = None  # probe queries that could see each column
        self._last_block = 0

    @classmethod
    def adopt(cls, layer: EpisodeLayer) -> MixedPrecisionLayer:
        """A mixed-precision layer holding ``layer``'s (full-precision) columns, for a policy switch."""
        if isinstance(layer, cls):
            return layer
        new = cls(layer.owner, layer.layer_idx)
        if layer.is_initialized and layer.keys is not None:
            new.dtype, new.device = layer.keys.dtype, layer.keys.device
            new.keys, new.values = layer.keys, layer.values
            new.is_initialized = True
            new._is_low = torch.zeros(int(layer.keys.shape[-2]), dtype=torch.bool)
        return new

    # ------------------------------------------------------------------ storage
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = int(key_states.shape[-2])
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._is_low = torch.cat([self._is_low, torch.zeros(n, dtype=torch.bool)])
        self._last_block = n
        return self._materialize(0, self.held_tokens())

    def held_tokens(self) -> int:
        return int(self._is_low.numel())

    def _dense_index(self, a: int, b: int) -> tuple[int, int]:
        """Range of dense (physical) columns for the full-precision columns among logical [a, b)."""
        dense_before = int((~self._is_low[:a]).sum())
        return dense_before, dense_before + int((~self._is_low[a:b]).sum())

    def _materialize(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of logical columns ``[a, b)`` in the model dtype (dequantising segments)."""
        inside = [s for s in self.segments if s.start < b and s.start + s.length > a]
        da, db = self._dense_index(a, b)
        if not inside:
            if a == 0 and db == self.keys.shape[-2]:
                return self.keys, self.values  # nothing low-precision: no copy, exactly the base path
            return self.keys[:, :, da:db], self.values[:, :, da:db]
        deq: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for group in _same_layout(inside):
            # one batched dequantisation per storage layout: [n, B, H, len, D]
            dk = dequantize_many([seg.keys for seg in group], self.keys.dtype)
            dv = dequantize_many([seg.values for seg in group], self.values.dtype)
            for i, seg in enumerate(group):
                deq[id(seg)] = (dk[i], dv[i])
        # The columns are runs of dense columns and segments: one concatenation of views, in order.
        pieces_k, pieces_v = [], []
        cur, phys = a, da
        for seg in inside:  # sorted by start
            lo, hi = max(a, seg.start), min(b, seg.start + seg.length)
            if lo > cur:
                pieces_k.append(self.keys[:, :, phys : phys + lo - cur])
                pieces_v.append(self.values[:, :, phys : phys + lo - cur])
                phys += lo - cur
            sk, sv = deq[id(seg)]
            pieces_k.append(sk[:, :, lo - seg.start : hi - seg.start])
            pieces_v.append(sv[:, :, lo - seg.start : hi - seg.start])
            cur = hi
        if cur < b:
            pieces_k.append(self.keys[:, :, phys : phys + b - cur])
            pieces_v.append(self.values[:, :, phys : phys + b - cur])
        return torch.cat(pieces_k, dim=2), torch.cat(pieces_v, dim=2)

    def columns(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._materialize(start, end)

    def select(self, index: torch.Tensor) -> None:
        if self.keys is None:
            return
        idx = index.to("cpu", torch.long)
        keep = torch.zeros(self.held_tokens(), dtype=torch.bool)
        keep[idx] = True
        segments = []
        for s in self.segments:
            kept = int(keep[s.start : s.start + s.length].sum())
            if kept not in (0, s.length):
                raise ValueError("a low-precision chunk can only be evicted as a whole")
            if kept:
                s.start = int(torch.searchsorted(idx, s.start))
                segments.append(s)
        dense_keep = keep[~self._is_low].nonzero().squeeze(1).to(self.keys.device)
        self.keys = self.keys.index_select(2, dense_keep)
        self.values = self.values.index_select(2, dense_keep)
        self._is_low = self._is_low[idx]
        self.segments = segments
        if self._recv is not None:
            dev_idx = idx.to(self._recv.device)
            n = self._recv.numel()
            dev_idx = dev_idx[dev_idx < n]
            self._recv = self._recv.index_select(0, dev_idx)
            self._vis = self._vis.index_select(0, dev_idx)

    def batch_index(self, index: torch.Tensor) -> None:
        """Beam reordering / batch repeat / select: dense columns and every low-precision chunk."""
        super().batch_index(index)
        for seg in self.segments:
            seg.keys, seg.values = batch_rows(seg.keys, index), batch_rows(seg.values, index)

    def truncate(self, n: int) -> None:
        if self.keys is not None and self.held_tokens() > n:
            self.select(torch.arange(n))

    def quantize_columns(self, start: int, end: int, bits: int, group_size: int) -> int:
        """Store logical columns ``[start, end)`` at ``bits`` bits; returns the bytes saved.

        Key groups span at most ``group_size`` tokens per channel, value groups at most
        ``group_size`` channels per token, balanced by :func:`balanced_group` so that little
        padding is stored. Columns already low-precision raise.
        """
        if end <= start:
            return 0
        if bool(self._is_low[start:end].any()):
            raise ValueError(f"columns [{start}, {end}) of layer {self.layer_idx} are already low-precision")
        before = self.nbytes()
        da, db = self._dense_index(start, end)
        k, v = self.keys[:, :, da:db], self.values[:, :, da:db]
        seg = QuantSegment(
            start=start,
            length=end - start,
            keys=quantize_keys(k, bits, balanced_group(end - start, group_size)),
            values=quantize_values(v, bits, balanced_group(v.shape[-1], group_size)),
        )
        self.keys = torch.cat([self.keys[:, :, :da], self.keys[:, :, db:]], dim=-2)
        self.values = torch.cat([self.values[:, :, :da], self.values[:, :, db:]], dim=-2)
        self._is_low[start:end] = True
        self.segments.append(seg)
        self.segments.sort(key=lambda s: s.start)
        return before - self.nbytes()

    def is_low_precision(self, start: int, end: int) -> bool:
        """Whether every column of ``[start, end)`` is stored at low precision."""
        return end > start and bool(self._is_low[start:end].all())

    def stored_bits(self, start: int, end: int) -> int:
        """Bit width columns ``[start, end)`` are stored at: 16 (model dtype) or a segment's bits.

        The range is one chunk, so it lies either wholly in the dense part or in one segment.
        """
        if end <= start or self.keys is None or not bool(self._is_low[start:end].any()):
            return 16
        for s in self.segments:
            if s.start <= start < s.start + s.length:
                return s.keys.bits
        return 16

    def nbytes(self) -> int:
        return super().nbytes() + sum(s.nbytes for s in self.segments)

    def reset(self) -> None:
        super().reset()
        self._init_extra()

    # ------------------------------------------------------------------ attention scores
    def record_attention(self, mass: torch.Tensor) -> None:
        """Add one forward's probe report: ``mass`` is the mean attention per column over the newest
        ``w = min(probe_queries, block)`` queries (bottom-right aligned, causal)."""
        kv_len = int(mass.shape[0])
        w = min(int(self.owner.config.probe_queries), max(1, self._last_block), kv_len)
        received = mass.detach().float() * w
        visible = visible_query_counts(w, kv_len, received.device)
        if self._recv is None:
            self._recv = torch.zeros(kv_len, device=received.device)
            self._vis = torch.zeros(kv_len, device=received.device)
        if self._recv.numel() < kv_len:
            pad = kv_len - self._recv.numel()
            self._recv = torch.nn.functional.pad(self._recv, (0, pad))
            self._vis = torch.nn.functional.pad(self._vis, (0, pad))
        self._recv[:kv_len] += received
        self._vis[:kv_len] += visible

    def normalized_scores(self) -> torch.Tensor | None:
        """Per column: attention received / queries that could see it, since the last reset (CPU)."""
        if self._recv is None:
            return None
        n = self.held_tokens()
        recv = torch.nn.functional.pad(self._recv, (0, max(0, n - self._recv.numel())))[:n]
        vis = torch.nn.functional.pad(self._vis, (0, max(0, n - self._vis.numel())))[:n]
        return torch.where(vis > 0, recv / vis.clamp(min=1), torch.zeros_like(recv)).cpu()

    def reset_attention(self) -> None:
        """Start a new probe window (after a decision)."""
        self._recv = self._vis = None
