"""``kv-vla inspect``: what the cache kept, evicted or stored at low precision over one episode.

Runs one closed-loop episode of a model policy and, after every control step, reads the cache
without changing it (``cache.chunks``: each completed chunk's utility, precision and evicted flag;
``cache.stats()``: kept tokens and bytes). The fates are recorded here, per step, rather than in the
cache: a cache need not keep a record of a chunk after evicting it (DESIGN.md, "no per-chunk record
outlives its eviction"), so a chunk that disappears from ``cache.chunks`` counts as evicted from
that step on. Writes ``inspect.json`` (the data) and ``inspect.png`` (:mod:`kv_vla.eval.inspect_plot`)
into ``--out``, atomically.

The defaults are the evaluated setting of ``scripts/eval_suite.sh`` for the budgeted policies:
2 recent chunks, an 80-token budget, gate threshold 0.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from kv_vla import settings
from kv_vla.atomic import atomic_write_json
from kv_vla.eval.cli import CACHE_FLAGS

PENDING, KEPT, LOW, EVICTED = "pending", "kept", "low", "evicted"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        default="late_cued_reach",
        help="a task name, options included (late_cued_reach:lead=100-400)",
    )
    parser.add_argument("--seed", type=int, default=3, help="episode seed (evaluation range: < 1_000_000)")
    settings.add_flags(parser, ("policy",), default_none=False)
    parser.add_argument("--out", required=True, help="output directory (inspect.json, inspect.png)")
    parser.add_argument("--model", default="models/compact-vla", help="compact VLA folder")
    parser.add_argument("--gate", default=None, help="trained ChunkGate (default: MODEL/gate.safetensors)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    # left out, a knob keeps the evaluated setting (kv_vla/settings.py, or the gate file's)
    # (the cache's own ``seed`` is left at its default: ``--seed`` is the episode's)
    knobs = tuple(n for n in CACHE_FLAGS if n != "seed")
    settings.add_flags(parser.add_argument_group("cache settings (kv_vla/settings.py)"), knobs)
    parser.add_argument("--frames", type=int, default=14, help="frames shown in the strip")


class CacheRecorder:
    """Per-step fates and utilities of every chunk, read from a cache after each step."""

    def __init__(self, pinned_tokens: int) -> None:
        self.pinned_tokens = pinned_tokens
        self.step_ranges: list[tuple[int, int]] = []  # tokens each step added: [start, end)
        self.chunks: dict[int, dict[str, Any]] = {}  # by start position (stable across evictions)

    def record(self, cache: Any, seen_before: int) -> dict[str, Any]:
        """Call after each step; returns that step's token accounting."""
        stats = cache.stats()
        t = len(self.step_ranges)
        self.step_ranges.append((seen_before, int(stats.seen_tokens)))
        live = {int(c.start): c for c in cache.chunks}
        for start, c in live.items():
            if start not in self.chunks:
                self.chunks[start] = {
                    "start": start,
                    "length": int(c.length),
                    "step": self._step_of(start),
                    "fate": [PENDING] * t,
                    "utility": [None] * t,
                }
        for start, rec in self.chunks.items():
            c = live.get(start)
            if c is None or c.evicted:
                rec["fate"].append(EVICTED)
                rec["utility"].append(None if c is None else float(c.utility))
            else:
                rec["fate"].append(KEPT if c.precision == "full" else LOW)
                rec["utility"].append(float(c.utility))
        return {
            "seen_tokens": int(stats.seen_tokens),
            "kept_tokens": int(stats.kept_tokens),
            "kv_bytes": int(stats.kv_bytes),
        }

    def _step_of(self, start: int) -> int:
        for t, (a, b) in enumerate(self.step_ranges):
            if a <= start < b:
                return t
        return -1

    def chunk_table(self) -> list[dict[str, Any]]:
        return [self.chunks[s] for s in sorted(self.chunks)]


