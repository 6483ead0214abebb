"""Asymmetric group-wise integer quantisation of KV tensors (KIVI / ZipCache style).

Keys have a few channels with large outliers that persist across tokens, so they are quantised
*per channel*: each group holds ``group_size`` consecutive tokens of one channel and gets its own
scale and zero point. Values have no such channel structure and are multiplied by attention
weights token by token, so they are quantised *per token*: each group holds ``group_size``
consecutive channels of one token (KIVI, Liu et al. 2024; ZipCache, He et al. 2024).

Scales and zero points are stored in a 16-bit float (``float16`` by default; a tensor whose range
overflows it keeps float32 scales, counted as such). They are rounded
*outwards* (zero down, scale up) before the codes are computed, so the stored grid still covers
the group's ``[min, max]`` and the reconstruction error stays within half a (stored) step:
``|x - dequantize(q)| <= scale / 2`` where ``scale ~= (max - min) / (2**bits - 1)``.

A group that does not fill up (the token or channel count is not a multiple of ``group_size``) is
padded by repeating its last element, which leaves its min and max unchanged; the padded codes are
stored and therefore counted in :attr:`QuantizedTensor.nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kv_vla.cache.quant.packing import SUPPORTED_BITS, pack_codes, unpack_codes

KEY_AXIS = -2  # keys [..., tokens, channels]: groups run along the token axis, one per channel
VALUE_AXIS = -1  # values [..., tokens, channels]: groups run along the channel axis, one per token


@dataclass
class QuantizedTensor:
    """A tensor stored as packed integer codes plus per-group scales and zero points.

    ``data`` holds the packed codes of the tensor in its own layout, padded along ``axis`` (the axis
    that groups run along) to a multiple of ``group_size``; ``scale``/``zero`` broadcast against the
    grouped view of :func:`group_view`.
    """

    data: torch.Tensor  # uint8, flat, packed codes (row-major over the padded tensor)
    scale: torch.Tensor  # the shape with ``axis`` replaced by (n_groups, 1), scale_dtype
    zero: torch.Tensor  # same shape as scale
    shape: tuple[int, ...]  # original shape
    dtype: torch.dtype  # original dtype, restored by dequantize
    bits: int
    group_size: int
    axis: int  # negative axis that groups run along

    @property
    def nbytes(self) -> int:
        """Bytes actually held: packed codes (incl. padding) plus scales and zero points."""
        return (
            self.data.numel() * self.data.element_size()
            + self.scale.numel() * self.scale.element_size()
            + self.zero.numel() * self.zero.element_size()
        )

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def clone(self) -> QuantizedTensor:
        """A copy whose tensors own their memory (a view into a larger batch would keep it alive)."""
        return QuantizedTensor(
            self.data.clone(),
            self.scale.clone(),
            self.zero.clone(),
            self.shape,
            self.dtype,
            self.bits,
            self.group_size,
            self.axis,
        )

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy on ``device`` (the codes are not touched)."""
        return QuantizedTensor(
            self.data.to(device),
            self.scale.to(device),
            self.zero.to(device),
            self.shape,
            self.dtype,
            self.bits,
            self.group_size,
            self.axis,
        )


