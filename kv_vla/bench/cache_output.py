"""Output of ``kv-vla bench cache``: the fixed-width table, the JSON report and its PNG plot."""

from __future__ import annotations

import os
from pathlib import Path

from kv_vla.atomic import atomic_write, atomic_write_json
from kv_vla.plotting import headless_pyplot


def format_table(report: dict) -> str:
    """A fixed-width table of the report (also pasted into the README)."""
    head = (
        f"{'policy':<12} {'storage':<8} {'comp':<4} {'history':>7} {'step ms p50':>11} {'KV MiB':>8} "
        f"{'latency/full':>12} {'/dynamic':>8} {'KV/full':>7} {'floor ms':>8} {'/floor':>7}"
    )
    lines = [head, "-" * len(head)]

    def ratio(value: float | None, width: int) -> str:
        return f"{'-' if value is None else f'{value:.3f}':>{width}}"

    for r in report["results"]:
        lines.append(
            f"{r['policy']:<12} {r.get('storage', 'dynamic'):<8} {'yes' if r.get('compiled') else 'no':<4} "
            f"{r['history_steps']:>7} {r['step_ms_p50']:>11.2f} {r['kv_bytes'] / 2**20:>8.2f} "
            f"{ratio(r['latency_ratio_vs_full'], 12)} {ratio(r.get('latency_ratio_vs_dynamic'), 8)} "
            f"{ratio(r['kv_ratio_vs_full'], 7)} {r.get('floor_ms', 0):>8.3f} {r.get('floor_ratio', 0):>7.1f}"
        )
    bw = report.get("copy_bandwidth_gb_s")
    if bw:
        lines.append(
            f"floor = {report['passes_per_step']} passes x (weights {report['weight_bytes'] / 2**20:.1f} MiB + "
            f"kept KV) / copy bandwidth {bw:.2f} GB/s (read + write of a 256 MiB copy, same run)"
        )
    return "\n".join(lines)


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Write the report atomically (:func:`kv_vla.atomic.atomic_write_json`); returns the path."""
    atomic_write_json(path, report)
    return Path(path)


def write_plot(report: dict, path: str | os.PathLike) -> Path | None:
    """Latency and KV memory against history, one line per policy (PNG; None without matplotlib)."""
    plt = headless_pyplot()
    if plt is None:
        return None
    path = Path(path)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))

    def label(r: dict) -> str:
        variant = (r.get("storage", "dynamic"), r.get("compiled", False))
        if variant == ("dynamic", False):
            return r["policy"]
        return f"{r['policy']} ({variant[0]}{', compiled' if variant[1] else ''})"

    for policy in dict.fromkeys(label(r) for r in report["results"]):
        rows = [r for r in report["results"] if label(r) == policy]
        hs = [r["history_steps"] for r in rows]
        ax_t.plot(hs, [r["step_ms_p50"] for r in rows], marker="o", label=policy)
        ax_m.plot(hs, [r["kv_bytes"] / 2**20 for r in rows], marker="o", label=policy)
    for ax, ylabel in ((ax_t, "step latency p50 (ms)"), (ax_m, "KV cache held (MiB)")):
        ax.set_xlabel("history (control steps)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=8)
    fig.suptitle(f"kv_vla cache bench: {report['preset']} on {report['device']} ({report['dtype']})")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
