"""MixedPrecisionLayer: column bookkeeping under quantisation and eviction, honest byte counts."""

from __future__ import annotations

import pytest
import torch

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig
from kv_vla.cache.quant import (
    KEY_AXIS,
    VALUE_AXIS,
    dequantize,
    quantize_keys,
    quantize_values,
    quantized_nbytes,
)
from kv_vla.cache.quant.store import MixedPrecisionLayer
from kv_vla.cache.testing import tiny_config

HEADS, DIM, CHUNK = 8, 64, 16


def _cache(layers: int = 1) -> EpisodeCache:
    cfg = tiny_config("llama", layers=layers)  # the layers store whatever shapes they are given
    return EpisodeCache(
        EpisodeCacheConfig(policy="full", chunk_size=CHUNK), cfg, layer_cls=MixedPrecisionLayer
    )


def _fill(
    cache: EpisodeCache, n_chunks: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, HEADS, n_chunks * CHUNK, DIM, generator=g).to(dtype)
    v = torch.randn(1, HEADS, n_chunks * CHUNK, DIM, generator=g).to(dtype)
    for i in range(n_chunks):
        sl = slice(i * CHUNK, (i + 1) * CHUNK)
        for layer in range(cache.num_layers):
            cache.update(k[:, :, sl], v[:, :, sl], layer)
    return k, v


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bytes_drop_by_the_expected_factor(bits, dtype):
    cache = _cache()
    _fill(cache, 4, dtype)
    layer = cache.layers[0]
    dense = layer.nbytes()
    per_token_dense = 2 * HEADS * DIM * torch.empty((), dtype=dtype).element_size()
    assert dense == 4 * CHUNK * per_token_dense
    for c in range(4):
        layer.quantize_columns(c * CHUNK, (c + 1) * CHUNK, bits, 32)
    shape = (1, HEADS, CHUNK, DIM)
    per_chunk = quantized_nbytes(shape, bits, CHUNK, KEY_AXIS) + quantized_nbytes(shape, bits, 32, VALUE_AXIS)
    assert layer.nbytes() == 4 * per_chunk
    # Per token and kv head: codes 2 * DIM * bits / 8 bytes; key scales+zeros 2 * 2 * DIM / CHUNK;
    # value scales+zeros 2 * 2 * DIM / 32 (float16).
    per_token = 2 * DIM * bits / 8 + 4 * DIM / CHUNK + 4 * DIM / 32
    assert layer.nbytes() == pytest.approx(4 * CHUNK * HEADS * per_token)
    assert cache.stats().kv_bytes == layer.nbytes()
    factor = dense / layer.nbytes()
    expected = {8: 1.68, 4: 2.91, 2: 4.57}[bits] * (2 if dtype == torch.float32 else 1)
    assert factor == pytest.approx(expected, rel=0.01)


def test_columns_and_update_return_dequantized_chunks_in_order():
    cache = _cache()
    k, v = _fill(cache, 5, torch.float32, seed=3)
    layer = cache.layers[0]
    layer.quantize_columns(CHUNK, 2 * CHUNK, 4, 32)
    layer.quantize_columns(3 * CHUNK, 4 * CHUNK, 2, 32)
    expect_k, expect_v = k.clone(), v.clone()
    for a, bits in ((CHUNK, 4), (3 * CHUNK, 2)):
        sl = slice(a, a + CHUNK)
        expect_k[:, :, sl] = dequantize(quantize_keys(k[:, :, sl], bits, CHUNK))
        expect_v[:, :, sl] = dequantize(quantize_values(v[:, :, sl], bits, 32))
    got_k, got_v = layer.columns(0, 5 * CHUNK)
    assert torch.equal(got_k, expect_k) and torch.equal(got_v, expect_v)
    assert torch.equal(layer.columns(CHUNK + 3, 3 * CHUNK + 5)[0], expect_k[:, :, CHUNK + 3 : 3 * CHUNK + 5])
    # A new block is appended after everything, low-precision chunks dequantised in place.
    new = torch.randn(1, HEADS, 3, DIM)
    out_k, out_v = cache.update(new, -new, 0)
    assert torch.equal(out_k, torch.cat([expect_k, new], dim=2))
    assert torch.equal(out_v, torch.cat([expect_v, -new], dim=2))
    assert layer.is_low_precision(CHUNK, 2 * CHUNK) and not layer.is_low_precision(0, CHUNK)
    with pytest.raises(ValueError):
        layer.quantize_columns(CHUNK, 2 * CHUNK, 4, 32)


