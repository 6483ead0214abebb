"""Expert success table: ``python -m kv_vla_sim.expert_table --episodes 100 [--noise 0.1]``.

Rolls the scripted expert over evaluation seeds 0..N-1 of every task and prints a markdown table
(success, episode length, CPU milliseconds per control step, chance level of a memoryless policy).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from tqdm import tqdm

from kv_vla_sim.env import TabletopEnv
from kv_vla_sim.experts import run_expert_episode
from kv_vla_sim.tasks import get_task, select_tasks


def expert_table(
    tasks: list[str], episodes: int, noise: float = 0.0, seed_offset: int = 0
) -> list[dict[str, object]]:
    rows = []
    for name in tasks:
        env = TabletopEnv(name)
        successes, lengths = [], []
        cpu = 0.0
        for seed in tqdm(range(seed_offset, seed_offset + episodes), desc=name, leave=False):
            t0 = time.process_time()
            r = run_expert_episode(env, seed, noise=noise)
            cpu += time.process_time() - t0
            successes.append(bool(r["success"]))
            lengths.append(int(r["steps"]))  # type: ignore[arg-type]
        env.close()
        task = get_task(name)
        rows.append(
            {
                "task": name,
                "memory": task.needs_memory,
                "episodes": episodes,
                "success": float(np.mean(successes)),
                "failed_seeds": [
                    s for s, ok in zip(range(seed_offset, seed_offset + episodes), successes) if not ok
                ],
                "len_mean": float(np.mean(lengths)),
                "len_max": int(np.max(lengths)),
                "max_steps": task.max_steps,
                "cpu_ms_per_step": 1000.0 * cpu / max(sum(lengths), 1),
                "chance": task.chance,
            }
        )
    return rows


def to_markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| task | memory | expert success | episode length mean / max (cap) | CPU ms/step (incl. reset) | memoryless chance |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {'yes' if r['memory'] else 'no'} | {100 * float(r['success']):.0f}% "  # type: ignore[arg-type]
            f"({r['episodes']}) | {float(r['len_mean']):.1f} / {r['len_max']} ({r['max_steps']}) | "  # type: ignore[arg-type]
            f"{float(r['cpu_ms_per_step']):.1f} | {float(r['chance']):.2f} |"  # type: ignore[arg-type]
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="all", help="comma list; 'all' = standard suite, 'long' = long tasks")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    tasks = select_tasks(args.tasks)
    rows = expert_table(tasks, args.episodes, args.noise, args.seed_offset)
    print(to_markdown(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.json)))
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
