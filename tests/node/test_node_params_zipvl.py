"""ZipVL's options as VLA-node parameters (issue 7).

Unit level: the parameter table, its validation, and how ``runtime_glue.cache_kwargs`` turns the
node's values into ``EpisodeCacheConfig.extra`` (only for ``zipvl`` and ``gated_tiered``). Then the
real tiny runtime takes a live threshold change, and one in-process node driven over DDS shows the
options reach the cache after ``~/reset`` and are refused with a reason when invalid.
"""

from __future__ import annotations

import numpy as np
import pytest

from kv_vla_node import params
from kv_vla_node.runtime_glue import ZIPVL_POLICIES, cache_extra, cache_kwargs, check_cache_values

ZIPVL_PARAMS = {
    "zipvl_tau": "tau",
    "zipvl_low_bits": "low_bits",
    "zipvl_group_size": "quant_group_size",
    "tiered_full_threshold": "full_threshold",
}


def node_defaults(**changes: object) -> dict[str, object]:
    """Every cache parameter at its declared default, with ``changes``."""
    values = {k: params.SPECS[k].default for k in params.CACHE_KEYS}
    values.update(changes)
    return values


def test_declared_defaults_equal_zipvl_defaults_and_policies_match_the_eval_cli():
    from kv_vla.cache.policies.zipvl import DEFAULTS
    from kv_vla.eval.cli import ZIPVL_POLICIES as EVAL_ZIPVL_POLICIES

    assert {ZIPVL_PARAMS[n]: params.SPECS[n].default for n in ZIPVL_PARAMS} == DEFAULTS
    assert set(params.ZIPVL_KEYS) == set(ZIPVL_PARAMS) and set(params.ZIPVL_KEYS) <= set(params.CACHE_KEYS)
    assert ZIPVL_POLICIES == EVAL_ZIPVL_POLICIES
    ranges = {n: (params.SPECS[n].low, params.SPECS[n].high) for n in ZIPVL_PARAMS}
    assert ranges == {
        "zipvl_tau": (0.0, 1.0),
        "zipvl_low_bits": (2, 8),
        "zipvl_group_size": (1, 65536),
        "tiered_full_threshold": (0.0, 1.0),
    }
    assert {params.SPECS[n].effect for n in ("zipvl_tau", "tiered_full_threshold")} == {params.NOW}
    assert {params.SPECS[n].effect for n in ("zipvl_low_bits", "zipvl_group_size")} == {params.NEXT_EPISODE}


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("zipvl_low_bits", 6, "not one of 2, 4, 8"),  # inside the descriptor's 2..8 step 2
        ("zipvl_low_bits", 3, "not one of 2, 4, 8"),
        ("zipvl_low_bits", 4.0, "must be an integer"),
        ("zipvl_tau", 0.0, "outside (0, 1]"),
        ("zipvl_tau", 1.5, "outside [0.0, 1.0]"),
        ("zipvl_tau", float("nan"), "must be finite"),
        ("zipvl_group_size", 0, "outside [1, 65536]"),
        ("zipvl_group_size", True, "must be an integer"),
        ("tiered_full_threshold", -0.1, "outside [0.0, 1.0]"),
    ],
)
def test_invalid_values_are_refused_with_a_reason(name, value, fragment):
    reason = params.validate(name, value)
    assert reason is not None and fragment in reason and name in reason


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("zipvl_low_bits", 2),
        ("zipvl_low_bits", 8),
        ("zipvl_tau", 1.0),
        ("zipvl_tau", 1),
        ("zipvl_group_size", 1),
    ],
)
def test_valid_values_pass(name, value):
    assert params.validate(name, value) is None


def test_extra_reaches_only_the_zipvl_policies():
    from kv_vla.cache import POLICIES, EpisodeCacheConfig

    values = dict(zipvl_tau=0.6, zipvl_low_bits=2, zipvl_group_size=16, tiered_full_threshold=0.8)
    expected = {
        "zipvl": {"tau": 0.6, "low_bits": 2, "quant_group_size": 16},
        "gated_tiered": {"low_bits": 2, "quant_group_size": 16, "full_threshold": 0.8},
    }
    for policy in POLICIES:
        kwargs = cache_kwargs(node_defaults(cache_policy=policy, **values), step_tokens=20)
        assert kwargs["extra"] == expected.get(policy, {}), policy
        if policy in ZIPVL_POLICIES:
            assert EpisodeCacheConfig(**kwargs).extra == expected[policy]
    assert cache_extra("zipvl", {}) == {"tau": 0.9, "low_bits": 4, "quant_group_size": 32}


