"""``kv-vla bench node``: frame-to-action round trip of the VLA node, event vs timer stepping.

Per mode, the node and the sim bridge run as two processes over DDS on a private domain, in
closed loop (the bridge sends a frame, waits for its action, steps PyBullet). The round trip is
timed by the bridge from the frame's publish to the answering action's arrival; the step time is
the node's own (diagnostics ``latency_total_ms``). With ``--flood-hz`` the bench then floods the
same node with frames from a third participant and counts the steps it still completes, beside
the rate the model sustains (1000 / step p50).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

FIELDS = ("mode", "rtt_ms_p50", "rtt_ms_p90", "rtt_ms_p99", "step_ms_p50", "steps_per_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kv-vla bench node``."""
    parser.add_argument("--json", required=True, type=Path, help="where to write the rows")
    parser.add_argument("--model", default="models/compact-vla", help="checkpoint folder")
    parser.add_argument("--modes", default="event,timer", help="comma-separated: event, timer")
    parser.add_argument("--timer-hz", type=float, default=10.0, help="timer mode's control_rate_hz")
    parser.add_argument("--task", default="reach", help="kv_vla_sim task of the closed loop")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=60, help="steps per episode (cap)")
    parser.add_argument("--flood-hz", type=float, default=200.0, help="0: skip the flood measurement")
    parser.add_argument("--flood-s", type=float, default=8.0, help="seconds of flood")
    parser.add_argument("--log-dir", default="outputs/bench_node_logs")
    parser.add_argument(
        "--spin-cpus",
        type=int,
        default=0,
        help="run this many lowest-priority busy loops during the measurement, so idle virtual CPUs "
        "stay scheduled (a VM's wake-up latency otherwise shows up in the round trip)",
    )


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else float("nan")


def _flood(client: Any, hz: float, seconds: float) -> tuple[int, float, float]:
    """Publish 64x64 frames at ``hz`` for ``seconds``; (steps the node completed, seconds, the
    node's step p50 in ms during the flood, from the diagnostics that follow its steps)."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    client.publish_instruction("reach the red cube")
    client.wait_diag(lambda d: d.get("instruction") == "reach the red cube", 30)
    before = int(client.wait_diag(lambda d: "steps_total" in d, 10).get("steps_total", 0))
    first_diag = len(client.diagnostics)
    t0 = time.monotonic()
    i = 0
    while (now := time.monotonic()) < t0 + seconds:
        client.send_frame(frames[i % len(frames)])
        i += 1
        time.sleep(max(0.0, t0 + i / hz - now))
    elapsed = time.monotonic() - t0
    time.sleep(1.5)  # the 1 Hz diagnostics after the last step
    after = int(client.last_diag().get("steps_total", before))
    step_ms = [
        float(d["latency_total_ms"]) for d in client.diagnostics[first_diag:] if int(d["episode_step"]) > 0
    ]
    return after - before, elapsed, _pct(step_ms, 50)


@contextlib.contextmanager
def cpu_spinners(n: int) -> Iterator[list[subprocess.Popen]]:
    """``n`` busy-loop processes at nice 19 for the duration of the block.

    Why: on a virtual machine an idle vCPU is descheduled by the host, and waking it for the next
    message can take tens to hundreds of milliseconds; two processes that hand frames and actions
    back and forth sleep between messages and pay it on many round trips. Busy loops at the
    lowest priority keep the vCPUs scheduled while taking CPU only when nothing else wants it.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "import os\nos.nice(19)\nwhile True:\n    pass"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(max(0, n))
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=10)


