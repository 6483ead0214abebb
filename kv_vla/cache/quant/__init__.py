"""Low-precision KV storage and ZipVL's layer-adaptive important-token selection."""

from kv_vla.cache.quant.packing import SUPPORTED_BITS, pack_codes, packed_numel, unpack_codes
from kv_vla.cache.quant.quantize import (
    KEY_AXIS,
    VALUE_AXIS,
    QuantizedTensor,
    dequantize,
    quantize,
    quantize_keys,
    quantize_values,
    quantized_nbytes,
)
from kv_vla.cache.quant.ratio import (
    Selection,
    chunk_scores,
    demote_within_allowance,
    normalized_scores,
    select_important,
    select_important_chunks,
    visible_query_counts,
)

__all__ = [
    "KEY_AXIS",
    "SUPPORTED_BITS",
    "VALUE_AXIS",
    "QuantizedTensor",
    "Selection",
    "chunk_scores",
    "demote_within_allowance",
    "dequantize",
    "normalized_scores",
    "pack_codes",
    "packed_numel",
    "quantize",
    "quantize_keys",
    "quantize_values",
    "quantized_nbytes",
    "select_important",
    "select_important_chunks",
    "unpack_codes",
    "visible_query_counts",
]
