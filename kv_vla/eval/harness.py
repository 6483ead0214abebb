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

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from kv_vla.eval.report import episode_order
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
    # the interval always holds p; rounding can leave 6/6's upper end at 0.9999999999999999 (which
    # then made a negative error bar and crashed the plot after a whole evaluation)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def eval_seeds(episodes: int, seed_offset: int = 0) -> list[int]:
    """The evaluation seeds; refuses any overlap with demonstration seeds."""
    seeds = list(range(seed_offset, seed_offset + episodes))
    if seed_offset < 0 or (seeds and seeds[-1] >= DEMO_SEED_OFFSET):
        raise ValueError(
            f"evaluation seeds must lie in [0, {DEMO_SEED_OFFSET}); got {seed_offset}..{seed_offset + episodes - 1}"
        )
    return seeds


def run_episode(env: TabletopEnv, agent: Agent, seed: int, record_actions: bool = False) -> dict[str, Any]:
    """One closed-loop episode. Returns the record (without the policy name) and the step times.

    ``sum_reward`` / ``max_reward`` are LeRobot's names for the env's rewards (1.0 on the success
    step); ``eval_s`` is the episode's wall time. With ``record_actions`` the executed actions come
    back under ``actions`` (to compare backends; off by default: it is the bulk of a record), and for
    a model agent ``action_margins``: per step, the smallest gap between the top two action logits
    of any dimension (where it is within float round-off, another process may decode another bin).
    """
    t_start = time.perf_counter()
    obs, info = env.reset(seed=seed)
    agent.reset(info["instruction"])
    step_ms: list[float] = []
    actions: list[list[float]] = []
    margins: list[float] = []
    rewards: list[float] = []
    peak_kv: int | None = None
    max_position: int | None = None
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
        max_position = getattr(res, "max_position_id", None)  # the episode's running max (None: no cache)
        action = np.asarray(res.action, dtype=np.float32)[:4]
        if record_actions:
            actions.append(action.tolist())
            logits = getattr(agent, "last_action_logits", None)
            if logits is not None:
                top2 = np.sort(np.asarray(logits, dtype=np.float32), axis=-1)[..., -2:]
                margins.append(float((top2[..., 1] - top2[..., 0]).min()))
        obs, reward, terminated, truncated, step_info = env.step(action)
        rewards.append(float(reward))
        steps += 1
        success, failure = bool(step_info["success"]), bool(step_info["failure"])
        if terminated or truncated:
            break
    rec = {
        "task": info["task"],
        "seed": seed,
        "instruction": info["instruction"],
        "success": success,
        "failure": failure,
        "steps": steps,
        "sum_reward": float(sum(rewards)),
        "max_reward": float(max(rewards)) if rewards else 0.0,
        "step_ms_p50": float(np.percentile(step_ms, 50)),
        "step_ms_p95": float(np.percentile(step_ms, 95)),
        "peak_kv_bytes": peak_kv,
        "max_position_id": max_position,
        "eval_s": time.perf_counter() - t_start,
        "_step_ms": step_ms,
    }
    if record_actions:
        rec["actions"] = actions
        if margins:
            rec["action_margins"] = margins
    return rec


def aggregate(records: Sequence[Mapping[str, Any]], step_ms: Sequence[float]) -> dict[str, Any]:
    """Success % with its Wilson 95% interval, pooled latency percentiles, mean peak KV bytes, and
    LeRobot's aggregate fields (``eval_s`` sums the episodes' wall times, ``eval_ep_s`` per episode)."""
    n = len(records)
    k = sum(bool(r["success"]) for r in records)
    lo, hi = wilson_interval(k, n)
    kv = [r["peak_kv_bytes"] for r in records if r["peak_kv_bytes"] is not None]
    eval_s = float(sum(r.get("eval_s", 0.0) for r in records))
    return {
        "episodes": n,
        "successes": k,
        "success_pct": 100.0 * k / n if n else 0.0,
        "success_ci95_pct": [100.0 * lo, 100.0 * hi],
        "steps_mean": float(np.mean([r["steps"] for r in records])) if n else 0.0,
        "step_ms_p50": float(np.percentile(step_ms, 50)) if len(step_ms) else None,
        "step_ms_p95": float(np.percentile(step_ms, 95)) if len(step_ms) else None,
        "peak_kv_bytes_mean": float(np.mean(kv)) if kv else None,
        # LeRobot's aggregate names (lerobot-eval's eval_info.json), over the same episodes
        "pc_success": 100.0 * k / n if n else 0.0,
        "avg_sum_reward": float(np.mean([r.get("sum_reward", 0.0) for r in records])) if n else 0.0,
        "avg_max_reward": float(np.mean([r.get("max_reward", 0.0) for r in records])) if n else 0.0,
        "eval_s": eval_s,
        "eval_ep_s": eval_s / n if n else 0.0,
    }


