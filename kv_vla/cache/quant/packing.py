"""Bit-packing of 2-, 4- and 8-bit integer codes into ``uint8`` bytes.

Low-precision KV storage only saves memory if the codes are actually packed: a 2-bit code held in a
``uint8`` still costs 8 bits. ``pack_codes`` puts ``8 // bits`` codes into each byte (little end
first: code ``i`` of a byte occupies bits ``[i * bits, (i + 1) * bits)``) and ``unpack_codes``
inverts it exactly. Both are plain tensor ops, so they run on any device.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def packed_numel(n: int, bits: int) -> int:
    """Number of bytes that ``n`` codes of ``bits`` bits occupy once packed."""
    _check_bits(bits)
    per_byte = 8 // bits
    return (n + per_byte - 1) // per_byte


def pack_codes(codes: torch.Tensor, bits: int, check: bool = True) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat ``uint8`` tensor.

    The input is flattened (row-major); the output has ``packed_numel(codes.numel(), bits)`` bytes.
    Values outside the code range raise, because silently masking them would corrupt the cache;
    ``check=False`` skips that test (a device sync on CUDA) for codes already clamped by the caller.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if check and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    grouped = flat.view(-1, per_byte)
    shifts = torch.arange(0, 8, bits, device=flat.device, dtype=torch.uint8)
    # Each code occupies a disjoint bit field, so summing the shifted codes equals OR-ing them.
    return (grouped << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as a flat ``uint8`` tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed data must be uint8, got {packed.dtype}")
    flat = packed.reshape(-1)
    if flat.numel() != packed_numel(n, bits):
        raise ValueError(f"{flat.numel()} bytes cannot hold exactly {n} codes of {bits} bits")
    if bits == 8:
        return flat[:n].clone()
    mask = (1 << bits) - 1
    # one elementwise op per field, stacked: faster than a broadcast shift over a [bytes, k] view
    fields = [flat & mask] + [(flat >> s) & mask for s in range(bits, 8, bits)]
    return torch.stack(fields, dim=1).reshape(-1)[:n]
