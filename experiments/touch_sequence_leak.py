"""What lets a policy without history solve ``touch_sequence``: the frame, or the clock?

``touch_sequence`` assumes that back home after the first touch the frame equals the first frame,
so only memory tells the policy which cube comes next. Yet the shipped policy with its cache reset
every step (``none``) solves 78%. Two diagnostics, evaluation-only (task, experts and
demonstrations unchanged):

* **snap** (default): after the first touch, the first time the end effector comes within
  ``--radius`` of home, the arm is put exactly at home (joints and servo target), so the next frame
  equals frame 0 (checked per episode). This removes any trace the policy leaves in the scene (the
  learned policy parks a few mm off home, the expert does not).
* **clock** (``--clock``): feed the *same first frame* at every step and record which cube the first
  action heads for. Nothing changes between steps but the token positions: every cache keeps RoPE
  positions (a ``none`` cache too), so the distance from the pinned prompt to the current frame
  tells the policy how many steps have passed.

Usage: ``python experiments/touch_sequence_leak.py --policies full,none,window,gated --episodes 50
--json outputs/touch_snap.json``; ``... --clock --episodes 20 --json outputs/touch_clock.json``
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from tqdm import tqdm

from kv_vla.atomic import atomic_write_json
from kv_vla.eval.harness import aggregate, run_episode
from kv_vla.runtime import EpisodeRuntime, shipped_gate
from kv_vla_sim.env import TabletopEnv
from kv_vla_sim.tasks import HOME

# cache options as in scripts/eval_suite.sh (80-token budget)
POLICY_OPTIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "none": {},
    "window": {"recent_chunks": 6},
    "gated": {"recent_chunks": 2, "max_tokens": 80, "gate_threshold": 0.0},
    "attention": {"recent_chunks": 2, "max_tokens": 80, "gate_threshold": 0.0},
}


class SnapHomeEnv(TabletopEnv):
    """``touch_sequence`` with the parking trace removed: the arm is put exactly at home once, when it
    first comes back within ``radius`` of home after the first touch."""

    def __init__(self, radius: float = 0.03, **kwargs: Any) -> None:
        super().__init__("touch_sequence", **kwargs)
        self.radius = radius
        self.snapped_equal_to_first: bool | None = None  # None: never snapped this episode

    def reset(self, *args: Any, **kwargs: Any):
        obs, info = super().reset(*args, **kwargs)
        self._first_frame = obs["image"].copy()
        self.snapped_equal_to_first = None
        return obs, info

    def step(self, action: np.ndarray):
        obs, reward, terminated, truncated, info = super().step(action)
        near_home = float(np.linalg.norm(self.ee_pos() - HOME)) < self.radius
        if self.snapped_equal_to_first is None and len(self._touches) == 1 and near_home and not terminated:
            self._set_home_pose()
            self._target = HOME.copy()
            obs = self._obs()
            self.snapped_equal_to_first = bool(np.array_equal(obs["image"], self._first_frame))
        return obs, reward, terminated, truncated, info


def clock_probe(rt: EpisodeRuntime, policies: list[str], seeds: list[int], steps: int = 30) -> dict:
    """Per policy and step: the share of scenes whose action heads for the first / the second
    named cube when the first frame is fed again at every step."""
    env = TabletopEnv("touch_sequence")
    out: dict[str, Any] = {}
    try:
        for policy in policies:
            rt.update_cache_config(policy=policy, **POLICY_OPTIONS[policy])
            first, second = np.zeros(steps), np.zeros(steps)
            for seed in tqdm(seeds, desc=f"clock probe ({policy})"):
                obs, info = env.reset(seed=seed)
                a, b = env.spec.sequence
                to_cubes = env.spec.cube_xy - env.ee_pos()[:2]
                to_cubes /= np.linalg.norm(to_cubes, axis=1, keepdims=True)
                rt.reset(info["instruction"])
                for t in range(steps):
                    move = np.asarray(rt.step(obs["image"]).action[:2], dtype=np.float64)
                    cube = int(np.argmax(to_cubes @ move / max(float(np.linalg.norm(move)), 1e-9)))
                    first[t] += cube == a
                    second[t] += cube == b
            out[policy] = {
                "heads_for_first": (first / len(seeds)).round(3).tolist(),
                "heads_for_second": (second / len(seeds)).round(3).tolist(),
            }
            print(policy, "first:", " ".join(f"{v:.2f}" for v in out[policy]["heads_for_first"]))
    finally:
        env.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/compact-vla")
    ap.add_argument("--policies", default="full,none,window,gated")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--radius", type=float, default=0.03, help="metres from home that trigger the snap")
    ap.add_argument("--clock", action="store_true", help="the clock probe instead of the snap evaluation")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    rt = EpisodeRuntime.from_pretrained(args.model, gate_path=shipped_gate(args.model))
    if args.clock:
        report = clock_probe(rt, args.policies.split(","), list(range(args.episodes)))
        atomic_write_json(args.json, {"config": vars(args), "clock": report}, indent=1)
        return
    env = SnapHomeEnv(radius=args.radius)
    records, summary = [], []
    for policy in args.policies.split(","):
        rt.update_cache_config(policy=policy, **POLICY_OPTIONS[policy])
        recs, times = [], []
        for seed in tqdm(range(args.episodes), desc=f"touch_sequence + snap ({policy})"):
            rec = run_episode(env, rt, seed)
            times.extend(rec.pop("_step_ms"))
            recs.append({"policy": policy, **rec, "snapped_equal_to_first": env.snapped_equal_to_first})
        agg = aggregate(recs, times)
        snapped = [r["snapped_equal_to_first"] for r in recs if r["snapped_equal_to_first"] is not None]
        summary.append(
            {
                "policy": policy,
                "success_pct": agg["success_pct"],
                "success_ci95_pct": agg["success_ci95_pct"],
                "episodes_snapped": len(snapped),
                "snapped_frame_equals_first": sum(snapped),
            }
        )
        records += recs
        print(json.dumps(summary[-1]))
    env.close()
    atomic_write_json(args.json, {"config": vars(args), "summary": summary, "episodes": records}, indent=1)


if __name__ == "__main__":
    main()
