"""The node's cache parameters are checked as a whole when they are set, so a refused change never
blocks a later valid one and ``param get`` never shows a refused value; a start-up budget no prompt
fits stops the node with the reason instead of logging "ready" and refusing every instruction."""

from __future__ import annotations

import numpy as np
import pytest

from kv_vla_node import params


def test_idle_checks_use_the_shortest_prompt():
    """While idle there is no running prompt: a change is checked against the shortest one any
    episode can have, so `chunk_size 40` at 80 tokens is refused while idle too."""

    class Layout:
        step_tokens = 8

        def prompt_layout(self, instruction: str) -> tuple[int, int]:
            assert instruction == params.SHORTEST_INSTRUCTION
            return 14, 8

    active = {k: params.SPECS[k].default for k in params.CACHE_KEYS}
    assert params.prompt_layout(Layout(), running=False, pinned_tokens=None) == (14, 8)
    assert params.prompt_layout(Layout(), running=True, pinned_tokens=20) == (20, 8)
    assert params.prompt_layout(object(), running=True, pinned_tokens=20) == (None, None)
    reason = params.check_cache_change(active, {"chunk_size": 40}, 14, 8)
    assert reason.startswith("max_tokens: 80 is smaller") and "14-token prompt" in reason
    assert params.check_cache_change(active, {"max_tokens": 5}, 14, 8).startswith("max_tokens: 5")
    assert params.check_cache_change(active, {"chunk_size": 40, "max_tokens": 200}, 14, 8) is None


def test_startup_with_a_chunk_no_budget_fits_is_refused_with_the_reason(tmp_path):
    from kv_vla_node.runtime_factory import RuntimeSettings, build_runtime
    from kv_vla_node.testing import save_random_model

    model = save_random_model(tmp_path / "tiny-vla")
    cache = {k: params.SPECS[k].default for k in params.CACHE_KEYS} | {"chunk_size": 40}
    with pytest.raises(ValueError, match=r"^invalid parameters: max_tokens: 80 is smaller .*>= 1\d\d"):
        build_runtime(RuntimeSettings(str(model), "cpu", "float32", "", cache=cache))


