"""Compact-VLA step: dynamic eager vs static eager vs static compiled, side by side in one run.

Answers: is the compiled bounded step faster than today's eager dynamic step at equal actions, and
is its time flat over a long episode? The three runtimes step on the same frames, taking turns
every ``--block`` steps (1: lockstep, each step after the other variants' steps evicted its weights
from the CPU caches; 25: warm caches, as in a process running one runtime; either way the
machine's drift falls on every variant alike); the report gives wall and thread-CPU p50 per variant
(CPU time is robust to a loaded machine), ratios against the first variant (dynamic eager),
action-bin agreement (near ties excepted), p50 early vs late in the episode, and a torch.profiler
table of a few steps of each variant.

    PYTHONPATH=. python experiments/static_step.py --steps 5000 --json docs/bench/static_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kv_vla.atomic import atomic_write_json
from kv_vla.cache import EpisodeCacheConfig
from kv_vla.runtime import EpisodeRuntime

VARIANTS = {
    "dynamic eager": ("dynamic", False),
    "static eager": ("static", False),
    "static compiled": ("static", True),
}


def _runtime(
    model_dir: str, storage: str, compiled: bool, max_tokens: int, policy: str = "gated", **options: object
) -> EpisodeRuntime:
    """The shipped model and gate with ``policy`` (2 recent chunks of 8 tokens) over ``storage``."""
    cfg = EpisodeCacheConfig(
        policy=policy, chunk_size=8, recent_chunks=2, max_tokens=max_tokens, storage=storage, **options
    )
    return EpisodeRuntime.from_pretrained(
        model_dir, cache_config=cfg, gate_path=Path(model_dir) / "gate.safetensors", compile=compiled
    )


def _profile(rt: EpisodeRuntime, frames: np.ndarray, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for f in frames:
            rt.step(f)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


PROFILE_ROWS = 18


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/compact-vla")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--window", type=int, default=100, help="steps per p50 window (early: from step 10)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; default: all three")
    ap.add_argument(
        "--block",
        type=int,
        default=1,
        help="steps each variant runs before the next one takes over (1: lockstep; larger: each "
        "variant's weights and buffers stay in the CPU caches for a block, as in a process that "
        "runs one runtime, while the blocks still interleave against the machine's drift)",
    )
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    runtimes = {k: _runtime(args.model, *VARIANTS[k], args.max_tokens) for k in names}
    times: dict[str, list[float]] = {k: [] for k in runtimes}
    phases: dict[str, list[dict[str, float]]] = {k: [] for k in runtimes}
    cpu: dict[str, list[float]] = {k: [] for k in runtimes}  # thread CPU time: robust to a loaded machine
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in runtimes}
    first_step_s = {}
    for rt in runtimes.values():
        rt.reset("touch the red cube")
    frames = rng.integers(0, 256, (args.steps, 64, 64, 3), dtype=np.uint8)
    bar = tqdm(total=args.steps, desc="static_step", unit="step")
    for start in range(0, args.steps, args.block):
        block = range(start, min(start + args.block, args.steps))
        for k, rt in runtimes.items():
            for i in block:
                t0, c0 = time.perf_counter(), time.thread_time()
                res = rt.step(frames[i])
                cpu[k].append(1e3 * (time.thread_time() - c0))
                if i == 0:
                    first_step_s[k] = time.perf_counter() - t0
                times[k].append(res.timings_ms["total"])
                phases[k].append(res.timings_ms)
                logits[k].append(rt.last_action_logits.clone())
        bar.update(len(block))
    bar.close()
    ref = torch.stack(logits[names[0]])  # the first variant is the reference
    w = args.window
    report: dict = {
        "model": args.model,
        "policy": "gated",
        "max_tokens": args.max_tokens,
        "steps": args.steps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "block": args.block,
        "note": "variants stepped on the same frames, taking turns every `block` steps (1: lockstep)",
        "variants": {},
    }
    base = statistics.median(times[names[0]][10:])
    for k, ts in times.items():
        got = torch.stack(logits[k])
        top2 = ref.topk(2, dim=-1).values
        near = (top2[..., 0] - top2[..., 1]) <= 1e-5
        differ = (got.argmax(-1) != ref.argmax(-1)) & ~near
        early = statistics.median(ts[10 : 10 + w])
        late = statistics.median(ts[-w:])
        report["variants"][k] = {
            "step_ms_p50": round(statistics.median(ts[10:]), 3),
            f"ratio_vs_{names[0].replace(' ', '_')}": round(statistics.median(ts[10:]) / base, 3),
            "p50_early_ms": round(early, 3),
            "p50_late_ms": round(late, 3),
            "late_over_early": round(late / early, 3),
            "cpu_ms_p50": round(statistics.median(cpu[k][10:]), 3),
            "cpu_p50_early_ms": round(statistics.median(cpu[k][10 : 10 + w]), 3),
            "cpu_p50_late_ms": round(statistics.median(cpu[k][-w:]), 3),
            "cpu_late_over_early": round(
                statistics.median(cpu[k][-w:]) / statistics.median(cpu[k][10 : 10 + w]), 3
            ),
            "max_abs_logit_diff_vs_first": float((got - ref).abs().max()),
            "bins_differ_outside_near_ties": int(differ.sum()),
            "first_step_s": round(first_step_s[k], 2),
            "phase_ms_p50": {
                n: round(statistics.median(t[n] for t in phases[k][10:]), 3) for n in phases[k][0]
            },
            "warmup_s": runtimes[k].warmup_s,
        }
    prof_frames = rng.integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    report["profiles"] = {k: _profile(rt, prof_frames, PROFILE_ROWS) for k, rt in runtimes.items()}
    atomic_write_json(args.json, report)
    print(json.dumps({k: v for k, v in report.items() if k != "profiles"}, indent=1))
    for k, table in report["profiles"].items():
        print(f"== profile: {k} (20 steps)\n{table}")


if __name__ == "__main__":
    main()
