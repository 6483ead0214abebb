"""A full closed-loop episode through the VLA node and the sim bridge: two processes over DDS.

The real EpisodeRuntime (tiny random CompactVLA) answers the real PyBullet environment's frames; the
test process listens to ``episode_result`` like any other ROS node would.
"""

from __future__ import annotations

import json

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

pytestmark = [pytest.mark.ros, pytest.mark.slow]  # node and bridge processes over DDS

MAX_STEPS = 6


def test_full_episode_through_node_and_bridge(tmp_path):
    model = save_random_model(tmp_path / "tiny-vla")
    domain = free_domain_id()
    env = ros_env(tmp_path / "ros_log", domain)
    results_path = tmp_path / "results.json"
    node = NodeProcess(
        node_command(
            "kv_vla_node.vla_node",
            {"model_path": str(model), "control_rate_hz": 50.0, "policy": "gated", "chunk_size": 0},
            params_file=CONFIG_FILE,
        ),
        env,
        tmp_path / "vla_node.log",
    )
    bridge = NodeProcess(
        node_command(
            "kv_vla_node.sim_bridge",
            {
                "tasks": ["cued_reach"],
                "episodes_per_task": 2,
                "seed_offset": 7,
                "max_steps": MAX_STEPS,
                "results_path": str(results_path),
            },
        ),
        env,
        tmp_path / "sim_bridge.log",
    )
    client = RosClient(domain, node_name="result_listener")
    published = []
    try:
        from std_msgs.msg import String

        from kv_vla_node.sim_bridge import RESULT_QOS

        client.node.create_subscription(
            String, "episode_result", lambda m: published.append(json.loads(m.data)), RESULT_QOS
        )
        code = bridge.wait(timeout=240)
        assert code == 0, (
            f"bridge exited with {code}:\n{bridge.log_text()[-3000:]}\n{node.log_text()[-3000:]}"
        )
        client.wait_for(lambda: len(published) >= 2, 10)
    finally:
        client.close()
        bridge.stop()
        node_code = node.stop()
    assert node_code == 0, node.log_text()[-3000:]

    results = json.loads(results_path.read_text())
    assert results == published
    assert [(r["task"], r["seed"]) for r in results] == [("cued_reach", 7), ("cued_reach", 8)]
    from kv_vla_sim import make_env

    sim = make_env("cued_reach", image_size=64)
    for r in results:
        assert "error" not in r, r
        assert r["instruction"] == sim.reset(seed=r["seed"])[1]["instruction"]
        assert isinstance(r["success"], bool)
        assert 1 <= r["steps"] <= MAX_STEPS and r["max_steps"] == MAX_STEPS
        assert r["policy"] == "gated"
        assert r["seen_tokens"] >= r["kept_tokens"] > 0
        assert r["peak_kv_bytes"] > 0 and r["step_latency_ms_p50"] > 0 and r["round_trip_ms_p50"] > 0
    # Every step of both episodes was answered by the node, each episode from a fresh cache.
    log = node.log_text()
    assert log.count("episode 1 started") == 1 and log.count("episode 2 started") == 1
    assert "episode_result" in bridge.log_text()
    sim.close()