@pytest.mark.slow  # a node over DDS
def test_a_refused_change_never_blocks_a_later_valid_one(tmp_path, monkeypatch):
    """Idle, then running: `max_tokens 5` and `chunk_size 40` are refused when set, with the reason;
    `param get` keeps the accepted values; valid changes right after are accepted and applied."""
    from kv_vla_node.testing import free_domain_id, in_process_node, save_random_model

    monkeypatch.setenv("ROS_LOG_DIR", str(tmp_path / "ros_log"))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    model = save_random_model(tmp_path / "tiny-vla")
    parameters = {"model_path": str(model), "control_rate_hz": 50.0, "max_image_age_s": 5.0}
    rng = np.random.default_rng(0)
    with in_process_node(free_domain_id(), parameters) as (node, client):
        for phase, budget, new_budget in (("idle", 80, 96), ("running", 96, 112)):
            for bad in ({"max_tokens": 5}, {"chunk_size": 40}):
                [res] = client.set_parameters(bad)
                assert not res.successful and res.reason.startswith("max_tokens:"), (phase, res.reason)
            values = client.get_parameters(["max_tokens", "chunk_size", "gate_threshold"])
            threshold = 0.0 if phase == "idle" else 0.3
            assert values == {"max_tokens": budget, "chunk_size": 0, "gate_threshold": threshold}, phase
            [ok] = client.set_parameters({"gate_threshold": 0.3 if phase == "idle" else 0.1})
            assert ok.successful, (phase, ok.reason)
            [ok] = client.set_parameters({"max_tokens": new_budget})  # a valid cache change, just after
            assert ok.successful, (phase, ok.reason)
            if phase == "idle":
                client.publish_instruction("touch the green cube")
                assert client.wait_diag(lambda d: d["episode"] == "1")
        assert client.exchange(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is not None
        assert client.wait_diag(lambda d: d["gate_threshold"] == "0.1")
        assert client.reset().success
        diag = client.wait_diag(lambda d: d["episode"] == "2" and d["pending_next_episode"] == "")
        assert diag["max_tokens"] == "112" and node._runtime.cache.config.max_tokens == 112
        assert diag["last_refusal"] == ""  # nothing was refused later, at an episode start


@pytest.mark.slow  # a node over DDS
def test_an_instruction_the_accepted_budget_cannot_hold_is_refused_and_the_change_stays(
    tmp_path, monkeypatch
):
    """A budget accepted against the running prompt may not hold a longer next instruction: then
    the instruction is what is refused (the running episode goes on), the change stays pending and
    shown by `param get`, and the next episode start applies it."""
    from kv_vla_node.testing import free_domain_id, in_process_node, save_random_model

    monkeypatch.setenv("ROS_LOG_DIR", str(tmp_path / "ros_log"))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    model = save_random_model(tmp_path / "tiny-vla")
    parameters = {"model_path": str(model), "control_rate_hz": 50.0, "max_image_age_s": 5.0}
    short, long = "touch the green cube", "touch the green cube and then the red cube and then the blue one"
    with in_process_node(free_domain_id(), parameters) as (node, client):
        client.publish_instruction(short)
        assert client.wait_diag(lambda d: d["episode"] == "1")
        (p_short, step), (p_long, _) = node._runtime.prompt_layout(short), node._runtime.prompt_layout(long)
        budget = p_short + 3 * step  # holds the short prompt, not the long one
        assert p_long > p_short
        [ok] = client.set_parameters({"max_tokens": budget})
        assert ok.successful, ok.reason
        client.publish_instruction(long)
        diag = client.wait_diag(
            lambda d: d["last_refusal"].startswith("instruction: instruction: its prompt")
        )
        assert diag["episode"] == "1" and f"max_tokens={budget}" in diag["last_refusal"], diag
        assert f"max_tokens={budget}" in diag["pending_next_episode"]
        assert client.get_parameters(["max_tokens"]) == {"max_tokens": budget}
        assert client.reset().success  # the running (short) instruction again: now it applies
        diag = client.wait_diag(lambda d: d["episode"] == "2" and d["pending_next_episode"] == "")
        assert diag["max_tokens"] == str(budget) and node._runtime.cache.config.max_tokens == budget


@pytest.mark.slow  # compiles the tiny model's step (about a minute here)
def test_a_compiled_node_compiles_every_shape_at_configure(tmp_path, monkeypatch):
    """``compile: true`` warms up at configure: the runtime comes back with its shapes compiled and
    no episode, and the first episode's steps compile nothing."""
    from kv_vla.cache.storage import compiled
    from kv_vla_node.runtime_factory import RuntimeSettings, build_runtime
    from kv_vla_node.testing import save_random_model

    monkeypatch.setattr(compiled, "CPU_INDUCTOR_CONFIG", {"freezing": True})  # shapes, not GEMM speed
    # torch.compile instead of AOTInductor: the same shapes in 27 s instead of 174 s
    # (test_compiled_step_equals_eager_and_recompiles_once_per_shape runs the AOT path)
    monkeypatch.setattr(compiled, "AHEAD_OF_TIME_ON_CPU", False)
    model = save_random_model(tmp_path / "tiny-vla")
    cache = {k: params.SPECS[k].default for k in params.CACHE_KEYS} | {"storage": "static"}
    runtime = build_runtime(RuntimeSettings(str(model), "cpu", "float32", "", cache=cache, compile=True))
    shapes = dict(runtime.warmup_s)
    assert shapes and runtime.cache is None
    runtime.reset("touch the red cube")
    frames = np.random.default_rng(0).integers(0, 256, size=(12, 64, 64, 3), dtype=np.uint8)
    for frame in frames:
        runtime.step(frame)
    assert runtime.warmup_s == shapes, "a control step compiled a shape configure did not"
