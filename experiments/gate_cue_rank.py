"""Where does a trained gate rank the cue of ``late_cued_reach``? (content vs position)

The cue is lit at a random frame 3-12 (``kv_vla_sim.tasks.LateCuedReach``); the frames before it
and after it are identical grey frames. Under a token budget the gated cache keeps the old chunks
of highest utility, so a gate that keeps the cue must rank one of its three chunks above every grey
chunk before the go step. A gate that learned position from the other cued tasks (cue at frames
0-2) ranks the first chunks highest instead. This script replays recorded demonstrations through
the model (teacher-forced, the runtime's chunk summaries) and reports, per gate, how often a cue
chunk is ranked first, its mean rank, and the mean utility of cue and grey chunks.

Usage: ``.venv/bin/python experiments/gate_cue_rank.py --model M --gates G1 [G2 ...] --data data/demos6
[--episodes 40] [--out docs/results/eval/gate_cue_rank.json]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from kv_vla.atomic import atomic_write_text


def cue_ranks(model_dir: str, gate_paths: list[str], data: list[str], episodes: int) -> dict[str, dict]:
    """Per gate: first-place rate, mean rank and utilities of the cue chunks over ``episodes``."""
    from kv_vla.cache import ChunkGate
    from kv_vla.model.compact import CompactVLA
    from kv_vla.train.data import load_demonstrations, tokenize_episodes
    from kv_vla.train.gate import episode_summaries
    from kv_vla_sim.tasks import TASKS

    model = CompactVLA.from_pretrained(model_dir).eval()
    eps = [e for e in load_demonstrations(data, episodes) if e.task == "late_cued_reach"][:episodes]
    if not eps:
        raise SystemExit(f"no late_cued_reach demonstrations in {data}")
    tokenized = tokenize_episodes(model, eps)
    summaries: dict[str, list] = {}  # per summary_keys: a gate reads the keys its config names
    report: dict[str, dict] = {}
    for path in gate_paths:
        gate = ChunkGate.load(path)
        keys = gate.config.summary_keys
        if keys not in summaries:
            summaries[keys] = [(ep, episode_summaries(model, ep, keys)) for ep in tokenized]
        ranks, cue_u, grey_u = [], [], []
        for ep, s in summaries[keys]:
            spec = TASKS[ep.task].sample(ep.seed)
            with torch.no_grad():
                u = gate(s).numpy()[: spec.go_step]  # the chunks old enough to matter at go
            cue = range(spec.cue_onset, spec.cue_onset + spec.cue_steps)
            order = list(np.argsort(-u, kind="stable"))
            ranks.append(min(order.index(k) for k in cue))
            cue_u.append(float(u[list(cue)].max()))
            grey_u.append(float(np.delete(u, list(cue)).mean()))
        report[path] = {
            "episodes": len(ranks),
            "cue_ranked_first": round(float(np.mean(np.array(ranks) == 0)), 3),
            "cue_in_top3": round(float(np.mean(np.array(ranks) < 3)), 3),  # ~ the 80-token budget's room
            "cue_mean_rank": round(float(np.mean(ranks)), 2),
            "cue_utility_mean": round(float(np.mean(cue_u)), 4),
            "grey_utility_mean": round(float(np.mean(grey_u)), 4),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--gates", nargs="+", required=True, help="gate .safetensors files")
    parser.add_argument("--data", nargs="+", default=["data/demos6"])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--out", default=None, help="JSON report (written atomically)")
    args = parser.parse_args()
    report = cue_ranks(args.model, args.gates, args.data, args.episodes)
    print(
        "| gate | episodes | cue ranked first | cue in top 3 | cue mean rank | cue utility | grey utility |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path, r in report.items():
        print(
            f"| {path} | {r['episodes']} | {r['cue_ranked_first']:.0%} | {r['cue_in_top3']:.0%} | {r['cue_mean_rank']} | "
            f"{r['cue_utility_mean']} | {r['grey_utility_mean']} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), json.dumps({"model": args.model, "gates": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
