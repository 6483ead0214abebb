"""Attention probe: lets a Cache see how much attention each kv column receives.

A ``Cache`` never sees queries, so attention-based policies (H2O/SnapKV style) need help from the
attention function. ``enable_attention_probe(model)`` registers an attention implementation
``kv_vla_probe`` with transformers' ``AttentionInterface`` that runs the stock SDPA attention (its
output is returned unchanged) and, when the layer's cache asked for it in ``update`` just before,
also computes ``softmax(q k^T * scaling + mask)`` for the newest ``probe_queries`` queries and hands
the mean mass per kv column to the cache (``EpisodeCache.record_attention``).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

PROBE_IMPLEMENTATION = "kv_vla_probe"

_local = threading.local()


def announce(cache: Any, layer_idx: int) -> None:
    """Called by ``EpisodeCache.update``: the next attention call of ``layer_idx`` belongs to ``cache``."""
    _local.target = (cache, layer_idx)


def _take(layer_idx: int) -> Any:
    target = getattr(_local, "target", None)
    if target is None or target[1] != layer_idx:
        return None
    _local.target = None
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


def probe_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """SDPA attention, plus the attention-mass report to the cache that owns this layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    cache = _take(getattr(module, "layer_idx", -1))
    if cache is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        with torch.no_grad():
            mass = newest_query_mass(query, key, attention_mask, scale, cache.config.probe_queries)
        cache.record_attention(module.layer_idx, mass)
    return out


def register_probe() -> str:
    """Register ``kv_vla_probe`` (attention + SDPA mask) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROBE_IMPLEMENTATION, probe_attention_forward)
    AttentionMaskInterface.register(PROBE_IMPLEMENTATION, sdpa_mask)
    return PROBE_IMPLEMENTATION


def enable_attention_probe(model: Any) -> Any:
    """Switch ``model`` to the probing attention (same outputs as SDPA); returns the model."""
    register_probe()
    model.set_attn_implementation(PROBE_IMPLEMENTATION)
    return model


def disable_attention_probe(model: Any) -> Any:
    """Switch ``model`` back to plain SDPA attention."""
    model.set_attn_implementation("sdpa")
    return model
