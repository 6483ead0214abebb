"""Table of experiments/gate_rebuild_screen.sh: success per gate and cell, and, against `full` on the
same seeds, the episodes only one of them solves (a paired count: the 50-episode intervals of two
cells overlap, but most of their episodes are shared).

Usage: ``python experiments/gate_screen_table.py SCREEN_DIR FULL_DIR [--out JSON]``, where
SCREEN_DIR holds NAME/{late80,lead80,pick288,reach288}/eval_info.json and FULL_DIR holds
{late,lead,pick,reach}/eval_info.json (``kv-vla eval --policies full`` on the same tasks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kv_vla.atomic import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_cells import compare  # the paired counts, shared with paired_cells.py

#: screen cell -> (full's folder, label)
CELLS = {
    "late80": ("late", "late_cued_reach, 80 tokens"),
    "lead80": ("lead", "late_cued_reach:lead=100-400, 80 tokens"),
    "reach288": ("reach", "long_cued_reach, 288 tokens"),
    "pick288": ("pick", "long_cued_pick, 288 tokens"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("screen", type=Path)
    parser.add_argument("full", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="JSON report (written atomically)")
    args = parser.parse_args()
    gates = sorted(p.name for p in args.screen.iterdir() if (p / "late80" / "eval_info.json").exists())
    if not gates:
        raise SystemExit(f"{args.screen}: no NAME/late80/eval_info.json (one folder per gate)")
    report: dict[str, dict] = {}
    print("| cell | full | " + " | ".join(gates) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in gates) + " |")
    for cell, (full_dir, label) in CELLS.items():
        row: dict = {}
        texts = []
        for gate in gates:
            c = compare(args.full / full_dir, args.screen / gate / cell)  # refuses other seeds
            row["full"] = c["full_success_pct"]
            row[gate] = {
                "success_pct": c["success_pct"],
                "only_full": c["only_full"],
                "only_gated": c["only_cache"],
            }
            texts.append(f"{c['success_pct']} (-{c['only_full']} / +{c['only_cache']})")
        report[label] = row
        print(f"| {label} | {row['full']} | " + " | ".join(texts) + " |")
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