def record_episode(runtime: Any, env: Any, seed: int) -> dict[str, Any]:
    """Run one episode with ``runtime`` in ``env``; everything the picture needs, JSON-ready."""
    obs, info = env.reset(seed=seed)
    runtime.reset(info["instruction"])
    recorder = CacheRecorder(int(runtime.cache.stats().seen_tokens))
    frames, steps = [], []
    success = False
    for t in range(info["max_steps"]):
        frames.append(obs["image"])
        seen_before = int(runtime.cache.get_seq_length())
        res = runtime.step(obs["image"])
        tokens = recorder.record(runtime.cache, seen_before)
        action = np.asarray(res.action, dtype=np.float32)[:4]
        obs, _, terminated, truncated, step_info = env.step(action)
        success = bool(step_info["success"])
        steps.append({"t": t, "action": [float(a) for a in action], "go": bool(step_info["go"]), **tokens})
        if terminated or truncated:
            break
    spec = env.spec
    cfg = runtime.cache_config
    return {
        "task": info["task"],
        "seed": seed,
        "instruction": info["instruction"],
        "success": success,
        "cache_config": {
            "policy": cfg.policy,
            "chunk_size": cfg.chunk_size,
            "recent_chunks": cfg.recent_chunks,
            "sink_tokens": cfg.sink_tokens,
            "max_tokens": cfg.max_tokens,
            "gate_threshold": cfg.gate_threshold,
        },
        "pinned_tokens": recorder.pinned_tokens,
        "cue_steps": [t for t in range(len(steps)) if spec.cue_visible(t)],
        "go_step": int(spec.go_step),
        "steps": steps,
        "chunks": recorder.chunk_table(),
        "_frames": frames,
    }


def run(args: argparse.Namespace) -> int:
    from kv_vla.cache import POLICIES
    from kv_vla.eval.harness import eval_seeds
    from kv_vla.eval.inspect_plot import plot_episode
    from kv_vla_sim.env import TabletopEnv
    from kv_vla_sim.tasks import get_task

    if args.policy not in POLICIES:
        raise SystemExit(f"--policy {args.policy!r}: inspect needs a cache policy, one of {sorted(POLICIES)}")
    try:
        get_task(args.task)  # a registered name, options included (late_cued_reach:lead=100-400)
    except ValueError as exc:
        raise SystemExit(f"--task: {exc}") from None
    eval_seeds(1, args.seed)  # refuses demonstration seeds
    runtime = _runtime(args)
    env = TabletopEnv(args.task, image_size=args.image_size)
    try:
        episode = record_episode(runtime, env, args.seed)
    finally:
        env.close()
    frames = episode.pop("_frames")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "inspect.json")
    png_path = os.path.join(args.out, "inspect.png")
    atomic_write_json(json_path, episode, indent=1)
    plot_episode(episode, frames, png_path, n_frames=args.frames)
    print(summary_line(episode))
    print("wrote", json_path, png_path)
    return 0


def _runtime(args: argparse.Namespace) -> Any:
    """The model with the policy and options of the command line (through ``kv-vla eval``'s loader)."""
    from kv_vla.eval.cli import model_factory

    try:
        return model_factory(args.policy, argparse.Namespace(**vars(args)))(None)
    except ValueError as exc:
        raise SystemExit(f"kv-vla inspect: {exc}") from None


def summary_line(episode: dict[str, Any]) -> str:
    """One line: outcome, what became of the cue chunks by the go step, kept tokens at the end."""
    at_go = min(episode["go_step"], len(episode["steps"]) - 1)
    by_step = {c["step"]: c for c in episode["chunks"]}
    parts = []
    for t in episode["cue_steps"]:
        fate = by_step[t]["fate"] if t in by_step else []
        if not fate:
            parts.append(f"t={t} never completed")
            continue
        kept = [i for i, f in enumerate(fate) if f in (KEPT, LOW)]
        last = max(kept) if kept else t
        parts.append(f"t={t} {fate[at_go]} at go, kept to t={last}")
    evicted = sum(c["fate"][at_go] == EVICTED for c in episode["chunks"])
    last_step = episode["steps"][-1]
    return (
        f"{episode['task']} seed {episode['seed']} ({episode['cache_config']['policy']}): "
        f"{'success' if episode['success'] else 'failure'} in {len(episode['steps'])} steps; "
        f"cue chunks: {'; '.join(parts) or 'no cue'}; {evicted} of {at_go + 1} chunks evicted by the go "
        f"step t={episode['go_step']}; kept {last_step['kept_tokens']} of {last_step['seen_tokens']} tokens at the end"
    )
