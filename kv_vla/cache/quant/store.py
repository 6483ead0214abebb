"""Mixed-precision storage for one layer of the episode cache.

:class:`MixedPrecisionLayer` is a drop-in :class:`kv_vla.cache.episode_cache.EpisodeLayer` whose
columns (kept tokens, in episode-position order) are either held densely in the model dtype or, per
chunk, as packed low-bit codes with group scales (:mod:`kv_vla.cache.quant.quantize`: keys per
channel, values per token), stacked with the other chunks of their layout in a
:class:`kv_vla.cache.quant.slab.QuantSlab`. Quantised chunks are dequantised, one call per slab,
when the layer is attended, i.e. in :meth:`update`, which returns the full ``[B, H, kept + new, D]``
keys and values in position order; the dequantised copy lives only as long as that forward's
attention holds it. :meth:`nbytes` counts
the dense tensors plus the packed codes, scales and zero points actually held.

The layer also accumulates, per column, the attention its newest queries gave it (from the
attention probe) and how many of those queries could see it, which is what ZipVL's normalised
score needs (:func:`kv_vla.cache.quant.ratio.normalized_scores`). Quantisation is one-way: a chunk
stored at low precision cannot be restored to full precision.
"""

from __future__ import annotations

import torch

from kv_vla.cache.quant.quantize import QuantizedTensor, quantize_keys, quantize_values
from kv_vla.cache.quant.ratio import visible_query_counts
from kv_vla.cache.quant.slab import (
    QuantSegment,
    QuantSlab,
    entries_fill_bytes,
    entry,
    lift,
    slab_layout,
    take_rows,
)
from kv_vla.cache.storage.dynamic import EpisodeLayer


