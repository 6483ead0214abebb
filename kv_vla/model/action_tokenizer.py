"""OpenVLA-compatible action tokenizer and action (un)normalisation.

OpenVLA discretises every action dimension into uniform bins on ``[-1, 1]`` and writes bin ``k`` as
one of the *last* 256 ids of the language model's vocabulary, so that a plain causal LM can emit
actions as text tokens. We reproduce its arithmetic exactly (``prismatic/vla/action_tokenizer.py``)
so that a real OpenVLA checkpoint decodes to the same numbers here:

* ``bins = linspace(min_action, max_action, n_bins)`` (256 *edges*, hence 255 bin centres),
* ``token = vocab_size - digitize(clip(a), bins)`` with ``digitize`` in ``[1, n_bins]``,
* decode: ``centres[clip(vocab_size - token - 1, 0, n_bins - 2)]``.

The 256 ids ``[vocab_size - 256, vocab_size)`` are therefore all reachable; the id for exactly
``max_action`` shares its centre with its neighbour (an OpenVLA quirk we keep on purpose). The
round-trip error is at most half a bin width, ``(max - min) / (2 * (n_bins - 1))``.

Normalisation follows OpenVLA's ``norm_stats[unnorm_key]["action"]`` layout (``q01``, ``q99``,
``mask``): a normalised ``x`` in ``[-1, 1]`` maps back to ``0.5 * (x + 1) * (q99 - q01) + q01`` on
masked-in dimensions and stays ``x`` elsewhere (typically the gripper).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

NormStats = dict[str, dict[str, dict[str, list[float] | list[bool]]]]


def _as_finite_array(values: Any, what: str) -> np.ndarray:
    """Convert to float64 and refuse NaN/inf, which would silently map to an edge bin."""
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{what} contains {bad} non-finite value(s) (NaN or inf); refusing to tokenise")
    return arr


class ActionTokenizer:
    """Maps continuous actions in ``[min_action, max_action]`` to the last ``n_bins`` vocabulary ids."""

    def __init__(self, vocab_size: int, n_bins: int = 256, min_action: float = -1.0, max_action: float = 1.0):
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        if vocab_size < n_bins:
            raise ValueError(f"vocab_size ({vocab_size}) must be >= n_bins ({n_bins})")
        if not max_action > min_action:
            raise ValueError(f"max_action ({max_action}) must exceed min_action ({min_action})")
        self.vocab_size = int(vocab_size)
        self.n_bins = int(n_bins)
        self.min_action = float(min_action)
        self.max_action = float(max_action)
        self.bins = np.linspace(self.min_action, self.max_action, self.n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @property
    def action_token_begin_idx(self) -> int:
        """First id of the action range (OpenVLA's name)."""
        return self.vocab_size - self.n_bins

    @property
    def max_roundtrip_error(self) -> float:
        """Largest ``|decode(encode(a)) - a|`` for ``a`` inside the range: half a bin width."""
        return float((self.max_action - self.min_action) / (2 * (self.n_bins - 1)))

    def encode(self, actions: Any) -> np.ndarray:
        """Token ids (int64, same shape as ``actions``); values outside the range are clipped first."""
        arr = _as_finite_array(actions, "actions")
        arr = np.clip(arr, self.min_action, self.max_action)
        return (self.vocab_size - np.digitize(arr, self.bins)).astype(np.int64)

    def decode(self, token_ids: Any) -> np.ndarray:
        """Bin centres (float32) for token ids; ids below the action range clip to the nearest bin."""
        ids = np.asarray(token_ids, dtype=np.int64)
        idx = np.clip(self.vocab_size - ids - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[idx].astype(np.float32)

    def bin_index_to_token(self, bin_index: Any) -> np.ndarray:
        """Index ``k`` into the 256-wide logit slice ``[vocab_size - n_bins, vocab_size)`` -> token id."""
        return np.asarray(bin_index, dtype=np.int64) + self.action_token_begin_idx

    def decode_bin_index(self, bin_index: Any) -> np.ndarray:
        """Decode an index into the action-logit slice (what the runtime's argmax returns)."""
        return self.decode(self.bin_index_to_token(bin_index))


def action_stats(norm_stats: Mapping[str, Any], unnorm_key: str | None) -> dict[str, np.ndarray]:
    """Select ``norm_stats[unnorm_key]["action"]`` as arrays; a single key may be left implicit (as OpenVLA)."""
    if not norm_stats:
        raise ValueError("no normalisation statistics available")
    if unnorm_key is None:
        if len(norm_stats) != 1:
            raise ValueError(f"several datasets in norm_stats, pass unnorm_key= one of {sorted(norm_stats)}")
        unnorm_key = next(iter(norm_stats))
    if unnorm_key not in norm_stats:
        raise ValueError(f"unnorm_key {unnorm_key!r} not in norm_stats (have {sorted(norm_stats)})")
    entry = norm_stats[unnorm_key]
    entry = entry.get("action", entry)
    q01 = _as_finite_array(entry["q01"], "q01")
    q99 = _as_finite_array(entry["q99"], "q99")
    if q01.shape != q99.shape or q01.ndim != 1:
        raise ValueError(f"q01/q99 must be 1-D of equal length, got {q01.shape} and {q99.shape}")
    mask = np.asarray(entry.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    if mask.shape != q01.shape:
        raise ValueError(f"mask shape {mask.shape} does not match q01 shape {q01.shape}")
    return {"q01": q01, "q99": q99, "mask": mask}


def unnormalize_actions(
    normalized: Any, norm_stats: Mapping[str, Any], unnorm_key: str | None = None
) -> np.ndarray:
    """OpenVLA's un-normalisation: ``0.5 * (x + 1) * (q99 - q01) + q01`` where ``mask``, else ``x``."""
    x = _as_finite_array(normalized, "normalized actions")
    s = action_stats(norm_stats, unnorm_key)
    if x.shape[-1] != s["q01"].shape[0]:
        raise ValueError(f"action dim {x.shape[-1]} does not match stats dim {s['q01'].shape[0]}")
    out = np.where(s["mask"], 0.5 * (x + 1.0) * (s["q99"] - s["q01"]) + s["q01"], x)
    return out.astype(np.float32)


def normalize_actions(
    actions: Any, norm_stats: Mapping[str, Any], unnorm_key: str | None = None
) -> np.ndarray:
    """Inverse of :func:`unnormalize_actions`, clipped to ``[-1, 1]`` (OpenVLA's ``BOUNDS_Q99``)."""
    a = _as_finite_array(actions, "actions")
    s = action_stats(norm_stats, unnorm_key)
    if a.shape[-1] != s["q01"].shape[0]:
        raise ValueError(f"action dim {a.shape[-1]} does not match stats dim {s['q01'].shape[0]}")
    span = np.maximum(s["q99"] - s["q01"], 1e-8)
    x = np.where(s["mask"], 2.0 * (a - s["q01"]) / span - 1.0, a)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def compute_norm_stats(actions: Any, mask: Any = None) -> dict[str, dict[str, list]]:
    """OpenVLA-style ``{"action": {...}}`` entry (q01, q99, mean, std, min, max, mask) from ``[N, D]`` actions.

    Dimensions with ``mask`` False (e.g. a binary gripper) are left un-normalised.
    """
    a = _as_finite_array(actions, "actions")
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"actions must be a non-empty [N, D] array, got shape {a.shape}")
    m = np.ones(a.shape[1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != (a.shape[1],):
        raise ValueError(f"mask must have shape ({a.shape[1]},), got {m.shape}")
    return {
        "action": {
            "q01": np.quantile(a, 0.01, axis=0).tolist(),
            "q99": np.quantile(a, 0.99, axis=0).tolist(),
            "mean": a.mean(axis=0).tolist(),
            "std": a.std(axis=0).tolist(),
            "min": a.min(axis=0).tolist(),
            "max": a.max(axis=0).tolist(),
            "mask": m.tolist(),
        }
    }


def identity_norm_stats(action_dim: int, low: float = -1.0, high: float = 1.0) -> dict[str, dict[str, list]]:
    """Stats whose un-normalisation is the identity on ``[low, high]`` (the simulator's native range)."""
    return {
        "action": {
            "q01": [float(low)] * action_dim,
            "q99": [float(high)] * action_dim,
            "mask": [True] * action_dim,
        }
    }
