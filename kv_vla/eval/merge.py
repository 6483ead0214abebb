"""Merge several ``kv-vla eval`` output folders into one report (``python -m kv_vla.eval.merge``).

Why: policies that need different cache options (``full`` refuses a budget, ``window`` is sized by
its recent chunks, the budgeted policies share ``--max-tokens``) are evaluated in separate runs, on
the same seeds; the comparison belongs in one table and one plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kv_vla.eval.report import episode_order, write_report


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate episodes, aggregates and summaries; refuse runs on different seeds or frames, or
    runs that share an episode. Episodes come out sorted by (task, policy, seed), whatever the order
    of the runs or of the episodes within them (the ``lerobot`` view is rebuilt by write_report)."""
    if not results:
        raise ValueError("nothing to merge")
    first = results[0]["config"]
    for r in results[1:]:
        cfg = r["config"]
        for key in ("seeds", "image_size", "episodes_per_task"):
            if cfg[key] != first[key]:
                raise ValueError(f"cannot merge runs with different {key}: {first[key]} vs {cfg[key]}")
    merged: dict[str, Any] = {"episodes": [], "aggregates": [], "summary": []}
    tasks: list[str] = []
    policies: list[str] = []
    for r in results:
        for key in merged:
            merged[key].extend(r[key])
        tasks += [t for t in r["config"]["tasks"] if t not in tasks]
        policies += [p for p in r["config"]["policies"] if p not in policies]
    merged["config"] = {
        **{k: first[k] for k in ("seeds", "image_size", "episodes_per_task")},
        "tasks": tasks,
        "policies": policies,
        "runs": [r["config"] for r in results],
    }
    keys = [(e["task"], e["policy"], e["seed"]) for e in merged["episodes"]]
    if len(set(keys)) < len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[0]
        raise ValueError(f"cannot merge runs that both hold episode (task, policy, seed) = {dup}")
    merged["episodes"] = episode_order(merged["episodes"])
    merged["aggregates"].sort(key=lambda a: (not a["memory_task"], a["task"]))
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="kv-vla eval output folders (each with eval_info.json)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    results = [json.loads((Path(d) / "eval_info.json").read_text()) for d in args.dirs]
    paths = write_report(merge_results(results), args.out)
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
