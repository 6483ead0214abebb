"""Helpers to run kv_vla's nodes as real processes over DDS and to talk to them (tests, demo).

* ``ros_env``: an environment that isolates a run (its own ROS_DOMAIN_ID, localhost-only discovery,
  a private log folder) so parallel test modules and demos never hear each other.
* ``NodeProcess``: a child process in its own process group, output captured to a file, stopped with
  SIGINT then SIGKILL of the whole group, so no orphan survives a failed test or a Ctrl-C.
* ``RosClient``: an rclpy node in a private context, spun in a background thread, with the topics,
  the parameter service and the reset service of the VLA node at hand.
* ``save_random_model``: a tiny random ``CompactVLA`` checkpoint (the real model class, random
  weights) for tests and ``kv-vla demo --random-model``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO_ROOT / "config" / "kv_vla.yaml"


_DOMAIN_LOCKS: dict[int, Any] = {}


def free_domain_id(seed: object = None) -> int:
    """A ROS_DOMAIN_ID in [1, 100] (safe for Fast DDS ports) that no other kv_vla run on this host holds.

    Each id is claimed with an exclusive ``flock`` on a file in the temp folder, held until this
    process exits, so concurrent test runs and demos never share a domain. Random order unless
    ``seed`` is given.
    """
    import fcntl

    rng = random.Random(str(seed) if seed is not None else f"{os.getpid()}-{time.time_ns()}")
    candidates = list(range(1, 101))
    rng.shuffle(candidates)
    lock_dir = Path(tempfile.gettempdir()) / "kv_vla_ros_domains"
    lock_dir.mkdir(exist_ok=True)
    for domain in candidates:
        if domain in _DOMAIN_LOCKS:
            continue
        fh = open(lock_dir / f"{domain}.lock", "a")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        _DOMAIN_LOCKS[domain] = fh
        return domain
    raise RuntimeError("all ROS domain ids 1..100 are held by other kv_vla runs")


def ros_env(log_dir: str | Path, domain_id: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child ROS process: private domain, localhost discovery, logs in ``log_dir``."""
    env = dict(os.environ)
    env.update(
        ROS_DOMAIN_ID=str(domain_id),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_LOG_DIR=str(log_dir),
        HOME=env.get("HOME") or str(log_dir),
        PYTHONUNBUFFERED="1",
        RCUTILS_LOGGING_BUFFERED_STREAM="0",
        RCUTILS_COLORIZED_OUTPUT="0",
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("ROS_LOCALHOST_ONLY", None)  # deprecated; the discovery range above replaces it
    env.update(extra or {})
    return env


def node_command(module: str, params: dict[str, Any], params_file: str | Path | None = None) -> list[str]:
    """``python -m <module> --ros-args [--params-file F] -p k:=v ...`` (values in ROS YAML syntax)."""
    cmd = [sys.executable, "-m", module, "--ros-args"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    for key, value in params.items():
        cmd += ["-p", f"{key}:={_ros_value(value)}"]
    return cmd


def _ros_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_ros_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else "''"
    return repr(value)


class NodeProcess:
    """A child process with its output in ``log_path``; ``stop()`` never leaves an orphan behind."""

    def __init__(
        self, cmd: Sequence[str], env: dict[str, str], log_path: str | Path, cwd: str | Path | None = None
    ):
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            env=env,
            cwd=str(cwd or REPO_ROOT),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches its children too
        )

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGINT (a clean rclpy shutdown), then SIGKILL to the whole process group after ``grace_s``."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                # Stuck: ask for every thread's stack (the nodes register SIGUSR1 with faulthandler)
                # so the log says where it waited, then kill.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(self.proc.pid, signal.SIGUSR1)
                time.sleep(1.0)
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        _signal_group(self.proc.pid, signal.SIGKILL)  # stragglers in the group, if any
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def save_random_model(path: str | Path, seed: int = 0, tiny: bool = True, **overrides: Any) -> Path:
    """Save a randomly initialised ``CompactVLA`` to ``path``: tiny, with the shipped model's token
    layout (4 image tokens + 4 parallel action slots = 8-token steps), so the shipped
    ``config/kv_vla.yaml`` budget fits it; ``overrides`` change the config."""
    import torch

    from kv_vla.model.compact_vla import CompactVLA, CompactVLAConfig

    torch.manual_seed(seed)
    layout = {"pool": 4, "action_decoding": "parallel"} | overrides
    config = CompactVLAConfig.tiny(**layout) if tiny else CompactVLAConfig(**layout)
    CompactVLA(config).save_pretrained(path)
    return Path(path)


@contextlib.contextmanager
def in_process_node(
    domain_id: int, parameters: dict[str, Any], runtime_factory: Callable[..., Any] | None = None
) -> Any:
    """A ``VLANode`` spun by a MultiThreadedExecutor in this process, and a :class:`RosClient` on
    the same domain: ``with in_process_node(domain, params) as (node, client): ...``.

    For tests that inject faults through ``runtime_factory`` or read the node's internals (the
    subprocess nodes of :class:`NodeProcess` allow neither). Torn down in order on exit: client,
    executor, spin thread, node, context.
    """
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from kv_vla_node.vla_node import VLANode

    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain_id)
    node = VLANode(
        runtime_factory=runtime_factory,
        context=ctx,
        parameter_overrides=[Parameter(name, value=value) for name, value in parameters.items()],
    )
    node.trigger_configure()
    node.trigger_activate()
    executor = MultiThreadedExecutor(context=ctx)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    client = RosClient(domain_id)
    try:
        yield node, client
    finally:
        client.close()
        executor.shutdown(timeout_sec=5)
        spinner.join(timeout=5)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)


