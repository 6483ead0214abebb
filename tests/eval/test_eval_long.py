"""Evaluation over long-horizon and option-carrying task names (``--tasks long``, ``NAME:key=value``)."""

from __future__ import annotations

import pytest

from kv_vla.eval.harness import evaluate, model_free_factory


def test_optioned_tasks_are_reported_under_the_name_given():
    names = ["long_cued_reach:wait=12-14", "late_cued_reach:lead=20"]
    result = evaluate({"expert": model_free_factory("expert")}, names, episodes=2, progress=False)
    rows = {r["task"]: r for r in result["aggregates"]}
    assert set(rows) == set(names)
    assert all(r["episodes"] == 2 and r["success_pct"] == 100.0 and r["memory_task"] for r in rows.values())
    assert rows["late_cued_reach:lead=20"]["steps_mean"] > 20 + 3  # the lead-in frames ran


def test_unknown_task_options_are_refused_before_any_episode():
    with pytest.raises(ValueError, match="unknown option"):
        evaluate({"expert": model_free_factory("expert")}, ["reach:wait=3"], episodes=1, progress=False)