def check_tasks(tasks: Sequence[str] | None) -> list[str]:
    """The task list (the standard suite for None); unknown names and bad task options raise
    ValueError here, before any episode."""
    tasks = list(STANDARD_TASKS) if tasks is None else list(tasks)
    for t in tasks:
        get_task(t)
    return tasks


def evaluate(
    agent_factories: Mapping[str, AgentFactory],
    tasks: Sequence[str] | None = None,
    episodes: int = 20,
    seed_offset: int = 0,
    image_size: int = 64,
    progress: bool = True,
    record_actions: bool = False,
) -> dict[str, Any]:
    """Run ``episodes`` episodes of every task for every policy, in this process.

    Returns ``{"config", "episodes": [record, ...], "aggregates": [per task and policy],
    "summary": [per policy over memory / no-memory tasks]}`` - the content of eval_info.json
    (:func:`kv_vla.eval.report.write_report` adds LeRobot's ``per_episode``/``aggregated`` view).
    ``kv_vla.eval.distributed.evaluate_ray`` returns the same on Ray workers.
    """
    tasks = check_tasks(tasks)
    seeds = eval_seeds(episodes, seed_offset)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(agent_factories) * len(tasks) * len(seeds), desc="eval", disable=not progress)
    for policy, factory in agent_factories.items():
        for task in tasks:
            env = TabletopEnv(task, image_size=image_size)
            agent = factory(env)
            for seed in seeds:
                rec = run_episode(env, agent, seed, record_actions=record_actions)
                records.append({"policy": policy, **rec})
                bar.update(1)
                bar.set_postfix(policy=policy, task=task)
            env.close()
    bar.close()
    result = assemble(records, list(agent_factories), tasks, seeds, image_size)
    result["config"]["backend"] = {"name": "local", "workers": 1, "wall_s": time.perf_counter() - t0}
    return result


def assemble(
    records: list[dict[str, Any]], policies: list[str], tasks: list[str], seeds: list[int], image_size: int
) -> dict[str, Any]:
    """Aggregates and summaries from finished episode records (each still carrying ``_step_ms``)."""
    times: dict[tuple[str, str], list[float]] = {}
    for rec in episode_order(records):
        times.setdefault((rec["task"], rec["policy"]), []).extend(rec.pop("_step_ms"))
    records = episode_order(records)
    for k, rec in enumerate(records):  # LeRobot's episode_ix: the index within its policy and task
        same = k > 0 and (records[k - 1]["task"], records[k - 1]["policy"]) == (rec["task"], rec["policy"])
        rec["episode_ix"] = records[k - 1]["episode_ix"] + 1 if same else 0
    aggregates = []
    for task in tasks:
        for policy in policies:
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
    for policy in policies:
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
            "policies": policies,
            "episodes_per_task": len(seeds),
            "seeds": [seeds[0], seeds[-1]] if seeds else [],
            "image_size": image_size,
        },
        "episodes": records,
        "aggregates": aggregates,
        "summary": summary,
    }


def model_free_factory(name: str, seed: int = 0) -> AgentFactory:
    """Factory for ``expert`` or ``random-actions``.

    ``random-actions`` draws each episode's actions from a generator keyed by (``seed``, task,
    episode seed), so an episode is the same whichever episodes ran before it in the process (and
    on whichever Ray worker it runs).
    """
    from kv_vla_sim.agents import EpisodeSeededRandomAgent, ExpertAgent

    if name == "expert":
        return ExpertAgent
    if name == "random-actions":
        return functools.partial(EpisodeSeededRandomAgent, seed=seed)
    raise ValueError(f"unknown model-free agent {name!r}; choose from {MODEL_FREE}")
