"""Evaluation throughput on 1 vs N Ray workers, measured side by side in one run.

``python -m kv_vla.bench.ray_scaling --json OUT.json [--workers 1,2] [--episodes 8] [--rounds 2]``

One embedded Ray serves every measurement (its start-up is paid once, outside the timings); each
round runs the same evaluation (``kv_vla.eval.distributed.evaluate_ray``: actor start, model load,
episodes) once per worker count, in alternating order (ABBA...), so background load on a shared
machine hits every count alike. Each round also times a control: a fixed amount of pure-Python
CPU work split over as many Ray tasks as workers, which shows how much parallel CPU the machine
offered at that moment (on a machine shared with other jobs it can be far less than its cores).
Prints the median wall time per count and the speed-up against the smallest count, checks that
every count produced the same episodes, and writes JSON + PNG.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from kv_vla.atomic import atomic_write, atomic_write_json

CONTROL_ITERATIONS = 20_000_000  # ~1 s of one free core


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i & 7
    return total


def _control_wall(ray: Any, workers: int) -> float:
    """Wall time of CONTROL_ITERATIONS loop iterations split over ``workers`` Ray tasks."""
    spin = ray.remote(num_cpus=1)(_spin)
    ray.get([spin.remote(1) for _ in range(workers)])  # task worker processes up before timing
    t = time.perf_counter()
    ray.get([spin.remote(CONTROL_ITERATIONS // workers) for _ in range(workers)])
    return time.perf_counter() - t


def _outcomes(result: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (e["task"], e["policy"], e["seed"], e["success"], e["steps"], e["peak_kv_bytes"])
        for e in result["episodes"]
    ]


def measure(
    policy: str,
    task: str,
    episodes: int,
    worker_counts: list[int],
    rounds: int,
    model: str,
    eval_args: list[str],
    progress: bool,
) -> dict[str, Any]:
    """Wall time of the same evaluation per worker count; see the module docstring."""
    from kv_vla.cli import build_parser
    from kv_vla.eval.cli import agent_factory, remote_args
    from kv_vla.eval.distributed import evaluate_ray
    from kv_vla_sim.distributed import ray_session

    argv = [
        "eval",
        "--policies",
        policy,
        "--tasks",
        task,
        "--out",
        "-",
        "--model",
        str(Path(model).resolve()),
    ]
    args = build_parser().parse_args([*argv, *eval_args])
    builders = {policy: functools.partial(agent_factory, policy, remote_args(args))}
    walls: dict[int, list[float]] = {w: [] for w in worker_counts}
    episode_walls: dict[int, list[float]] = {w: [] for w in worker_counts}
    control_walls: dict[int, list[float]] = {w: [] for w in worker_counts}
    outcomes: dict[int, list[tuple[Any, ...]]] = {}
    t0 = time.perf_counter()
    with ray_session(max(worker_counts)) as ray:
        ray_start_s = time.perf_counter() - t0
        for r in range(rounds):
            order = worker_counts if r % 2 == 0 else worker_counts[::-1]
            for w in order:
                t = time.perf_counter()
                result = evaluate_ray(builders, [task], episodes, workers=w, progress=progress)
                walls[w].append(time.perf_counter() - t)
                episode_walls[w].append(result["config"]["backend"]["episodes_s"])
                control_walls[w].append(_control_wall(ray, w))
                outcomes.setdefault(w, _outcomes(result))
                if outcomes[w] != _outcomes(result) or outcomes[w] != outcomes[worker_counts[0]]:
                    raise RuntimeError(f"{w} workers gave other episodes than {worker_counts[0]}")
    base = statistics.median(walls[worker_counts[0]])
    base_ep = statistics.median(episode_walls[worker_counts[0]])
    base_ctl = statistics.median(control_walls[worker_counts[0]])
    return {
        "policy": policy,
        "task": task,
        "episodes": episodes,
        "eval_args": eval_args,
        "rounds": rounds,
        "ray_start_s": ray_start_s,
        "wall_s": {str(w): v for w, v in walls.items()},
        "median_wall_s": {str(w): statistics.median(v) for w, v in walls.items()},
        "speedup_vs_first": {str(w): base / statistics.median(v) for w, v in walls.items()},
        "episodes_wall_s": {str(w): v for w, v in episode_walls.items()},
        "median_episodes_wall_s": {str(w): statistics.median(v) for w, v in episode_walls.items()},
        "episodes_speedup_vs_first": {
            str(w): base_ep / statistics.median(v) for w, v in episode_walls.items()
        },
        "control_wall_s": {str(w): v for w, v in control_walls.items()},
        "control_speedup_vs_first": {
            str(w): base_ctl / statistics.median(v) for w, v in control_walls.items()
        },
        "load_average_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "same_episodes": True,
        "successes": sum(o[3] for o in outcomes[worker_counts[0]]),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    from kv_vla.plotting import headless_pyplot

    plt = headless_pyplot()
    if plt is None:  # matplotlib comes with the sim extra; without it there is no plot to write
        return

    counts = list(report["median_wall_s"])
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=110)
    x = np.arange(len(counts))
    for dx, key, label, colour in (
        (-0.2, "median_wall_s", "with worker start-up", "tab:grey"),
        (0.2, "median_episodes_wall_s", "episodes only", "tab:blue"),
    ):
        speed = "speedup_vs_first" if key == "median_wall_s" else "episodes_speedup_vs_first"
        values = [report[key][c] for c in counts]
        ax.bar(x + dx, values, width=0.4, color=colour, label=label)
        for xi, c, v in zip(x, counts, values):
            ax.annotate(f"x{report[speed][c]:.2f}", (xi + dx, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, counts)
    ax.set_ylim(0, 1.3 * max(report["median_wall_s"].values()))
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.set_xlabel("Ray workers")
    ax.set_ylabel("wall time (s, median)")
    control = ", ".join(f"x{v:.2f}" for v in report["control_speedup_vs_first"].values())
    ax.set_title(
        f"{report['episodes']} episodes of {report['policy']} on {report['task']}\n"
        f"CPU control (same work on 1, 2, ... tasks): {control}",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="report path (PNG beside)")
    parser.add_argument("--policy", default="gated")
    parser.add_argument("--task", default="late_cued_reach")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="models/compact-vla")
    parser.add_argument(
        "--eval-args",
        default="--recent-chunks 2 --max-tokens 80 --gate-threshold 0.0",
        help="further kv-vla eval options (default: the suite's budgeted setting)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if not counts or min(counts) < 1 or args.rounds < 1 or args.episodes < 1:
        parser.error("--workers, --rounds and --episodes must be >= 1")
    report = measure(
        args.policy,
        args.task,
        args.episodes,
        counts,
        args.rounds,
        args.model,
        shlex.split(args.eval_args),
        not args.no_progress,
    )
    atomic_write_json(args.json, report)
    plot(report, args.json.with_suffix(".png"))
    for c in counts:
        print(
            f"{c} worker(s): median {report['median_wall_s'][str(c)]:.1f} s with worker start-up "
            f"(x{report['speedup_vs_first'][str(c)]:.2f}), {report['median_episodes_wall_s'][str(c)]:.1f} s "
            f"episodes only (x{report['episodes_speedup_vs_first'][str(c)]:.2f}); CPU control "
            f"x{report['control_speedup_vs_first'][str(c)]:.2f}; over {args.rounds} rounds"
        )
    print(f"load average at the end {report['load_average_end'][0]:.1f} on {report['cpu_count']} CPUs")
    print(f"Ray start-up (once, not timed above): {report['ray_start_s']:.1f} s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
