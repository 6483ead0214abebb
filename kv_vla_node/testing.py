"""Helpers for the tests that talk to kv_vla's nodes: an in-process node and a ROS client.

* ``in_process_node``: a ``VLANode`` spun in this process, with a :class:`RosClient` beside it.
* ``RosClient``: an rclpy node in a private context, spun in a background thread, with the topics,
  the parameter service and the reset service of the VLA node at hand.

The process helpers (``ros_env``, ``NodeProcess``, ``free_domain_id``, ``save_random_model``) live
in :mod:`kv_vla_node.ros_env`, which the demo uses; they are re-exported here for the tests.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kv_vla_node.ros_env import (  # noqa: F401 - re-exported for the tests
    CONFIG_FILE,
    REPO_ROOT,
    NodeProcess,
    free_domain_id,
    node_command,
    ros_env,
    save_random_model,
)


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
