"""Position modes of the episode cache, and the RoPE re-rotation that makes ``cache`` mode exact.

* ``episode``: survivors keep the positions they were cached at and new tokens continue the
  episode's counter, so position ids grow with the episode.
* ``cache`` (StreamingLLM, Xiao et al. 2023, "Efficient Streaming Language Models with Attention
  Sinks"): the model sees positions *within the cache*. Kept column ``j`` sits at position ``j``, so
  when a gap closes every later key is re-rotated by its (negative) position delta. RoPE rotations
  compose (``R(q - p) R(p) k = R(q) k``), so a key rotated at ``p`` is then exactly a key at ``q``
  up to float rounding; values carry no position. Position ids stay below pinned + budget + one
  forward's block however long the episode runs.

Only rotate-half RoPE with a position-independent frequency table can be re-rotated; every other
position scheme (learned absolute positions, ALiBi, NTK/longrope tables that change with the
sequence length, partial or multimodal rotary) is refused up front with the reason.
"""

from __future__ import annotations

from typing import Any

import torch

POSITION_MODES = ("episode", "cache")

#: Decoder families whose attention applies HF's rotate-half RoPE to the full head dimension.
ROTATE_HALF_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "phi3",
        "granite",
        "olmo",
        "olmo2",
        "starcoder2",
    }
)
#: RoPE types whose frequency table does not depend on the sequence length (so deltas compose).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3"})


def check_mode(mode: Any) -> str:
    """Raise ValueError unless ``mode`` is a position mode; return it."""
    if mode not in POSITION_MODES:
        raise ValueError(f"positions: unknown position mode {mode!r}; allowed values: {list(POSITION_MODES)}")
    return mode


class PositionRangeWarning(UserWarning):
    """An episode's position ids reached the model's ``max_position_embeddings``.

    RoPE still computes such positions, but the model was never trained on them; it happens in
    ``episode`` positions after about ``max_position_embeddings / tokens_per_step`` control steps.
    """


def position_limit(cfg: Any) -> int | None:
    """The decoder's ``max_position_embeddings`` (None where its config states none)."""
    limit = getattr(cfg, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def position_range_note(max_position_id: int, limit: int | None, mode: str) -> str | None:
    """Why the largest position id so far lies outside the model's range, or None while inside it."""
    if limit is None or max_position_id < limit:
        return None
    fix = (
        "positions:=cache keeps them below pinned + budget + one step"
        if mode == "episode"
        else "lower max_tokens so that pinned + budget + one step fits"
    )
    return (
        f"position id {max_position_id} reached the model's max_position_embeddings {limit} "
        f"({mode} positions): the model was not trained on such positions; {fix}"
    )


def _rope_parameters(cfg: Any) -> dict | None:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return params
    scaling = getattr(cfg, "rope_scaling", None)  # older configs
    theta = getattr(cfg, "rope_theta", None)
    if theta is None and not scaling:
        return None
    params = dict(scaling or {})
    params.setdefault("rope_type", params.get("type", "default"))
    if theta is not None:
        params.setdefault("rope_theta", theta)
    return params


def _refuse(cfg: Any, why: str) -> ValueError:
    kind = getattr(cfg, "model_type", type(cfg).__name__)
    return ValueError(
        f"positions: 'cache' is not supported for model_type {kind!r}: {why}; allowed values for this "
        "model: ['episode']"
    )


class RopeRotator:
    """Re-rotates cached keys by per-column position deltas with the model's RoPE frequencies."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().float().cpu()
        self._by_device: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def for_config(cls, cfg: Any) -> RopeRotator:
        """The rotator of a HF decoder config, or ValueError saying why its positions cannot move."""
        params = _rope_parameters(cfg)
        if params is None:
            raise _refuse(
                cfg,
                "it has no rotary position embedding (e.g. learned absolute positions added to the hidden "
                "states), so a cached key cannot be moved to a new position",
            )
        model_type = getattr(cfg, "model_type", None)
        if model_type not in ROTATE_HALF_MODEL_TYPES:
            raise _refuse(
                cfg,
                f"its RoPE layout is not known to be rotate-half over the full head; known families: "
                f"{sorted(ROTATE_HALF_MODEL_TYPES)}",
            )
        rope_type = params.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise _refuse(
                cfg,
                f"rope_type {rope_type!r} is not re-rotatable (its frequencies depend on the sequence length "
                f"or scale cos/sin); supported: {sorted(STATIC_ROPE_TYPES)}",
            )
        if "mrope_section" in params or "mrope_interleaved" in params:
            raise _refuse(cfg, "multimodal (3-D) rotary positions are not re-rotatable by one delta")
        factor = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
        if factor is not None and float(factor) != 1.0:
            raise _refuse(cfg, f"partial rotary embedding (partial_rotary_factor={factor}) is not supported")
        inv_freq = _inv_freq(cfg, params, rope_type)
        from kv_vla.cache.summary import head_dim_of

        if 2 * inv_freq.numel() != head_dim_of(cfg):
            raise _refuse(cfg, f"rotary dim {2 * inv_freq.numel()} differs from head_dim {head_dim_of(cfg)}")
        return cls(inv_freq)

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``keys [B, H, n, D]`` rotated by ``delta [n]`` positions (computed in float32)."""
        dev = keys.device
        if dev not in self._by_device:
            self._by_device[dev] = self.inv_freq.to(dev)
        freqs = delta.to(device=dev, dtype=torch.float32)[:, None] * self._by_device[dev]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        k = keys.float()
        half = k.shape[-1] // 2
        rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
        return (k * cos + rotated * sin).to(keys.dtype)


def _inv_freq(cfg: Any, params: dict, rope_type: str) -> torch.Tensor:
    """The frequency table the model's rotary embedding uses (same formula, float32, CPU)."""
    from kv_vla.cache.summary import head_dim_of

    if rope_type == "default":
        dim = head_dim_of(cfg)
        base = float(params["rope_theta"])
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, _scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv_freq.float()


def closing_deltas(index: torch.Tensor) -> tuple[int, torch.Tensor]:
    """For kept old columns ``index`` (ascending), the first column that moves and the deltas from it.

    New column ``j`` held old column ``index[j]``; its position changes by ``j - index[j]`` (<= 0).
    Returns ``(len(index), empty)`` when nothing moves.
    """
    delta = torch.arange(index.numel(), dtype=torch.long) - index.cpu()
    moved = (delta != 0).nonzero()
    if moved.numel() == 0:
        return int(index.numel()), delta[:0]
    first = int(moved[0, 0])
    return first, delta[first:]
