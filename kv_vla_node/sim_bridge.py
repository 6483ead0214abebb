"""The sim bridge node (``kv_vla_sim_bridge``): the PyBullet tabletop as a ROS 2 robot.

For each task and episode it resets the environment, publishes the instruction (reliable, transient
local), then per control step publishes the camera frame on ``image`` (stamped with the node clock)
and waits for the ``action`` that answers exactly that frame (the action's layout carries the frame
stamp, see ``kv_vla_node.conversions``), applies it and steps the simulator. An episode ends on
success, on the environment's termination/truncation or at ``max_steps``.

Episode boundaries rely on the instruction, not on ``~/reset``: every instruction message starts a new
episode in the VLA node, and the bridge waits until the node's diagnostics report that new episode
before sending its first frame, so no frame of the new episode is answered by the old cache.

Each episode's result (task, seed, success, steps, peak KV bytes and kept/seen tokens from the node's
diagnostics, step latency p50) is logged, published on ``episode_result`` (std_msgs/String, JSON, transient local) and,
with ``results_path`` set, all results are written to that JSON file when the run ends.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import IntegerRange, ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray, String

from kv_vla.atomic import atomic_write_json
from kv_vla_node import conversions
from kv_vla_node.interface import DIAG_NAME, IMAGE_QOS, INSTRUCTION_QOS
from kv_vla_node.spinning import BackgroundSpin, exit_after, register_stack_dump

NODE_NAME = "kv_vla_sim_bridge"
RESULT_QOS = QoSProfile(
    depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON via a temp file in the same folder and ``os.replace`` (never a half-written file)."""
    atomic_write_json(path, payload)


