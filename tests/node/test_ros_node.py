"""The VLA node as a real process over DDS, driven from this test process.

One node process per module (a tiny random CompactVLA saved to a temp dir, the real EpisodeRuntime),
its own ROS_DOMAIN_ID and localhost-only discovery. The instruction is published before the node has
finished loading, so the first test also shows the transient-local instruction reaching a late node.
"""

from __future__ import annotations

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

pytestmark = [pytest.mark.ros, pytest.mark.slow]  # a node process over DDS

INSTRUCTION = "pick up the red cube"
MAX_PIXELS = 128 * 128
RNG = np.random.default_rng(0)


def frame(h: int = 64, w: int = 64) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ros_node")
    model = save_random_model(tmp / "tiny-vla")
    domain = free_domain_id()
    env = ros_env(tmp / "ros_log", domain)
    cmd = node_command(
        "kv_vla_node.vla_node",
        {
            "model_path": str(model),
            "control_rate_hz": 50.0,
            "max_image_pixels": MAX_PIXELS,
            "max_image_age_s": 5.0,
            "policy": "gated",
        },
        params_file=CONFIG_FILE,
    )
    proc = NodeProcess(cmd, env, tmp / "vla_node.log")
    client = RosClient(domain)
    client.publish_instruction(INSTRUCTION)  # before the node is up: transient local must deliver it
    try:
        diag = client.wait_diag(lambda d: d.get("episode") == "1", timeout_s=120)
        assert diag, f"node did not start an episode:\n{proc.log_text()[-3000:]}"
        yield client, proc
    finally:
        client.close()
        code = proc.stop()
        assert code == 0, f"node exited with {code}:\n{proc.log_text()[-3000:]}"


