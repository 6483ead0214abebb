"""The VLA node (``kv_vla``), a managed (lifecycle) node: frames + an instruction in, actions out.

Longer than ~400 lines on purpose: the transitions, the inputs and the step worker share one state
under two locks (``_lock`` for what the executor thread writes, ``_runtime_lock`` for the runtime),
and keeping that locking in one file is what makes it checkable.

Topics are relative, so a namespace or a remap moves them together; names and QoS are in
``interface``, the report in ``diagnostics``, loading the model in ``runtime_factory``, and the
step thread in ``step_loop``. The README (kv_vla_node/README.md) has the full interface.

Lifecycle: configure validates the parameters and loads the model; activate starts answering
frames (a running instruction starts a fresh episode); deactivate publishes one hold (zero) action
and stops; cleanup frees the model. With ``autostart`` (the default) ``main`` configures and
activates at once, so a plain ``ros2 run`` acts like an unmanaged node.

Threading: subscriptions only check headers and store the latest frame and wake the step worker, which
owns the runtime (episode starts, resets, steps, the watchdog, diagnostics). In ``event`` mode it
steps as soon as a new frame is stored (at most ``control_rate_hz`` per second when that is > 0);
in ``timer`` mode a timer at ``control_rate_hz`` wakes it. The parameter callback only records
changes; the worker applies them (``params`` says when each one takes effect).
"""

from __future__ import annotations

import gc
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
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float32MultiArray, String
from std_srvs.srv import Trigger

from kv_vla_node import conversions, diagnostics, params
from kv_vla_node.compressed import compressed_to_rgb
from kv_vla_node.interface import (
    COMPRESSED_TOPIC,
    IMAGE_TOPIC,
    INSTRUCTION_QOS,
    NODE_NAME,
    descriptor,
    image_qos,
)
from kv_vla_node.params import NOW, PARAMS, SPECS
from kv_vla_node.runtime_factory import (
    RuntimeFactory,
    RuntimeSettings,
    build_runtime,
    policy_names,
    runtime_stats,
)
from kv_vla_node.runtime_glue import cache_kwargs
from kv_vla_node.spinning import register_stack_dump, spin_until_shutdown
from kv_vla_node.step_loop import StepLoop

WARN_THROTTLE_S = 2.0
DIAG_PERIOD_S = 1.0
STEP_DIAG_PERIOD_S = 0.1  # diagnostics after a step, at most this often (each costs ~60 key/values)
RESET_TIMEOUT_S = 30.0
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


@dataclass
class _Frame:
    header: Any
    stamp_ns: int  # header stamp, or receipt time when the stamp is zero
    msg: Any  # an Image (header-checked) or a CompressedImage; the worker decodes the one it steps on
    rgb: np.ndarray | None = None


def check_step_mode(values: dict[str, Any]) -> str | None:
    """Why ``step_mode``/``control_rate_hz`` do not go together (None when they do)."""
    if values["step_mode"] == "timer" and values["control_rate_hz"] <= 0:
        return "control_rate_hz must be > 0 in timer mode (0 means 'no cap' in event mode only)"
    return None