def balanced_group(n: int, group_size: int) -> int:
    """The group size <= ``group_size`` that splits ``n`` into the fewest, most even groups.

    A 71-token chunk with ``group_size`` 32 gets 3 groups of 24 (1 padded token) instead of 3
    groups of 32 (25 padded tokens, whose codes would be stored and counted).
    """
    groups = -(-n // group_size)
    return -(-n // groups)


def quantize_chunk(
    k: torch.Tensor, v: torch.Tensor, bits: int, group_size: int
) -> tuple[QuantizedTensor, QuantizedTensor]:
    """A chunk's keys (per channel) and values (per token) at ``bits``, groups balanced by
    :func:`balanced_group`; leading axes (batch, heads, or a stack of layers) never share a group."""
    return (
        quantize_keys(k, bits, balanced_group(k.shape[-2], group_size)),
        quantize_values(v, bits, balanced_group(v.shape[-1], group_size)),
    )


class MixedPrecisionLayer(EpisodeLayer):
    """Episode-cache layer with per-chunk low-precision storage (see module docstring).

    ``keys``/``values`` hold the full-precision columns only (in order); ``_bits`` holds, for every
    logical column, 0 if it is one of them, else the bit width of the :class:`QuantSlab` holding it.
    """

    supports_rotation = False  # re-rotating quantised keys would re-quantise them: not exact

    def __init__(self, owner, layer_idx: int):
        super().__init__(owner, layer_idx)
        self._init_extra()

    def _init_extra(self) -> None:
        self.slabs: list[QuantSlab] = []
        self._bits = torch.zeros(0, dtype=torch.uint8)
        self._dense_cols: torch.Tensor | None = None  # logical columns of the dense ones, on device
        self._recv: torch.Tensor | None = None  # attention received per column (sum over queries)
        self._vis: torch.Tensor | None = None  # probe queries that could see each column
        self._last_block = 0

    @property
    def segments(self) -> list[QuantSegment]:
        """Every low-precision chunk as a :class:`QuantSegment`, by start column (copies; for inspection)."""
        return sorted((s for slab in self.slabs for s in slab.segments()), key=lambda s: s.start)

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
            new._bits = torch.zeros(int(layer.keys.shape[-2]), dtype=torch.uint8)
        return new

    # ------------------------------------------------------------------ storage
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = int(key_states.shape[-2])
        old = self.held_tokens()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._bits = torch.cat([self._bits, torch.zeros(n, dtype=torch.uint8)])
        if self._dense_cols is not None:  # the new block is dense and last
            self._dense_cols = torch.cat(
                [self._dense_cols, torch.arange(old, old + n, device=self._dense_cols.device)]
            )
        self._last_block = n
        return self._materialize()

    def held_tokens(self) -> int:
        return int(self._bits.numel())

    def _dense_index(self, a: int, b: int) -> tuple[int, int]:
        """Range of dense (physical) columns for the full-precision columns among logical [a, b)."""
        dense_before = int((self._bits[:a] == 0).sum())
        return dense_before, dense_before + int((self._bits[a:b] == 0).sum())

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every logical column in the model dtype, low-precision chunks dequantised.

        Each slab is dequantised in one call and scattered to its columns; the dense columns are
        scattered likewise, so the work in Python is per slab, not per chunk.
        """
        if not self.slabs:
            return self.keys, self.values  # nothing low-precision: no copy, exactly the base path
        b, h, _, d = self.keys.shape
        n = self.held_tokens()
        if self._dense_cols is None:
            self._dense_cols = (self._bits == 0).nonzero().squeeze(1).to(self.keys.device)
        out_k = self.keys.new_empty((b, h, n, d))
        out_v = self.values.new_empty((b, h, n, self.values.shape[-1]))
        out_k.index_copy_(2, self._dense_cols, self.keys)
        out_v.index_copy_(2, self._dense_cols, self.values)
        for slab in self.slabs:
            dk, dv = slab.dequantized(self.keys.dtype)
            cols = slab.device_columns(self.keys.device)
            out_k.index_copy_(2, cols, dk)
            out_v.index_copy_(2, cols, dv)
        return out_k, out_v

    def columns(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool((self._bits[start:end] > 0).any()):
            da, db = self._dense_index(start, end)
            return self.keys[:, :, da:db], self.values[:, :, da:db]
        k, v = self._materialize()
        return k[:, :, start:end], v[:, :, start:end]

    def select(self, index: torch.Tensor) -> None:
        if self.keys is None:
            return
        idx = index.to("cpu", torch.long)
        keep = torch.zeros(self.held_tokens(), dtype=torch.bool)
        keep[idx] = True
        kept_rows = []
        for slab in self.slabs:  # check every slab before changing any
            kept = keep[slab.columns()].view(-1, slab.length).sum(1)
            if bool(((kept != 0) & (kept != slab.length)).any()):
                raise ValueError("a low-precision chunk can only be evicted as a whole")
            kept_rows.append((kept == slab.length).nonzero().squeeze(1))
        slabs = []
        for slab, rows in zip(self.slabs, kept_rows):
            if rows.numel() == 0:
                continue
            slab.take(rows, torch.searchsorted(idx, slab.starts[rows]))
            slabs.append(slab)
        dense_keep = keep[self._bits == 0].nonzero().squeeze(1).to(self.keys.device)
        self.keys = self.keys.index_select(2, dense_keep)
        self.values = self.values.index_select(2, dense_keep)
        self._bits = self._bits[idx]
        self.slabs = slabs
        self._dense_cols = None
        if self._recv is not None:
            dev_idx = idx.to(self._recv.device)
            n = self._recv.numel()
            dev_idx = dev_idx[dev_idx < n]
            self._recv = self._recv.index_select(0, dev_idx)
            self._vis = self._vis.index_select(0, dev_idx)

    def batch_index(self, index: torch.Tensor) -> None:
        """Beam reordering / batch repeat / select: dense columns and every low-precision chunk."""
        super().batch_index(index)
        for slab in self.slabs:
            slab.keys, slab.values = take_rows(slab.keys, 1, index), take_rows(slab.values, 1, index)

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
        before = self.nbytes()
        qk, qv = quantize_chunk(*self._dense_chunk(start, end), bits, group_size)
        self._store_quantized(start, end, qk, qv, own=True)
        return before - self.nbytes()

    def _dense_chunk(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the full-precision columns ``[start, end)``; low-precision ones raise."""
        if bool((self._bits[start:end] > 0).any()):
            raise ValueError(f"columns [{start}, {end}) of layer {self.layer_idx} are already low-precision")
        da, db = self._dense_index(start, end)
        return self.keys[:, :, da:db], self.values[:, :, da:db]

    def _store_quantized(
        self, start: int, end: int, qk: QuantizedTensor, qv: QuantizedTensor, own: bool
    ) -> None:
        """Hold ``qk``/``qv`` for columns ``[start, end)`` in place of their dense columns.

        ``own=False``: the codes are views into a larger batch (:func:`quantize_chunk_in_layers`); a
        new slab copies them so that it does not keep the whole batch alive.
        """
        lk, lv = lift(qk), lift(qv)
        layout = slab_layout(lk, lv)
        # a chunk whose codes end in a partial byte cannot be concatenated byte-wise: a slab of its own
        slab = next((s for s in self.slabs if s.exact and slab_layout(s.keys, s.values) == layout), None)
        if slab is not None:
            slab.append(start, qk, qv)  # concatenates: a copy
        else:
            if not own:
                lk, lv = lk.clone(), lv.clone()
            self.slabs.append(QuantSlab(torch.tensor([start]), lk, lv))
        da, db = self._dense_index(start, end)
        self.keys = torch.cat([self.keys[:, :, :da], self.keys[:, :, db:]], dim=-2)
        self.values = torch.cat([self.values[:, :, :da], self.values[:, :, db:]], dim=-2)
        self._bits[start:end] = qk.bits
        self._dense_cols = None

    def is_low_precision(self, start: int, end: int) -> bool:
        """Whether every column of ``[start, end)`` is stored at low precision."""
        return end > start and bool((self._bits[start:end] > 0).all())

    def stored_bits(self, start: int, end: int) -> int:
        """Bit width columns ``[start, end)`` are stored at: 16 (model dtype) or its chunk's bits.

        The range is one chunk, so it lies either wholly in the dense part or in one chunk.
        """
        if end <= start or self.keys is None:
            return 16
        return int(self.chunk_bits(torch.tensor([start]))[0])

    def chunk_bits(self, starts: torch.Tensor) -> torch.Tensor:
        """Bit width of the chunks starting at logical columns ``starts`` (16: model dtype), one lookup."""
        if starts.numel() == 0 or self.keys is None:
            return torch.full((int(starts.numel()),), 16, dtype=torch.long)
        bits = self._bits[starts].long()
        return torch.where(bits > 0, bits, torch.full_like(bits, 16))

    def nbytes(self) -> int:
        return super().nbytes() + sum(s.nbytes for s in self.slabs)

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


def quantize_chunk_in_layers(
    layers: list[MixedPrecisionLayer], cols: list[tuple[int, int]], bits: int, group_size: int
) -> None:
    """``layer.quantize_columns(*cols[i], bits, group_size)`` for every layer, in one quantisation.

    The layers' chunks are stacked on a new leading axis and quantised together: groups never span
    that axis, so every layer gets exactly the codes, scales and zero points it would get alone,
    for two quantisations per step instead of two per layer. Layers whose chunks differ in shape,
    dtype or device, and batches whose scales fall back to float32 (which is decided per tensor)
    or whose layers would share a packed byte, are quantised one by one.
    """
    todo = [(ly, c) for ly, c in zip(layers, cols) if c[1] > c[0]]
    if len(todo) < 2:
        for ly, (a, b) in todo:
            ly.quantize_columns(a, b, bits, group_size)
        return
    chunks = [ly._dense_chunk(a, b) for ly, (a, b) in todo]
    k0, v0 = chunks[0]
    same = all(
        k.shape == k0.shape and v.shape == v0.shape and k.dtype == k0.dtype and k.device == k0.device
        for k, v in chunks
    )
    if same:
        n = len(todo)
        qk, qv = quantize_chunk(
            torch.stack([k for k, _ in chunks]), torch.stack([v for _, v in chunks]), bits, group_size
        )
        fills = entries_fill_bytes(qk, n) and entries_fill_bytes(qv, n)
        if qk.scale.dtype == torch.float16 == qv.scale.dtype and fills:
            for i, (ly, (a, b)) in enumerate(todo):
                ly._store_quantized(a, b, entry(qk, i), entry(qv, i), own=False)
            return
    for ly, (a, b) in todo:
        ly.quantize_columns(a, b, bits, group_size)
