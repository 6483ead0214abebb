"""Model features the episode cache handles exactly, and refusals for the ones it cannot.

Run once when an :class:`kv_vla.cache.EpisodeCache` is built. A refused feature raises a
``ValueError`` that names the feature and what to do, because after an eviction it would give a
silently wrong result (see docs/FAMILIES.md for the families checked and the features refused).
Sliding-window layers are supported: their masks are built from the kept tokens' positions
(:mod:`kv_vla.cache.masks`); this module only reads their windows from the config.
"""

from __future__ import annotations

from typing import Any

# Layer types whose masks kv_vla.cache.masks rebuilds from kept positions.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# Families with recurrent (linear-attention, SSM or conv) state next to or instead of attention.
RECURRENT_FAMILIES = (
    "lfm2", "qwen3_next", "mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "zamba", "zamba2",
    "bamba", "granitemoehybrid", "nemotron_h", "recurrent_gemma", "rwkv", "xlstm", "minimax",
)  # fmt: skip


def text_config(model_config: Any) -> Any:
    """The decoder config of a (possibly multimodal) HF config."""
    getter = getattr(model_config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else model_config


def _family(cfg: Any) -> str:
    return str(getattr(cfg, "model_type", type(cfg).__name__))


def uses_alibi(cfg: Any) -> bool:
    """Whether attention adds an ALiBi bias (Bloom always, MPT by default, Falcon with ``alibi``)."""
    family = _family(cfg)
    if family == "bloom":
        return True
    if family == "mpt":
        attn_config = getattr(cfg, "attn_config", None)
        alibi = (
            attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi", None)
        )
        return True if alibi is None else bool(alibi)
    return bool(getattr(cfg, "alibi", False))


def layer_windows(cfg: Any) -> list[int | None]:
    """Per decoder layer: its sliding window in tokens (a query sees itself and ``window - 1``
    earlier positions), or None for full attention. Raises ``ValueError`` for other layer types."""
    n = int(cfg.num_hidden_layers)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if not layer_types:
        return [int(window) if window is not None else None] * n
    unknown = sorted({str(t) for t in layer_types} - set(ATTENTION_LAYER_TYPES))
    if unknown:
        raise ValueError(
            f"model_config.layer_types: {unknown} layers ({_family(cfg)}) are not supported by EpisodeCache: "
            "their recurrent/conv state or chunk mask cannot follow evicted tokens; use a model whose layer_types "
            f"are only {list(ATTENTION_LAYER_TYPES)}"
        )
    if "sliding_attention" in layer_types and window is None:
        raise ValueError("model_config.sliding_window: sliding_attention layers need a window; got None")
    return [int(window) if t == "sliding_attention" else None for t in layer_types]


def check_model(model_config: Any) -> list[int | None]:
    """Refuse model features the cache cannot handle exactly; return :func:`layer_windows`."""
    cfg = text_config(model_config)
    family = _family(cfg)
    if uses_alibi(cfg):
        raise ValueError(
            f"model_config: {family} uses ALiBi (an attention bias from the kv column index), which "
            "EpisodeCache cannot keep for survivors of an eviction; use a RoPE model (Llama, Qwen, "
            "Gemma, ...) or a DynamicCache"
        )
    if family in RECURRENT_FAMILIES:
        raise ValueError(
            f"model_config: {family} has linear-attention/conv (recurrent) layers, whose state cannot "
            "drop evicted tokens; EpisodeCache supports attention-only decoders (use a DynamicCache)"
        )
    attention_layers = getattr(cfg, "attention_layers", None)
    if attention_layers and "local" in attention_layers:
        raise ValueError(
            f"model_config.attention_layers: {family} local layers (window_size="
            f"{getattr(cfg, 'window_size', None)}) mask by kv column index inside the attention module, "
            "wrong once chunks are evicted; use only 'global' attention_layers or a DynamicCache"
        )
    return layer_windows(cfg)


def check_storage(windows: list[int | None], layer_cls: type) -> None:
    """Refuse sliding-window layers on a storage whose caller-built slot mask has no window."""
    if getattr(layer_cls, "needs_block_mask", False) and any(w is not None for w in windows):
        raise ValueError(
            f"storage: {layer_cls.__name__} builds one slot mask for every layer, without the sliding "
            f"windows {sorted({w for w in windows if w is not None})} of this model; allowed values: "
            "storage='dynamic' for sliding-window models"
        )


def check_stock_mask(took_plan: bool, evicted: bool, windows: list[int | None]) -> None:
    """Refuse a forward whose sliding-window mask was not built from the kept positions after an
    eviction (a caller's 4-D mask, or a transformers whose builders take no announced plan)."""
    if evicted and not took_plan and any(w is not None for w in windows):
        raise ValueError(
            "attention_mask: this forward's sliding-window mask was not built from the kept tokens' "
            "positions (a 4-D mask was passed, or this transformers version builds masks another "
            "way); pass a 2-D or no attention_mask, with attn_implementation 'sdpa' or 'eager'"
        )
