"""Per-chunk summaries the gate reads: cheap statistics of a chunk's keys and values per layer."""

from __future__ import annotations

import math

import torch


def head_dim_of(model_config: object) -> int:
    """Key head dimension of a HF decoder config (the width of a cached key)."""
    return kv_widths(model_config)[0]


def kv_widths(model_config: object) -> tuple[int, int]:
    """``(key width, value width)`` of one cached head. Multi-head latent attention (DeepSeek-V2/V3)
    caches keys of ``qk_nope_head_dim + qk_rope_head_dim`` and values of ``v_head_dim``."""
    rope = getattr(model_config, "qk_rope_head_dim", None)
    value = getattr(model_config, "v_head_dim", None)
    if rope and value:
        key = getattr(model_config, "qk_head_dim", None) or rope + int(
            getattr(model_config, "qk_nope_head_dim", 0)
        )
        return int(key), int(value)
    head_dim = getattr(model_config, "head_dim", None)
    if not head_dim:
        head_dim = model_config.hidden_size // model_config.num_attention_heads
    return int(head_dim), int(head_dim)


def summary_dim(num_layers: int, head_dim: int, value_dim: int | None = None) -> int:
    """Length of :func:`chunk_summary`'s output: per layer mean and std of the keys (``head_dim``
    each) and of the values (``value_dim``, default ``head_dim``), plus 2 extras."""
    value_dim = head_dim if value_dim is None else value_dim
    return num_layers * 2 * (head_dim + value_dim) + N_EXTRA


N_EXTRA = 2  # attention mass received (0 when not probed), log1p(chunk index) / 8


def layer_summary(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean and std over batch, heads and tokens of a chunk's keys and values: ``[2 * (Dk + Dv)]``.

    ``keys``/``values``: ``[B, H, T, D]`` (the chunk's columns of one layer), any float dtype.
    """
    k = keys.float().transpose(1, 2).reshape(-1, keys.shape[-1])
    v = values.float().transpose(1, 2).reshape(-1, values.shape[-1])
    k_std = k.std(0, unbiased=False)
    v_std = v.std(0, unbiased=False)
    return torch.cat([k.mean(0), k_std, v.mean(0), v_std])


def chunk_summary(
    per_layer: list[torch.Tensor], attention_mass: float | None, chunk_index: int
) -> torch.Tensor:
    """Concatenate per-layer summaries and the extras into the gate's input vector (float32, CPU)."""
    extras = torch.tensor(
        [0.0 if attention_mass is None else float(attention_mass), math.log1p(chunk_index) / 8.0],
        dtype=torch.float32,
    )
    return torch.cat([t.detach().float().cpu() for t in per_layer] + [extras])
