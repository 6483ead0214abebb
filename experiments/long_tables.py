"""Markdown tables for docs/LONG_HORIZON.md from ``kv-vla eval`` output folders.

Usage: ``python experiments/long_tables.py length RUN_DIR`` (the folders of
``experiments/long_length_table.sh``) or ``python experiments/long_tables.py results DIR [DIR ...]``.
Rows: task, policy (with its position mode), episodes, success % [95% CI], steps, step ms p50 / p95,
peak KV (MiB, mean over episodes) and peak KV as a share of full history's on the same task.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kv_vla import settings

DEFAULTS = settings.defaults(("positions", "max_tokens"))


def _rows(dirs: list[Path]) -> list[dict]:
    rows = []
    for d in dirs:
        info = json.loads((d / "eval_info.json").read_text())
        # an option not passed is the library's default (kv_vla/settings.py), which the run used
        opts = {**DEFAULTS, **info["config"].get("cache_options", {})}
        mode, budget = opts["positions"], opts["max_tokens"]
        for a in info["aggregates"]:
            label = a["policy"]
            if a["policy"] == "gated":
                label += f" ({budget} tokens, {mode} positions)"
            seeds = info["config"].get("seeds") or ["?", "?"]
            rows.append({**a, "label": label, "seeds": f"{seeds[0]}-{seeds[-1]}"})
    return rows


def table(dirs: list[Path]) -> str:
    rows = _rows(dirs)
    full = {(r["task"], r["seeds"]): r["peak_kv_bytes_mean"] for r in rows if r["policy"] == "full"}
    out = [
        "| task | policy | seeds | success % [95% CI] | steps | step ms p50 / p95 | peak KV MiB | of full's |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["task"], r["label"] != "full", r["label"], r["seeds"])):
        kv = r["peak_kv_bytes_mean"] or 0.0
        ref = full.get((r["task"], r["seeds"]))
        share = f"{100 * kv / ref:.0f}%" if ref else "-"
        lo, hi = r["success_ci95_pct"]
        out.append(
            f"| {r['task']} | {r['label']} | {r['seeds']} | {r['success_pct']:.0f} [{lo:.0f}, {hi:.0f}] | "
            f"{r['steps_mean']:.0f} | {r['step_ms_p50']:.0f} / {r['step_ms_p95']:.0f} | {kv / 2**20:.2f} | {share} |"
        )
    return "\n".join(out)


def main(argv: list[str]) -> int:
    kind, *paths = argv
    if kind == "length":
        dirs = sorted(p.parent for p in Path(paths[0]).glob("w*/*/eval_info.json"))
    else:
        dirs = [Path(p) for p in paths]
    print(table(dirs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
