"""ZipVL's options as VLA-node parameters.

Unit level: the parameter table (built from ``kv_vla.settings``), its validation, and that each
policy takes its own options from the same flat set of values (no re-mapping: one spelling per
knob). Then the real tiny runtime takes a live threshold change, and one in-process node driven
over DDS shows the options reach the cache after ``~/reset`` and are refused with a reason when
invalid.
"""

from __future__ import annotations

import numpy as np
import pytest

from kv_vla import settings
from kv_vla_node import params
from kv_vla_node.runtime_glue import cache_kwargs

pytestmark = pytest.mark.ros

ZIPVL_OPTIONS = ("tau", "low_bits", "quant_group_size", "full_threshold")


def node_defaults(**changes: object) -> dict[str, object]:
    """Every cache parameter at its declared default, with ``changes``."""
    values = {k: params.SPECS[k].default for k in params.CACHE_KEYS}
    values.update(changes)
    return values


def test_the_options_are_policy_fields_with_the_table_defaults():
    from kv_vla.cache import POLICIES

    zipvl, tiered = POLICIES["zipvl"], POLICIES["gated_tiered"]
    assert zipvl.option_names() == ("low_bits", "quant_group_size", "tau")
    assert tiered.option_names() == ("gate_threshold", "low_bits", "quant_group_size", "full_threshold")
    assert {n: getattr(zipvl(), n) for n in zipvl.option_names()} == settings.defaults(zipvl.option_names())
    assert set(ZIPVL_OPTIONS) <= set(params.CACHE_KEYS)
    assert {params.SPECS[n].effect for n in ("tau", "full_threshold")} == {params.NOW}
    assert {params.SPECS[n].effect for n in ("low_bits", "quant_group_size")} == {params.NEXT_EPISODE}
    assert (params.SPECS["low_bits"].low, params.SPECS["low_bits"].high) == (2, 8)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("low_bits", 6, "allowed values: 2, 4, 8"),  # inside the descriptor's 2..8
        ("low_bits", 3, "allowed values: 2, 4, 8"),
        ("low_bits", 4.0, "allowed values: 2, 4, 8"),
        ("tau", 0.0, "(0, 1]"),
        ("tau", 1.5, "(0, 1]"),
        ("tau", float("nan"), "(0, 1]"),
        ("quant_group_size", 0, "[1, 65536]"),
        ("quant_group_size", True, "[1, 65536]"),
        ("full_threshold", -0.1, "[0, 1]"),
    ],
)
def test_invalid_values_are_refused_with_a_reason(name, value, fragment):
    reason = params.validate(name, value)
    assert reason is not None and fragment in reason and reason.startswith(name + ":")


@pytest.mark.parametrize(
    ("name", "value"), [("low_bits", 2), ("low_bits", 8), ("tau", 1.0), ("tau", 1), ("quant_group_size", 1)]
)
def test_valid_values_pass(name, value):
    assert params.validate(name, value) is None


def test_each_policy_reads_its_own_options_from_one_flat_set():
    from kv_vla.cache import POLICIES, EpisodeCacheConfig

    values = dict(tau=0.6, low_bits=2, quant_group_size=16, full_threshold=0.8, max_tokens=0, sink_tokens=4)
    for policy in POLICIES:
        config = EpisodeCacheConfig(**cache_kwargs(node_defaults(policy=policy, **values)))
        built = POLICIES[policy].from_config(config)
        assert {n: getattr(built, n) for n in built.option_names()} == {
            n: getattr(config, n) for n in POLICIES[policy].option_names()
        }
    # a ZipVL option under another policy rides along unread; switching needs no re-mapping
    assert cache_kwargs({"tau": 0.5, "control_rate_hz": 5.0}) == {"tau": 0.5}


def test_whole_config_check_names_the_offending_option():
    tiered = node_defaults(policy="gated_tiered", gate_threshold=0.5, full_threshold=0.3)
    reason = params.check_cache_change(tiered, {})
    assert reason is not None and reason.startswith("full_threshold:") and "gate_threshold=0.5" in reason
    assert params.check_cache_change(tiered, {"policy": "gated"}) is None  # not its option


