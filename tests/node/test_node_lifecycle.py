"""The VLA node's lifecycle, watchdog and input hygiene, as a real process over DDS.

One node process (``autostart`` false, so this test drives every transition through the standard
``~/change_state`` service like a lifecycle manager would), the real EpisodeRuntime on a tiny
random CompactVLA, and a client in this process on a private domain. Behaviour only, no timings.
"""

from __future__ import annotations

import struct
import time

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

pytestmark = pytest.mark.slow
INSTRUCTION = "touch the blue cube"
RNG = np.random.default_rng(1)


def frame() -> np.ndarray:
    return RNG.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


class Lifecycle:
    """The node's lifecycle services, called from the test client's node."""

    def __init__(self, client: RosClient, node: str = "kv_vla") -> None:
        from lifecycle_msgs.srv import ChangeState, GetState

        self.client = client
        self.change = client.node.create_client(ChangeState, f"/{node}/change_state")
        self.get = client.node.create_client(GetState, f"/{node}/get_state")

    def state(self) -> str:
        from lifecycle_msgs.srv import GetState

        return self.client._call(self.get, GetState.Request(), 30).current_state.label

    def transition(self, label: str) -> bool:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        request = ChangeState.Request(transition=Transition(label=label))
        return bool(self.client._call(self.change, request, 120).success)


def is_hold(entry: tuple) -> bool:
    action, _stamp, _msg = entry
    return bool(np.all(action == 0.0))


@pytest.fixture(scope="module")
def managed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    model = save_random_model(tmp / "tiny-vla")
    domain = free_domain_id()
    params = {
        "model_path": str(model),
        "autostart": False,
        "max_image_age_s": 3.0,
        "max_future_stamp_s": 1.0,
        "max_image_pixels": 1280 * 720,
    }
    proc = NodeProcess(
        node_command("kv_vla_node.vla_node", params, CONFIG_FILE),
        ros_env(tmp / "ros_log", domain),
        tmp / "node.log",
    )
    client = RosClient(domain)
    try:
        yield client, Lifecycle(client), proc
    finally:
        client.close()
        code = proc.stop()
        assert code == 0, f"node exited with {code}:\n{proc.log_text()[-3000:]}"


def test_each_transition_over_dds(managed):
    client, life, proc = managed
    assert life.state() == "unconfigured"
    client.publish_instruction(INSTRUCTION)  # held until the node is active
    assert client.exchange(frame(), timeout_s=2, tries=1) is None, "an unconfigured node answered"

    assert life.transition("configure"), proc.log_text()[-2000:]
    assert life.state() == "inactive"
    assert "configured:" in proc.log_text()
    assert client.exchange(frame(), timeout_s=2, tries=1) is None, "an inactive node answered"

    assert life.transition("activate")
    assert life.state() == "active"
    assert client.wait_diag(
        lambda d: d.get("instruction") == INSTRUCTION and d["lifecycle_state"] == "active"
    )
    assert client.exchange(frame()) is not None

    n = len(client.actions)
    assert life.transition("deactivate")
    assert life.state() == "inactive"
    hold = client.wait_for(
        lambda: client.actions[n:] if any(is_hold(a) for a in client.actions[n:]) else None, 10
    )
    assert hold and sum(is_hold(a) for a in hold) == 1, "deactivate must publish exactly one hold action"
    assert client.exchange(frame(), timeout_s=2, tries=1) is None, "a deactivated node answered"

    assert life.transition("cleanup")
    assert life.state() == "unconfigured"
    assert "model freed" in proc.log_text()

    # configure again (the model is loaded afresh) and act again: a fresh episode, same instruction
    assert life.transition("configure") and life.transition("activate")
    assert client.exchange(frame()) is not None
    assert client.wait_diag(lambda d: d["instruction"] == INSTRUCTION and int(d["episode_step"]) >= 1)


def test_watchdog_holds_once_and_warns_until_frames_return(managed):
    client, life, _ = managed
    if life.state() != "active":
        assert life.transition("configure") and life.transition("activate")
    assert client.exchange(frame()) is not None
    n = len(client.actions)
    held = client.wait_diag(lambda d: d["holding"] == "true", timeout_s=20)  # 3 s without a frame
    assert held and int(held["watchdog_holds"]) >= 1
    assert client.wait_for(lambda: any(is_hold(a) for a in client.actions[n:]), 10)
    client.wait_diag(lambda d: False, timeout_s=1.5)  # more silence: still only the one hold action
    assert sum(is_hold(a) for a in client.actions[n:]) == 1
    assert client.exchange(frame()) is not None
    assert client.wait_diag(lambda d: d["holding"] == "false")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("\u200b\u200c\u2060", "no printable word"),
        ("\x01\x02\x1b", "no printable word"),
        ("pick up\x00 the red cube", "NUL character at index 7"),
    ],
)
def test_instruction_without_a_word_or_with_a_nul_is_refused(managed, text, reason):
    client, life, _ = managed
    if life.state() != "active":
        assert life.transition("configure") and life.transition("activate")
    before = client.wait_diag(lambda d: "refused_instructions" in d)
    # serialized by hand: rclpy's own conversion would cut the text at the NUL before sending it
    encoded = text.encode()
    client.instruction_pub.publish(
        b"\x00\x01\x00\x00" + struct.pack("<I", len(encoded) + 1) + encoded + b"\x00"
    )
    diag = client.wait_diag(lambda d: int(d["refused_instructions"]) > int(before["refused_instructions"]))
    assert diag and reason in diag["last_refusal"]
    assert diag["episode"] == before["episode"] and diag["instruction"] == before["instruction"]


