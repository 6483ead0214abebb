"""``kv-vla bench soak``: one long episode per policy and position mode, to show what grows.

Each run drives :class:`kv_vla.runtime.EpisodeRuntime` (the shipped model, the cache options of
``kv-vla eval``) for ``steps`` control steps on a fixed synthetic frame stream (a seeded pool of
random frames, cycled, so the frames cost nothing and hold no memory of their own), and records per
step the wall time, the KV bytes held and the largest position id so far, and the process RSS
every ``rss_every`` steps. A bounded policy should show flat step time, flat RSS and (``cache``
positions) bounded position ids; ``full`` is capped at ``max_steps_full`` and shows the growth.

Per step both the wall time (``timings_ms["total"]``) and the process CPU time are recorded: on a
shared machine the wall time also measures the neighbours' load, the CPU time much less so. Torch
runs ``threads`` intra-op threads (default 1, so CPU time is one thread's work).

RSS growth is the least-squares slope of RSS against step after the first ``warmup`` steps
(allocator warm-up excluded), in MiB per 1,000 steps.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kv_vla.atomic import atomic_write
from kv_vla.plotting import headless_pyplot

WINDOW = 1000  # steps in the first/last latency windows


@dataclass
class SoakConfig:
    """What ``kv-vla bench soak`` runs (one episode per policy x position mode)."""

    model: str = "models/compact-vla"
    policies: list[str] = field(default_factory=lambda: ["gated"])
    positions: list[str] = field(default_factory=lambda: ["cache"])
    steps: int = 10_000
    max_steps_full: int = 2_000
    cache_options: dict[str, Any] = field(default_factory=dict)
    gate: str | None = None
    device: str = "cpu"
    instruction: str = "reach the cube that was lit"
    image_size: int = 64
    frame_pool: int = 16
    seed: int = 0
    rss_every: int = 50
    warmup: int = 1000
    plot_steps: int = 1000
    threads: int = 1
    compile: bool = False  # bounded runs take the compiled step (warmed up before the episode; full stays eager)


def rss_mib() -> float:
    """Resident set size of this process (Linux ``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def frame_stream(cfg: SoakConfig) -> list[np.ndarray]:
    """The fixed pool of seeded random frames the episode cycles through."""
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.image_size, cfg.image_size, 3)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(cfg.frame_pool)]


def _slope_per_1000(xs: list[int], ys: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0] * 1000.0)