class SimBridgeNode(Node):
    """Runs episodes of ``kv_vla_sim`` tasks against the VLA node over topics."""

    def __init__(self, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self.declare_parameter(
            "tasks", ["cued_reach"], ParameterDescriptor(description="kv_vla_sim task names")
        )
        self.declare_parameter("episodes_per_task", 2, _int_desc("episodes per task", 1, 10_000))
        self.declare_parameter("seed_offset", 0, _int_desc("seed of a task's first episode", 0, 999_999))
        self.declare_parameter("image_size", 64, _int_desc("rendered frame side (pixels)", 16, 1024))
        self.declare_parameter(
            "max_steps", 0, _int_desc("step cap per episode; 0 = the task's own", 0, 100_000)
        )
        self.declare_parameter("action_timeout_s", 10.0, ParameterDescriptor(description="wait per frame"))
        self.declare_parameter(
            "frame_retries", 3, _int_desc("frames re-sent before an episode fails", 0, 100)
        )
        self.declare_parameter(
            "startup_timeout_s", 180.0, ParameterDescriptor(description="wait for the VLA node")
        )
        self.declare_parameter(
            "encoding", "rgb8", ParameterDescriptor(description="image encoding to publish")
        )
        self.declare_parameter(
            "frame_id", "sim_camera", ParameterDescriptor(description="frames' header.frame_id")
        )
        self.declare_parameter(
            "results_path", "", ParameterDescriptor(description="JSON file for all results")
        )

        self._cond = threading.Condition()
        self._actions: dict[int, np.ndarray] = {}  # answered frame stamp -> action
        self._diag: dict[str, str] = {}
        self._step_latency: dict[tuple[int, int], float] = {}  # (episode, step) -> node total ms
        self.results: list[dict[str, Any]] = []

        self._image_pub = self.create_publisher(Image, "image", IMAGE_QOS)
        self._instruction_pub = self.create_publisher(String, "instruction", INSTRUCTION_QOS)
        self._result_pub = self.create_publisher(String, "episode_result", RESULT_QOS)
        self.create_subscription(Float32MultiArray, "action", self._on_action, 10)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)

    def _p(self, name: str) -> Any:
        return self.get_parameter(name).value

    # ------------------------------------------------------------------ subscriptions
    def _on_action(self, msg: Float32MultiArray) -> None:
        action, stamp_ns = conversions.array_msg_to_action(msg)
        if stamp_ns is None:
            return
        with self._cond:
            self._actions[stamp_ns] = action
            self._cond.notify_all()

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name != DIAG_NAME:
                continue
            values = {kv.key: kv.value for kv in status.values}
            with self._cond:
                self._diag = values
                try:
                    key = (int(values["episode"]), int(values["episode_step"]))
                    if key[1] > 0:
                        self._step_latency[key] = float(values["latency_total_ms"])
                except (KeyError, ValueError):
                    pass
                self._cond.notify_all()

    def _wait(self, predicate: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or not rclpy.ok():
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def _diag_int(self, key: str) -> int:
        try:
            return int(self._diag.get(key, "0"))
        except ValueError:
            return 0

    # ------------------------------------------------------------------ episodes
    def run(self) -> list[dict[str, Any]]:
        """Run every configured episode (blocking; spin the node in another thread)."""
        from kv_vla_sim import TASKS, make_env

        tasks = list(self._p("tasks"))
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
        episodes = int(self._p("episodes_per_task"))
        if not self._wait(lambda: self.count_subscribers("image") > 0, float(self._p("startup_timeout_s"))):
            raise TimeoutError("no VLA node subscribed to 'image' within startup_timeout_s")
        for task in tasks:
            env = make_env(task, image_size=int(self._p("image_size")))
            try:
                for i in range(episodes):
                    seed = int(self._p("seed_offset")) + i
                    result = self.run_episode(env, task, seed)
                    self.results.append(result)
                    self._result_pub.publish(String(data=json.dumps(result)))
                    self.get_logger().info(f"episode_result {json.dumps(result)}")
                    if not rclpy.ok():
                        return self.results
            finally:
                close = getattr(env, "close", None)
                if callable(close):
                    close()
        if self._p("results_path"):
            write_json_atomic(self._p("results_path"), self.results)
        return self.results

    def run_episode(self, env: Any, task: str, seed: int) -> dict[str, Any]:
        """One closed-loop episode; returns its result record."""
        obs, info = env.reset(seed=seed)
        instruction = str(info["instruction"])
        max_steps = int(self._p("max_steps")) or int(info.get("max_steps", 100))
        with self._cond:
            previous_episode = self._diag_int("episode")
        self._instruction_pub.publish(String(data=instruction))
        started = self._wait(
            lambda: (
                self._diag_int("episode") > previous_episode and self._diag.get("instruction") == instruction
            ),
            float(self._p("startup_timeout_s")),
        )
        record: dict[str, Any] = {"task": task, "seed": seed, "instruction": instruction}
        if not started:
            return {**record, "success": False, "steps": 0, "error": "the VLA node did not start the episode"}
        with self._cond:
            episode = self._diag_int("episode")

        success, steps, error, round_trips = False, 0, "", []
        loop_t0 = time.perf_counter()
        while steps < max_steps and rclpy.ok():
            answered = self._exchange(obs["image"])
            if answered is None:
                error = "no action answered the frame"
                break
            action, rtt_ms = answered
            round_trips.append(rtt_ms)
            obs, _reward, terminated, truncated, info = env.step(action.astype(np.float32))
            steps += 1
            success = bool(info.get("success", False))
            if success or terminated or truncated:
                break
        wall_s = time.perf_counter() - loop_t0

        # The node publishes diagnostics right after each action; wait for the last step's.
        self._wait(
            lambda: self._diag_int("episode") != episode or self._diag_int("episode_step") >= steps, 2.0
        )
        with self._cond:
            diag = dict(self._diag)
            latencies = [ms for (ep, _), ms in self._step_latency.items() if ep == episode]
        same_episode = diag.get("episode") == str(episode)
        record.update(
            success=success,
            steps=steps,
            max_steps=max_steps,
            peak_kv_bytes=int(diag.get("peak_kv_bytes", 0)) if same_episode else None,
            final_kv_bytes=int(diag.get("kv_bytes", 0)) if same_episode else None,
            evicted_chunks=int(diag.get("evicted_chunks", 0)) if same_episode else None,
            seen_tokens=int(diag.get("seen_tokens", 0)) if same_episode else None,
            kept_tokens=int(diag.get("kept_tokens", 0)) if same_episode else None,
            policy=diag.get("policy"),
            step_latency_ms_p50=_percentile(latencies, 50),
            round_trip_ms_p50=_percentile(round_trips, 50),
            wall_s=round(wall_s, 4),
            round_trips_ms=[round(v, 3) for v in round_trips],
            step_latencies_ms=[round(v, 3) for v in latencies],
        )
        if error:
            record["error"] = error
        return record

    def wait_for_results_acked(self, timeout_s: float) -> bool:
        """Block until every matched subscriber acknowledged the published results (or timeout)."""
        from rclpy.duration import Duration

        return bool(self._result_pub.wait_for_all_acked(Duration(seconds=timeout_s)))

    def _exchange(self, rgb: np.ndarray) -> tuple[np.ndarray, float] | None:
        """Publish one frame and wait for the action answering it (re-sending on a lost frame);
        (action, round trip in ms from the publish of the answered frame)."""
        timeout_s = float(self._p("action_timeout_s"))
        for _ in range(int(self._p("frame_retries")) + 1):
            stamp_ns = self.get_clock().now().nanoseconds
            msg = conversions.rgb_to_image(
                np.asarray(rgb, dtype=np.uint8), self._p("encoding"), stamp_ns, self._p("frame_id")
            )
            with self._cond:
                self._actions.clear()
            sent_ns = time.perf_counter_ns()
            self._image_pub.publish(msg)
            if self._wait(lambda s=stamp_ns: s in self._actions, timeout_s):
                rtt_ms = (time.perf_counter_ns() - sent_ns) / 1e6
                with self._cond:
                    return self._actions.pop(stamp_ns), rtt_ms
            self.get_logger().warning(f"no action within {timeout_s} s; re-sending the frame")
        return None


def _int_desc(description: str, low: int, high: int) -> ParameterDescriptor:
    return ParameterDescriptor(
        description=description, integer_range=[IntegerRange(from_value=low, to_value=high, step=1)]
    )


def main(args: list[str] | None = None) -> int:
    """Run all episodes, then exit (0 when every episode ran, 1 on a bridge failure)."""
    register_stack_dump()
    # A thread woken by a message (the step worker, the waiting episode loop) gets the GIL within
    # 1 ms instead of the default 5 ms while another thread runs Python code.
    sys.setswitchinterval(0.001)
    rclpy.init(args=args)
    node = SimBridgeNode()
    spin = BackgroundSpin(node, num_threads=2)  # the episodes run here, on the main thread
    code = 0
    try:
        results = node.run()
        ok = sum(bool(r.get("success")) for r in results)
        node.get_logger().info(f"done: {ok}/{len(results)} episodes succeeded")
    except (KeyboardInterrupt, ExternalShutdownException):
        code = 130
    except Exception as exc:
        node.get_logger().error(f"sim bridge failed: {exc!r}")
        code = 1
    if rclpy.ok():
        # reliable results must reach the subscribers that matched before the process goes away
        node.wait_for_results_acked(2.0)
    return exit_after(spin, code)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
