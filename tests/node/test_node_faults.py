"""A runtime fault in the middle of a step (say CUDA out of memory) does not take the node down.

The real runtime with a tiny model on a CPU cannot produce such a fault on demand, so this is the one
place with an injected fault: the real EpisodeRuntime wrapped so that one step raises. Node and
client run in this process (separate contexts, so separate DDS participants) on a private domain.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kv_vla_node.testing import free_domain_id, in_process_node, save_random_model

pytestmark = pytest.mark.ros


class FaultOnce:
    """The real runtime; its ``fail_at``-th step raises after the runtime's own step started."""

    def __init__(self, runtime: Any, fail_at: int) -> None:
        self.runtime, self.fail_at, self.calls = runtime, fail_at, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runtime, name)

    def step(self, image: np.ndarray) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected fault: CUDA out of memory")
        return self.runtime.step(image)


@pytest.mark.slow
def test_runtime_fault_is_reported_and_the_episode_restarts(tmp_path, monkeypatch):
    from kv_vla_node.runtime_factory import build_runtime

    monkeypatch.setenv("ROS_LOG_DIR", str(tmp_path / "ros_log"))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    model = save_random_model(tmp_path / "tiny-vla")
    rng = np.random.default_rng(0)
    with in_process_node(
        free_domain_id(),
        {"model_path": str(model), "control_rate_hz": 50.0},
        runtime_factory=lambda settings: FaultOnce(build_runtime(settings), fail_at=2),
    ) as (_node, client):
        client.publish_instruction("touch the green cube")
        assert client.wait_diag(lambda d: d["episode"] == "1")
        assert client.exchange(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is not None
        # this step faults; images are best effort, so resend until the node has seen one
        sent = []
        for _ in range(5):
            sent.append(client.send_frame(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
            diag = client.wait_diag(lambda d: d["step_errors"] == "1" and d["episode"] == "2", timeout_s=5)
            if diag:
                break
        assert "injected fault" in diag["last_error"] and diag["episode_step"] == "0"
        assert diag, "the injected fault was not reported"
        # the faulting frame (and any earlier one the network dropped) is never answered
        assert not any(a[1] in sent for a in client.actions)
        assert client.exchange(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is not None
        assert client.wait_diag(lambda d: d["episode"] == "2" and d["episode_step"] == "1")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dtype": "int8"}, "dtype: 'int8' is not allowed; allowed values: float32, float16, bfloat16"),
        ({"policy": "nope"}, "policy='nope' is not one of"),
        ({"step_mode": "timer", "control_rate_hz": 0.0}, "control_rate_hz must be > 0 in timer mode"),
        ({"model_path": "/nonexistent/vla"}, "FileNotFoundError: .*/nonexistent/vla"),
    ],
)
def test_bad_configuration_fails_the_configure_transition_with_the_reason(
    tmp_path, monkeypatch, overrides, match
):
    """Parameters are checked and the model loaded at configure; ``main`` turns a failure into exit 1."""
    import re

    import rclpy
    from rclpy.context import Context
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from kv_vla_node.vla_node import VLANode

    monkeypatch.setenv("ROS_LOG_DIR", str(tmp_path / "ros_log"))
    ctx = Context()
    rclpy.init(context=ctx, domain_id=free_domain_id())
    try:
        node = VLANode(context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert re.search(match, node.configure_error), node.configure_error
        assert node._runtime is None  # still unconfigured: nothing loaded
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=ctx)


def test_positions_past_the_model_range_are_reported_once_per_episode(tmp_path, monkeypatch):
    """``episode`` positions outgrow a model whose ``max_position_embeddings`` is 64 within a few
    steps: the node says so on /diagnostics (and warns in its log) instead of running on silently."""
    monkeypatch.setenv("ROS_LOG_DIR", str(tmp_path / "ros_log"))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    model = save_random_model(tmp_path / "tiny-vla", max_position_embeddings=64)
    rng = np.random.default_rng(0)
    with in_process_node(free_domain_id(), {"model_path": str(model), "step_mode": "event"}) as (
        _node,
        client,
    ):
        client.publish_instruction("touch the green cube")
        assert client.wait_diag(lambda d: d["episode"] == "1")
        for _ in range(12):
            assert client.exchange(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is not None
        diag = client.wait_diag(lambda d: d["episode_step"] == "12")
        assert diag["max_position_embeddings"] == "64" and int(diag["max_position_id"]) >= 64
        assert "reached the model's max_position_embeddings 64" in diag["position_note"]
        assert "positions:=cache" in diag["position_note"]
        client.publish_instruction("touch the red cube")  # a new episode starts inside the range
        fresh = client.wait_diag(lambda d: d["episode"] == "2")
        assert fresh["position_note"] == "" and int(fresh["max_position_id"]) < 64
