"""Stopping a node: SIGINT and SIGTERM end it cleanly, and a stuck callback cannot hang the exit.

The stuck callback is a fault no real part produces on demand, so that test builds a minimal real
rclpy node whose timer callback blocks forever and runs it through the same
``kv_vla_node.spinning.spin_until_shutdown`` the VLA node uses.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kv_vla_node.testing import (
    CONFIG_FILE,
    NodeProcess,
    RosClient,
    free_domain_id,
    node_command,
    ros_env,
    save_random_model,
)

pytestmark = [pytest.mark.ros, pytest.mark.slow]  # node processes and stop signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_vla_node_exits_zero_on_a_stop_signal_mid_episode(tmp_path, sig):
    model = save_random_model(tmp_path / "tiny-vla")
    domain = free_domain_id()
    proc = NodeProcess(
        node_command(
            "kv_vla_node.vla_node",
            {"model_path": str(model), "control_rate_hz": 50.0, "max_image_age_s": 5.0},
            params_file=CONFIG_FILE,
        ),
        ros_env(tmp_path / "ros_log", domain),
        tmp_path / "vla_node.log",
    )
    client = RosClient(domain)
    try:
        client.publish_instruction("pick up the red cube")
        assert client.wait_diag(lambda d: d.get("episode") == "1", timeout_s=120), proc.log_text()[-3000:]
        assert client.exchange(np.zeros((64, 64, 3), dtype=np.uint8)), proc.log_text()[
            -3000:
        ]  # one step held
        proc.proc.send_signal(sig)  # the process only, as `kill` would: no help from the group
        code = proc.proc.wait(timeout=15)
    finally:
        client.close()
        proc.stop()
    assert code == 0, proc.log_text()[-3000:]


STUCK_NODE = textwrap.dedent(
    """
    import sys, threading
    import rclpy
    from rclpy.node import Node
    from kv_vla_node.spinning import register_stack_dump, spin_until_shutdown

    register_stack_dump()
    rclpy.init()
    node = Node("stuck_callback", start_parameter_services=False)
    never = threading.Event()

    def callback_that_never_returns():
        print("stuck", flush=True)
        never.wait()

    node.create_timer(0.01, callback_that_never_returns)
    sys.exit(spin_until_shutdown(node, num_threads=2, timeout_s={timeout}))
    """
)


def test_a_stuck_callback_makes_a_bounded_exit_that_shows_where_it_waits(tmp_path):
    timeout_s = 1.0
    env = ros_env(tmp_path / "ros_log", free_domain_id())
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_NODE.replace("{timeout}", str(timeout_s))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "stuck"  # the callback has started and blocks
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)  # without the bounded stop this waits forever on the callback
        out = proc.stdout.read()
    finally:
        proc.kill()
    assert code == 1, out
    assert f"shutdown did not finish within {timeout_s} s" in out
    assert "callback_that_never_returns" in out  # the stack dump names the stuck function
