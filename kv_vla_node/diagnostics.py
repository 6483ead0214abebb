"""What the VLA node reports on ``/diagnostics``: counters, key/values and the status level.

Pure functions of the node's state (no node, no DDS), so the report's contents and levels are
decided in one place and the node file keeps only the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from kv_vla_node.interface import DIAG_NAME
from kv_vla_node.params import CACHE_KEYS

STATS_KEYS = (
    "seen_tokens",
    "kept_tokens",
    "pinned_tokens",
    "evicted_tokens",
    "kept_chunks",
    "evicted_chunks",
)
TIMING_KEYS = ("vision", "prefill", "decode", "total")
OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
REPORTED_PARAMS = (
    "step_mode",
    "image_reliability",
    "action_clip",
    "dry_run",
    "control_rate_hz",
    "max_image_age_s",
    "device",
    "dtype",
    "model_path",
)


@dataclass
class Counters:
    """Every refusal, skip, error, step and published action since the node started."""

    frames_received: int = 0  # every Image / CompressedImage the subscriptions got while active
    refused_frames: int = 0
    refused_instructions: int = 0
    stale_frames: int = 0
    superseded_frames: int = 0  # replaced by a newer frame before the worker took them (not refused)
    watchdog_holds: int = 0
    step_errors: int = 0
    steps_total: int = 0
    actions_published: int = 0


def status_values(
    *,
    episode: int,
    episode_step: int,
    instruction: str | None,
    stats: Any,
    peak_kv_bytes: int,
    timings: dict[str, float],
    active_cache: dict[str, Any],
    cache_config: Any,
    pending: dict[str, Any],
    values: dict[str, Any],
    last_action: np.ndarray | None,
    counters: Counters,
    last_refusal: str,
    last_error: str,
    max_position_id: int = -1,
    max_position_embeddings: int | None = None,
    position_note: str = "",
) -> dict[str, str]:
    """The key/values of the diagnostics status (strings, as DiagnosticStatus carries them).

    ``max_position_embeddings`` is ``-1`` where the model's config states none; ``position_note``
    says why this episode's positions are out of that range (empty while inside it).
    """
    out: dict[str, str] = {
        "episode": str(episode),
        "episode_step": str(episode_step),
        "instruction": instruction or "",
        "kv_bytes": str(int(getattr(stats, "kv_bytes", 0) or 0)),
        "peak_kv_bytes": str(peak_kv_bytes),
        "max_position_id": str(max_position_id),
        "max_position_embeddings": str(-1 if max_position_embeddings is None else max_position_embeddings),
        "position_note": position_note,
    }
    for key in STATS_KEYS:
        out[key] = str(int(getattr(stats, key, 0) or 0))
    for key in TIMING_KEYS:
        out[f"latency_{key}_ms"] = f"{float(timings.get(key, 0.0)):.3f}"
    for key in CACHE_KEYS:
        out[key] = str(active_cache[key])
    out["chunk_size_tokens"] = str(getattr(cache_config, "chunk_size", active_cache["chunk_size"]))
    extra = getattr(cache_config, "extra", None) or {}
    out["cache_extra"] = ",".join(f"{k}={v}" for k, v in sorted(extra.items()))  # what the cache got
    out["pending_next_episode"] = ",".join(f"{k}={v}" for k, v in sorted(pending.items()))
    for key in REPORTED_PARAMS:
        out[key] = str(values[key])
    out["last_action"] = "" if last_action is None else ",".join(f"{v:.4f}" for v in last_action.tolist())
    for key, value in vars(counters).items():
        out[key] = str(value)
    out["last_refusal"] = last_refusal
    out["last_error"] = last_error
    return out


def status_level(
    values: dict[str, str], episode: int, episode_step: int, error_in_this_episode: bool
) -> tuple[bytes, str]:
    """(level, message): ERROR for a fault in this episode, WARN once recovered or while positions
    are out of the model's range, else OK."""
    if values["last_error"] and error_in_this_episode:
        return DiagnosticStatus.ERROR, values["last_error"][:200]
    if values["last_error"]:
        return (
            DiagnosticStatus.WARN,
            f"episode {episode} step {episode_step}; recovered from: {values['last_error'][:150]}",
        )
    if values.get("position_note"):
        return (
            DiagnosticStatus.WARN,
            f"episode {episode} step {episode_step}; {values['position_note'][:150]}",
        )
    if not values["instruction"]:
        return DiagnosticStatus.OK, "idle: waiting for an instruction"
    return DiagnosticStatus.OK, f"episode {episode} step {episode_step}"


def diagnostic_array(values: dict[str, str], level: bytes, message: str, stamp: Any) -> DiagnosticArray:
    """One ``DiagnosticArray`` holding the node's status."""
    status = DiagnosticStatus(name=DIAG_NAME, hardware_id=values["device"], level=level, message=message)
    status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
    msg = DiagnosticArray(status=[status])
    msg.header.stamp = stamp
    return msg
