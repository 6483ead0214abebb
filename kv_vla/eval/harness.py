"""Closed-loop evaluation: run agents episode after episode in the PyBullet tasks.

An *agent* is anything with ``reset(instruction)`` and ``step(image)`` returning an object with
``.action``, ``.timings_ms`` and ``.cache_stats`` (docs/CONTRACTS.md): the VLA runtime, the
scripted expert, random actions. :func:`evaluate` takes one *factory* per policy name; a factory is
called once per task with that task's env and returns the agent to use for all of the task's
episodes (the runtime is built once and returned every time; the expert needs the env).

Every policy sees the same seeds (a paired comparison), and evaluation seeds are always below
the first demonstration seed, so a model is never evaluated on an episode it was trained on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from kv_vla_sim.demos import DEMO_SEED_OFFSET
from kv_vla_sim.env import TabletopEnv
from kv_vla_sim.tasks import STANDARD_TASKS, get_task


class Agent(Protocol):
    def reset(self, instruction: str) -> None: ...

    def step(self, image: np.ndarray) -> Any: ...


AgentFactory = Callable[[TabletopEnv], Agent]
MODEL_FREE = ("expert", "random-actions")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (as fractions in [0, 1])."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def eval_seeds(episodes: int, seed_offset: int = 0) -> list[int]:
    """The evaluation seeds; refuses any overlap with demonstration seeds."""
    seeds = list(range(seed_offset, seed_offset + episodes))
    if seed_offset < 0 or (seeds and seeds[-1] >= DEMO_SEED_OFFSET):
        raise ValueError(
            f"evaluation seeds must lie in [0, {DEMO_SEED_OFFSET}); got {seed_offset}..{seed_offset + episodes - 1}"
        )
    return seeds


def run_episode(env: TabletopEnv, agent: Agent, seed: int) -> dict[str, Any]:
    """One closed-loop episode. Returns the record (without the policy name) and the step times."""
    obs, info = env.reset(seed=seed)
    agent.reset(info["instruction"])
    step_ms: list[float] = []
    peak_kv: int | None = None
    success = failure = False
    steps = 0
    for _ in range(info["max_steps"]):
        t0 = time.perf_counter()
        res = agent.step(obs["image"])
        step_ms.append(1000.0 * (time.perf_counter() - t0))
        stats = getattr(res, "cache_stats", None)
        if stats is not None:
            kv = int(stats.kv_bytes)
            peak_kv = kv if peak_kv is None else max(peak_kv, kv)
        obs, _, terminated, truncated, step_info = env.step(np.asarray(res.action, dtype=np.float32)[:4])
        steps += 1
        success, failure = bool(step_info["success"]), bool(step_info["failure"])
        if terminated or truncated:
            break
    return {
        "task": info["task"],
        "seed": seed,
        "instruction": info["instruction"],
        "success": success,
        "failure": failure,
        "steps": steps,
        "step_ms_p50": float(np.percentile(step_ms, 50)),
        "step_ms_p95": float(np.percentile(step_ms, 95)),
        "peak_kv_bytes": peak_kv,
        "_step_ms": step_ms,
    }


def aggregate(records: Sequence[Mapping[str, Any]], step_ms: Sequence[float]) -> dict[str, Any]:
    """Success % with its Wilson 95% interval, pooled latency percentiles, mean peak KV bytes."""
    n = len(records)
    k = sum(bool(r["success"]) for r in records)
    lo, hi = wilson_interval(k, n)
    kv = [r["peak_kv_bytes"] for r in records if r["peak_kv_bytes"] is not None]
    return {
        "episodes": n,
        "successes": k,
        "success_pct": 100.0 * k / n if n else 0.0,
        "success_ci95_pct": [100.0 * lo, 100.0 * hi],
        "steps_mean": float(np.mean([r["steps"] for r in records])) if n else 0.0,
        "step_ms_p50": float(np.percentile(step_ms, 50)) if len(step_ms) else None,
        "step_ms_p95": float(np.percentile(step_ms, 95)) if len(step_ms) else None,
        "peak_kv_bytes_mean": float(np.mean(kv)) if kv else None,
    }


def evaluate(
    agent_factories: Mapping[str, AgentFactory],
    tasks: Sequence[str] | None = None,
    episodes: int = 20,
    seed_offset: int = 0,
    image_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``episodes`` episodes of every task for every policy.

    Returns ``{"config", "episodes": [record, ...], "aggregates": [per task and policy],
    "summary": [per policy over memory / no-memory tasks]}`` - the content of eval_info.json.
    """
    tasks = list(STANDARD_TASKS) if tasks is None else list(tasks)
    for t in tasks:
        get_task(t)  # unknown names and bad options raise ValueError here, before any episode
    seeds = eval_seeds(episodes, seed_offset)
    records: list[dict[str, Any]] = []
    times: dict[tuple[str, str], list[float]] = {}
    bar = tqdm(total=len(agent_factories) * len(tasks) * len(seeds), desc="eval", disable=not progress)
    for policy, factory in agent_factories.items():
        for task in tasks:
            env = TabletopEnv(task, image_size=image_size)
            agent = factory(env)
            for seed in seeds:
                rec = run_episode(env, agent, seed)
                times.setdefault((task, policy), []).extend(rec.pop("_step_ms"))
                records.append({"policy": policy, **rec})
                bar.update(1)
                bar.set_postfix(policy=policy, task=task)
            env.close()
    bar.close()
    aggregates = []
    for task in tasks:
        for policy in agent_factories:
            recs = [r for r in records if r["policy"] == policy and r["task"] == task]
            aggregates.append(
                {
                    "task": task,
                    "policy": policy,
                    "memory_task": get_task(task).needs_memory,
                    "chance_pct": 100.0 * get_task(task).chance,
                    **aggregate(recs, times[(task, policy)]),
                }
            )
    summary = []
    for policy in agent_factories:
        for family, memory in (("memory", True), ("no-memory", False)):
            fam = [t for t in tasks if get_task(t).needs_memory == memory]
            if not fam:
                continue
            recs = [r for r in records if r["policy"] == policy and r["task"] in fam]
            ms = [x for t in fam for x in times[(t, policy)]]
            summary.append({"policy": policy, "tasks": family, **aggregate(recs, ms)})
    return {
        "config": {
            "tasks": tasks,
            "policies": list(agent_factories),
            "episodes_per_task": episodes,
            "seeds": [seeds[0], seeds[-1]] if seeds else [],
            "image_size": image_size,
        },
        "episodes": records,
        "aggregates": aggregates,
        "summary": summary,
    }


def model_free_factory(name: str, seed: int = 0) -> AgentFactory:
    """Factory for ``expert`` or ``random-actions``."""
    from kv_vla_sim.agents import ExpertAgent, RandomAgent

    if name == "expert":
        return ExpertAgent
    if name == "random-actions":
        counter = iter(range(1_000_000))

        def make_random(env: TabletopEnv) -> Agent:
            return RandomAgent(seed=seed * 1000 + next(counter))

        return make_random
    raise ValueError(f"unknown model-free agent {name!r}; choose from {MODEL_FREE}")
