"""The picture of one inspected episode (``kv-vla inspect``): frames, chunk fates, utilities, budget,
actions, on one time axis. Reads the dict :func:`kv_vla.eval.inspector.record_episode` returns."""

from __future__ import annotations

from typing import Any

import numpy as np

from kv_vla.atomic import atomic_write

FATE_CODES = {"pending": 0, "kept": 1, "low": 2, "evicted": 3}
FATE_COLOURS = ["#ffffff", "#2e8b57", "#f0a030", "#a8a8a8"]  # not yet seen, kept, low precision, evicted
FATE_LABELS = ["not yet complete", "kept (full precision)", "kept at low precision", "evicted"]
CUE_COLOUR = "#e6b800"


def _strip_steps(n_steps: int, cue: list[int], go: int, n_frames: int) -> list[int]:
    """Which frames to show: the cue frames, the go step, the last one, the rest evenly spaced."""
    must = sorted({*cue, min(go, n_steps - 1), n_steps - 1, 0})
    rest = [round(float(x)) for x in np.linspace(0, n_steps - 1, max(n_frames, len(must)))]
    chosen = set(must)
    for t in rest:
        if len(chosen) >= n_frames:
            break
        chosen.add(t)
    return sorted(chosen)


def plot_episode(episode: dict[str, Any], frames: list[np.ndarray], path: str, n_frames: int = 14) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch

    steps, chunks = episode["steps"], episode["chunks"]
    n = len(steps)
    cue, go = episode["cue_steps"], episode["go_step"]
    cfg = episode["cache_config"]
    at_go = min(go, n - 1)  # when the memory is needed: the frame's chunk as the arm may move
    fate_at_go = {c["step"]: c["fate"][at_go] for c in chunks}
    shown = _strip_steps(n, cue, go, n_frames)

    fig = plt.figure(figsize=(13, 12.5), dpi=100)
    grid = fig.add_gridspec(5, 1, height_ratios=[1.0, 2.6, 2.6, 1.3, 1.3], hspace=0.38, top=0.895)
    strip = grid[0].subgridspec(1, len(shown), wspace=0.06)
    for i, t in enumerate(shown):
        ax = fig.add_subplot(strip[0, i])
        ax.imshow(frames[t], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        fate = fate_at_go.get(t, "pending")
        edge = FATE_COLOURS[FATE_CODES[fate]] if fate != "pending" else "#4060c0"
        for side in ax.spines.values():
            side.set_edgecolor(edge)
            side.set_linewidth(4)
        label = f"t={t}" + (" cue" if t in cue else "") + (" go" if t == go else "")
        ax.set_title(
            label,
            fontsize=9,
            color=CUE_COLOUR if t in cue else "black",
            fontweight="bold" if t in cue else None,
        )
        if i == 0:
            ax.set_ylabel("frames", fontsize=9)
    title = (
        f"{episode['task']} seed {episode['seed']}, policy {cfg['policy']} "
        f"(budget {cfg['max_tokens']} tokens, {cfg['recent_chunks']} recent chunks, threshold {cfg['gate_threshold']}): "
        f'{"success" if episode["success"] else "failure"}\n"{episode["instruction"]}"   '
        f"frame border = that frame's chunk at the go step t={go} (green kept, grey evicted, orange low precision, "
        "blue not yet a chunk)"
    )
    fig.suptitle(title, fontsize=10, y=0.965)

    # chunk x step maps; row k = the chunk of step k's frame and actions
    rows = [c["step"] for c in chunks]
    fate = np.array([[FATE_CODES[f] for f in c["fate"]] for c in chunks])
    util = np.array([[np.nan if u is None else u for u in c["utility"]] for c in chunks], dtype=float)
    extent = (-0.5, n - 0.5, len(chunks) - 0.5, -0.5)
    ax_f = fig.add_subplot(grid[1])
    ax_f.imshow(
        fate,
        cmap=ListedColormap(FATE_COLOURS),
        vmin=0,
        vmax=3,
        aspect="auto",
        interpolation="nearest",
        extent=extent,
    )
    ax_u = fig.add_subplot(grid[2], sharex=ax_f)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#ffffff")
    # log scale: a trained gate's utilities span decades (~0.2 for a cue, < 0.01 for idle frames)
    norm = LogNorm(vmin=1e-3, vmax=1.0)
    im = ax_u.imshow(
        np.clip(util, 1e-3, 1.0), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest", extent=extent
    )
    fig.colorbar(
        im, cax=ax_u.inset_axes((1.005, 0.0, 0.012, 1.0)), label="utility (log)"
    )  # keeps the x axes aligned
    for ax, name in ((ax_f, "fate of each chunk"), (ax_u, "utility of each chunk (white: not yet scored)")):
        ticks = [i for i, r in enumerate(rows) if r % 10 == 0]
        ax.set_yticks(ticks, [f"t={rows[i]}" for i in ticks], fontsize=8)
        cue_rows = [i for i, r in enumerate(rows) if r in cue]
        if cue_rows:
            ax.axhspan(cue_rows[0] - 0.5, cue_rows[-1] + 0.5, xmin=0, xmax=0.012, color=CUE_COLOUR)
            for y in (cue_rows[0] - 0.5, cue_rows[-1] + 0.5):
                ax.axhline(y, color=CUE_COLOUR, lw=0.9)
            ax.annotate(
                "cue",
                (0, (cue_rows[0] + cue_rows[-1]) / 2),
                xycoords=("axes fraction", "data"),
                xytext=(-26, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color="#a08000",
                fontweight="bold",
            )
        ax.axvline(go - 0.5, color="black", lw=1, ls="--")
        ax.set_ylabel("chunk (frame of step)", fontsize=9)
        ax.set_title(name, fontsize=10, loc="left")
    ax_f.legend(
        handles=[Patch(color=c, label=lab) for c, lab in zip(FATE_COLOURS[1:], FATE_LABELS[1:])]
        + [
            Patch(color=CUE_COLOUR, label="cue frame"),
            plt.Line2D([], [], color="black", ls="--", label="go"),
        ],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        ncol=5,
        framealpha=0.9,
    )

    t = np.arange(n)
    ax_b = fig.add_subplot(grid[3], sharex=ax_f)
    ax_b.plot(t, [s["kept_tokens"] for s in steps], color="tab:green", lw=1.5, label="kept tokens")
    kept = [s["kept_tokens"] for s in steps]
    ax_b.set_ylim(0, 1.5 * max(max(kept), cfg["max_tokens"] or 0))
    ax_b.annotate(
        f"full history would hold {steps[-1]['seen_tokens']} tokens at the end",
        (0.99, 0.9),
        xycoords="axes fraction",
        ha="right",
        va="top",
        fontsize=8,
        color="tab:grey",
    )
    if cfg["max_tokens"] is not None:
        ax_b.axhline(cfg["max_tokens"], color="tab:red", ls="--", label=f"budget {cfg['max_tokens']}")
    ax_b.axhline(episode["pinned_tokens"], color="tab:purple", lw=0.8, ls="-.", label="pinned prompt")
    ax_b.set_ylabel("tokens", fontsize=9)
    ax_b.legend(loc="upper left", fontsize=8, ncol=4)
    ax_b.set_title("cache size after each step", fontsize=10, loc="left")

    ax_a = fig.add_subplot(grid[4], sharex=ax_f)
    acts = np.array([s["action"] for s in steps])
    for k, (name, colour) in enumerate(
        zip(("dx", "dy", "dz", "gripper"), ("tab:blue", "tab:orange", "tab:green", "black"))
    ):
        ax_a.step(t, acts[:, k], where="mid", color=colour, lw=1.2, label=name)
    ax_a.axvline(go - 0.5, color="black", lw=1, ls="--")
    ax_a.set_ylim(-1.1, 1.1)
    ax_a.set_ylabel("action", fontsize=9)
    ax_a.set_xlabel("control step t")
    ax_a.legend(loc="lower left", fontsize=8, ncol=4)
    ax_a.set_title("action per step (before go the arm ignores it)", fontsize=10, loc="left")
    ax_f.set_xlim(-0.5, n - 0.5)

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)
