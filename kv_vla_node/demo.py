"""``kv-vla demo``: the main job. The VLA node and the sim bridge run as separate processes and talk
over DDS; a few closed-loop episodes per task; a table of success, peak KV memory and latency.

By default the episodes run twice: with the gated cache and with the full cache (nothing evicted),
the reference the gated cache's memory and success are measured against.

Each run gets its own ROS_DOMAIN_ID with localhost-only discovery, so demos and tests running side by
side never hear each other. Both children run in their own process groups and are stopped (SIGINT,
then SIGKILL) on success, failure and Ctrl-C alike: the demo leaves no orphan processes.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kv_vla import settings

DEFAULT_TASKS = ("cued_reach", "late_cued_reach", "touch_sequence", "reach", "push")
#: node parameters the demo takes as flags (``kv_vla.settings`` names, ``--chunk-size`` etc.)
DEMO_SETTINGS = ("chunk_size", "gate_threshold", "max_tokens", "recent_chunks", "device", "dtype")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kv-vla demo``."""
    parser.add_argument("--model", default="models/compact-vla", help="checkpoint folder (the shipped model)")
    parser.add_argument(
        "--random-model", action="store_true", help="use a tiny random CompactVLA (plumbing check, no skill)"
    )
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="kv_vla_sim task names")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per task")
    parser.add_argument("--seed-offset", type=int, default=0, help="seed of each task's first episode")
    parser.add_argument("--max-steps", type=int, default=0, help="step cap per episode; 0 = the task's own")
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["gated", "full"],
        help="cache policies, one node run each (full = keep everything: the memory reference)",
    )
    settings.add_flags(parser, DEMO_SETTINGS)  # typed and described by kv_vla/settings.py
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--json", default="outputs/demo.json", help="where to write per-episode results")
    parser.add_argument("--log-dir", default="outputs/demo_logs", help="the children's logs")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per policy run")


def _interrupt_on_stop_signals() -> None:
    """Make SIGINT and SIGTERM raise ``KeyboardInterrupt``, so either one stops the two nodes before
    the demo exits.

    Why explicit: a process started in the background by a non-interactive shell inherits SIGINT as
    *ignored*, and Python then installs no handler, so ``kill -INT`` (or a CI harness's interrupt)
    would do nothing; and SIGTERM's default action would end the demo at once and orphan the nodes,
    which run in process groups of their own.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every episode ran (success or not), 1 when the ROS graph failed."""
    from tqdm import tqdm

    from kv_vla_node.ros_env import (
        CONFIG_FILE,
        REPO_ROOT,
        NodeProcess,
        free_domain_id,
        node_command,
        ros_env,
        save_random_model,
    )
    from kv_vla_node.sim_bridge import write_json_atomic
    from kv_vla_sim import TASKS

    _interrupt_on_stop_signals()
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        print(f"kv-vla demo: unknown task(s) {unknown}; choose from {sorted(TASKS)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kv_vla_demo_"))
    if args.random_model:
        model = save_random_model(work / "random-vla")
    else:
        model = Path(args.model)
        if not model.is_absolute() and not model.exists():
            model = REPO_ROOT / model
        if not model.is_dir():
            print(
                f"kv-vla demo: no model at {args.model} (train one, or use --random-model)", file=sys.stderr
            )
            return 2
    log_dir = Path(args.log_dir)
    total = len(args.tasks) * args.episodes
    records: list[dict[str, Any]] = []
    failed = False
    for policy in args.policies:
        domain = free_domain_id()
        env = ros_env(log_dir / "ros", domain)
        node_params: dict[str, Any] = {
            "model_path": str(model.resolve()),
            "policy": policy,
            "max_image_age_s": 30.0,  # a loaded 2-core machine must not turn frames stale
            **settings.given(args, DEMO_SETTINGS),  # left out: the node's defaults / the YAML
        }
        results_path = work / f"results_{policy}.json"
        bridge_params = {
            "tasks": list(args.tasks),
            "episodes_per_task": args.episodes,
            "seed_offset": args.seed_offset,
            "max_steps": args.max_steps,
            "image_size": args.image_size,
            "results_path": str(results_path),
        }
        print(f"[demo] policy={policy} ROS_DOMAIN_ID={domain} model={model} logs={log_dir}", flush=True)
        node = bridge = None
        try:
            node = NodeProcess(
                node_command("kv_vla_node.vla_node", node_params, CONFIG_FILE),
                env,
                log_dir / f"vla_node_{policy}.log",
            )
            bridge = NodeProcess(
                node_command("kv_vla_node.sim_bridge", bridge_params),
                env,
                log_dir / f"sim_bridge_{policy}.log",
            )
            code = _follow(node, bridge, total, args.timeout, tqdm(total=total, desc=f"episodes ({policy})"))
            if code != 0:
                print(
                    f"[demo] sim bridge failed ({code}); see {bridge.log_path} and {node.log_path}",
                    file=sys.stderr,
                )
                failed = True
                continue
            for record in json.loads(results_path.read_text()):
                records.append({**record, "policy": policy})
        except KeyboardInterrupt:
            print("\n[demo] interrupted; stopping the nodes", file=sys.stderr)
            return 130
        finally:
            for proc in (bridge, node):
                if proc is not None:
                    proc.stop()

    summary = summarize(records)
    payload = {
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")} | {"model": str(model)},
        "episodes": records,
        "per_task": summary,
    }
    write_json_atomic(args.json, payload)
    print(format_table(summary))
    print(f"[demo] {len(records)} episodes; results in {args.json}")
    return 1 if failed or not records else 0