def test_a_partial_change_rebuilds_extra_for_the_active_policy():
    active = node_defaults(cache_policy="zipvl", zipvl_low_bits=2)
    # extra is replaced whole, so a tau change must carry the active low_bits along
    assert cache_kwargs({"zipvl_tau": 0.5}, 20, active) == {
        "extra": {"tau": 0.5, "low_bits": 2, "quant_group_size": 32}
    }
    # leaving zipvl drops its options
    assert cache_kwargs({"cache_policy": "gated"}, 20, active) == {"policy": "gated", "extra": {}}
    # a ZipVL option under another policy is kept by the node but not passed to the cache
    assert cache_kwargs({"zipvl_tau": 0.5}, 20, node_defaults()) == {"extra": {}}
    # changes that touch neither the policy nor a ZipVL option leave extra alone
    assert cache_kwargs({"gate_threshold": 0.3}, 20, active) == {"gate_threshold": 0.3}


def test_whole_config_check_names_the_offending_option():
    tiered = node_defaults(cache_policy="gated_tiered", gate_threshold=0.5, tiered_full_threshold=0.3)
    reason = check_cache_values(tiered, 20)
    assert reason is not None and "full_threshold" in reason and "gate_threshold=0.5" in reason
    assert check_cache_values({**tiered, "cache_policy": "gated"}, 20) is None  # not its option


