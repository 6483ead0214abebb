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
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import TwistStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray, String
from std_srvs.srv import Trigger

from kv_vla_node import conversions, diagnostics, params
from kv_vla_node.interface import IMAGE_QOS, INSTRUCTION_QOS, NODE_NAME, descriptor
from kv_vla_node.params import NOW, PARAMS, SPECS
from kv_vla_node.runtime_factory import (
    RuntimeFactory,
    RuntimeSettings,
    build_runtime,
    policy_names,
    runtime_stats,
)
from kv_vla_node.runtime_glue import cache_kwargs, check_cache_values
from kv_vla_node.spinning import register_stack_dump, spin_until_shutdown

WARN_THROTTLE_S = 2.0


@dataclass
class _Frame:
    rgb: np.ndarray
    header: Any
    stamp_ns: int  # header stamp, or receipt time when the stamp is zero


class VLANode(Node):
    """Runs an ``EpisodeRuntime`` once per control step on the latest camera frame."""

    def __init__(self, runtime_factory: RuntimeFactory | None = None, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        for spec in PARAMS:
            self.declare_parameter(spec.name, spec.default, descriptor(spec))
        self._policies = policy_names()
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
        self._counters = diagnostics.Counters()
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
        )
        t0 = time.perf_counter()
        self._runtime = (runtime_factory or build_runtime)(settings)
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
            with self._lock:
                candidate = {k: self._values[k] for k in params.CACHE_KEYS}
                running = self._instruction is not None
            candidate.update(cache_changes)
            pinned = getattr(self._last_stats, "pinned_tokens", None) if running else None
            reason = check_cache_values(candidate, self._step_tokens, pinned_tokens=pinned)
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
        self._runtime.reset(instruction)
        if pending:
            try:
                self._runtime.update_cache_config(
                    **cache_kwargs(pending, self._step_tokens, self._active_cache)
                )
                self._active_cache.update(pending)
            except ValueError as exc:
                self._refuse("parameter", f"cache change {pending} refused at episode start: {exc}")
        self._instruction = instruction
        self._episode += 1
        self._episode_step = 0
        self._last_timings = {}
        self._last_action = None
        self._last_stats = runtime_stats(self._runtime)
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
        with self._lock:
            counters = diagnostics.Counters(**vars(self._counters))
            values = dict(self._values)
            pending = {**self._pending_now, **self._pending_episode}
            last_refusal, last_error = self._last_refusal, self._last_error
        return diagnostics.status_values(
            episode=self._episode,
            episode_step=self._episode_step,
            instruction=self._instruction,
            stats=self._last_stats,
            peak_kv_bytes=self._peak_kv_bytes,
            timings=self._last_timings,
            active_cache=self._active_cache,
            cache_config=getattr(self._runtime, "cache_config", None),
            pending=pending,
            values=values,
            last_action=self._last_action,
            counters=counters,
            last_refusal=last_refusal,
            last_error=last_error,
        )

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics_values()
        level, message = diagnostics.status_level(
            values, self._episode, self._episode_step, self._last_error_episode == self._episode
        )
        stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(diagnostics.diagnostic_array(values, level, message, stamp))


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