class RosClient:
    """Talks to the VLA node from another process: frames, instructions, parameters, reset."""

    def __init__(
        self, domain_id: int, node_name: str = "kv_vla_test_client", vla_node: str = "kv_vla"
    ) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from rcl_interfaces.srv import GetParameters, SetParameters
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import Image
        from std_msgs.msg import Float32MultiArray, String
        from std_srvs.srv import Trigger

        from kv_vla_node.interface import DIAG_NAME, IMAGE_QOS, INSTRUCTION_QOS

        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(node_name, context=self.context)
        self._cond = threading.Condition()
        self.actions: list[tuple[np.ndarray, int | None, Any]] = []
        self.twists: list[Any] = []
        self.diagnostics: list[dict[str, str]] = []
        self._diag_name = DIAG_NAME
        self.image_pub = self.node.create_publisher(Image, "image", IMAGE_QOS)
        self.instruction_pub = self.node.create_publisher(String, "instruction", INSTRUCTION_QOS)
        self.node.create_subscription(Float32MultiArray, "action", self._on_action, 50)
        self.node.create_subscription(TwistStamped, "action_twist", self._on_twist, 50)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 100)
        self.set_client = self.node.create_client(SetParameters, f"/{vla_node}/set_parameters")
        self.get_client = self.node.create_client(GetParameters, f"/{vla_node}/get_parameters")
        self.reset_client = self.node.create_client(Trigger, f"/{vla_node}/reset")
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        with contextlib.suppress(ExternalShutdownException, Exception):
            self.executor.spin()

    # ---- callbacks
    def _on_action(self, msg: Any) -> None:
        from kv_vla_node.conversions import array_msg_to_action

        action, stamp = array_msg_to_action(msg)
        with self._cond:
            self.actions.append((action, stamp, msg))
            self._cond.notify_all()

    def _on_twist(self, msg: Any) -> None:
        with self._cond:
            self.twists.append(msg)
            self._cond.notify_all()

    def _on_diag(self, msg: Any) -> None:
        for status in msg.status:
            if status.name == self._diag_name:
                with self._cond:
                    self.diagnostics.append({kv.key: kv.value for kv in status.values})
                    self._cond.notify_all()

    # ---- waiting
    def wait_for(self, predicate: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Wait until ``predicate()`` is truthy (evaluated under the client's lock); return its value."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    return value
                self._cond.wait(min(left, 0.2))

    def last_diag(self) -> dict[str, str]:
        with self._cond:
            return dict(self.diagnostics[-1]) if self.diagnostics else {}

    def wait_diag(
        self, predicate: Callable[[dict[str, str]], bool], timeout_s: float = 30.0
    ) -> dict[str, str]:
        """The newest diagnostics satisfying ``predicate`` (an empty dict on timeout)."""

        def newest() -> dict[str, str] | None:
            return next((d for d in reversed(self.diagnostics) if predicate(d)), None)

        return dict(self.wait_for(newest, timeout_s) or {})

    # ---- actions on the VLA node
    def publish_instruction(self, text: str) -> None:
        from std_msgs.msg import String

        self.instruction_pub.publish(String(data=text))

    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def send_frame(self, rgb: np.ndarray, encoding: str = "rgb8", stamp_ns: int | None = None) -> int:
        from kv_vla_node.conversions import rgb_to_image

        stamp_ns = self.now_ns() if stamp_ns is None else stamp_ns
        self.image_pub.publish(rgb_to_image(rgb, encoding, stamp_ns, "test_camera"))
        return stamp_ns

    def exchange(self, rgb: np.ndarray, timeout_s: float = 10.0, tries: int = 3) -> tuple[int, Any] | None:
        """Send a frame until an action answers it (best effort may drop one); (stamp, action entry)."""
        for _ in range(tries):
            stamp = self.send_frame(rgb)
            hit = self.wait_for(lambda s=stamp: next((a for a in self.actions if a[1] == s), None), timeout_s)
            if hit:
                return stamp, hit
        return None

    def set_parameters(self, values: dict[str, Any], timeout_s: float = 10.0) -> list[Any]:
        """SetParameters on the VLA node; the list of SetParametersResult (successful, reason)."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        req = SetParameters.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        )
        return list(self._call(self.set_client, req, timeout_s).results)

    def get_parameters(self, names: list[str], timeout_s: float = 10.0) -> dict[str, Any]:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        res = self._call(self.get_client, GetParameters.Request(names=names), timeout_s)
        return {n: parameter_value_to_python(v) for n, v in zip(names, res.values)}

    def reset(self, timeout_s: float = 10.0) -> Any:
        from std_srvs.srv import Trigger

        return self._call(self.reset_client, Trigger.Request(), timeout_s)

    def _call(self, client: Any, request: Any, timeout_s: float) -> Any:
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise TimeoutError(f"service {client.srv_name} not available")
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout_s):
            raise TimeoutError(f"no answer from {client.srv_name}")
        return future.result()

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5)
