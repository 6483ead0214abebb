"""Stacked low-precision chunks: the storage unit of :class:`kv_vla.cache.quant.store.MixedPrecisionLayer`.

A :class:`QuantSlab` holds every low-precision chunk of one layout (shape, bits, groups) of a layer
as one :class:`kv_vla.cache.quant.quantize.QuantizedTensor` with a leading chunk axis, so attending
the layer dequantises each slab in one call however many chunks it holds: the Python work per
step is per slab, not per chunk. Codes are only ever copied between slabs, never re-quantised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kv_vla.cache.quant.packing import pack_codes, unpack_codes
from kv_vla.cache.quant.quantize import QuantizedTensor, _padded_numel, dequantize


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


def entries_fill_bytes(q: QuantizedTensor, entries: int) -> bool:
    """Whether each of ``entries`` equal parts of ``q``'s codes (its leading axes) packs into whole
    bytes, so that parts can be selected or concatenated byte-wise without repacking."""
    return _padded_numel(q.shape, q.group_size, q.axis) // entries * q.bits % 8 == 0


def take_rows(q: QuantizedTensor, dim: int, index: torch.Tensor) -> QuantizedTensor:
    """``q`` with only entries ``index`` (in that order) of its leading axis ``dim`` (0 or 1).

    Groups never span the leading axes, so each entry's codes, scales and zero points are its own
    and the codes are copied, never re-quantised.
    """
    idx = index.to(q.data.device)
    lead = 1
    for s in q.shape[:dim]:
        lead *= s
    entries = lead * q.shape[dim]
    n_codes = _padded_numel(q.shape, q.group_size, q.axis)
    if entries_fill_bytes(q, entries) and q.data.numel() * 8 == n_codes * q.bits:
        rows = q.data.view(lead, q.shape[dim], -1).index_select(1, idx).reshape(-1)  # whole bytes
    else:  # entries share packed bytes: unpack, select, repack
        codes = unpack_codes(q.data, q.bits, n_codes).view(lead, q.shape[dim], -1)
        rows = pack_codes(codes.index_select(1, idx).reshape(-1), q.bits, check=False)
    shape = list(q.shape)
    shape[dim] = int(idx.numel())
    return QuantizedTensor(
        data=rows,
        scale=q.scale.index_select(dim, idx.to(q.scale.device)),
        zero=q.zero.index_select(dim, idx.to(q.zero.device)),
        shape=tuple(shape),
        dtype=q.dtype,
        bits=q.bits,
        group_size=q.group_size,
        axis=q.axis,
    )


def _stack(qs: list[QuantizedTensor]) -> QuantizedTensor:
    """Tensors of one exact-packed layout stacked on a new leading axis (codes concatenated)."""
    first = qs[0]
    return QuantizedTensor(
        data=torch.cat([q.data for q in qs]),
        scale=torch.cat([q.scale for q in qs]),
        zero=torch.cat([q.zero for q in qs]),
        shape=(sum(q.shape[0] for q in qs), *first.shape[1:]),
        dtype=first.dtype,
        bits=first.bits,
        group_size=first.group_size,
        axis=first.axis,
    )


def lift(q: QuantizedTensor) -> QuantizedTensor:
    """``q`` as a stack of one: a new leading axis of size 1 (views, no copy)."""
    return QuantizedTensor(
        q.data,
        q.scale.unsqueeze(0),
        q.zero.unsqueeze(0),
        (1, *q.shape),
        q.dtype,
        q.bits,
        q.group_size,
        q.axis,
    )


@dataclass
class QuantSlab:
    """Every low-precision chunk of one storage layout, stacked: ``[n, B, H, length, D]``.

    One slab is dequantised by one call however many chunks it holds, so the per-step cost of the
    low-precision tier does not grow with its chunk count in Python. ``starts[i]`` is the logical
    start column of chunk ``i`` (chunks are in order of quantisation, not of position).
    """

    starts: torch.Tensor  # int64 [n], CPU
    keys: QuantizedTensor
    values: QuantizedTensor
    _cols: torch.Tensor | None = field(default=None, repr=False)  # logical columns, chunk-major, on device

    @property
    def length(self) -> int:
        return int(self.keys.shape[-2])

    @property
    def exact(self) -> bool:
        """Whether each chunk's codes fill whole bytes (then chunks can be appended byte-wise)."""
        n = int(self.starts.numel())
        return entries_fill_bytes(self.keys, n) and entries_fill_bytes(self.values, n)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def columns(self) -> torch.Tensor:
        """Logical column of every stored token, chunk-major (``[n * length]``, CPU)."""
        return (self.starts[:, None] + torch.arange(self.length)).reshape(-1)

    def device_columns(self, device: torch.device) -> torch.Tensor:
        if self._cols is None or self._cols.device != device:
            self._cols = self.columns().to(device)
        return self._cols

    def append(self, start: int, keys: QuantizedTensor, values: QuantizedTensor) -> None:
        self.starts = torch.cat([self.starts, torch.tensor([start])])
        self.keys, self.values = _stack([self.keys, lift(keys)]), _stack([self.values, lift(values)])
        self._cols = None

    def take(self, rows: torch.Tensor, starts: torch.Tensor) -> None:
        """Keep chunks ``rows`` (ascending) and give them new logical ``starts`` (no copy if all stay)."""
        if rows.numel() != self.starts.numel():
            self.keys, self.values = take_rows(self.keys, 0, rows), take_rows(self.values, 0, rows)
        self.starts = starts
        self._cols = None

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as ``[B, H, n * length, D]``, chunk-major (matching :meth:`columns`)."""

        def flat(x: torch.Tensor) -> torch.Tensor:
            n, b, h, t, d = x.shape
            return x.permute(1, 2, 0, 3, 4).reshape(b, h, n * t, d)

        return flat(dequantize(self.keys, dtype)), flat(dequantize(self.values, dtype))

    def segments(self) -> list[QuantSegment]:
        """One :class:`QuantSegment` per chunk (copies; for inspection)."""
        out = []
        for i in range(int(self.starts.numel())):
            row = torch.tensor([i])
            out.append(
                QuantSegment(
                    int(self.starts[i]),
                    self.length,
                    entry(take_rows(self.keys, 0, row), 0),
                    entry(take_rows(self.values, 0, row), 0),
                )
            )
        return out


def entry(q: QuantizedTensor, i: int) -> QuantizedTensor:
    """Entry ``i`` of ``q``'s leading axis as views (the inverse of :func:`lift`); its entries must fill
    whole bytes, as one entry always does."""
    return QuantizedTensor(
        q.data.view(q.shape[0], -1)[i],
        q.scale[i],
        q.zero[i],
        q.shape[1:],
        q.dtype,
        q.bits,
        q.group_size,
        q.axis,
    )


def slab_layout(keys: QuantizedTensor, values: QuantizedTensor) -> tuple:
    """What the chunks of one slab share: everything of their stacked keys and values but the count."""
    return tuple(
        (q.shape[1:], q.bits, q.group_size, q.axis, q.dtype, tuple(q.scale.shape[1:]), q.scale.dtype)
        for q in (keys, values)
    )
