"""`kv-vla bench cache` with tiny settings: JSON schema, full is the unit, window holds less."""

from __future__ import annotations

import json

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
    by = {(r["policy"], r["history_steps"]): r for r in rows}
    for h in (2, 5):
        assert by[("full", h)]["latency_ratio_vs_full"] == 1.0
        assert by[("full", h)]["kv_ratio_vs_full"] == 1.0
    assert by[("window", 5)]["kv_bytes"] < by[("full", 5)]["kv_bytes"]
    assert by[("none", 5)]["kv_bytes"] <= by[("window", 5)]["kv_bytes"]
    # the budgeted policies hold the same history size as window+sinks at the longest history
    assert by[("gated", 5)]["kv_bytes"] < by[("full", 5)]["kv_bytes"]
    assert "latency/full" in capsys.readouterr().out
