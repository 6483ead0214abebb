"""KV bytes and the largest position id against step over one long episode, per cache setting.

``python experiments/long_trace.py run NAME OUT.json [cache options as key=value ...]`` runs one
``long_cued_reach:wait=980`` episode (seed 0, ≈1,000 steps) with the shipped model and records
per step ``kv_bytes`` and ``max_position``; ``python experiments/long_trace.py plot OUT.png A.json
B.json ...`` draws them. Why: the figure of docs/LONG_HORIZON.md (issue #17 part 5).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def run(name: str, out: str, options: list[str], task: str = "long_cued_reach:wait=980") -> None:
    from tqdm import tqdm

    from kv_vla.atomic import atomic_write_text
    from kv_vla.runtime import EpisodeRuntime, shipped_gate
    from kv_vla_sim.env import TabletopEnv

    opts = {}
    for item in options:
        k, _, v = item.partition("=")
        opts[k] = v if k in ("policy", "positions") else float(v) if "." in v else int(v)
    model = "models/compact-vla"
    runtime = EpisodeRuntime.from_pretrained(model, device="cpu", gate_path=shipped_gate(model))
    runtime.update_cache_config(**opts)
    env = TabletopEnv(task)
    obs, info = env.reset(seed=0)
    runtime.reset(info["instruction"])
    kv, pos = [], []
    for _ in tqdm(range(info["max_steps"]), desc=name):
        res = runtime.step(obs["image"])
        kv.append(int(res.cache_stats.kv_bytes))
        pos.append(int(res.cache_stats.max_position))
        obs, _, terminated, truncated, _ = env.step(np.asarray(res.action, dtype=np.float32)[:4])
        if terminated or truncated:
            break
    atomic_write_text(
        Path(out), json.dumps({"name": name, "options": opts, "kv_bytes": kv, "max_position": pos})
    )


def plot(out: str, paths: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kv_vla.atomic import atomic_write

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for p in paths:
        d = json.loads(Path(p).read_text())
        a.plot(np.array(d["kv_bytes"]) / 2**20, label=d["name"])
        b.plot(d["max_position"], label=d["name"])
    a.set_xlabel("control step")
    a.set_ylabel("KV MiB")
    b.set_xlabel("control step")
    b.set_ylabel("largest position id")
    b.axhline(8192, color="grey", ls=":", lw=1)
    a.legend(fontsize=8)
    a.set_title("KV held")
    b.set_title("positions (dotted: max_position_embeddings)")
    fig.tight_layout()
    atomic_write(Path(out), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "run":
        run(rest[0], rest[1], rest[2:])
    else:
        plot(rest[0], rest[1:])
