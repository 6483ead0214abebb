"""Bit-packing must round-trip exactly, and actually pack (8 // bits codes per byte)."""

from __future__ import annotations

import itertools

import pytest
import torch

from kv_vla.cache.quant.packing import pack_codes, packed_numel, unpack_codes


@pytest.mark.parametrize("bits", [2, 4])
def test_exhaustive_small_sequences_round_trip(bits: int) -> None:
    levels = range(1 << bits)
    for n in range(1, 4):  # every sequence of 1..3 codes, covering partial last bytes
        for combo in itertools.product(levels, repeat=n):
            codes = torch.tensor(combo, dtype=torch.uint8)
            packed = pack_codes(codes, bits)
            assert packed.dtype == torch.uint8
            assert packed.numel() == packed_numel(n, bits)
            assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_every_byte_value_unpacks_and_repacks() -> None:
    all_bytes = torch.arange(256, dtype=torch.uint8)
    for bits in (2, 4, 8):
        n = 256 * (8 // bits)
        codes = unpack_codes(all_bytes, bits, n)
        assert int(codes.max()) < (1 << bits)
        assert torch.equal(pack_codes(codes, bits), all_bytes)


def test_known_layout_low_bits_first() -> None:
    codes = torch.tensor([1, 2, 3, 0], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [1 | (2 << 2) | (3 << 4)]
    assert pack_codes(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 11), (2, 4, 20, 64)])
def test_random_round_trip(bits: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape) * bits)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).reshape(shape), codes)


def test_rejects_out_of_range_and_bad_sizes() -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([1]), 3)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 5)
    with pytest.raises(TypeError):
        unpack_codes(torch.zeros(2, dtype=torch.int32), 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip() -> None:
    codes = torch.randint(0, 4, (3, 1001), dtype=torch.uint8, device="cuda")
    packed = pack_codes(codes, 2)
    assert packed.is_cuda
    assert torch.equal(unpack_codes(packed, 2, codes.numel()).reshape(codes.shape), codes)
