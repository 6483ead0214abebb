"""``kv-vla collect``: record scripted-expert demonstrations (see ``kv_vla_sim.demos``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="a task name (see kv_vla_sim.tasks.TASKS) or 'all'")
    parser.add_argument("--episodes", type=int, required=True, help="successful demonstrations per task")
    parser.add_argument("--out", required=True, help="output directory (resumable)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (Ray actors with --backend ray)"
    )
    parser.add_argument(
        "--backend", choices=["local", "ray"], default="local", help="local processes, or Ray actors"
    )
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster to join (default: an embedded local Ray)"
    )
    parser.add_argument("--seed-offset", type=int, default=1_000_000, help="first seed (>= 1_000_000)")
    parser.add_argument(
        "--noise",
        type=float,
        default=None,
        help="std of the action noise executed on full-speed steps (labels stay clean); default 0.1",
    )
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from kv_vla_sim.demos import DEFAULT_NOISE, collect

    counts = collect(
        args.task,
        args.episodes,
        args.out,
        seed_offset=args.seed_offset,
        image_size=args.image_size,
        noise=DEFAULT_NOISE if args.noise is None else args.noise,
        workers=args.workers,
        progress=not args.no_progress,
        backend=args.backend,
        ray_address=args.ray_address,
    )
    for task, n in counts.items():
        print(f"{task}: {n} demonstrations in {args.out}")
    return 0
