"""``kv-vla bench ...``: benchmarks. ``cache``: the episode cache's policies; ``node``: the VLA node over DDS."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from kv_vla import settings

# The ROS layer's benchmark, named here only (the core never imports kv_vla_node; its module keeps
# rclpy inside ``run``).
NODE_BENCH = "kv_vla_node.bench"
#: cache knobs ``kv-vla bench soak`` takes as flags (``kv_vla.settings`` names): those of ``kv-vla eval``
#: but the policy and positions (soak takes lists of both) and the ``random`` policy's seed (soak's
#: ``--seed`` seeds its frame stream)
SOAK_KNOBS = tuple(n for n in settings.CACHE_SETTINGS if n not in ("policy", "positions", "seed"))
FRAMES_BENCH = "kv_vla_node.bench_frames"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("history lengths must be integers >= 1")
    return values


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``bench`` sub-subcommands (kept free of heavy imports)."""
    sub = parser.add_subparsers(dest="bench", required=True)
    cache = sub.add_parser("cache", help="step latency and KV memory of every cache policy vs full")
    cache.add_argument("--json", required=True, type=Path, help="where to write the JSON report (PNG beside)")
    cache.add_argument("--preset", choices=["small", "openvla-7b"], default="small")
    cache.add_argument(
        "--obs-tokens", type=int, default=276, help="prefill tokens per step (256 image + prompt)"
    )
    cache.add_argument("--action-tokens", type=int, default=7, help="greedy decoded tokens per step")
    cache.add_argument(
        "--history", type=_int_list, default=[10, 20, 40, 80, 160], help="e.g. 10,20,40,80,160"
    )
    cache.add_argument(
        "--policies",
        type=_str_list,
        default=None,
        help="comma-separated; default: every cache policy. 'hf_dynamic' adds transformers' DynamicCache "
        "as a reference row (separates the episode cache's own cost from the decoder's)",
    )
    cache.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    cache.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    cache.add_argument("--repeats", type=int, default=3, help="timed steps per history point (median)")
    cache.add_argument("--keep-steps", type=int, default=8, help="history the bounded policies keep (steps)")
    cache.add_argument("--seed", type=int, default=0)
    cache.add_argument(
        "--isolate",
        action="store_true",
        help="run each policy in its own process (fresh CUDA context and cuDNN plan cache): for GPU "
        "latency between policies whose cache grows (full, hf_dynamic, zipvl), which lockstep confounds",
    )
    cache.add_argument(
        "--storage",
        dest="storages",
        type=_str_list,
        default=["dynamic"],
        help="comma-separated KV storages to run each policy in: dynamic,static (static only for bounded "
        "policies)",
    )
    cache.add_argument(
        "--compile",
        dest="compiled_rows",
        action="store_true",
        help="also run every static-storage policy as a compiled step (torch.compile; a CUDA graph on GPU); "
        "the first steps compile (warmup_s in each row)",
    )
    cache.add_argument(
        "--no-full",
        action="store_true",
        help="skip the full-history reference row (its step grows with history: the longest part of a "
        "long run); the *_vs_full ratios are then null",
    )
    cache.add_argument("--no-progress", action="store_true")
    node = sub.add_parser("node", help="VLA node round trip over DDS with the sim bridge: event vs timer")
    importlib.import_module(NODE_BENCH).add_arguments(node)
    frames = sub.add_parser(
        "frames", help="camera frame sizes x image QoS: delivered and answered by the node"
    )
    importlib.import_module(FRAMES_BENCH).add_arguments(frames)

    soak = sub.add_parser("soak", help="one long episode per policy and position mode: what grows")
    soak.add_argument("--json", required=True, type=Path, help="where to write the JSON report")
    soak.add_argument("--steps", type=int, default=10_000, help="control steps per bounded run")
    soak.add_argument("--max-steps-full", type=int, default=2_000, help="cap for the 'full' policy")
    soak.add_argument(
        "--policies", type=_str_list, default=["gated"], help="comma-separated, e.g. gated,full"
    )
    soak.add_argument(
        "--positions",
        dest="position_modes",
        type=_str_list,
        default=["cache"],
        help="comma-separated position modes to run, each a value of the positions setting: episode,cache",
    )
    soak.add_argument("--model", default="models/compact-vla")
    soak.add_argument("--gate", default=None, help="trained ChunkGate (default: MODEL/gate.safetensors)")
    soak.add_argument("--device", default="cpu")
    settings.add_flags(soak.add_argument_group("cache settings (kv_vla/settings.py)"), SOAK_KNOBS)
    settings.add_flags(soak.add_argument_group("runtime settings"), ("compile",), default_none=False)
    soak.add_argument("--seed", type=int, default=0, help="seeds the synthetic frame stream")
    soak.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG of KV bytes and position id against step over the first --plot-steps of every run",
    )
    soak.add_argument("--plot-steps", type=int, default=1000)
    soak.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="run nothing: merge the runs of these soak reports into --json (and --plot)",
    )
    soak.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    soak.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Dispatch ``kv-vla bench <name>``."""
    if args.bench == "cache":
        return _run_cache(args)
    if args.bench == "node":
        return int(importlib.import_module(NODE_BENCH).run(args))
    if args.bench == "frames":
        return int(importlib.import_module(FRAMES_BENCH).run(args))
    if args.bench == "soak":
        return _run_soak(args)
    raise SystemExit(f"unknown benchmark {args.bench!r}")


def _run_cache(args: argparse.Namespace) -> int:
    import torch

    from kv_vla.bench.cache_bench import (
        ALL_POLICIES,
        BenchConfig,
        format_table,
        run_bench,
        write_json,
        write_plot,
    )

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("kv-vla bench cache: --device cuda requested but no CUDA device is available")
        return 2
    cfg = BenchConfig(
        preset=args.preset,
        obs_tokens=args.obs_tokens,
        action_tokens=args.action_tokens,
        history=args.history,
        policies=args.policies or list(ALL_POLICIES),
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
        keep_steps=args.keep_steps,
        seed=args.seed,
        isolate=args.isolate,
        storages=args.storages,
        compile=args.compiled_rows,
        full_reference=not args.no_full,
    )

    def save_partial(report: dict) -> None:
        write_json(report, args.json)  # replaced by the complete report at the end
        if cfg.isolate:
            done = ", ".join(dict.fromkeys(r["policy"] for r in report["results"]))
            print(f"measured {done}; partial report in {args.json}", flush=True)
        else:
            last = max(r["history_steps"] for r in report["results"])
            print(f"history up to {last} steps measured; partial report in {args.json}", flush=True)

    report = run_bench(cfg, progress=not args.no_progress, on_point=save_partial)
    print(format_table(report))
    path = write_json(report, args.json)
    plot = write_plot(report, path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    return 0


def _run_soak(args: argparse.Namespace) -> int:
    from kv_vla.bench.cache_output import write_json
    from kv_vla.bench.soak import SoakConfig, format_table, merge_reports, options_for, run_soak, write_plot
    from kv_vla.cache import EpisodeCacheConfig

    if args.from_json:
        report = merge_reports(args.from_json)
        print(format_table(report))
        path = write_json(report, args.json)
        plot = write_plot(report, args.plot) if args.plot is not None else None
        print(f"wrote {path}" + (f" and {plot}" if plot else ""))
        return 0

    options = settings.given(args, SOAK_KNOBS)
    for policy in args.policies:  # refuse bad options before loading anything
        for mode in args.position_modes:
            EpisodeCacheConfig(policy=policy, positions=mode, **options_for(policy, options))
    if args.steps < 1 or args.max_steps_full < 1:
        raise SystemExit("--steps and --max-steps-full must be >= 1")
    if args.compile and options.get("storage") != "static":
        raise SystemExit("--compile: the compiled step runs over static storage; add --storage static")
    cfg = SoakConfig(
        model=args.model,
        policies=args.policies,
        positions=args.position_modes,
        steps=args.steps,
        max_steps_full=args.max_steps_full,
        cache_options=options,
        gate=args.gate,
        device=args.device,
        seed=args.seed,
        plot_steps=args.plot_steps,
        threads=args.threads,
        compile=args.compile,
    )

    def save_partial(report: dict) -> None:
        write_json(report, args.json)
        last = report["runs"][-1]
        print(f"soak {last['policy']}/{last['positions']} done; partial report in {args.json}", flush=True)

    report = run_soak(cfg, progress=not args.no_progress, on_run=save_partial)
    print(format_table(report))
    path = write_json(report, args.json)
    plot = write_plot(report, args.plot) if args.plot is not None else None
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    return 0
