"""`kv-vla bench soak` on a tiny random model: report keys, bounded positions, merge and PNG."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from kv_vla.bench import cli as bench_cli
from kv_vla.model import CompactVLA, CompactVLAConfig

KEYS = {
    "step_ms_p50_first",
    "step_ms_p50_last",
    "rss_mib_per_1000_steps",
    "max_position_id",
    "max_position_embeddings",
    "kv_bytes_max",
    "steps",
}


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return bench_cli.run(parser.parse_args(argv))


@pytest.mark.slow
def test_bench_soak_reports_growth_and_bounded_positions(tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "tiny-vla"
    CompactVLA(CompactVLAConfig.tiny(pool=4, action_decoding="parallel")).save_pretrained(model)
    out = tmp_path / "soak.json"
    common = ["--model", str(model), "--no-progress", "--plot-steps", "30"]
    argv = [
        "soak",
        "--json",
        str(out),
        "--steps",
        "30",
        "--policies",
        "window,full",
        "--max-steps-full",
        "12",
    ]
    assert _run([*argv, "--positions", "episode,cache", "--recent-chunks", "2", *common]) == 0
    runs = {(r["policy"], r["positions"]): r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {(p, m) for p in ("window", "full") for m in ("episode", "cache")}
    for run in runs.values():
        assert set(run) >= KEYS
        assert len(run["series"]["kv_bytes"]) == run["steps"]
    assert runs[("full", "episode")]["steps"] == 12 and runs[("window", "cache")]["steps"] == 30
    # window keeps 2 steps + the open one: cache positions stay there, episode positions grow
    step = 8  # 4 image tokens + 4 parallel action slots
    bounded = runs[("window", "cache")]["max_position_id"]
    assert bounded < runs[("window", "episode")]["max_position_id"]
    assert bounded <= 3 * step + 64  # prompt (< 64 tokens) + kept steps + one step
    assert runs[("window", "cache")]["kv_bytes_max"] == runs[("window", "episode")]["kv_bytes_max"]
    assert runs[("full", "episode")]["kv_bytes_max"] > runs[("window", "episode")]["kv_bytes_max"]
    # merging reports made in separate processes, and the PNG
    merged, png = tmp_path / "merged.json", tmp_path / "soak.png"
    assert _run(["soak", "--json", str(merged), "--from-json", str(out), str(out), "--plot", str(png)]) == 0
    assert len(json.loads(merged.read_text())["runs"]) == 8 and png.stat().st_size > 0


@pytest.mark.slow
def test_bench_soak_runs_bounded_policies_compiled_over_static_storage(tmp_path, monkeypatch):
    """``--storage static --compile``: the bounded run is compiled and warmed up before its episode,
    ``full`` stays eager on the dynamic storage, and each run says which step it took."""
    from kv_vla.cache.storage import compiled

    monkeypatch.setattr(
        compiled, "AHEAD_OF_TIME_ON_CPU", False
    )  # torch.compile: the same wiring, faster to build
    torch.manual_seed(0)
    model = tmp_path / "tiny-vla"
    CompactVLA(CompactVLAConfig.tiny(pool=4, action_decoding="parallel")).save_pretrained(model)
    out = tmp_path / "soak.json"
    argv = ["soak", "--json", str(out), "--model", str(model), "--no-progress", "--plot-steps", "20"]
    argv += ["--steps", "20", "--max-steps-full", "6", "--policies", "window,full", "--recent-chunks", "2"]
    argv += ["--positions", "episode,cache"]
    with pytest.raises(SystemExit, match="add --storage static"):
        _run([*argv, "--compile"])
    assert _run([*argv, "--storage", "static", "--compile"]) == 0
    runs = {(r["policy"], r["positions"]): r for r in json.loads(out.read_text())["runs"]}
    for positions in ("episode", "cache"):
        window, full = runs[("window", positions)], runs[("full", positions)]
        assert (window["storage"], window["compiled"], window["steps"]) == ("static", True, 20)
        assert (full["storage"], full["compiled"], full["warmup_s"]) == ("dynamic", False, 0.0)
        assert full["kv_bytes_max"] > window["kv_bytes_max"]
    # the first compiled run compiles its shapes; the second (same shapes) reuses them
    assert runs[("window", "episode")]["warmup_s"] > 2 * runs[("window", "cache")]["warmup_s"] > 0


@pytest.mark.slow
def test_bench_soak_passes_the_quantisation_knobs_to_the_cache(tmp_path):
    """``--low-bits`` reaches the cache as in ``kv-vla eval``: fewer bits, fewer KV bytes held."""
    torch.manual_seed(0)
    model = tmp_path / "tiny-vla"
    CompactVLA(CompactVLAConfig.tiny(pool=4, action_decoding="parallel")).save_pretrained(model)
    held = {}
    for bits in (8, 2):
        out = tmp_path / f"soak{bits}.json"
        argv = ["soak", "--json", str(out), "--steps", "20", "--policies", "zipvl", "--positions", "episode"]
        argv += [
            "--model",
            str(model),
            "--no-progress",
            "--recent-chunks",
            "1",
            "--tau",
            "0.1",
            "--low-bits",
            str(bits),
        ]
        assert _run(argv) == 0
        report = json.loads(out.read_text())
        assert report["config"]["cache_options"]["low_bits"] == bits
        held[bits] = report["runs"][0]["kv_bytes_max"]
    assert held[2] < held[8]