def test_late_node_gets_the_instruction_and_answers_with_a_stamped_action(ros):
    client, _ = ros
    assert client.last_diag()["instruction"] == INSTRUCTION
    got = client.exchange(frame())
    assert got is not None, "no action answered the frame"
    stamp, (action, _, msg) = got
    assert [d.label for d in msg.layout.dim] == [
        "action",
        "fields:dx,dy,dz,gripper",
        f"stamp:{stamp // 10**9}.{stamp % 10**9:09d}",
    ]
    assert msg.layout.dim[0].size == 4 and action.shape == (4,)
    assert np.all(np.abs(action) <= 1.0)
    twist = client.wait_for(
        lambda: next(
            (t for t in client.twists if t.header.stamp.sec * 10**9 + t.header.stamp.nanosec == stamp), None
        )
    )
    assert twist is not None and twist.header.frame_id == "test_camera"
    assert twist.twist.angular.x == pytest.approx(float(action[3]))
    assert twist.twist.linear.x == pytest.approx(float(action[0]) * 0.05, rel=1e-5)
    diag = client.wait_diag(lambda d: d.get("last_action", "") != "" and int(d["episode_step"]) >= 1)
    assert int(diag["kv_bytes"]) > 0 and int(diag["seen_tokens"]) > int(diag["pinned_tokens"])


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("encoding", "unsupported image encoding 'yuv422'"),
        ("short", "shorter than height x step"),
        ("zero", "zero-size image (0x0)"),
        ("huge", "image too large: 300x300 = 90000 pixels > 16384"),
        ("empty_instruction", "empty instruction"),
        ("long_instruction", "instruction too long: 102400 characters > 1000"),
    ],
)
def test_bad_input_is_refused_with_a_reason_and_good_frames_still_answered(ros, bad, reason):
    from kv_vla_node.conversions import rgb_to_image

    client, proc = ros
    before = client.last_diag()
    counter = "refused_instructions" if bad.endswith("instruction") else "refused_frames"
    for _ in range(3):  # frames are best effort: re-send until the refusal is counted
        if bad == "empty_instruction":
            client.publish_instruction("   ")
        elif bad == "long_instruction":
            client.publish_instruction("x" * 102_400)
        else:
            msg = rgb_to_image(frame(300, 300) if bad == "huge" else frame(), stamp_ns=client.now_ns())
            if bad == "encoding":
                msg.encoding = "yuv422"
            elif bad == "short":
                msg.data = bytes(msg.data)[: len(msg.data) // 2]
            elif bad == "zero":
                msg.height = msg.width = 0
                msg.data = b""
            client.image_pub.publish(msg)
        diag = client.wait_diag(lambda d: int(d[counter]) > int(before[counter]), timeout_s=5)
        if diag:
            break
    assert diag, f"refusal not counted for {bad}"
    assert reason in diag["last_refusal"]
    assert client.wait_for(lambda: "refused" in proc.log_text(), 10), "no refusal logged"  # throttled
    assert diag["episode"] == before["episode"], "a refused instruction must not start an episode"
    assert proc.poll() is None
    assert client.exchange(frame()) is not None, "node stopped answering good frames"


def test_stale_frame_is_skipped_and_counted(ros):
    client, proc = ros
    # settle: answer one good frame, then take a snapshot from the 1 Hz diagnostics that follow it,
    # so a step still in flight from an earlier test cannot be mistaken for the stale frame's
    assert client.exchange(frame()) is not None
    time.sleep(1.5)
    before = client.last_diag()
    for _ in range(3):
        client.send_frame(frame(), stamp_ns=client.now_ns() - 30 * 10**9)
        diag = client.wait_diag(lambda d: int(d["stale_frames"]) > int(before["stale_frames"]), timeout_s=5)
        if diag:
            break
    assert diag and diag["episode_step"] == before["episode_step"], "a stale frame must not be stepped"
    assert "skipping stale frame" in proc.log_text()
    assert client.exchange(frame()) is not None


def test_live_parameters_show_in_diagnostics_and_invalid_ones_are_refused(ros):
    client, _ = ros
    [ok] = client.set_parameters({"gate_threshold": 0.25})
    assert ok.successful, ok.reason
    client.exchange(frame())  # "now" parameters apply at the next control step
    assert client.wait_diag(lambda d: d["gate_threshold"] == "0.25"), "gate_threshold not active"

    refused = {
        "gate_threshold": 1.5,  # outside the descriptor's range
        "policy": "no_such_policy",  # not a registered policy
        "device": "tpu",  # read-only
        "model_path": "/elsewhere",  # read-only
        "chunk_size": -3,  # outside the range
        "action_clip": float("nan"),
    }
    for name, value in refused.items():
        [res] = client.set_parameters({name: value})
        assert not res.successful, f"{name}={value!r} was accepted"
        assert res.reason, f"no reason given for refusing {name}"
    [res] = client.set_parameters({"policy": "no_such_policy"})
    assert "no_such_policy" in res.reason
    [ok] = client.set_parameters({"control_rate_hz": 25.0})
    assert ok.successful, ok.reason
    assert client.wait_diag(lambda d: d["control_rate_hz"] == "25.0")
    assert client.exchange(frame()) is not None  # the re-timed control loop still steps
    values = client.get_parameters(["gate_threshold", "policy", "chunk_size"])
    assert values == {"gate_threshold": 0.25, "policy": "gated", "chunk_size": 0}

    # A next-episode parameter is pending until the reset, then active.
    # (16 tokens = two control steps; the YAML's 80-token budget must still hold prefix + 3 chunks)
    [ok] = client.set_parameters({"chunk_size": 16})
    assert ok.successful, ok.reason
    assert client.wait_diag(lambda d: "chunk_size=16" in d["pending_next_episode"] and d["chunk_size"] == "0")
    assert client.reset().success
    diag = client.wait_diag(lambda d: d["chunk_size"] == "16" and d["pending_next_episode"] == "")
    assert diag["chunk_size_tokens"] == "16"

    # dry_run: the step runs (diagnostics advance) but no action is published.
    [ok] = client.set_parameters({"dry_run": True})
    assert ok.successful
    step_before = int(client.last_diag()["episode_step"])
    stamp = client.send_frame(frame())
    assert client.wait_diag(lambda d: int(d["episode_step"]) > step_before and d["dry_run"] == "True")
    assert not any(a[1] == stamp for a in client.actions)
    [ok] = client.set_parameters({"dry_run": False})
    assert ok.successful and client.exchange(frame()) is not None


def test_reset_service_starts_a_new_episode_with_an_empty_cache(ros):
    client, _ = ros
    for _ in range(3):
        assert client.exchange(frame()) is not None
    # this episode's report (after-step diagnostics are rate-limited, the 1 Hz one follows)
    running = client.wait_diag(lambda d: int(d["episode_step"]) >= 1)["episode"]
    before = client.wait_diag(lambda d: d["episode"] == running and int(d["episode_step"]) >= 3)
    assert int(before["seen_tokens"]) > int(before["pinned_tokens"])
    res = client.reset()
    assert res.success and "cache emptied" in res.message
    episode = int(before["episode"]) + 1
    after = client.wait_diag(lambda d: d["episode"] == str(episode))
    assert after["episode_step"] == "0" and after["instruction"] == INSTRUCTION
    # Only the pinned instruction prompt is left: nothing from the earlier frames.
    assert after["seen_tokens"] == after["kept_tokens"] == after["pinned_tokens"]
    assert int(after["kv_bytes"]) < int(before["kv_bytes"])
    assert after["kept_chunks"] == "0" and after["evicted_chunks"] == "0"
    assert client.exchange(frame()) is not None
    assert client.wait_diag(lambda d: d["episode"] == str(episode) and d["episode_step"] == "1")