def test_real_runtime_takes_the_options_and_a_live_tau_change(tmp_path):
    pytest.importorskip("kv_vla.runtime")
    from kv_vla_node.runtime_factory import RuntimeSettings, build_runtime
    from kv_vla_node.testing import save_random_model

    model = save_random_model(tmp_path / "tiny-vla")
    active = node_defaults(cache_policy="zipvl", zipvl_low_bits=2, zipvl_tau=0.5)
    runtime = build_runtime(RuntimeSettings(str(model), "cpu", "float32", "", cache=dict(active)))
    assert runtime.cache_config.policy == "zipvl"
    assert runtime.cache_config.extra == {"tau": 0.5, "low_bits": 2, "quant_group_size": 32}
    runtime.reset("pick up the red cube")
    rng = np.random.default_rng(0)
    for _ in range(5):
        runtime.step(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    precisions = {c.precision for c in runtime.cache.chunks}
    assert precisions & {"int2", "mixed"}, precisions  # tau 0.5 demoted some chunk, at 2 bits
    assert not precisions & {"int4", "int8"}
    runtime.update_cache_config(**cache_kwargs({"zipvl_tau": 0.95}, runtime.step_tokens, active))
    assert runtime.cache.config.extra == {"tau": 0.95, "low_bits": 2, "quant_group_size": 32}
    runtime.step(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # the episode goes on


@pytest.mark.slow
def test_node_over_dds_applies_the_options_after_reset(tmp_path, monkeypatch):
    pytest.importorskip("rclpy")
    pytest.importorskip("kv_vla.runtime")
    from kv_vla_node.testing import free_domain_id, in_process_node, save_random_model

    monkeypatch.setenv("ROS_LOG_DIR", str(tmp_path / "ros_log"))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    model = save_random_model(tmp_path / "tiny-vla")
    parameters = {
        "model_path": str(model),
        "control_rate_hz": 50.0,
        "max_image_age_s": 5.0,
        "cache_policy": "gated",
    }
    rng = np.random.default_rng(0)
    with in_process_node(free_domain_id(), parameters) as (node, client):
        client.publish_instruction("touch the green cube")
        assert client.wait_diag(lambda d: d["episode"] == "1" and d["cache_extra"] == "")

        # a chunk size an 80-token budget cannot hold beside this episode's prompt is refused when it
        # is set (not only at the next episode start); one it can hold is accepted
        for change in ({"max_tokens": 80}, {"chunk_size": 16}):
            [ok] = client.set_parameters(change)
            assert ok.successful, ok.reason
        [res] = client.set_parameters({"chunk_size": 40})
        assert not res.successful and "running episode" in res.reason and "max_tokens" in res.reason, (
            res.reason
        )
        for change in ({"chunk_size": 0}, {"max_tokens": 0}):  # back to the defaults
            [ok] = client.set_parameters(change)
            assert ok.successful, ok.reason

        for name, value, fragment in [
            ("zipvl_low_bits", 6, "2, 4, 8"),
            ("zipvl_tau", 0.0, "(0, 1]"),
            ("zipvl_group_size", 0, ""),  # outside the descriptor's range: rclpy's own reason
        ]:
            [res] = client.set_parameters({name: value})
            assert not res.successful and res.reason and fragment in res.reason, (name, res.reason)

        for name, value in (("cache_policy", "zipvl"), ("zipvl_low_bits", 2)):
            [ok] = client.set_parameters({name: value})
            assert ok.successful, ok.reason
        assert client.wait_diag(
            lambda d: (
                "cache_policy=zipvl" in d["pending_next_episode"]
                and "zipvl_low_bits=2" in d["pending_next_episode"]
                and d["cache_policy"] == "gated"
            )
        )
        assert client.reset().success
        diag = client.wait_diag(lambda d: d["episode"] == "2" and d["pending_next_episode"] == "")
        assert diag["cache_policy"] == "zipvl" and diag["zipvl_low_bits"] == "2"
        assert diag["cache_extra"] == "low_bits=2,quant_group_size=32,tau=0.9"
        assert node._runtime.cache.config.extra == {"tau": 0.9, "low_bits": 2, "quant_group_size": 32}

        # a threshold applies at the next step, without a reset
        [ok] = client.set_parameters({"zipvl_tau": 0.5})
        assert ok.successful, ok.reason
        assert client.exchange(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is not None
        assert client.wait_diag(lambda d: d["episode"] == "2" and "tau=0.5" in d["cache_extra"])

        # gated_tiered's full_threshold must not be under gate_threshold (0.5 here)
        [ok] = client.set_parameters({"cache_policy": "gated_tiered"})
        assert ok.successful, ok.reason
        [res] = client.set_parameters({"tiered_full_threshold": 0.2})
        assert not res.successful and "full_threshold" in res.reason


def test_full_policy_ignores_the_shared_budget():
    """The YAML's budget is for the bounded policies; cache_policy:=full must still start."""
    from kv_vla.cache import EpisodeCacheConfig
    from kv_vla_node.runtime_glue import cache_kwargs

    kwargs = cache_kwargs({"cache_policy": "full", "max_tokens": 240, "chunk_size": 0}, step_tokens=20)
    assert kwargs["max_tokens"] is None
    EpisodeCacheConfig(**kwargs)  # valid
    gated = cache_kwargs({"cache_policy": "gated", "max_tokens": 240}, step_tokens=20)
    assert gated["max_tokens"] == 240
    # switching a budgeted cache to full clears the budget instead of being refused
    cfg = EpisodeCacheConfig(**gated)
    assert (
        cfg.replace(**cache_kwargs({"cache_policy": "full"}, active={"max_tokens": 240})).max_tokens is None
    )


def test_budget_is_checked_against_the_running_prompt():
    """With the running episode's prompt length the set-time check applies the cache's own rule:
    prompt + sinks + recent chunks + the open chunk must fit the budget."""
    values = node_defaults(cache_policy="gated", max_tokens=80, recent_chunks=2, chunk_size=16)
    assert check_cache_values(values, 8) is None  # valid on its own
    assert check_cache_values(values, 8, pinned_tokens=20) is None  # 20 + 3 x 16 = 68 <= 80
    reason = check_cache_values(values, 8, pinned_tokens=40)  # 40 + 48 = 88 > 80
    assert reason is not None and "40-token prompt" in reason and "max_tokens" in reason
    assert check_cache_values({**values, "cache_policy": "full"}, 8, pinned_tokens=400) is None