def test_eviction_keeps_the_right_columns_and_segments():
    cache = _cache()
    k, _ = _fill(cache, 5, torch.float32, seed=4)
    layer = cache.layers[0]
    layer.quantize_columns(CHUNK, 2 * CHUNK, 4, 32)
    layer.quantize_columns(3 * CHUNK, 4 * CHUNK, 4, 32)
    low_before = layer.columns(3 * CHUNK, 4 * CHUNK)[0].clone()
    bytes_before = layer.nbytes()
    # Evict chunk 1 (low) and chunk 2 (dense): keep chunks 0, 3, 4.
    keep = torch.cat([torch.arange(0, CHUNK), torch.arange(3 * CHUNK, 5 * CHUNK)])
    layer.select(keep)
    assert layer.held_tokens() == 3 * CHUNK
    got = layer.columns(0, 3 * CHUNK)[0]
    assert torch.equal(got[:, :, :CHUNK], k[:, :, :CHUNK])
    assert torch.equal(got[:, :, CHUNK : 2 * CHUNK], low_before)
    assert torch.equal(got[:, :, 2 * CHUNK :], k[:, :, 4 * CHUNK :])
    assert layer.is_low_precision(CHUNK, 2 * CHUNK)
    assert layer.nbytes() < bytes_before
    with pytest.raises(ValueError, match="as a whole"):
        layer.select(torch.arange(CHUNK + 3))  # would split the low-precision chunk
    layer.truncate(CHUNK)
    assert layer.held_tokens() == CHUNK and not layer.segments


def test_adopt_keeps_data_and_attention_scores_are_normalised():
    cache = EpisodeCache(
        EpisodeCacheConfig(policy="full", chunk_size=CHUNK, probe_queries=4), _cache().model_config
    )
    _fill(cache, 2, torch.float32)
    plain = cache.layers[0]
    mixed = MixedPrecisionLayer.adopt(plain)
    assert mixed.keys is plain.keys and mixed.held_tokens() == 2 * CHUNK
    # One forward of 4 new tokens: every probe query sees the 32 old columns, new ones causally.
    block = torch.randn(1, HEADS, 4, DIM)
    mixed.update(block, block)
    mass = torch.full((36,), 1.0 / 36)
    mixed.record_attention(mass)
    scores = mixed.normalized_scores()
    assert scores.shape == (36,)
    # received = mass * 4 queries; visible counts 4 for old columns, then 4, 3, 2, 1 for the block
    assert torch.allclose(scores[:33], torch.full((33,), 1.0 / 36))
    assert torch.allclose(scores[33:], torch.tensor([4 / 3, 2.0, 4.0]) / 36)
    mixed.reset_attention()
    assert mixed.normalized_scores() is None