def test_future_frames_are_refused_and_refusal_warnings_are_throttled(managed):
    client, life, proc = managed
    if life.state() != "active":
        assert life.transition("configure") and life.transition("activate")
    before = client.wait_diag(lambda d: "refused_frames" in d)
    logged_before = proc.log_text().count("refused frame:")
    far = client.now_ns() + 10 * 365 * 86400 * 10**9  # ten years ahead
    stamps = [far, (2**31 - 1) * 10**9] + [far + i for i in range(1, 40)]
    for stamp in stamps:
        client.send_frame(frame(), stamp_ns=stamp)
        time.sleep(0.02)  # pacing only: keep-last-1 readers would otherwise merge a burst
    diag = client.wait_diag(lambda d: int(d["refused_frames"]) - int(before["refused_frames"]) >= 10)
    assert diag and "in the future" in diag["last_refusal"] and "max_future_stamp_s" in diag["last_refusal"]
    assert not any(a[1] in stamps for a in client.actions)
    refused = int(diag["refused_frames"]) - int(before["refused_frames"])
    logged = proc.log_text().count("refused frame:") - logged_before
    assert 1 <= logged < refused, (logged, refused)  # every refusal counted, few lines logged
    assert client.exchange(frame()) is not None


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_frames_are_answered_and_truncated_ones_refused(managed, fmt):
    from kv_vla_node.compressed import rgb_to_compressed

    client, life, _ = managed
    if life.state() != "active":
        assert life.transition("configure") and life.transition("activate")
    from sensor_msgs.msg import CompressedImage

    from kv_vla_node.interface import COMPRESSED_TOPIC, IMAGE_QOS

    pub = client.node.create_publisher(CompressedImage, COMPRESSED_TOPIC, IMAGE_QOS)
    big = RNG.integers(0, 256, size=(720, 1280, 3), dtype=np.uint8)
    stamp = None
    for _ in range(3):
        stamp = client.now_ns()
        pub.publish(rgb_to_compressed(big, fmt, stamp, "test_camera"))
        if client.wait_for(lambda s=stamp: any(a[1] == s for a in client.actions), 20):
            break
    assert any(a[1] == stamp for a in client.actions), f"no action answered the {fmt} frame"

    before = client.wait_diag(lambda d: "refused_frames" in d)
    bad = rgb_to_compressed(big, fmt, client.now_ns(), "test_camera")
    bad.data = bytes(bad.data)[: len(bad.data) // 3]
    pub.publish(bad)
    diag = client.wait_diag(lambda d: int(d["refused_frames"]) > int(before["refused_frames"]), 20)
    assert diag and f"truncated {fmt.upper()}" in diag["last_refusal"]
    client.node.destroy_publisher(pub)


def test_timer_mode_still_steps_on_its_ticks(tmp_path, monkeypatch):
    """``step_mode: timer`` (the old behaviour) answers frames at its ticks; 0 Hz is refused there."""
    from kv_vla_node.testing import in_process_node

    monkeypatch.setenv("ROS_LOG_DIR", str(tmp_path / "ros_log"))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    model = save_random_model(tmp_path / "tiny-vla")
    parameters = {
        "model_path": str(model),
        "step_mode": "timer",
        "control_rate_hz": 20.0,
        "max_image_age_s": 30.0,
    }
    with in_process_node(free_domain_id(), parameters) as (node, client):
        assert node._timer is not None
        client.publish_instruction(INSTRUCTION)
        assert client.wait_diag(lambda d: d["episode"] == "1" and d["step_mode"] == "timer")
        assert client.exchange(frame()) is not None
        [res] = client.set_parameters({"control_rate_hz": 0.0})
        assert not res.successful and "timer mode" in res.reason
        [ok] = client.set_parameters({"control_rate_hz": 5.0})
        assert ok.successful and node._timer.timer_period_ns == 200_000_000
        assert client.exchange(frame()) is not None
