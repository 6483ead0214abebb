"""eval_info.json carries LeRobot's field names beside ours; merging is order-independent."""

from __future__ import annotations

import json

import pytest

from kv_vla.eval.harness import evaluate, model_free_factory
from kv_vla.eval.merge import merge_results
from kv_vla.eval.report import LEROBOT_AGGREGATE_FIELDS, LEROBOT_EPISODE_FIELDS, write_report


def _run(policy, tasks=("reach", "cued_reach"), episodes=2, seed_offset=0, **kw):
    return evaluate(
        {policy: model_free_factory(policy)},
        list(tasks),
        episodes=episodes,
        seed_offset=seed_offset,
        progress=False,
        **kw,
    )


def test_lerobot_fields_per_episode_and_per_policy_and_task(tmp_path):
    result = _run("expert")
    write_report(result, str(tmp_path))
    info = json.loads((tmp_path / "eval_info.json").read_text())
    for rec in info["episodes"]:
        assert set(rec) >= set(LEROBOT_EPISODE_FIELDS) | {"policy", "task", "steps", "peak_kv_bytes"}
        assert rec["sum_reward"] == rec["max_reward"] == float(rec["success"])  # reward 1 on success only
    assert [r["episode_ix"] for r in info["episodes"]] == [0, 1, 0, 1]  # per task, sorted by seed
    for agg in info["aggregates"]:
        assert set(agg) >= set(LEROBOT_AGGREGATE_FIELDS) | {"success_pct", "success_ci95_pct"}
        assert agg["pc_success"] == agg["success_pct"] == 100.0
        assert agg["avg_sum_reward"] == agg["avg_max_reward"] == 1.0
        assert agg["eval_s"] > 0 and agg["eval_ep_s"] == pytest.approx(agg["eval_s"] / 2)
    view = info["lerobot"]["expert"]["cued_reach"]
    assert set(view) == {"per_episode", "aggregated"}
    assert [e["seed"] for e in view["per_episode"]] == [0, 1]
    assert set(view["per_episode"][0]) == set(LEROBOT_EPISODE_FIELDS)
    assert set(view["aggregated"]) == set(LEROBOT_AGGREGATE_FIELDS)
    assert info["config"]["backend"]["name"] == "local"


def test_random_actions_episode_does_not_depend_on_what_ran_before():
    long = _run("random-actions", tasks=["reach"], episodes=3, record_actions=True)
    short = _run("random-actions", tasks=["reach"], episodes=1, seed_offset=2, record_actions=True)
    a, b = long["episodes"][2], short["episodes"][0]
    assert a["seed"] == b["seed"] == 2
    assert a["actions"] == b["actions"] and a["steps"] == b["steps"]
    assert long["episodes"][0]["actions"] != long["episodes"][1]["actions"]


def test_merge_is_deterministic_and_refuses_shared_episodes():
    a, b = _run("expert", tasks=["reach"]), _run("random-actions", tasks=["reach"])
    ab, ba = merge_results([a, b]), merge_results([b, a])
    key = [(e["task"], e["policy"], e["seed"]) for e in ab["episodes"]]
    assert key == sorted(key) == [(e["task"], e["policy"], e["seed"]) for e in ba["episodes"]]
    with pytest.raises(ValueError, match="both hold episode"):
        merge_results([a, _run("expert", tasks=["reach"])])