def _reference(
    k: torch.Tensor, v: torch.Tensor, low: dict[int, int], chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``/``v`` with the chunks in ``low`` (start column -> bits) replaced by their round trip."""
    rk, rv = k.clone(), v.clone()
    for a, bits in low.items():
        sl = slice(a, a + chunk)
        rk[:, :, sl] = dequantize(quantize_keys(k[:, :, sl], bits, chunk))
        rv[:, :, sl] = dequantize(quantize_values(v[:, :, sl], bits, 32))
    return rk, rv


def test_chunks_of_one_layout_share_one_slab_through_eviction():
    cache = _cache()
    k, v = _fill(cache, 8, torch.float32, seed=5)
    layer = cache.layers[0]
    low = {c * CHUNK: 4 for c in (1, 2, 4, 6)}
    for a in (4 * CHUNK, CHUNK, 6 * CHUNK, 2 * CHUNK):  # quantised out of position order
        layer.quantize_columns(a, a + CHUNK, 4, 32)
    assert len(layer.slabs) == 1 and layer.slabs[0].starts.numel() == 4  # one dequantisation per step
    got_k, got_v = layer.columns(0, 8 * CHUNK)
    ref_k, ref_v = _reference(k, v, low, CHUNK)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    # Evict chunk 2 (low) and chunk 3 (dense): the slab keeps three chunks at their new columns.
    keep = torch.cat([torch.arange(0, 2 * CHUNK), torch.arange(4 * CHUNK, 8 * CHUNK)])
    layer.select(keep)
    assert layer.slabs[0].starts.tolist() == [2 * CHUNK, CHUNK, 4 * CHUNK]  # order of quantisation
    got_k, got_v = layer.columns(0, 6 * CHUNK)
    assert torch.equal(got_k, ref_k[:, :, keep]) and torch.equal(got_v, ref_v[:, :, keep])
    assert [s.start for s in layer.segments] == [CHUNK, 2 * CHUNK, 4 * CHUNK]
    shape = (1, HEADS, CHUNK, DIM)
    per_chunk = quantized_nbytes(shape, 4, CHUNK, KEY_AXIS) + quantized_nbytes(shape, 4, 32, VALUE_AXIS)
    dense = 3 * CHUNK * 2 * HEADS * DIM * 4
    assert layer.nbytes() == 3 * per_chunk + dense


def test_a_refused_eviction_changes_nothing():
    cache = _cache()
    _fill(cache, 4, torch.float32, seed=6)
    layer = cache.layers[0]
    layer.quantize_columns(CHUNK, 2 * CHUNK, 8, 32)
    layer.quantize_columns(2 * CHUNK, 3 * CHUNK, 8, 32)
    before = [t.clone() for t in layer.columns(0, 4 * CHUNK)]
    starts = layer.slabs[0].starts.clone()
    with pytest.raises(ValueError, match="as a whole"):
        layer.select(torch.cat([torch.arange(0, CHUNK), torch.arange(2 * CHUNK + 1, 4 * CHUNK)]))
    assert torch.equal(layer.slabs[0].starts, starts) and layer.held_tokens() == 4 * CHUNK
    after = layer.columns(0, 4 * CHUNK)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("bits", [2, 4])
def test_chunks_ending_in_a_partial_byte_stay_exact(bits):
    """A chunk of 15 codes (5 tokens, 1 head, 3 channels) ends in a partial byte: no byte-wise stacking."""
    cache = _cache()
    g = torch.Generator().manual_seed(7)
    k = torch.randn(1, 1, 15, 3, generator=g)
    v = torch.randn(1, 1, 15, 3, generator=g)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    layer.quantize_columns(0, 5, bits, 5)
    layer.quantize_columns(10, 15, bits, 5)
    assert len(layer.slabs) == 2  # one slab each
    ref_k, ref_v = k.clone(), v.clone()
    for a in (0, 10):
        ref_k[:, :, a : a + 5] = dequantize(quantize_keys(k[:, :, a : a + 5], bits, 5))
        ref_v[:, :, a : a + 5] = dequantize(quantize_values(v[:, :, a : a + 5], bits, 3))
    got = layer.columns(0, 15)
    assert torch.equal(got[0], ref_k) and torch.equal(got[1], ref_v)
    layer.batch_index(torch.tensor([0, 0, 0]))  # batch repeat repacks the shared bytes
    got = layer.columns(0, 15)
    assert torch.equal(got[0], ref_k.expand(3, -1, -1, -1)) and torch.equal(
        got[1], ref_v.expand(3, -1, -1, -1)
    )


def _layers_pair(n_layers: int, scale: list[float], seed: int) -> tuple[EpisodeCache, EpisodeCache]:
    """Two caches holding the same 3 chunks per layer; layer ``i``'s values are scaled by ``scale[i]``."""
    caches = (_cache(n_layers), _cache(n_layers))
    g = torch.Generator().manual_seed(seed)
    for i in range(n_layers):
        k = torch.randn(1, HEADS, 3 * CHUNK, DIM, generator=g) * scale[i]
        v = torch.randn(1, HEADS, 3 * CHUNK, DIM, generator=g) * scale[i]
        for c in caches:
            c.update(k, v, i)
    return caches


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("scale", [[1.0, 1.0, 1.0], [1.0, 1e5, 1.0]])  # 1e5: float32 scales in one layer
def test_one_quantisation_for_all_layers_equals_one_per_layer(bits, scale):
    from kv_vla.cache.quant.store import quantize_chunk_in_layers

    batched, alone = _layers_pair(3, scale, seed=bits)
    for a in (CHUNK, 0):  # the second chunk joins the first one's slab
        quantize_chunk_in_layers(batched.layers, [(a, a + CHUNK)] * 3, bits, 32)
        for layer in alone.layers:
            layer.quantize_columns(a, a + CHUNK, bits, 32)
        for s in (slab for layer in batched.layers for slab in layer.slabs):
            # a slab owns its codes: no view into the batch keeps the other layers' codes alive
            assert s.keys.data.untyped_storage().nbytes() == s.keys.data.numel()
            assert s.values.scale.untyped_storage().nbytes() == s.values.scale.nbytes
    for got, want in zip(batched.layers, alone.layers):
        assert got.nbytes() == want.nbytes()
        assert [s.start for s in got.segments] == [s.start for s in want.segments] == [0, CHUNK]
        for x, y in zip(got.columns(0, 3 * CHUNK), want.columns(0, 3 * CHUNK)):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="already low-precision"):
        quantize_chunk_in_layers(batched.layers, [(0, CHUNK)] * 3, bits, 32)
