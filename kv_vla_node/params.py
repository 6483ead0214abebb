"""The VLA node's parameters: one table that the node, the YAML file, the launch files and the tests
all check against, so a parameter cannot exist in one place and be missing in another.

``effect`` says when a valid change takes effect:

* ``startup``: read-only, fixed when the node starts (the model is loaded once);
* ``now``: the next control step;
* ``next_episode``: the next episode (a new instruction or a ``~/reset`` call); a cache cannot change
  its chunking or budget in the middle of an episode without invalidating the chunks it holds.

The ZipVL options are thresholds or a storage format. ``EpisodeCache.update_config`` accepts a live
change of ``extra`` and the policies read it at every decision, so the thresholds (``zipvl_tau``,
``tiered_full_threshold``) apply ``now``, like ``gate_threshold``. The storage format
(``zipvl_low_bits``, ``zipvl_group_size``) waits for the next episode: demotion is one-way, so a live
change would leave one episode's low-precision chunks in two formats and its KV bytes comparable
with neither setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

STARTUP, NOW, NEXT_EPISODE = "startup", "now", "next_episode"
DTYPES = ("float32", "float16", "bfloat16")
STEP_MODES = ("event", "timer")
RELIABILITIES = ("reliable", "best_effort")
DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter: default, meaning, when a change applies, and its valid values."""

    name: str
    default: Any
    description: str
    effect: str
    low: float | None = None
    high: float | None = None
    step: float | None = None  # IntegerRange step for ints; FloatingPointRange step (0 = continuous)
    choices: tuple[str, ...] | None = None


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("model_path", "models/compact-vla", "checkpoint directory (EpisodeRuntime.from_pretrained)", STARTUP),
    ParamSpec("device", "cpu", "torch device: cpu, cuda, cuda:N or mps", STARTUP),
    ParamSpec("dtype", "float32", "model dtype", STARTUP, choices=DTYPES),
    ParamSpec("gate_path", "", "chunk-gate weights; empty = the gate shipped with the model, if any", STARTUP),
    ParamSpec("cache_policy", "gated", "KV eviction policy (a key of kv_vla.cache.POLICIES)", NEXT_EPISODE),
    ParamSpec("chunk_size", 0, "tokens per cache chunk; 0 = the tokens of one control step", NEXT_EPISODE, 0, 65536, 1),
    ParamSpec("gate_threshold", 0.5, "gated policy: evict a chunk whose utility is below this", NOW, 0.0, 1.0, 0.0),
    ParamSpec("recent_chunks", 2, "most recent complete chunks that are never evicted", NEXT_EPISODE, 0, 4096, 1),
    ParamSpec("max_tokens", 0, "KV token budget per episode; 0 = unbounded", NEXT_EPISODE, 0, 10_000_000, 1),
    ParamSpec("zipvl_tau", 0.9, "zipvl: share of attention mass whose chunks stay at full precision (> 0)", NOW, 0.0, 1.0, 0.0),
    ParamSpec("zipvl_low_bits", 4, "zipvl, gated_tiered: bits of low-precision chunks: 2, 4 or 8", NEXT_EPISODE, 2, 8, 2),
    ParamSpec("zipvl_group_size", 32, "zipvl, gated_tiered: quantisation group size (tokens or channels)", NEXT_EPISODE, 1, 65536, 1),
    ParamSpec("tiered_full_threshold", 0.75, "gated_tiered: chunks with utility >= this stay full precision (>= gate_threshold)", NOW, 0.0, 1.0, 0.0),
    ParamSpec("autostart", True, "configure and activate at start-up; false: wait for a lifecycle manager", STARTUP),
    ParamSpec("step_mode", "event", "event: step when a new frame arrives; timer: step at control_rate_hz", STARTUP, choices=STEP_MODES),
    ParamSpec("control_rate_hz", 0.0, "event mode: at most this many steps/s (0 = as fast as frames come); timer mode: the timer's rate (> 0)", NOW, 0.0, 1000.0, 0.0),
    ParamSpec("image_reliability", "reliable", "QoS reliability of the image subscriptions (a reliable one does not match a best-effort camera)", STARTUP, choices=RELIABILITIES),
    ParamSpec("image_depth", 5, "QoS history depth (keep last) of the image subscriptions; the node still steps on the newest frame only", STARTUP, 1, 100, 1),
    ParamSpec("max_future_stamp_s", 0.5, "frames stamped further ahead of the node clock are refused", NOW, 0.0, 1e9, 0.0),
    ParamSpec("max_image_age_s", 1.0, "frames older than this are skipped; no valid frame for this long while active: one hold action", NOW, 0.001, 3600.0, 0.0),
    ParamSpec("action_clip", 1.0, "every action component is clipped to [-action_clip, action_clip]", NOW, 0.0, 1.0, 0.0),
    ParamSpec("dry_run", False, "compute actions and diagnostics but publish no action", NOW),
    ParamSpec("twist_scale", 0.05, "action_twist.linear = (dx, dy, dz) x twist_scale", NOW, 0.0, 10.0, 0.0),
    ParamSpec("max_image_pixels", 4_194_304, "frames with more pixels (width x height) are refused", NOW, 1, 268_435_456, 1),
    ParamSpec("max_instruction_chars", 1000, "longer instructions are refused", NOW, 1, 100_000, 1),
)  # fmt: skip
SPECS: dict[str, ParamSpec] = {p.name: p for p in PARAMS}
# Options of the mixed-precision policies (``zipvl``, ``gated_tiered``); they reach the cache as
# ``EpisodeCacheConfig.extra`` and only for those policies (``runtime_glue.cache_kwargs``).
ZIPVL_KEYS = ("zipvl_tau", "zipvl_low_bits", "zipvl_group_size", "tiered_full_threshold")
LOW_BITS = (2, 4, 8)
CACHE_KEYS = ("cache_policy", "chunk_size", "gate_threshold", "recent_chunks", "max_tokens", *ZIPVL_KEYS)


