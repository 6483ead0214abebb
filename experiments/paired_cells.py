"""Cache cells against `full` on the same seeds: success, the episodes only one side solves, peak KV
as a share of `full`'s, and step time. Paired counts, because two 50-episode cells share most of
their outcomes and their intervals overlap whatever the difference.

Usage: ``python experiments/paired_cells.py LABEL=FULL_DIR:CACHE_DIR ... [--out JSON]``, each DIR a
``kv-vla eval`` output folder (``eval_info.json``) of one task and one policy, both over the same
evaluation seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kv_vla.atomic import atomic_write_text


def episodes(path: Path) -> tuple[dict, dict[int, dict]]:
    """The run's config and evaluation seed -> episode record, from one single-policy ``kv-vla eval`` folder."""
    info = json.loads((path / "eval_info.json").read_text())
    if len(info["config"]["policies"]) != 1 or len(info["config"]["tasks"]) != 1:
        raise SystemExit(f"{path}: expected one task and one policy, got {info['config']}")
    return info["config"], {int(e["seed"]): e for e in info["episodes"]}


def compare(full_dir: Path, cache_dir: Path) -> dict:
    """One cell: the cache's outcomes and costs next to `full`'s on the same seeds."""
    (_, full), (info, cache) = episodes(full_dir), episodes(cache_dir)
    if full.keys() != cache.keys():
        raise SystemExit(f"{cache_dir}: other evaluation seeds than {full_dir}")
    seeds = sorted(full)

    def pct(eps: dict[int, dict]) -> int:
        return round(100 * sum(bool(eps[s]["success"]) for s in seeds) / len(seeds))

    def peak_mib(eps: dict[int, dict]) -> float:
        return statistics.fmean(eps[s]["peak_kv_bytes"] for s in seeds) / 2**20

    def step_ms(eps: dict[int, dict]) -> float:
        return statistics.median(eps[s]["step_ms_p50"] for s in seeds)

    return {
        "task": info["tasks"][0],
        "policy": info["policies"][0],
        "cache_options": info.get("cache_options", {}),
        "seeds": [seeds[0], seeds[-1]],
        "episodes": len(seeds),
        "full_success_pct": pct(full),
        "success_pct": pct(cache),
        "only_full": sum(bool(full[s]["success"]) and not cache[s]["success"] for s in seeds),
        "only_cache": sum(bool(cache[s]["success"]) and not full[s]["success"] for s in seeds),
        "full_peak_kv_mib": round(peak_mib(full), 3),
        "peak_kv_mib": round(peak_mib(cache), 3),
        "of_full_kv_pct": round(100 * peak_mib(cache) / peak_mib(full), 1),
        "full_step_ms_p50": round(step_ms(full), 1),
        "step_ms_p50": round(step_ms(cache), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cells", nargs="+", help="LABEL=FULL_DIR:CACHE_DIR")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (written atomically)")
    args = parser.parse_args()
    report = {}
    print("| cell | full | cache (only full / only cache) | peak KV MiB (of full's) | step ms p50 (full) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for spec in args.cells:
        label, sep, dirs = spec.rpartition("=")
        full_dir, sep2, cache_dir = dirs.partition(":")
        if not (sep and sep2 and label):
            raise SystemExit(f"{spec!r}: expected LABEL=FULL_DIR:CACHE_DIR")
        row = report[label] = compare(Path(full_dir), Path(cache_dir))
        print(
            f"| {label} | {row['full_success_pct']} | {row['success_pct']} (-{row['only_full']} / "
            f"+{row['only_cache']}) | {row['peak_kv_mib']:.2f} ({row['of_full_kv_pct']}%) | "
            f"{row['step_ms_p50']} ({row['full_step_ms_p50']}) |"
        )
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
