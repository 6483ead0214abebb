"""`kv-vla bench cache` with tiny settings: JSON schema, full is the unit, window holds less."""

from __future__ import annotations

import json

import pytest

from kv_vla.bench import cli as bench_cli


def test_bench_cache_json_schema_and_ratios(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    out = tmp_path / "bench" / "cache.json"
    argv = "--obs-tokens 10 --action-tokens 2 --history 2,5 --repeats 1 --keep-steps 1 --no-progress"
    args = parser.parse_args(["cache", "--json", str(out), *argv.split()])
    assert bench_cli.run(args) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert {"preset", "device", "dtype", "results"} <= set(report)
    assert report["preset"] == "small" and report["device"] == "cpu" and report["dtype"] == "float32"
    keys = {"policy", "history_steps", "step_ms_p50", "kv_bytes", "latency_ratio_vs_full", "kv_ratio_vs_full"}
    keys |= {"storage", "compiled", "latency_ratio_vs_dynamic", "floor_ms", "floor_ratio", "warmup_s"}
    rows = report["results"]
    assert {r["policy"] for r in rows} == {
        "full",
        "none",
        "window",
        "sinks",
        "attention",
        "random",
        "gated",
        "zipvl",
        "gated_tiered",
    }
    for r in rows:
        assert set(r) == keys
        assert r["step_ms_p50"] > 0 and r["kv_bytes"] > 0
        assert (r["storage"], r["compiled"]) == ("dynamic", False)
        # the ratio is computed before rounding, the test from the rounded fields: 1% covers that
        assert r["floor_ms"] > 0
        assert r["floor_ratio"] == pytest.approx(r["step_ms_p50"] / r["floor_ms"], rel=0.01, abs=0.01)
    assert report["copy_bandwidth_gb_s"] > 0 and report["passes_per_step"] == 3
    by = {(r["policy"], r["history_steps"]): r for r in rows}
    for h in (2, 5):
        assert by[("full", h)]["latency_ratio_vs_full"] == 1.0
        assert by[("full", h)]["kv_ratio_vs_full"] == 1.0
    assert by[("window", 5)]["kv_bytes"] < by[("full", 5)]["kv_bytes"]
    assert by[("none", 5)]["kv_bytes"] <= by[("window", 5)]["kv_bytes"]
    # the budgeted policies hold the same history size as window+sinks at the longest history
    assert by[("gated", 5)]["kv_bytes"] < by[("full", 5)]["kv_bytes"]
    assert "latency/full" in capsys.readouterr().out


def test_partial_reports_hold_the_points_measured_so_far():
    """Each finished history point is reported before the run ends (so a timed-out 7B run keeps
    what it measured); the KV bytes in a partial report equal the final report's for that point."""
    from kv_vla.bench.cache_bench import BenchConfig, run_bench

    cfg = BenchConfig(
        obs_tokens=6, action_tokens=1, history=[1, 3, 4], policies=["full", "window"], repeats=1, keep_steps=1
    )
    partial: list[dict] = []
    final = run_bench(cfg, progress=False, on_point=partial.append)
    assert [sorted({r["history_steps"] for r in p["results"]}) for p in partial] == [[1], [1, 3]]
    assert [p["complete"] for p in partial] == [False, False] and final["complete"]
    kv = {(r["policy"], r["history_steps"]): r["kv_bytes"] for r in final["results"]}
    assert all(kv[(r["policy"], r["history_steps"])] == r["kv_bytes"] for p in partial for r in p["results"])


def test_dynamic_cache_reference_holds_what_full_holds():
    """The `hf_dynamic` reference row (transformers' DynamicCache) keeps the same tokens as `full`,
    so its KV bytes equal full's at every history point and only the latency ratio tells them apart."""
    from kv_vla.bench.cache_bench import BenchConfig, run_bench

    cfg = BenchConfig(
        obs_tokens=6, action_tokens=2, history=[1, 3], policies=["full", "hf_dynamic"], repeats=1
    )
    rows = run_bench(cfg, progress=False)["results"]
    by = {(r["policy"], r["history_steps"]): r for r in rows}
    for h in (1, 3):
        assert by[("hf_dynamic", h)]["kv_bytes"] == by[("full", h)]["kv_bytes"] > 0
        assert by[("hf_dynamic", h)]["kv_ratio_vs_full"] == 1.0


@pytest.mark.slow  # one process per policy
def test_isolated_run_measures_each_policy_in_its_own_process_with_the_same_bytes():
    """``--isolate`` (one spawned process per policy, for fair GPU latency) sees the same model and
    tokens as lockstep: every row's KV bytes equal the lockstep run's exactly, and the partial
    report after each policy holds the policies measured so far."""
    from kv_vla.bench.cache_bench import BenchConfig, run_bench

    kw = dict(obs_tokens=6, action_tokens=1, history=[1, 3], policies=["full", "gated"], repeats=1)
    lockstep = run_bench(BenchConfig(keep_steps=1, **kw), progress=False)
    partial: list[dict] = []
    isolated = run_bench(
        BenchConfig(keep_steps=1, isolate=True, **kw), progress=False, on_point=partial.append
    )
    key = lambda r: (r["policy"], r["history_steps"])  # noqa: E731
    assert [(key(r), r["kv_bytes"]) for r in isolated["results"]] == [
        (key(r), r["kv_bytes"]) for r in lockstep["results"]
    ]
    assert isolated["complete"] and isolated["config"]["isolate"]
    assert [[r["policy"] for r in p["results"]] for p in partial] == [["full"] * 2]
    assert not any(p["complete"] for p in partial)
    assert all(r["step_ms_p50"] > 0 for r in isolated["results"])


def test_static_storage_rows_hold_the_same_bytes_as_dynamic():
    """``--storage dynamic,static``: every bounded policy gets a static row with the dynamic row's KV
    bytes at each history point; unbounded ones (full, zipvl) and the reference stay dynamic only."""
    from kv_vla.bench.cache_bench import BenchConfig, run_bench

    cfg = BenchConfig(
        obs_tokens=6,
        action_tokens=1,
        history=[2, 4],
        policies=["full", "window", "gated", "zipvl", "hf_dynamic"],
        repeats=1,
        keep_steps=1,
        storages=["dynamic", "static"],
    )
    rows = run_bench(cfg, progress=False)["results"]
    by = {(r["policy"], r["storage"], r["history_steps"]): r for r in rows}
    assert {(p, s) for p, s, _ in by} == {
        ("full", "dynamic"),
        ("window", "dynamic"),
        ("window", "static"),
        ("gated", "dynamic"),
        ("gated", "static"),
        ("zipvl", "dynamic"),
        ("hf_dynamic", "dynamic"),
    }
    for p in ("window", "gated"):
        for h in (2, 4):
            assert by[(p, "static", h)]["kv_bytes"] == by[(p, "dynamic", h)]["kv_bytes"] > 0
            assert by[(p, "static", h)]["latency_ratio_vs_dynamic"] > 0