def validate(name: str, value: Any, policies: tuple[str, ...] | None = None) -> str | None:
    """Return why ``value`` is invalid for parameter ``name`` (None when it is valid).

    Ranges are also declared in the descriptors (rclpy enforces those itself); this covers what a
    range cannot say: string choices, device syntax, the policy registry, non-finite floats.
    """
    spec = SPECS.get(name)
    if spec is None:
        return None  # not ours (e.g. use_sim_time): rclpy handles it
    if isinstance(spec.default, bool):
        return None if isinstance(value, bool) else f"{name} must be a bool"
    if isinstance(spec.default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} must be an integer"
    elif isinstance(spec.default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number"
        if value != value or value in (float("inf"), float("-inf")):
            return f"{name} must be finite"
    elif isinstance(spec.default, str) and not isinstance(value, str):
        return f"{name} must be a string"
    if spec.low is not None and spec.high is not None and not spec.low <= value <= spec.high:
        return f"{name}={value} is outside [{spec.low}, {spec.high}]"
    if spec.choices is not None and value not in spec.choices:
        return f"{name}={value!r} is not one of {', '.join(spec.choices)}"
    if name == "device" and not DEVICE_RE.match(value):
        return f"device={value!r} is not cpu, mps, cuda or cuda:N"
    if name == "cache_policy" and policies is not None and value not in policies:
        return f"cache_policy={value!r} is not one of {', '.join(policies)}"
    if name == "zipvl_low_bits" and value not in LOW_BITS:
        return f"zipvl_low_bits={value} is not one of {', '.join(map(str, LOW_BITS))}"
    if name == "zipvl_tau" and value <= 0.0:
        return f"zipvl_tau={value} is outside (0, 1]: a zero share of the attention mass keeps nothing"
    if name == "model_path" and not value:
        return "model_path must not be empty"
    return None
