"""Merging separate evaluation runs (same seeds) into one report."""

from __future__ import annotations

import json

import pytest

from kv_vla.eval.harness import evaluate, model_free_factory
from kv_vla.eval.merge import main, merge_results
from kv_vla.eval.report import write_report


def test_merge_concatenates_runs_and_refuses_different_seeds(tmp_path):
    a = evaluate({"expert": model_free_factory("expert")}, tasks=["reach"], episodes=2, progress=False)
    b = evaluate(
        {"random-actions": model_free_factory("random-actions")}, tasks=["reach"], episodes=2, progress=False
    )
    write_report(a, str(tmp_path / "a"))
    write_report(b, str(tmp_path / "b"))
    assert main(["--out", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    merged = json.loads((tmp_path / "m" / "eval_info.json").read_text())
    assert {r["policy"] for r in merged["episodes"]} == {"expert", "random-actions"}
    assert len(merged["episodes"]) == 4 and len(merged["aggregates"]) == 2
    table = (tmp_path / "m" / "results.md").read_text()
    assert "| reach | no | expert |" in table and "| reach | no | random-actions |" in table
    assert (tmp_path / "m" / "success_vs_kv.png").stat().st_size > 0
    c = evaluate(
        {"expert": model_free_factory("expert")}, tasks=["reach"], episodes=2, seed_offset=5, progress=False
    )
    with pytest.raises(ValueError, match="seeds"):
        merge_results([a, c])