def run_mode(args: argparse.Namespace, mode: str, model: Path, work: Path) -> dict[str, Any]:
    """One row: closed loop with the bridge, then (optionally) the flood."""
    from kv_vla_node.testing import CONFIG_FILE, NodeProcess, RosClient, free_domain_id, node_command, ros_env

    domain = free_domain_id()
    log_dir = Path(args.log_dir)
    env = ros_env(log_dir / "ros", domain)
    rate = args.timer_hz if mode == "timer" else 0.0
    node_params = {
        "model_path": str(model),
        "step_mode": mode,
        "control_rate_hz": rate,
        "max_image_age_s": 30.0,  # a loaded 2-core machine must not turn frames stale
    }
    results_path = work / f"results_{mode}.json"
    bridge_params = {
        "tasks": [args.task],
        "episodes_per_task": args.episodes,
        "max_steps": args.max_steps,
        "results_path": str(results_path),
    }
    node = NodeProcess(
        node_command("kv_vla_node.vla_node", node_params, CONFIG_FILE), env, log_dir / f"node_{mode}.log"
    )
    bridge = None
    try:
        bridge = NodeProcess(
            node_command("kv_vla_node.sim_bridge", bridge_params), env, log_dir / f"bridge_{mode}.log"
        )
        code = bridge.wait(timeout=1800)
        if code != 0:
            raise RuntimeError(f"sim bridge exited {code}; see {bridge.log_path} and {node.log_path}")
        records = json.loads(results_path.read_text())
        rtts = [v for r in records for v in r["round_trips_ms"]]
        steps_ms = [v for r in records for v in r["step_latencies_ms"]]
        steps = sum(r["steps"] for r in records)
        row: dict[str, Any] = {
            "mode": mode,
            "control_rate_hz": rate,
            "rtt_ms_p50": _pct(rtts, 50),
            "rtt_ms_p90": _pct(rtts, 90),
            "rtt_ms_p99": _pct(rtts, 99),
            "step_ms_p50": _pct(steps_ms, 50),
            "steps_per_s": round(steps / sum(r["wall_s"] for r in records), 2),
            "steps": steps,
            "episodes": len(records),
            # where a tail comes from: every round trip in step order, one list per episode
            "round_trips_ms": [r["round_trips_ms"] for r in records],
        }
        if args.flood_hz > 0:
            client = RosClient(domain, node_name="kv_vla_bench_flood")
            try:
                done, elapsed, flood_step_ms = _flood(client, args.flood_hz, args.flood_s)
            finally:
                client.close()
            rate = done / elapsed
            row.update(
                flood_hz=args.flood_hz,
                flood_steps_per_s=round(rate, 2),
                flood_step_ms_p50=flood_step_ms,
                # the share of the flood's wall time the node spent stepping: 1.0 = back to back
                flood_busy=round(rate * flood_step_ms / 1000.0, 2),
                model_steps_per_s=round(1000.0 / row["step_ms_p50"], 2),
            )
        return row
    finally:
        if bridge is not None:
            bridge.stop()
        node.stop()


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: the required fields first, then the flood columns when measured."""
    extra = [
        k
        for k in ("flood_hz", "flood_steps_per_s", "flood_step_ms_p50", "flood_busy", "model_steps_per_s")
        if k in rows[0]
    ]
    cols = [*FIELDS, *extra]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]

    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Both modes one after the other, on the same model and machine; rows written atomically."""
    from kv_vla.atomic import atomic_write_json
    from kv_vla_node.demo import _interrupt_on_stop_signals
    from kv_vla_node.testing import REPO_ROOT

    _interrupt_on_stop_signals()  # children then get SIGINT's default, so a stop reaches them
    model = Path(args.model)
    if not model.is_absolute() and not model.exists():
        model = REPO_ROOT / model
    if not model.is_dir():
        print(f"kv-vla bench node: no model at {args.model}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="kv_vla_bench_node_"))
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        print(f"[bench node] mode={mode} ...", flush=True)
        with cpu_spinners(args.spin_cpus):
            row = run_mode(args, mode, model.resolve(), work)
        rows.append({**row, "spin_cpus": args.spin_cpus})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "round_trips_ms"}), flush=True)
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")
    }
    atomic_write_json(args.json, {"config": config, "rows": rows})
    print(format_table(rows))
    if len(rows) > 1:
        p50 = {r["mode"]: r["rtt_ms_p50"] for r in rows}
        if "event" in p50 and "timer" in p50:
            print(f"rtt p50 timer / event = {p50['timer'] / p50['event']:.2f}")
    print(
        f"[bench node] wrote {args.json}; median step {statistics.median([r['step_ms_p50'] for r in rows])} ms"
    )
    return 0
