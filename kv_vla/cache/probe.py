"""Attention probe: lets a Cache see how much attention each kv column receives.

A ``Cache`` never sees queries, so attention-based policies (H2O/SnapKV style) need help from the
attention function. ``enable_attention_probe(model)`` switches the model to an attention
implementation (registered with transformers' ``AttentionInterface``) that wraps the one the model
was using: its output is returned unchanged (eager keeps the model's own eager attention with its
softcapping or sinks; sdpa stays sdpa), and, when the layer's cache asked for it in ``update`` just
before, the mean attention mass of the newest ``probe_queries`` queries per kv column is handed to
the cache (``EpisodeCache.record_attention``): taken from the attention weights when the wrapped
implementation returns them, else computed as ``softmax(q k^T * scaling + mask)``.
``disable_attention_probe`` restores the implementation found. Families whose attention does not go
through the ``AttentionInterface`` (GPT-J, CodeGen, Falcon, Bloom, MPT, GPT-Neo) are refused.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

PROBE_IMPLEMENTATION = "kv_vla_probe"

_local = threading.local()


def announce(cache: Any, layer_idx: int, kv_length: int = -1) -> None:
    """Called by ``EpisodeCache.update``: the next attention call of ``layer_idx`` over ``kv_length``
    columns belongs to ``cache``."""
    _local.target = (cache, layer_idx, kv_length)


def _take(layer_idx: int, kv_length: int) -> Any:
    """The announcing cache, if this attention call is the one it announced. Any announcement is
    consumed by the next probed call: one left by a forward that ran unprobed (or by another
    cache) must not be credited to a later forward over another cache."""
    target = getattr(_local, "target", None)
    _local.target = None
    if target is None or target[1] != layer_idx or target[2] not in (-1, kv_length):
        return None
    return target[0]


def newest_query_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    window: int,
) -> torch.Tensor:
    """Mean softmax attention mass per kv column from the newest ``window`` queries: ``[kv_len]``.

    ``query``: ``[B, Hq, q, D]``; ``key``: ``[B, Hkv, kv, D]`` (grouped heads are repeated).
    Without a mask the block is causal with its last query aligned to the last key.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    w = min(window, q_len)
    q = query[:, :, q_len - w :].float()
    n_rep = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(n_rep, dim=1) if n_rep > 1 else key.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        m = attention_mask[..., q_len - w :, :kv_len]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    else:
        rows = torch.arange(q_len - w, q_len, device=scores.device).unsqueeze(1) + (kv_len - q_len)
        cols = torch.arange(kv_len, device=scores.device).unsqueeze(0)
        scores = scores.masked_fill(cols > rows, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return probs.mean(dim=(0, 1, 2))


def _inner_forward(module: torch.nn.Module, previous: str) -> Any:
    """The attention function ``previous`` names, for ``module``'s family (eager: the model's own)."""
    if previous == "eager":
        import sys

        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(
                f"model: {type(module).__name__} has no eager_attention_forward; the attention probe cannot "
                "wrap its eager attention (use attn_implementation='sdpa')"
            )
        return fn
    from transformers import AttentionInterface

    return AttentionInterface._global_mapping[previous]


def _probe_forward(previous: str) -> Any:
    def probe_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        """``previous``'s attention, plus the attention-mass report to the cache that owns this layer."""
        out, weights = _inner_forward(module, previous)(
            module, query, key, value, attention_mask, *args, **kwargs
        )
        cache = _take(getattr(module, "layer_idx", -1), int(key.shape[-2]))
        if cache is not None:
            window = cache.config.probe_queries
            with torch.no_grad():
                if weights is not None:
                    w = min(window, weights.shape[-2])
                    mass = weights[:, :, -w:, : key.shape[2]].float().mean(dim=(0, 1, 2))
                else:
                    scaling = kwargs.get("scaling")
                    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                    mass = newest_query_mass(query, key, attention_mask, scale, window)
            cache.record_attention(module.layer_idx, mass)
        return out, weights

    return probe_attention_forward


def probe_name(previous: str) -> str:
    """The probe's implementation name when it wraps ``previous`` (``sdpa``: :data:`PROBE_IMPLEMENTATION`)."""
    return PROBE_IMPLEMENTATION if previous == "sdpa" else f"{PROBE_IMPLEMENTATION}_{previous}"


def register_probe(previous: str = "sdpa") -> str:
    """Register the probe wrapping ``previous`` (attention + that implementation's mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from kv_vla.cache import masks

    name = probe_name(previous)
    AttentionInterface.register(name, _probe_forward(previous))
    mask_builder = AttentionMaskInterface._global_mapping[previous]
    AttentionMaskInterface.register(
        name, masks.wrap(getattr(mask_builder, "_kv_vla_original", mask_builder), name)
    )
    return name


def enable_attention_probe(model: Any) -> Any:
    """Switch ``model`` to the probe wrapping its current attention (same outputs); returns the model.

    Raises ``ValueError`` for a family whose attention the probe cannot observe.
    """
    if not getattr(type(model), "_supports_attention_backend", False):
        family = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(
            f"model: {family} computes attention inside its own modules, not through transformers' "
            "AttentionInterface, so the attention probe cannot observe it; use a policy that needs no "
            "probe (window, sinks, random, gated)"
        )
    if is_probing(model):
        return model
    current = model.config._attn_implementation
    model.set_attn_implementation(register_probe(current))
    model._kv_vla_probe_previous = current
    return model


def is_probing(model: Any) -> bool:
    """Whether ``model`` runs the attention probe (whichever implementation it wraps)."""
    return str(getattr(model.config, "_attn_implementation", "")).startswith(PROBE_IMPLEMENTATION)


def disable_attention_probe(model: Any) -> Any:
    """Switch ``model`` back to the attention implementation it had before the probe (no-op if none)."""
    if not is_probing(model):
        return model
    previous = getattr(model, "_kv_vla_probe_previous", None)
    if previous is None:  # e.g. a copy of a probed model: the wrapped name says what it wrapped
        name = model.config._attn_implementation
        previous = name[len(PROBE_IMPLEMENTATION) + 1 :] or "sdpa"
    model.set_attn_implementation(previous)
    model.__dict__.pop("_kv_vla_probe_previous", None)
    return model