def options_for(policy: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options a policy takes: ``full`` never evicts, so it keeps only ``chunk_size`` (no budget,
    and the dynamic storage: nothing bounds a static buffer)."""
    if policy == "full":
        return {"max_tokens": None, "storage": "dynamic", **{k: v for k, v in options.items() if k == "chunk_size"}}
    return dict(options)


def run_one(runtime: Any, policy: str, positions: str, cfg: SoakConfig, progress: bool = True) -> dict:
    """One episode of ``policy`` with ``positions``; the per-step series and the summary numbers."""
    steps = cfg.max_steps_full if policy == "full" else cfg.steps
    compiled = cfg.compile and policy != "full"
    if not compiled:  # a compiled runtime refuses the dynamic storage of full's config
        runtime.set_compile(False)
    runtime.update_cache_config(policy=policy, positions=positions, **options_for(policy, cfg.cache_options))
    warmup_s = 0.0
    if compiled:  # every shape of this config compiled before the episode (shapes of earlier runs kept)
        if not runtime.compile:
            runtime.set_compile(True)
        runtime.reset(cfg.instruction)  # ends the previous run's episode, which warm_up refuses to interrupt
        warmup_s = runtime.warm_up(cfg.instruction)
    runtime.reset(cfg.instruction)
    frames = frame_stream(cfg)
    # preallocated and written through (np.full touches every page) so the recording itself adds
    # nothing to RSS while the episode runs
    step_ms, cpu_ms, kv_bytes, max_pos = (np.full(steps, np.nan) for _ in range(4))
    rss_steps = sorted({*range(0, steps, cfg.rss_every), steps - 1})
    rss = np.full(len(rss_steps), np.nan)
    k = 0
    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"soak {policy}/{positions}", unit="step", mininterval=5.0)
    for t in it:
        c0 = time.process_time()
        res = runtime.step(frames[t % len(frames)])
        cpu_ms[t] = (time.process_time() - c0) * 1e3
        stats = res.cache_stats
        step_ms[t] = res.timings_ms["total"]
        kv_bytes[t] = stats.kv_bytes
        max_pos[t] = res.max_position_id
        if k < len(rss_steps) and rss_steps[k] == t:
            rss[k] = rss_mib()
            k += 1
    window = min(WINDOW, steps)
    after = [(s, float(r)) for s, r in zip(rss_steps, rss) if s >= min(cfg.warmup, steps // 2)]
    first, last = float(np.median(step_ms[:window])), float(np.median(step_ms[-window:]))
    return {
        "policy": policy,
        "positions": positions,
        "storage": runtime.cache.config.storage,
        "compiled": compiled,
        "warmup_s": warmup_s,
        "steps": steps,
        "step_ms_p50_first": first,
        "step_ms_p50_last": last,
        "last_over_first": last / first,
        "cpu_ms_p50_first": float(np.median(cpu_ms[:window])),
        "cpu_ms_p50_last": float(np.median(cpu_ms[-window:])),
        "cpu_last_over_first": float(np.median(cpu_ms[-window:]) / np.median(cpu_ms[:window])),
        "rss_mib_per_1000_steps": _slope_per_1000([s for s, _ in after], [r for _, r in after]),
        "rss_mib_start": float(rss[0]),
        "rss_mib_end": float(rss[-1]),
        "max_position_id": int(max_pos.max()),
        "max_position_embeddings": runtime.position_limit or -1,
        "kv_bytes_max": int(kv_bytes.max()),
        "kv_bytes_last": int(kv_bytes[-1]),
        "kept_chunk_records": len(runtime.cache.chunks),
        "series": {
            "kv_bytes": kv_bytes[: cfg.plot_steps].astype(int).tolist(),
            "max_position_id": max_pos[: cfg.plot_steps].astype(int).tolist(),
            "rss_steps": rss_steps,
            "rss_mib": [round(float(r), 3) for r in rss],
        },
    }


def run_soak(cfg: SoakConfig, progress: bool = True, on_run: Any = None) -> dict:
    """Every policy x position mode, one episode each, in one process (side by side)."""
    import torch

    from kv_vla.runtime import EpisodeRuntime, shipped_gate

    torch.set_num_threads(cfg.threads)

    gate = cfg.gate if cfg.gate is not None else shipped_gate(cfg.model)
    runtime = EpisodeRuntime.from_pretrained(cfg.model, device=cfg.device, gate_path=gate)
    report: dict[str, Any] = {
        "config": {**asdict(cfg), "gate": None if gate is None else str(gate)},
        "frames": f"synthetic: {cfg.frame_pool} seeded random {cfg.image_size}x{cfg.image_size} frames, cycled",
        "runs": [],
    }
    for policy in cfg.policies:
        for positions in cfg.positions:
            t0 = time.perf_counter()
            run = run_one(runtime, policy, positions, cfg, progress=progress)
            run["wall_s"] = time.perf_counter() - t0
            report["runs"].append(run)
            if on_run is not None:
                on_run(report)
    return report


def merge_reports(paths: list[str | os.PathLike]) -> dict:
    """One report holding the runs of several (e.g. runs made in parallel processes), in order."""
    import json

    reports = [json.loads(Path(p).read_text()) for p in paths]
    return {
        "config": [r["config"] for r in reports],
        "frames": reports[0]["frames"] if reports else "",
        "merged_from": [str(p) for p in paths],
        "runs": [run for r in reports for run in r["runs"]],
    }


SUMMARY_KEYS = (
    "steps",
    "step_ms_p50_first",
    "step_ms_p50_last",
    "rss_mib_per_1000_steps",
    "max_position_id",
    "max_position_embeddings",
    "kv_bytes_max",
)


def format_table(report: dict) -> str:
    """Markdown table of the runs' summary numbers."""
    head = ["policy", "positions", "step", *SUMMARY_KEYS, "last/first", "cpu last/first"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in report["runs"]:
        step = f"{r.get('storage', 'dynamic')}{', compiled' if r.get('compiled') else ''}"
        cells = [r["policy"], r["positions"], step]
        for k in SUMMARY_KEYS:
            v = r[k]
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        cells.append(f"{r['last_over_first']:.3f}")
        cells.append(f"{r['cpu_last_over_first']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(report: dict, path: str | os.PathLike) -> Path | None:
    """KV bytes and largest position id against step over the first ``plot_steps`` of every run."""
    plt = headless_pyplot()
    if plt is None:
        return None
    path = Path(path)
    fig, (ax_kv, ax_pos) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"episode": "-", "cache": "--"}
    for r in report["runs"]:
        label = f"{r['policy']} / {r['positions']} positions"
        kv = np.asarray(r["series"]["kv_bytes"]) / 2**10
        ax_kv.plot(np.arange(1, kv.size + 1), kv, styles.get(r["positions"], "-"), label=label)
        pos = r["series"]["max_position_id"]
        ax_pos.plot(np.arange(1, len(pos) + 1), pos, styles.get(r["positions"], "-"), label=label)
    limit = report["runs"][0]["max_position_embeddings"] if report["runs"] else -1
    if limit > 0:
        ax_pos.axhline(limit, color="grey", lw=0.8, ls=":", label="max_position_embeddings")
    ax_kv.set_ylabel("KV cache held (KiB)")
    ax_pos.set_ylabel("largest position id so far")
    for ax in (ax_kv, ax_pos):
        ax.set_xlabel("control step")
        ax.grid(alpha=0.3)
    ax_pos.legend(fontsize=8)
    fig.suptitle("kv_vla soak: one episode per policy and position mode (synthetic frame stream)")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
