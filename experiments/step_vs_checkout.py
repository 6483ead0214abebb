"""This tree's compact-VLA step against another checkout's, taking turns in one run.

Answers: is the step faster than the one an earlier commit shipped (e.g. "today's eager dynamic
step" of an issue), measured side by side? Each variant runs in its own worker process (so two
versions of ``kv_vla`` can be imported), all on the same frames; the workers take turns every
``--block`` steps, so the machine's drift (this VM's speed moves ~30% between runs) falls on every
variant alike. Prints and writes per-variant p50 and the ratio to the first variant, and whether
the action bins agree (near ties excepted). ``--policy`` and ``--options`` choose the cache policy
(default ``gated``), e.g. the 8-bit tier of ``gated_tiered`` at 480 tokens:

    git worktree add /tmp/base 28e9086 && git worktree add /tmp/slab ed74aae
    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/step_vs_checkout.py --policy gated_tiered \\
        --options '{"low_bits": 8, "positions": "episode"}' --max-tokens 480 --steps 1000 \\
        --variant base=/tmp/base:dynamic --variant slab=/tmp/slab:dynamic --variant this=.:dynamic \\
        --json docs/bench/tiered8_step_vs_28e9086.json

    git worktree add /tmp/base f8c4ea9
    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/step_vs_checkout.py \\
        --variant base=/tmp/base:dynamic --variant this=.:dynamic --variant this=.:static+compiled \\
        --json docs/bench/step_vs_f8c4ea9.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve()


def _worker(
    model: str, storage: str, compiled: bool, max_tokens: int, steps: int, policy: str, options: dict
) -> None:
    """Step on command: reads ``a b`` lines, steps frames ``[a, b)``, answers a JSON line."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    from static_step import _runtime  # the same runtime the in-process bench builds

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rt = _runtime(model, storage, compiled, max_tokens, policy, **options)
    warm = getattr(rt, "warm_up", None)
    warmup_s = warm() if compiled and callable(warm) else 0.0
    frames = np.random.default_rng(0).integers(0, 256, (steps, 64, 64, 3), dtype=np.uint8)
    rt.reset("touch the red cube")
    print(json.dumps({"ready": True, "warmup_s": warmup_s}), flush=True)
    for line in sys.stdin:
        a, b = map(int, line.split())
        out = []
        for i in range(a, b):
            res = rt.step(frames[i])
            logits = rt.last_action_logits
            top2 = logits.topk(2, dim=-1).values
            out.append(
                {
                    "ms": res.timings_ms["total"],
                    "bins": res.action_token_ids.tolist(),
                    "near_tie": ((top2[:, 0] - top2[:, 1]) <= 1e-5).tolist(),
                }
            )
        print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME=SRC:STORAGE[+compiled]: SRC is the checkout whose kv_vla runs (PYTHONPATH); the "
        "first variant is the reference",
    )
    ap.add_argument("--model", default="models/compact-vla")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--block", type=int, default=25, help="steps each worker runs per turn")
    ap.add_argument("--policy", default="gated", help="cache policy of every variant")
    ap.add_argument("--options", default="{}", help="JSON object of further cache settings, e.g. low_bits")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    options = json.loads(args.options)
    if args.worker:
        storage, compiled, max_tokens, steps = args.worker
        _worker(args.model, storage, compiled == "1", int(max_tokens), int(steps), args.policy, options)
        return
    model = str(Path(args.model).resolve())
    workers = {}
    for spec in args.variant:
        name, rest = spec.split("=", 1)
        src, kind = rest.rsplit(":", 1)
        storage, _, flag = kind.partition("+")
        label = f"{name} {storage}{' compiled' if flag else ' eager'}"
        env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
        cmd = [sys.executable, str(HERE), "--model", model, "--json", "-", "--variant", spec]
        cmd += ["--policy", args.policy, "--options", args.options, "--worker"]
        cmd += [storage, "1" if flag else "0", str(args.max_tokens), str(args.steps)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = json.loads(proc.stdout.readline())
        workers[label] = (proc, src, ready["warmup_s"])
    results: dict[str, list[dict]] = {k: [] for k in workers}
    with tqdm(total=args.steps, desc="step_vs_checkout", unit="step") as bar:
        for a in range(0, args.steps, args.block):
            b = min(a + args.block, args.steps)
            for k, (proc, _, _) in workers.items():
                proc.stdin.write(f"{a} {b}\n")
                proc.stdin.flush()
                results[k] += json.loads(proc.stdout.readline())
            bar.update(b - a)
    for proc, _, _ in workers.values():
        proc.stdin.close()
        proc.wait()
    names = list(results)
    ref = results[names[0]]
    base = statistics.median(r["ms"] for r in ref[10:])
    report = {
        "model": args.model,
        "policy": args.policy,
        "options": options,
        "max_tokens": args.max_tokens,
        "steps": args.steps,
        "block": args.block,
        "variants": {},
    }
    for k, rows in results.items():
        differ = sum(
            1
            for r, g in zip(ref, rows)
            for d, (x, y) in enumerate(zip(r["bins"], g["bins"]))
            if x != y and not r["near_tie"][d]
        )
        p50 = statistics.median(r["ms"] for r in rows[10:])
        report["variants"][k] = {
            "src": workers[k][1],
            "step_ms_p50": round(p50, 3),
            "ratio_vs_first": round(p50 / base, 3),
            "bins_differ_outside_near_ties": differ,
            "warmup_s": round(workers[k][2], 1),
        }
    from kv_vla.atomic import atomic_write_json

    atomic_write_json(args.json, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
