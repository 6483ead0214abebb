"""The VLA node (``kv_vla``): camera frames + an instruction in, one action per control step out.

Topics (relative names, so a namespace or a remap moves them together):

* ``image`` (sensor_msgs/Image, sensor-data QoS: best effort, keep last 1) — only the latest frame is
  kept; rgb8, bgr8, rgba8, bgra8 and mono8 are decoded in the subscription callback, anything else
  (or a malformed/zero-size/oversized frame) is refused with a logged reason.
* ``instruction`` (std_msgs/String, reliable + transient local, depth 1, so a node started late still
  gets the last instruction) — every accepted message starts a new episode at the next control step.
* ``action`` (std_msgs/Float32MultiArray, labelled layout carrying the answered frame's stamp, see
  ``conversions``) and ``action_twist`` (geometry_msgs/TwistStamped with the frame's header).
* ``/diagnostics`` (diagnostic_msgs/DiagnosticArray): KV bytes, kept/evicted chunks and tokens, step
  latency, the active and pending cache parameters, refusal counters and the last refusal reason.
* service ``~/reset`` (std_srvs/Trigger): ends the current episode; the cache is emptied down to the
  instruction prompt and the next frame is step 0 of a new episode with the same instruction.

Threading: subscriptions only decode and store (their own callback group); a timer at
``control_rate_hz`` in a MutuallyExclusiveCallbackGroup runs the model, and the reset service and the
diagnostics timer share that group, so the runtime is only ever touched from one callback at a time.
The parameter callback runs elsewhere and only records changes; the step applies them (see
``params`` for when each one takes effect). Run it with a MultiThreadedExecutor (``main``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TwistStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray, String
from std_srvs.srv import Trigger

from kv_vla_node import conversions, params
from kv_vla_node.params import NOW, PARAMS, SPECS, STARTUP
from kv_vla_node.runtime_glue import build_runtime, cache_kwargs
from kv_vla_node.spinning import register_stack_dump, spin_until_shutdown

NODE_NAME = "kv_vla"
DIAG_NAME = "kv_vla: episode KV cache"
WARN_THROTTLE_S = 2.0

# Sensor-data QoS with depth 1: a slow step never works through a backlog of old frames.
IMAGE_QOS = QoSProfile(
    depth=1,
    reliability=qos_profile_sensor_data.reliability,
    durability=qos_profile_sensor_data.durability,
    history=qos_profile_sensor_data.history,
)
INSTRUCTION_QOS = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


@dataclass
class RuntimeSettings:
    """What a runtime factory needs: the read-only model settings and the cache parameters."""

    model_path: str
    device: str
    dtype: str
    gate_path: str
    cache: dict[str, Any] = field(default_factory=dict)  # node parameter names (params.CACHE_KEYS)
    trust_remote_code: bool = False


RuntimeFactory = Callable[[RuntimeSettings], Any]


def default_runtime_factory(settings: RuntimeSettings) -> Any:
    """Build the real ``EpisodeRuntime`` (imports torch lazily; see ``kv_vla_node.runtime_glue``)."""
    return build_runtime(settings)


def _descriptor(spec: params.ParamSpec) -> ParameterDescriptor:
    desc = ParameterDescriptor(
        name=spec.name,
        description=f"{spec.description} [takes effect: {spec.effect}]",
        read_only=spec.effect == STARTUP,
    )
    if spec.choices:
        desc.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.low is not None and spec.high is not None:
        if isinstance(spec.default, float):
            desc.floating_point_range = [
                FloatingPointRange(
                    from_value=float(spec.low), to_value=float(spec.high), step=float(spec.step or 0.0)
                )
            ]
        else:
            desc.integer_range = [
                IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=int(spec.step or 1))
            ]
    return desc


@dataclass
class _Frame:
    rgb: np.ndarray
    header: Any
    stamp_ns: int  # header stamp, or receipt time when the stamp is zero


@dataclass
class _Counters:
    refused_frames: int = 0
    refused_instructions: int = 0
    stale_frames: int = 0
    step_errors: int = 0
    steps_total: int = 0
    actions_published: int = 0


class VLANode(Node):
    """Runs an ``EpisodeRuntime`` once per control step on the latest camera frame."""

    def __init__(self, runtime_factory: RuntimeFactory | None = None, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        for spec in PARAMS:
            self.declare_parameter(spec.name, spec.default, _descriptor(spec))
        self._policies = _policy_names()
        self._values: dict[str, Any] = {spec.name: self.get_parameter(spec.name).value for spec in PARAMS}
        for name, value in self._values.items():
            reason = params.validate(name, value, self._policies)
            if reason:
                raise ValueError(f"invalid parameter: {reason}")

        self._lock = threading.Lock()  # guards everything the subscription/parameter threads touch
        self._frame: _Frame | None = None
        self._answered_stamp_ns: int | None = None
        self._pending_instruction: str | None = None
        self._pending_now: dict[str, Any] = {}
        self._pending_episode: dict[str, Any] = {}
        self._counters = _Counters()
        self._last_refusal = ""
        self._last_error = ""
        self._last_error_episode = -1

        # State touched only from the step group.
        self._instruction: str | None = None
        self._episode = 0
        self._episode_step = 0
        self._peak_kv_bytes = 0
        self._last_timings: dict[str, float] = {}
        self._last_stats: Any = None
        self._last_action: np.ndarray | None = None
        self._active_cache = {k: self._values[k] for k in params.CACHE_KEYS}

        settings = RuntimeSettings(
            model_path=self._values["model_path"],
            device=self._values["device"],
            dtype=self._values["dtype"],
            gate_path=self._values["gate_path"],
            cache=dict(self._active_cache),
            trust_remote_code=self._values["trust_remote_code"],
        )
        t0 = time.perf_counter()
        self._runtime = (runtime_factory or default_runtime_factory)(settings)
        self._step_tokens: int | None = getattr(self._runtime, "step_tokens", None)
        self.get_logger().info(
            f"loaded {settings.model_path} on {settings.device}/{settings.dtype} in {time.perf_counter() - t0:.1f} s"
        )

        self._input_group = MutuallyExclusiveCallbackGroup()
        self._step_group = MutuallyExclusiveCallbackGroup()
        self._action_pub = self.create_publisher(Float32MultiArray, "action", 10)
        self._twist_pub = self.create_publisher(TwistStamped, "action_twist", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(Image, "image", self._on_image, IMAGE_QOS, callback_group=self._input_group)
        self.create_subscription(
            String, "instruction", self._on_instruction, INSTRUCTION_QOS, callback_group=self._input_group
        )
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=self._step_group)
        self._step_timer = self.create_timer(
            1.0 / self._values["control_rate_hz"], self._on_control_tick, callback_group=self._step_group
        )
        self.create_timer(1.0, self._publish_diagnostics, callback_group=self._step_group)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)
        self.get_logger().info("ready: waiting for an instruction and frames")

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, changes: list[Any]) -> SetParametersResult:
        """Validate every change; refuse the whole set with a reason if any value is invalid."""
        for p in changes:
            reason = params.validate(p.name, p.value, self._policies)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        cache_changes = {p.name: p.value for p in changes if p.name in params.CACHE_KEYS}
        if cache_changes and self._policies is not None:
            with self._lock:  # the accepted values (refused ones never get here)
                active = {k: self._values[k] for k in params.CACHE_KEYS}
                running = self._instruction is not None
            pinned = getattr(self._last_stats, "pinned_tokens", None)
            layout = params.prompt_layout(self._runtime, running, pinned)
            reason = params.check_cache_change(active, cache_changes, *layout)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, changes: list[Any]) -> None:
        """Record accepted changes; the control step applies them when they take effect."""
        with self._lock:
            for p in changes:
                spec = SPECS.get(p.name)
                if spec is None:
                    continue
                self._values[p.name] = p.value
                if p.name in params.CACHE_KEYS:
                    target = self._pending_now if spec.effect == NOW else self._pending_episode
                    target[p.name] = p.value
                self.get_logger().info(f"parameter {p.name} = {p.value!r} (takes effect: {spec.effect})")
            rate = self._values["control_rate_hz"]
        if any(p.name == "control_rate_hz" for p in changes):
            self._step_timer.timer_period_ns = int(1e9 / rate)

    # ------------------------------------------------------------------ inputs
    def _refuse(self, what: str, reason: str) -> None:
        with self._lock:
            if what == "frame":
                self._counters.refused_frames += 1
            elif what == "instruction":
                self._counters.refused_instructions += 1
            self._last_refusal = f"{what}: {reason}"
        self.get_logger().warning(f"refused {what}: {reason}")

    def _on_image(self, msg: Image) -> None:
        """Decode and store the latest frame; no inference here."""
        with self._lock:
            max_pixels = int(self._values["max_image_pixels"])
        try:
            rgb = conversions.image_to_rgb(msg, max_pixels)
        except conversions.InputRefused as exc:
            self._refuse("frame", str(exc))
            return
        stamp_ns = conversions.stamp_to_ns(msg.header.stamp) or self.get_clock().now().nanoseconds
        with self._lock:
            self._frame = _Frame(rgb=rgb, header=msg.header, stamp_ns=stamp_ns)

    def _on_instruction(self, msg: String) -> None:
        with self._lock:
            max_chars = int(self._values["max_instruction_chars"])
        try:
            text = conversions.validate_instruction(msg.data, max_chars)
        except conversions.InputRefused as exc:
            self._refuse("instruction", str(exc))
            return
        with self._lock:
            self._pending_instruction = text
        self.get_logger().info(f"instruction received: {text!r} (new episode at the next control step)")

    # ------------------------------------------------------------------ episodes
    def _start_episode(self, instruction: str) -> None:
        """Reset the runtime (cache emptied down to the pinned prompt), then apply next-episode changes.

        The changes are applied to the fresh cache while it holds only the prompt, so a new chunk size
        or budget never meets chunks cut under the old one; a change the cache refuses (e.g. a budget
        smaller than this prompt) is reported and the previous value stays active.
        """
        with self._lock:
            pending, self._pending_episode = self._pending_episode, {}
            pending.update(self._pending_now)
            self._pending_now = {}
            self._frame = None  # a frame from before the reset never answers into the new episode
        try:  # the changes and the instruction are checked together; a refusal changes nothing
            self._runtime.reset(instruction, **cache_kwargs(pending))
        except ValueError:
            with self._lock:  # the instruction is refused; the accepted changes stay pending
                self._pending_episode = {**pending, **self._pending_episode}
            raise
        self._active_cache.update(pending)
        self._instruction = instruction
        self._episode += 1
        self._episode_step = 0
        self._last_timings = {}
        self._last_action = None
        self._last_stats = _runtime_stats(self._runtime)
        self._peak_kv_bytes = int(getattr(self._last_stats, "kv_bytes", 0) or 0)
        self.get_logger().info(f"episode {self._episode} started: {instruction!r} cache={self._active_cache}")
        self._publish_diagnostics()

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self._instruction is None:
            with self._lock:
                pending = self._pending_instruction
            if pending is None:
                response.success = True
                response.message = "no episode running (no instruction yet); nothing to reset"
                return response
        ended = self._episode
        try:
            with self._lock:
                instruction = self._pending_instruction or self._instruction
                self._pending_instruction = None
            self._start_episode(instruction)
        except Exception as exc:  # the runtime failed: say so, keep the node alive
            self._record_error(f"reset failed: {exc!r}")
            response.success, response.message = False, f"reset failed: {exc}"
            return response
        response.success = True
        response.message = f"episode {ended} ended; episode {self._episode} started (cache emptied)"
        return response

    # ------------------------------------------------------------------ control step
    def _on_control_tick(self) -> None:
        with self._lock:
            instruction, self._pending_instruction = self._pending_instruction, None
            frame = self._frame
            max_age_s = float(self._values["max_image_age_s"])
        if instruction is not None:
            try:
                self._start_episode(instruction)
            except ValueError as exc:  # the runtime's own prompt check; the old episode is intact
                self._refuse("instruction", str(exc))
            except Exception as exc:
                self._record_error(f"episode start failed: {exc!r}")
            return
        try:
            if self._instruction is None or frame is None or frame.stamp_ns == self._answered_stamp_ns:
                return
            self._answered_stamp_ns = frame.stamp_ns
            age_s = (self.get_clock().now().nanoseconds - frame.stamp_ns) / 1e9
            if age_s > max_age_s:
                with self._lock:
                    self._counters.stale_frames += 1
                self.get_logger().warning(
                    f"skipping stale frame: {age_s:.3f} s old > max_image_age_s={max_age_s}",
                    throttle_duration_sec=WARN_THROTTLE_S,
                )
                return
            self._step(frame)
        except Exception as exc:  # never let a runtime fault kill the executor thread
            self._record_error(f"control step failed: {exc!r}")
            self._recover()

    def _recover(self) -> None:
        """After a runtime fault the episode's cache may be half-written: start the episode again."""
        if self._instruction is None:
            return
        try:
            self._start_episode(self._instruction)
        except Exception as exc:
            self._record_error(f"restart after a fault failed: {exc!r}")
            return
        self.get_logger().warning(f"restarted as episode {self._episode} after a runtime fault")

    def _step(self, frame: _Frame) -> None:
        with self._lock:
            now_changes, self._pending_now = self._pending_now, {}
            clip = float(self._values["action_clip"])
            dry_run = bool(self._values["dry_run"])
            twist_scale = float(self._values["twist_scale"])
        if now_changes:
            try:
                self._runtime.update_cache_config(
                    **cache_kwargs(now_changes, self._step_tokens, self._active_cache)
                )
                self._active_cache.update(now_changes)
            except ValueError as exc:
                self._refuse("parameter", f"cache change {now_changes} refused: {exc}")
        result = self._runtime.step(frame.rgb)
        action = conversions.clip_action(result.action, clip)
        self._episode_step += 1
        self._last_action = action
        self._last_timings = dict(result.timings_ms or {})
        self._last_stats = result.cache_stats
        self._peak_kv_bytes = max(self._peak_kv_bytes, int(getattr(result.cache_stats, "kv_bytes", 0) or 0))
        with self._lock:
            self._counters.steps_total += 1
            if not dry_run:
                self._counters.actions_published += 1
        if not dry_run:
            self._action_pub.publish(conversions.action_to_array_msg(action, frame.stamp_ns))
            self._twist_pub.publish(conversions.action_to_twist(action, frame.header, twist_scale))
        self._publish_diagnostics()

    def _record_error(self, message: str) -> None:
        with self._lock:
            self._counters.step_errors += 1
            self._last_error = message
            self._last_error_episode = self._episode
        self.get_logger().error(message, throttle_duration_sec=WARN_THROTTLE_S)

    # ------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict[str, str]:
        """The key/values of the diagnostics status (strings, as DiagnosticStatus carries them)."""
        stats = self._last_stats
        with self._lock:
            counters = self._counters
            values = dict(self._values)
            pending = {**self._pending_now, **self._pending_episode}
            last_refusal, last_error = self._last_refusal, self._last_error
        out: dict[str, str] = {
            "episode": str(self._episode),
            "episode_step": str(self._episode_step),
            "instruction": self._instruction or "",
            "kv_bytes": str(int(getattr(stats, "kv_bytes", 0) or 0)),
            "peak_kv_bytes": str(self._peak_kv_bytes),
        }
        for key in (
            "seen_tokens",
            "kept_tokens",
            "pinned_tokens",
            "evicted_tokens",
            "kept_chunks",
            "evicted_chunks",
        ):
            out[key] = str(int(getattr(stats, key, 0) or 0))
        for key in ("vision", "prefill", "decode", "total"):
            out[f"latency_{key}_ms"] = f"{float(self._last_timings.get(key, 0.0)):.3f}"
        for key in params.CACHE_KEYS:
            out[key] = str(self._active_cache[key])
        active_config = getattr(self._runtime, "cache_config", None)
        out["chunk_size_tokens"] = str(getattr(active_config, "chunk_size", self._active_cache["chunk_size"]))
        extra = getattr(active_config, "extra", None) or {}
        out["cache_extra"] = ",".join(f"{k}={v}" for k, v in sorted(extra.items()))  # what the cache got
        out["pending_next_episode"] = ",".join(f"{k}={v}" for k, v in sorted(pending.items()))
        for key in (
            "action_clip",
            "dry_run",
            "control_rate_hz",
            "max_image_age_s",
            "device",
            "dtype",
            "model_path",
        ):
            out[key] = str(values[key])
        out["last_action"] = (
            "" if self._last_action is None else ",".join(f"{v:.4f}" for v in self._last_action.tolist())
        )
        for key, value in vars(counters).items():
            out[key] = str(value)
        out["last_refusal"] = last_refusal
        out["last_error"] = last_error
        return out

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics_values()
        status = DiagnosticStatus(name=DIAG_NAME, hardware_id=values["device"])
        if values["last_error"] and self._last_error_episode == self._episode:
            status.level, status.message = DiagnosticStatus.ERROR, values["last_error"][:200]
        elif values["last_error"]:
            status.level = DiagnosticStatus.WARN
            status.message = f"episode {self._episode} step {self._episode_step}; recovered from: {values['last_error'][:150]}"
        elif self._instruction is None:
            status.level, status.message = DiagnosticStatus.OK, "idle: waiting for an instruction"
        else:
            status.level, status.message = (
                DiagnosticStatus.OK,
                f"episode {self._episode} step {self._episode_step}",
            )
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)


def _policy_names() -> tuple[str, ...] | None:
    """The registered cache policies, or None (no registry check) when the cache room is absent."""
    try:
        from kv_vla.cache import POLICIES
    except ImportError:
        return None
    return tuple(POLICIES)


def _runtime_stats(runtime: Any) -> Any:
    """The runtime's cache stats right after a reset (None when it exposes no cache)."""
    cache = getattr(runtime, "cache", None)
    try:
        return cache.stats() if cache is not None else None
    except Exception:
        return None


def main(args: list[str] | None = None) -> int:
    """Console entry (``vla_node`` / ``python -m kv_vla_node.vla_node --ros-args ...``)."""
    register_stack_dump()
    rclpy.init(args=args)
    try:
        node = VLANode()
    except Exception as exc:  # bad startup parameters or an unloadable model: exit with the reason
        print(f"kv_vla: cannot start: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    return spin_until_shutdown(node, num_threads=4)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