REFUSED_INSTRUCTION = "refused instruction: "  # what VLANode._refuse logs for an instruction
CANNOT_START = "kv_vla: cannot start: "  # what vla_node.main prints when configure fails


def instruction_refusal(node_log: str) -> str | None:
    """Why the node will run no episode (from its log): the first instruction it refused, or the
    configuration it refused to start with; None when neither happened."""
    for line in node_log.splitlines():
        for marker in (REFUSED_INSTRUCTION, CANNOT_START):
            at = line.find(marker)
            if at >= 0:
                return line[at + len(marker) :].strip()
    return None


def _follow(node: Any, bridge: Any, total: int, timeout_s: float, bar: Any) -> int:
    """Wait for the bridge, advancing ``bar`` per finished episode; fail fast if the node dies."""
    deadline = time.monotonic() + timeout_s
    done = 0
    try:
        while True:
            code = bridge.poll()
            finished = bridge.log_text().count("episode_result {")
            if finished > done:
                bar.update(finished - done)
                done = finished
            # the node's refusal first: a bridge left without a node exits too, and its code says less
            refusal = instruction_refusal(node.log_text())
            if refusal is not None:
                # the bridge only sends valid instructions, so a refusal is the node's configuration
                # (e.g. a budget too small for the model's steps): no episode can run, say why now
                # rather than after the bridge's startup timeout
                print(f"[demo] the VLA node refused the episode: {refusal}", file=sys.stderr)
                return 1
            if code is not None:
                return code
            if node.poll() is not None:
                print(
                    f"[demo] the VLA node exited ({node.poll()}):\n{node.log_text()[-2000:]}", file=sys.stderr
                )
                return 1
            if time.monotonic() > deadline:
                print(f"[demo] timed out after {timeout_s:.0f} s", file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        bar.close()


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (policy, task) aggregates: success rate, mean peak KV bytes, median latencies, steps."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r.get("policy", ""), r["task"]), []).append(r)
    rows = []
    for (policy, task), rs in groups.items():
        kv = [r["peak_kv_bytes"] for r in rs if r.get("peak_kv_bytes") is not None]
        lat = [
            r["step_latency_ms_p50"]
            for r in rs
            if r.get("step_latency_ms_p50") == r.get("step_latency_ms_p50")
        ]
        rtt = [r["round_trip_ms_p50"] for r in rs if r.get("round_trip_ms_p50") == r.get("round_trip_ms_p50")]
        rows.append(
            {
                "policy": policy,
                "task": task,
                "episodes": len(rs),
                "success_rate": sum(bool(r["success"]) for r in rs) / len(rs),
                "peak_kv_bytes_mean": statistics.fmean(kv) if kv else None,
                "step_latency_ms_p50": statistics.median(lat) if lat else None,
                "round_trip_ms_p50": statistics.median(rtt) if rtt else None,
                "steps_mean": statistics.fmean(r["steps"] for r in rs),
                "kept_token_fraction": _kept_fraction(rs),
            }
        )
    return rows


def _kept_fraction(records: list[dict[str, Any]]) -> float | None:
    """Kept / seen tokens at the episodes' ends (1.0 = everything kept, as the full cache does)."""
    seen = sum(r.get("seen_tokens") or 0 for r in records)
    kept = sum(r.get("kept_tokens") or 0 for r in records)
    return kept / seen if seen else None


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table (one row per policy and task); "KV kept" = kept / seen tokens at episode end."""
    head = (
        f"{'policy':<8} {'task':<16} {'eps':>3} {'success':>8} {'peak KV KiB':>12} {'KV kept':>8} "
        f"{'step p50 ms':>12} {'rtt p50 ms':>11} {'steps':>6}"
    )
    lines = [head, "-" * len(head)]

    def num(v: float | None, scale: float = 1.0) -> str:
        return "-" if v is None else f"{v / scale:.1f}"

    for r in rows:
        lines.append(
            f"{r['policy']:<8} {r['task']:<16} {r['episodes']:>3} {100 * r['success_rate']:>7.0f}% "
            f"{num(r['peak_kv_bytes_mean'], 1024):>12} "
            f"{'-' if r['kept_token_fraction'] is None else format(r['kept_token_fraction'], '.0%'):>8} "
            f"{num(r['step_latency_ms_p50']):>12} "
            f"{num(r['round_trip_ms_p50']):>11} {r['steps_mean']:>6.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="kv-vla demo")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
