"""Evaluation harness: reports for model-free agents, expert >> random, model policies end to end."""

from __future__ import annotations

import json

import pytest

from kv_vla.cli import main as kv_vla_main
from kv_vla.eval.harness import eval_seeds, evaluate, model_free_factory, wilson_interval
from kv_vla.eval.report import write_report


def test_wilson_interval_reference_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)


def test_wilson_interval_holds_the_rate_exactly_and_a_perfect_row_plots(tmp_path):
    """6/6 gave an upper end of 0.9999999999999999 once: a negative error bar, and the report's plot
    raised after the whole evaluation had run. Every n up to 200 keeps lo <= k/n <= hi exactly."""
    from kv_vla.eval.report import plot_success_vs_kv

    for n in range(1, 201):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
    lo, hi = wilson_interval(6, 6)
    row = {
        "policy": "full",
        "tasks": "memory",
        "success_pct": 100.0 * 6 / 6,
        "success_ci95_pct": [100.0 * lo, 100.0 * hi],
        "peak_kv_bytes_mean": 4.9e6,
    }
    plot_success_vs_kv({"summary": [row]}, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_evaluation_seeds_never_reach_demonstration_seeds():
    assert eval_seeds(3, 10) == [10, 11, 12]
    with pytest.raises(ValueError):
        eval_seeds(5, 999_998)
    with pytest.raises(ValueError):
        eval_seeds(1, -1)


def test_expert_far_above_random_and_all_three_files(tmp_path):
    factories = {name: model_free_factory(name) for name in ("expert", "random-actions")}
    result = evaluate(factories, ["reach", "cued_reach"], episodes=3, progress=False)
    paths = write_report(result, str(tmp_path))
    for p in paths.values():
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 0
    info = json.loads((tmp_path / "eval_info.json").read_text())
    assert len(info["episodes"]) == 2 * 2 * 3
    rec = info["episodes"][0]
    assert set(rec) >= {
        "policy",
        "task",
        "seed",
        "success",
        "steps",
        "step_ms_p50",
        "step_ms_p95",
        "peak_kv_bytes",
    }
    assert rec["peak_kv_bytes"] is None  # no KV cache
    # the same seeds for every policy
    seeds = {(r["policy"], r["task"]): [] for r in info["episodes"]}
    for r in info["episodes"]:
        seeds[(r["policy"], r["task"])].append(r["seed"])
    assert all(s == [0, 1, 2] for s in seeds.values())
    agg = {(a["policy"], a["task"]): a for a in info["aggregates"]}
    for task in ("reach", "cued_reach"):
        assert agg[("expert", task)]["success_pct"] == 100.0
        assert agg[("random-actions", task)]["success_pct"] <= 34.0
        lo, hi = agg[("expert", task)]["success_ci95_pct"]
        assert lo < 100.0 == hi
    md = (tmp_path / "results.md").read_text()
    assert "| reach | no | expert | 100 [" in md and "random-actions" in md
    assert (tmp_path / "success_vs_kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_with_a_model_policy_and_agents(tmp_path):
    """End to end through `kv-vla eval`: a tiny untrained compact VLA under two cache policies."""
    from kv_vla.model.compact import CompactVLA, CompactVLAConfig

    CompactVLA(CompactVLAConfig.tiny()).eval().save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    argv = ["eval", "--policies", "full,none,expert", "--tasks", "reach", "--episodes", "1"]
    argv += ["--model", str(tmp_path / "model"), "--out", str(out), "--no-progress"]
    assert kv_vla_main(argv) == 0
    info = json.loads((out / "eval_info.json").read_text())
    by_policy = {r["policy"]: r for r in info["episodes"]}
    assert set(by_policy) == {"full", "none", "expert"}
    assert by_policy["full"]["peak_kv_bytes"] > by_policy["none"]["peak_kv_bytes"] > 0
    assert by_policy["expert"]["peak_kv_bytes"] is None
    assert (out / "results.md").exists() and (out / "success_vs_kv.png").exists()
    with pytest.raises(SystemExit, match="unknown policy"):
        kv_vla_main(["eval", "--policies", "bogus", "--tasks", "reach", "--episodes", "1", "--out", str(out)])


@pytest.mark.parametrize(("pool", "step_tokens"), [(2, 20), (4, 8)])
def test_eval_cli_chunks_are_one_control_step_of_the_model(tmp_path, pool, step_tokens):
    """Without --chunk-size the evaluated cache cuts chunks at the model's own control step (the
    unit its gate is trained on), whatever the model's tokens per step; options apply on top."""
    import argparse

    from kv_vla.eval.cli import model_factory
    from kv_vla.model.compact import CompactVLA, CompactVLAConfig

    CompactVLA(CompactVLAConfig.tiny(pool=pool)).eval().save_pretrained(tmp_path / "model")
    names = ("chunk_size", "sink_tokens", "max_tokens", "gate_threshold", "gate")
    args = argparse.Namespace(
        model=str(tmp_path / "model"), device="cpu", recent_chunks=3, **dict.fromkeys(names)
    )
    runtime = model_factory("window", args)(None)
    assert runtime.cache_config.chunk_size == step_tokens
    assert runtime.cache_config.policy == "window" and runtime.cache_config.recent_chunks == 3
    args.chunk_size = 40
    assert model_factory("window", args)(None).cache_config.chunk_size == 40


def test_plot_labels_of_policies_at_one_budget_do_not_overlap():
    """Budgeted policies share one peak-KV value and often one success rate: their labels must still
    land in separate places."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kv_vla.eval.report import _place_labels

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    points = [("gated", 0.13, 90.0), ("attention", 0.13, 90.0), ("sinks", 0.13, 89.0), ("full", 0.7, 94.0)]
    for _, x, y in points:
        ax.plot([x], [y], "o")
    ax.set_ylim(-3, 103)
    _place_labels(ax, points)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 4
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    plt.close(fig)