def _step_16bit(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The neighbouring representable value of a finite float16/bfloat16 tensor (up or down)."""
    bits = x.view(torch.int16).to(torch.int32)
    negative = bits < 0  # sign bit set (the magnitude lives in the low 15 bits)
    is_zero = (bits & 0x7FFF) == 0
    toward_larger_magnitude = negative ^ up
    stepped = torch.where(toward_larger_magnitude, bits + 1, bits - 1)
    # +-0 has no smaller magnitude: the next value is the smallest subnormal of the requested sign.
    smallest = torch.full_like(bits, 1 if up else -32767)  # int16 view of +min / -min subnormal
    stepped = torch.where(is_zero, smallest, stepped)
    return stepped.to(torch.int16).view(x.dtype)


def _round_outward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` (float32) in ``dtype``, rounded so the result is ``>= x`` (up) or ``<= x`` (down)."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    wrong = y.float() < x if up else y.float() > x
    return torch.where(wrong, _step_16bit(y, up), y)


def group_view(x: torch.Tensor, group_size: int, axis: int) -> tuple[torch.Tensor, int]:
    """``x`` padded along ``axis`` by edge repetition, with that axis split into ``(groups, group_size)``.

    The other axes keep their place, so no transpose is needed either way (keys group along tokens
    per channel, values along channels per token). Returns the view and the (non-negative) index of
    the within-group dimension, which the statistics reduce over.
    """
    ax = axis % x.dim()
    n = x.shape[ax]
    pad = (-n) % group_size
    if pad:
        edge = x.narrow(ax, n - 1, 1)
        x = torch.cat([x, edge.expand(*x.shape[:ax], pad, *x.shape[ax + 1 :])], dim=ax)
    shape = list(x.shape)
    shape[ax : ax + 1] = [shape[ax] // group_size, group_size]
    return x.reshape(shape), ax + 1


def _padded_numel(shape: tuple[int, ...], group_size: int, axis: int) -> int:
    n = 1
    for i, s in enumerate(shape):
        n *= -(-s // group_size) * group_size if i == axis % len(shape) else s
    return n


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Asymmetric ``bits``-bit quantisation with groups of ``group_size`` along ``axis``.

    Computation runs in float32 whatever the input dtype (float32, bfloat16, float16).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if x.dim() == 0:
        raise ValueError("cannot quantise a scalar")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating tensor, got {x.dtype}")
    axis = axis if axis < 0 else axis - x.dim()
    if not -x.dim() <= axis < 0:
        raise ValueError(f"axis {axis} out of range for a {x.dim()}-d tensor")
    levels = (1 << bits) - 1
    g, dim = group_view(x.float(), group_size, axis)
    lo = g.amin(dim=dim, keepdim=True)
    hi = g.amax(dim=dim, keepdim=True)
    zero = _round_outward(lo, scale_dtype, up=False)
    # divide by a tensor, not a Python number: CUDA turns division by a scalar into multiplication
    # by its reciprocal, whose rounding differs from the CPU's true division (seen on an H100: a
    # few 4- and 8-bit scales one float16 step apart, and so different codes)
    span = hi - zero.float()
    scale = _round_outward(span / torch.full_like(span, levels), scale_dtype, up=True)
    if scale_dtype != torch.float32 and not bool(torch.isfinite(scale).all() & torch.isfinite(zero).all()):
        # outside float16's range (|x| > 65504): keep this tensor's scales in float32 instead
        scale_dtype = torch.float32
        zero, scale = lo, (hi - lo) / torch.full_like(lo, levels)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((g - zero.float()) / safe).clamp_(0, levels).to(torch.uint8)
    return QuantizedTensor(
        data=pack_codes(codes, bits, check=False),  # clamped above
        scale=scale,
        zero=zero,
        shape=tuple(x.shape),
        dtype=x.dtype,
        bits=bits,
        group_size=group_size,
        axis=axis,
    )


def quantize_keys(
    k: torch.Tensor, bits: int, group_size: int = 32, scale_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Per-channel key quantisation: ``k`` is ``[..., tokens, channels]``; groups span tokens."""
    return quantize(k, bits, group_size, KEY_AXIS, scale_dtype)


def quantize_values(
    v: torch.Tensor, bits: int, group_size: int = 32, scale_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Per-token value quantisation: ``v`` is ``[..., tokens, channels]``; groups span channels."""
    return quantize(v, bits, group_size, VALUE_AXIS, scale_dtype)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reconstruct the tensor (in ``dtype``, default its original dtype) from its codes."""
    ax = q.axis % len(q.shape)
    n = q.shape[ax]
    padded = list(q.shape)
    padded[ax] = q.scale.shape[ax] * q.group_size
    grouped = list(padded)
    grouped[ax : ax + 1] = [q.scale.shape[ax], q.group_size]
    codes = unpack_codes(q.data, q.bits, _padded_numel(q.shape, q.group_size, q.axis)).view(grouped)
    x = torch.addcmul(q.zero.float(), codes, q.scale.float()).view(padded)  # uint8 promotes in-kernel
    if padded[ax] != n:
        x = x.narrow(ax, 0, n)
    return x.to(dtype or q.dtype)


def quantized_nbytes(
    shape: tuple[int, ...],
    bits: int,
    group_size: int,
    axis: int,
    scale_dtype: torch.dtype = torch.float16,
) -> int:
    """Bytes :func:`quantize` would hold for a tensor of ``shape``, without quantising it."""
    from kv_vla.cache.quant.packing import packed_numel

    dims = list(shape)
    n = dims.pop(axis)
    n_groups = -(-n // group_size)
    rest = 1
    for s in dims:
        rest *= s
    scale_bytes = torch.empty((), dtype=scale_dtype).element_size()
    return packed_numel(rest * n_groups * group_size, bits) + 2 * rest * n_groups * scale_bytes