def test_real_runtime_takes_the_options_and_a_live_tau_change(tmp_path):
    from kv_vla_node.runtime_factory import RuntimeSettings, build_runtime
    from kv_vla_node.testing import save_random_model

    model = save_random_model(tmp_path / "tiny-vla")
    active = node_defaults(policy="zipvl", low_bits=2, tau=0.5, max_tokens=0)
    runtime = build_runtime(RuntimeSettings(str(model), "cpu", "float32", "", cache=dict(active)))
    assert runtime.cache_config.policy == "zipvl"
    runtime.reset("pick up the red cube")
    assert (runtime.cache.policy.tau, runtime.cache.policy.low_bits) == (0.5, 2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        runtime.step(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    precisions = {c.precision for c in runtime.cache.chunks}
    assert precisions & {"int2", "mixed"}, precisions  # tau 0.5 demoted some chunk, at 2 bits
    assert not precisions & {"int4", "int8"}
    runtime.update_cache_config(**cache_kwargs({"tau": 0.95}))
    assert runtime.cache.config.tau == 0.95 and runtime.cache.policy.tau == 0.95
    runtime.step(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # the episode goes on


@pytest.mark.slow
def test_node_over_dds_applies_the_options_after_reset(tmp_path, monkeypatch):
    from kv_vla_node.testing import free_domain_id, in_process_node, save_random_model

    monkeypatch.setenv("ROS_LOG_DIR", str(tmp_path / "ros_log"))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    model = save_random_model(tmp_path / "tiny-vla")
    parameters = {
        "model_path": str(model),
        "control_rate_hz": 50.0,
        "max_image_age_s": 5.0,
        "policy": "gated",
    }
    rng = np.random.default_rng(0)
    with in_process_node(free_domain_id(), parameters) as (node, client):
        client.publish_instruction("touch the green cube")
        assert client.wait_diag(lambda d: d["episode"] == "1" and d["policy"] == "gated")

        # a chunk size an 80-token budget cannot hold beside this episode's prompt is refused when it
        # is set (not only at the next episode start); one it can hold is accepted
        [ok] = client.set_parameters({"chunk_size": 16})
        assert ok.successful, ok.reason
        [res] = client.set_parameters({"chunk_size": 40})
        assert not res.successful and "prompt" in res.reason and "max_tokens" in res.reason, res.reason
        for change in ({"chunk_size": 0}, {"max_tokens": 0}):
            [ok] = client.set_parameters(change)
            assert ok.successful, ok.reason

        for name, value, fragment in [
            ("low_bits", 6, "2, 4, 8"),
            ("tau", 0.0, "(0, 1]"),
            ("quant_group_size", 0, ""),  # outside the descriptor's range: rclpy's own reason
        ]:
            [res] = client.set_parameters({name: value})
            assert not res.successful and res.reason and fragment in res.reason, (name, res.reason)

        for name, value in (("policy", "zipvl"), ("low_bits", 2)):
            [ok] = client.set_parameters({name: value})
            assert ok.successful, ok.reason
        assert client.wait_diag(
            lambda d: (
                "policy=zipvl" in d["pending_next_episode"]
                and "low_bits=2" in d["pending_next_episode"]
                and d["policy"] == "gated"
            )
        )
        assert client.reset().success
        diag = client.wait_diag(lambda d: d["episode"] == "2" and d["pending_next_episode"] == "")
        assert diag["policy"] == "zipvl" and diag["low_bits"] == "2"
        assert (node._runtime.cache.policy.tau, node._runtime.cache.policy.low_bits) == (0.9, 2)

        # a threshold applies at the next step, without a reset
        [ok] = client.set_parameters({"tau": 0.5})
        assert ok.successful, ok.reason
        assert client.exchange(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is not None
        assert client.wait_diag(lambda d: d["episode"] == "2" and d["tau"] == "0.5")
        assert node._runtime.cache.policy.tau == 0.5

        # gated_tiered's full_threshold must not be under gate_threshold
        for change in ({"gate_threshold": 0.5}, {"policy": "gated_tiered"}):
            [ok] = client.set_parameters(change)
            assert ok.successful, ok.reason
        [res] = client.set_parameters({"full_threshold": 0.2})
        assert not res.successful and "full_threshold" in res.reason


def test_full_policy_ignores_the_shared_budget():
    """The budget is for the evicting policies; policy:=full with the default budget must start."""
    from kv_vla.cache import EpisodeCacheConfig

    cfg = EpisodeCacheConfig(**cache_kwargs({"policy": "full", "max_tokens": 240, "chunk_size": 0}))
    assert cfg.max_tokens == 240 and cfg.effective_max_tokens is None
    assert (
        params.check_cache_change(node_defaults(), {"policy": "full"}, pinned_tokens=400, step_tokens=8)
        is None
    )


def test_budget_is_checked_against_the_running_prompt():
    """With the running episode's prompt length the set-time check applies the cache's own rule:
    prompt + sinks + recent chunks + the open chunk must fit the budget."""
    values = node_defaults(policy="gated", max_tokens=80, recent_chunks=2, chunk_size=16)
    assert params.check_cache_change(values, {}) is None  # valid on its own
    assert params.check_cache_change(values, {}, pinned_tokens=20, step_tokens=8) is None  # 20 + 48 <= 80
    reason = params.check_cache_change(values, {}, pinned_tokens=40, step_tokens=8)  # 40 + 48 = 88 > 80
    assert reason is not None and "40-token prompt" in reason and reason.startswith("max_tokens:")
    # chunk_size 0 is one control step, resolved with the step length given
    assert params.check_cache_change(values, {"chunk_size": 0}, pinned_tokens=40, step_tokens=8) is None