class VLANode(LifecycleNode):
    """Runs an ``EpisodeRuntime`` on the newest camera frame while active."""

    def __init__(self, runtime_factory: RuntimeFactory | None = None, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        for spec in PARAMS:
            self.declare_parameter(spec.name, spec.default, descriptor(spec))
        self._factory = runtime_factory or build_runtime
        self._policies = policy_names()
        self._values: dict[str, Any] = {spec.name: self.get_parameter(spec.name).value for spec in PARAMS}
        self.configure_error = ""  # why the last configure failed

        self._lock = threading.Lock()  # guards what the subscription/parameter/service threads touch
        self._runtime_lock = threading.RLock()  # held by the worker's work and by every transition
        self._frame: _Frame | None = None
        self._last_valid_t = time.monotonic()
        self._pending_instruction: str | None = None
        self._reset_request: dict[str, Any] | None = None
        self._tick = False
        self._pending_now: dict[str, Any] = {}
        self._pending_episode: dict[str, Any] = {}
        self._counters = diagnostics.Counters()
        self._last_refusal = ""
        self._last_error = ""
        self._last_error_episode = -1
        self._active = False
        self._runtime: Any = None
        self._loop: StepLoop | None = None
        self._timer: Any = None
        self._step_tokens: int | None = None
        self._active_cache = {k: self._values[k] for k in params.CACHE_KEYS}
        self._clear_episode()
        self._episode = 0

        qos = image_qos(self._values["image_reliability"], int(self._values["image_depth"]))
        events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_image_qos)
        self._action_pub = self.create_lifecycle_publisher(Float32MultiArray, "action", 10)
        self._twist_pub = self.create_lifecycle_publisher(TwistStamped, "action_twist", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Inputs and the reset service in groups of their own: a transition or a reset waiting for
        # the worker never holds up the frames.
        self._input_group = MutuallyExclusiveCallbackGroup()
        group = {"callback_group": self._input_group}
        self.create_subscription(Image, IMAGE_TOPIC, self._on_image, qos, event_callbacks=events, **group)
        self.create_subscription(
            CompressedImage, COMPRESSED_TOPIC, self._on_compressed, qos, event_callbacks=events, **group
        )
        # raw: rclpy's conversion would cut the text at an embedded NUL before the check could see it
        self.create_subscription(
            String, "instruction", self._on_instruction, INSTRUCTION_QOS, raw=True, **group
        )
        self.create_service(
            Trigger, "~/reset", self._on_reset, callback_group=MutuallyExclusiveCallbackGroup()
        )
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

    def _clear_episode(self) -> None:
        self._instruction: str | None = None
        self._episode_step = 0
        self._peak_kv_bytes = 0
        self._last_timings: dict[str, float] = {}
        self._last_stats: Any = None
        self._max_position_id = -1
        self._position_note = ""  # why this episode's positions left the model's range ("" inside it)
        self._last_action: np.ndarray | None = None
        self._holding = False
        self._next_step_t = 0.0
        self._last_diag_t = 0.0

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Validate every parameter and the cache configuration, then load the model."""
        values = dict(self._values)
        reason = next(filter(None, (params.validate(k, v, self._policies) for k, v in values.items())), None)
        reason = reason or check_step_mode(values)
        cache = {k: values[k] for k in params.CACHE_KEYS}
        if reason is None and self._policies is not None:
            reason = params.check_cache_change(cache, {})
        settings = RuntimeSettings(
            values["model_path"],
            values["device"],
            values["dtype"],
            values["gate_path"],
            cache,
            trust_remote_code=values["trust_remote_code"],
            compile=values["compile"],
        )
        with self._runtime_lock:
            try:
                if reason is not None:
                    raise ValueError(f"invalid parameter: {reason}")
                t0 = time.perf_counter()
                self._runtime = self._factory(settings)
            except Exception as exc:  # bad parameters or an unloadable model: stay unconfigured
                self.configure_error = f"{type(exc).__name__}: {exc}"
                self.get_logger().error(f"configure failed: {self.configure_error}")
                return FAILURE
            self.configure_error = ""
            self._step_tokens = getattr(self._runtime, "step_tokens", None)
            self._active_cache = dict(cache)
            self._loop = StepLoop(self._work, lambda exc: self._record_error(f"step worker: {exc!r}"))
            if values["step_mode"] == "timer":
                self._timer = self.create_timer(
                    1.0 / values["control_rate_hz"], self._on_tick, callback_group=self._input_group
                )
        self.get_logger().info(
            f"configured: {settings.model_path} on {settings.device}/{settings.dtype} loaded in "
            f"{time.perf_counter() - t0:.1f} s{self._warm_up_note()}; {values['step_mode']} stepping"
        )
        return SUCCESS

    def _warm_up_note(self) -> str:
        """`` (compiled step: N shapes in S s)`` when the runtime compiled at configure, else ``""``."""
        shapes = getattr(self._runtime, "warmup_s", None)
        if not shapes:
            return ""
        return f" (compiled step: {len(shapes)} shapes in {sum(shapes.values()):.1f} s)"

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the action publishers first
        with self._runtime_lock:
            with self._lock:
                self._frame = None
                if self._pending_instruction is None and self._instruction is not None:
                    self._pending_instruction = self._instruction  # a fresh episode, not a stale cache
                self._last_valid_t = time.monotonic()
            self._active = True
        self._wake()
        self.get_logger().info("active: answering frames")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._runtime_lock:
            self._publish_hold("deactivated")
            self._active = False
        self.get_logger().info("inactive: published one hold action; frames are no longer answered")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("cleaned up: model freed")
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._active:
            self._publish_hold("shutting down")
        self._release()
        return SUCCESS

    def _release(self) -> None:
        """Stop the worker and the timer, then drop the model (and its cache) so its memory is freed."""
        if self._loop is not None:
            self._loop.stop()
        with self._runtime_lock:
            self._loop = None
            if self._timer is not None:
                self.destroy_timer(self._timer)
                self._timer = None
            self._active = False
            self._runtime = None
            with self._lock:
                self._frame = None
                # the instruction outlives the model: the next activation starts it afresh
                self._pending_instruction = self._pending_instruction or self._instruction
            self._clear_episode()
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def destroy_node(self) -> None:
        if self._loop is not None:
            self._loop.stop()
        super().destroy_node()

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, changes: list[Any]) -> SetParametersResult:
        """Validate every change; refuse the whole set with a reason if any value is invalid."""
        for p in changes:
            reason = params.validate(p.name, p.value, self._policies)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        with self._lock:
            candidate = dict(self._values)
        reason = check_step_mode({**candidate, **{p.name: p.value for p in changes}})
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
        """Record accepted changes; the step worker applies them when they take effect."""
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
        if any(p.name == "control_rate_hz" for p in changes) and self._timer is not None:
            self._timer.timer_period_ns = int(1e9 / rate)

    # ------------------------------------------------------------------ inputs
    def _refuse(self, what: str, reason: str) -> None:
        """Count every refusal; the warnings are throttled per kind (one call site each)."""
        with self._lock:
            if what == "frame":
                self._counters.refused_frames += 1
            elif what == "instruction":
                self._counters.refused_instructions += 1
            self._last_refusal = f"{what}: {reason}"
        log = self.get_logger()
        if what == "frame":
            log.warning(f"refused frame: {reason}", throttle_duration_sec=WARN_THROTTLE_S)
        elif what == "instruction":
            log.warning(f"refused instruction: {reason}", throttle_duration_sec=WARN_THROTTLE_S)
        else:
            log.warning(f"refused {what}: {reason}", throttle_duration_sec=WARN_THROTTLE_S)

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.wake()

    def _store(self, frame: _Frame, valid: bool) -> None:
        """Keep only the newest frame (a replaced one is counted as superseded) and wake the worker."""
        with self._lock:
            if self._frame is not None:
                self._counters.superseded_frames += 1
            self._frame = frame
            if valid:
                self._last_valid_t = time.monotonic()
            event_mode = self._values["step_mode"] == "event"
        if event_mode:
            self._wake()

    def _checked_stamp(self, header: Any) -> int | None:
        """The frame's stamp (receipt time when zero), or None for a refused future or a stale one."""
        with self._lock:
            self._counters.frames_received += 1
        now_ns = self.get_clock().now().nanoseconds
        stamp_ns = conversions.stamp_to_ns(header.stamp) or now_ns
        try:
            conversions.check_stamp(stamp_ns, now_ns, float(self._values["max_future_stamp_s"]))
        except conversions.InputRefused as exc:
            self._refuse("frame", str(exc))
            return None
        return None if self._stale(stamp_ns, now_ns) else stamp_ns

    def _stale(self, stamp_ns: int, now_ns: int) -> bool:
        """Count and skip (throttled warning) a frame older than ``max_image_age_s``."""
        age_s, max_age_s = (now_ns - stamp_ns) / 1e9, float(self._values["max_image_age_s"])
        if age_s <= max_age_s:
            return False
        with self._lock:
            self._counters.stale_frames += 1
        self.get_logger().warning(
            f"skipping stale frame: {age_s:.3f} s old > max_image_age_s={max_age_s}",
            throttle_duration_sec=WARN_THROTTLE_S,
        )
        return True

    def _on_image(self, msg: Image) -> None:
        """Check the header (no copy) and store; the worker decodes only the frame it steps on."""
        if not self._active:
            return
        try:
            conversions.check_image(msg, int(self._values["max_image_pixels"]))
        except conversions.InputRefused as exc:
            with self._lock:
                self._counters.frames_received += 1
            self._refuse("frame", str(exc))
            return
        stamp_ns = self._checked_stamp(msg.header)
        if stamp_ns is not None:
            self._store(_Frame(header=msg.header, stamp_ns=stamp_ns, msg=msg), valid=True)

    def _on_compressed(self, msg: CompressedImage) -> None:
        """Store undecoded (validity is known once the worker decodes it)."""
        if not self._active:
            return
        stamp_ns = self._checked_stamp(msg.header)
        if stamp_ns is not None:
            self._store(_Frame(header=msg.header, stamp_ns=stamp_ns, msg=msg), valid=False)

    def _on_incompatible_image_qos(self, event: Any) -> None:
        self.get_logger().warning(
            f"an image publisher's QoS is incompatible ({event.last_policy_kind}); with a best-effort "
            "camera set image_reliability:=best_effort",
            throttle_duration_sec=WARN_THROTTLE_S,
        )

    def _on_instruction(self, raw: bytes) -> None:
        try:
            text = conversions.string_from_cdr(raw)
            text = conversions.validate_instruction(text, int(self._values["max_instruction_chars"]))
        except conversions.InputRefused as exc:
            self._refuse("instruction", str(exc))
            return
        with self._lock:
            self._pending_instruction = text
        self.get_logger().info(f"instruction received: {text!r} (new episode at the next step)")
        self._wake()

    def _on_tick(self) -> None:
        self._tick = True
        self._wake()

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Hand the reset to the worker (it owns the runtime) and wait for its answer."""
        if not self._active:
            response.success, response.message = False, "not active (configure and activate the node first)"
            return response
        done = threading.Event()
        reply: dict[str, Any] = {"done": done}
        with self._lock:
            self._reset_request = reply
        self._wake()
        if not done.wait(RESET_TIMEOUT_S):
            response.success, response.message = False, f"reset not done within {RESET_TIMEOUT_S} s"
            return response
        response.success, response.message = reply["success"], reply["message"]
        return response

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        """One run of the step worker: requests first, then the newest frame, then the watchdog."""
        with self._runtime_lock:
            if self._runtime is None:
                return
            with self._lock:
                instruction, self._pending_instruction = self._pending_instruction, None
                reset, self._reset_request = self._reset_request, None
            if reset is not None:
                self._do_reset(reset, instruction)
            elif instruction is not None and self._active:
                self._start_episode_safely(instruction)
            elif instruction is not None:
                with self._lock:  # inactive: keep it for the activation
                    self._pending_instruction = self._pending_instruction or instruction
            if self._active and self._instruction is not None:
                self._maybe_step()
                self._watchdog()
            if time.monotonic() - self._last_diag_t >= DIAG_PERIOD_S:
                self._publish_diagnostics()

    def _maybe_step(self) -> None:
        values = self._values
        if values["step_mode"] == "timer":
            if not self._tick:
                return
            self._tick = False
        elif self._frame is not None and values["control_rate_hz"] > 0:
            wait_s = self._next_step_t - time.monotonic()  # the cap: take the newest frame after it
            if wait_s > 0 and not (self._loop is not None and self._loop.sleep(wait_s)):
                return
        with self._lock:
            frame, self._frame = self._frame, None
        if frame is None:
            return
        if self._stale(frame.stamp_ns, self.get_clock().now().nanoseconds):  # timer mode: it waited
            return
        try:
            if isinstance(frame.msg, CompressedImage):
                frame.rgb = compressed_to_rgb(frame.msg, int(values["max_image_pixels"]))
                with self._lock:
                    self._last_valid_t = time.monotonic()
            else:
                frame.rgb = conversions.image_to_rgb(frame.msg, int(values["max_image_pixels"]))
        except conversions.InputRefused as exc:
            self._refuse("frame", str(exc))
            return
        rate = float(values["control_rate_hz"])
        self._next_step_t = time.monotonic() + (1.0 / rate if rate > 0 else 0.0)
        try:
            self._step(frame)
        except Exception as exc:  # never let a runtime fault stop the worker
            self._record_error(f"control step failed: {exc!r}")
            self._recover()

    def _watchdog(self) -> None:
        """No valid frame for ``max_image_age_s`` while active: one hold action, WARN until frames return."""
        with self._lock:
            silent_s = time.monotonic() - self._last_valid_t
        if not self._holding and silent_s > float(self._values["max_image_age_s"]):
            self._publish_hold(f"no valid frame for {silent_s:.2f} s")
            self._holding = True
            with self._lock:
                self._counters.watchdog_holds += 1
            self._publish_diagnostics()

    def _publish_hold(self, why: str) -> None:
        """One zero action on both action topics (nothing under ``dry_run`` or before any episode)."""
        if self._instruction is None or bool(self._values["dry_run"]):
            return
        hold = np.zeros(len(self._last_action) if self._last_action is not None else 4, dtype=np.float32)
        now = self.get_clock().now()
        self._action_pub.publish(conversions.action_to_array_msg(hold, now.nanoseconds))
        header = TwistStamped().header
        header.stamp = now.to_msg()
        self._twist_pub.publish(conversions.action_to_twist(hold, header, 0.0))
        self.get_logger().warning(f"published a hold action: {why}")

    # ------------------------------------------------------------------ episodes
    def _start_episode_safely(self, instruction: str) -> None:
        try:
            self._start_episode(instruction)
        except ValueError as exc:  # the runtime's own prompt check; the old episode is intact
            self._refuse("instruction", str(exc))
        except Exception as exc:
            self._record_error(f"episode start failed: {exc!r}")

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
            self._last_valid_t = time.monotonic()
        try:  # the changes and the instruction are checked together; a refusal changes nothing
            self._runtime.reset(instruction, **cache_kwargs(pending))
        except ValueError:
            with self._lock:  # the instruction is refused; the accepted changes stay pending
                self._pending_episode = {**pending, **self._pending_episode}
            raise
        self._active_cache.update(pending)
        self._clear_episode()
        self._instruction = instruction
        self._episode += 1
        self._last_stats = runtime_stats(self._runtime)
        self._peak_kv_bytes = int(getattr(self._last_stats, "kv_bytes", 0) or 0)
        self.get_logger().info(f"episode {self._episode} started: {instruction!r} cache={self._active_cache}")
        self._publish_diagnostics()

    def _do_reset(self, reply: dict[str, Any], instruction: str | None) -> None:
        instruction = instruction or self._instruction
        if instruction is None:
            reply.update(success=True, message="no episode running (no instruction yet); nothing to reset")
        else:
            ended = self._episode
            try:
                self._start_episode(instruction)
                reply.update(
                    success=True,
                    message=f"episode {ended} ended; episode {self._episode} started (cache emptied)",
                )
            except Exception as exc:  # the runtime failed: say so, keep the node alive
                self._record_error(f"reset failed: {exc!r}")
                reply.update(success=False, message=f"reset failed: {exc}")
        reply["done"].set()

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
        self._holding = False
        self._last_timings = dict(result.timings_ms or {})
        self._last_stats = result.cache_stats
        self._peak_kv_bytes = max(self._peak_kv_bytes, int(getattr(result.cache_stats, "kv_bytes", 0) or 0))
        self._max_position_id = int(getattr(result, "max_position_id", -1))  # the episode's running max
        note = getattr(self._runtime, "position_note", None)
        if note and not self._position_note:
            self._position_note = note
            self.get_logger().warning(f"episode {self._episode} step {self._episode_step}: {note}")
        with self._lock:
            self._counters.steps_total += 1
            if not dry_run:
                self._counters.actions_published += 1
        if not dry_run:
            self._action_pub.publish(conversions.action_to_array_msg(action, frame.stamp_ns))
            self._twist_pub.publish(conversions.action_to_twist(action, frame.header, twist_scale))
        if time.monotonic() - self._last_diag_t >= STEP_DIAG_PERIOD_S:
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
        out = diagnostics.status_values(
            episode=self._episode,
            episode_step=self._episode_step,
            instruction=self._instruction,
            stats=self._last_stats,
            peak_kv_bytes=self._peak_kv_bytes,
            max_position_id=self._max_position_id,
            max_position_embeddings=getattr(self._runtime, "position_limit", None),
            position_note=self._position_note,
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
        out["lifecycle_state"] = "active" if self._active else "inactive"
        out["holding"] = str(self._holding).lower()
        return out

    def _publish_diagnostics(self) -> None:
        self._last_diag_t = time.monotonic()
        values = self.diagnostics_values()
        level, message = diagnostics.status_level(
            values, self._episode, self._episode_step, self._last_error_episode == self._episode
        )
        if self._holding and level == diagnostics.OK:
            level = diagnostics.WARN
            message = f"holding: no valid frame for max_image_age_s={values['max_image_age_s']} s"
        stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(diagnostics.diagnostic_array(values, level, message, stamp))


def main(args: list[str] | None = None) -> int:
    """Console entry (``vla_node`` / ``python -m kv_vla_node.vla_node --ros-args ...``)."""
    register_stack_dump()
    # A thread woken by a message (the step worker, the waiting episode loop) gets the GIL within
    # 1 ms instead of the default 5 ms while another thread runs Python code.
    sys.setswitchinterval(0.001)
    rclpy.init(args=args)
    node = VLANode()
    if node.get_parameter("autostart").value:
        if node.trigger_configure() != SUCCESS:
            print(f"kv_vla: cannot start: {node.configure_error}", file=sys.stderr)
            node.destroy_node()
            rclpy.try_shutdown()
            return 1
        node.trigger_activate()
    else:
        node.get_logger().info("unconfigured: waiting for a lifecycle manager (autostart is false)")
    # Every callback only stores, records or hands over to the step worker, so one executor thread
    # is enough and the cheapest path from a frame's arrival to the worker.
    return spin_until_shutdown(node, num_threads=0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
