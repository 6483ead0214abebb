"""Evaluation reports: eval_info.json, results.md and success_vs_kv.png, written atomically.

eval_info.json also carries LeRobot's field names (``lerobot-eval``'s ``per_episode`` and
``aggregated``) so tools that read LeRobot reports read ours: on every episode record and
aggregate, and as one LeRobot-shaped block per policy and task under ``"lerobot"``. The lerobot
package itself is not a dependency (its pins conflict with this stack; docs/ECOSYSTEM.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import IO, Any

from kv_vla.atomic import atomic_write

MIB = 1024.0 * 1024.0


def _atomic(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through a binary file object, atomically (see :mod:`kv_vla.atomic`)."""

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_file)


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _fmt_kv(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:.2f}"


def results_markdown(result: dict[str, Any]) -> str:
    """The per-task table and the per-family summary as markdown."""
    cfg = result["config"]
    lines = [
        "# Closed-loop evaluation",
        "",
        f"{cfg['episodes_per_task']} episodes per task and policy, evaluation seeds "
        f"{cfg['seeds'][0] if cfg['seeds'] else '-'}..{cfg['seeds'][1] if cfg['seeds'] else '-'} "
        f"(the same for every policy), {cfg['image_size']}x{cfg['image_size']} frames. Success with its "
        "Wilson 95% interval; latency = wall time of one agent step (p50/p95 over all steps); "
        "peak KV = the largest KV cache held during an episode, mean over episodes.",
        "",
        "| task | memory | policy | success % [95% CI] | chance % | steps | step ms p50 / p95 | peak KV MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a in result["aggregates"]:
        lo, hi = a["success_ci95_pct"]
        lines.append(
            f"| {a['task']} | {'yes' if a['memory_task'] else 'no'} | {a['policy']} | "
            f"{a['success_pct']:.0f} [{lo:.0f}, {hi:.0f}] | {a['chance_pct']:.0f} | {a['steps_mean']:.1f} | "
            f"{_fmt_ms(a['step_ms_p50'])} / {_fmt_ms(a['step_ms_p95'])} | {_fmt_kv(a['peak_kv_bytes_mean'])} |"
        )
    lines += [
        "",
        "## Per policy",
        "",
        "| policy | tasks | success % [95% CI] | step ms p50 / p95 | peak KV MiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in result["summary"]:
        lo, hi = s["success_ci95_pct"]
        lines.append(
            f"| {s['policy']} | {s['tasks']} | {s['success_pct']:.0f} [{lo:.0f}, {hi:.0f}] | "
            f"{_fmt_ms(s['step_ms_p50'])} / {_fmt_ms(s['step_ms_p95'])} | {_fmt_kv(s['peak_kv_bytes_mean'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_success_vs_kv(result: dict[str, Any], path: str) -> None:
    """Success (per task family) against mean peak KV memory, one marker per cache policy.

    Model-free agents hold no KV cache; they are drawn as horizontal reference lines.
    """
    from kv_vla.plotting import headless_pyplot

    plt = headless_pyplot()
    if plt is None:  # matplotlib comes with the sim extra; without it there is no plot to write
        return

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    styles = {"memory": ("o", "tab:red"), "no-memory": ("s", "tab:blue")}
    ref_styles = {"memory": ":", "no-memory": "--"}
    plotted_any = False
    labels: list[tuple[str, float, float]] = []
    for s in result["summary"]:
        marker, colour = styles[s["tasks"]]
        lo, hi = s["success_ci95_pct"]
        if s["peak_kv_bytes_mean"] is None:
            ax.axhline(s["success_pct"], color="grey", ls=ref_styles[s["tasks"]], lw=1)
            ax.annotate(
                f"{s['policy']} ({s['tasks']})",
                (0.99, s["success_pct"]),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                fontsize=7,
                color="grey",
            )
            continue
        x = s["peak_kv_bytes_mean"] / MIB
        y = s["success_pct"]
        ax.errorbar(x, y, yerr=[[max(0.0, y - lo)], [max(0.0, hi - y)]], fmt=marker, color=colour, capsize=3)
        labels.append((s["policy"], x, y))
        plotted_any = True
    for family, (marker, colour) in styles.items():
        ax.plot([], [], marker, color=colour, label=f"{family} tasks")
    ax.set_xlabel("peak KV cache per episode (MiB, mean)")
    ax.set_ylabel("success (%)")
    ax.set_ylim(-3, 103)
    _place_labels(ax, labels)
    if not plotted_any:
        ax.set_xlim(0, 1)
        ax.text(0.5, 0.5, "no KV-cache policy evaluated", transform=ax.transAxes, ha="center", color="grey")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Success vs KV memory per cache policy")
    fig.tight_layout()
    _atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def _place_labels(ax: Any, labels: list[tuple[str, float, float]], fontsize: int = 8) -> None:
    """Annotate each point with its policy name, moving a label up or down (in points) until its box
    clears the labels already placed: policies at the same budget sit almost on top of each other."""
    ax.autoscale_view()
    to_pts = 72.0 / ax.figure.dpi  # display pixels -> points
    placed: list[tuple[float, float, float, float]] = []  # x0, y0, x1, y1 in points
    height = fontsize * 1.2
    for name, x, y in sorted(labels, key=lambda item: -item[2]):
        px, py = (v * to_pts for v in ax.transData.transform((x, y)))
        width = 0.6 * fontsize * len(name)
        for dy in (4, -12, 14, -22, 24, -32, 34):
            box = (px + 4, py + dy, px + 4 + width, py + dy + height)
            if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, dy), fontsize=fontsize)


def episode_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records sorted by (task, policy, seed): one order whatever ran them, or in what order."""
    return sorted(records, key=lambda r: (r["task"], r["policy"], r["seed"]))


LEROBOT_EPISODE_FIELDS = ("episode_ix", "success", "seed", "sum_reward", "max_reward")
LEROBOT_AGGREGATE_FIELDS = ("pc_success", "avg_sum_reward", "avg_max_reward", "eval_s", "eval_ep_s")


def lerobot_view(result: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{policy: {task: {"per_episode": [...], "aggregated": {...}}}}`` in LeRobot's field names."""
    view: dict[str, dict[str, dict[str, Any]]] = {}
    for a in result["aggregates"]:
        episodes = [r for r in result["episodes"] if r["policy"] == a["policy"] and r["task"] == a["task"]]
        view.setdefault(a["policy"], {})[a["task"]] = {
            "per_episode": [{k: r[k] for k in LEROBOT_EPISODE_FIELDS} for r in episodes],
            "aggregated": {k: a[k] for k in LEROBOT_AGGREGATE_FIELDS},
        }
    return view


def write_report(result: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Write the three report files into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "eval_info": os.path.join(out_dir, "eval_info.json"),
        "results": os.path.join(out_dir, "results.md"),
        "plot": os.path.join(out_dir, "success_vs_kv.png"),
    }
    info = {**result, "lerobot": lerobot_view(result)}
    _atomic(paths["eval_info"], lambda f: f.write(json.dumps(info, indent=1).encode()))
    _atomic(paths["results"], lambda f: f.write(results_markdown(result).encode()))
    plot_success_vs_kv(result, paths["plot"])
    return paths
