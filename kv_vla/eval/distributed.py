"""Closed-loop evaluation on Ray actors (``kv-vla eval --backend ray``): same result as :func:`evaluate`.

Each worker is an actor holding one agent (for a model policy: one loaded runtime) and one env; each
episode is one actor call ``run(policy, task, seed)``. Calls are handed out in (policy, task, seed)
order to whichever worker is free (``ray.util.ActorPool``), so a worker mostly stays on one policy
and task, and rebuilds its agent or env only when its next episode needs another. An episode's
result does not depend on which worker runs it: every runtime episode starts from a fresh cache and
gate state, the envs rebuild the world at reset, and ``random-actions`` is seeded per episode. The
records are then sorted by (task, policy, seed) and assembled exactly as the local backend does.

Agents are described by *builders*: picklable zero-argument callables returning an
:data:`~kv_vla.eval.harness.AgentFactory` (e.g. ``functools.partial(model_factory, policy, args)``),
called inside the worker, so the model is loaded where it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tqdm import tqdm

from kv_vla.eval.harness import AgentFactory, assemble, check_tasks, eval_seeds, run_episode
from kv_vla_sim.distributed import check_backend, map_on_actors, ray_session

AgentBuilder = Callable[[], AgentFactory]


class EvalWorker:
    """One agent and one env, kept between episodes of the same policy and task."""

    def __init__(self, builders: Mapping[str, AgentBuilder], image_size: int, torch_threads: int) -> None:
        self.builders = dict(builders)
        self.image_size = image_size
        self.torch_threads = torch_threads
        self._policy: str | None = None
        self._factory: AgentFactory | None = None
        self._task: str | None = None
        self._env: Any = None
        self._agent: Any = None

    def warm(self, policy: str, task: str) -> None:
        """Build the agent and env of the first episode (timed apart from the episodes)."""
        self._prepare(policy, task)

    def run(self, policy: str, task: str, seed: int, record_actions: bool) -> dict[str, Any]:
        self._prepare(policy, task)
        rec = run_episode(self._env, self._agent, seed, record_actions=record_actions)
        return {"policy": policy, **rec}

    def _prepare(self, policy: str, task: str) -> None:
        from kv_vla_sim.env import TabletopEnv

        if policy != self._policy:
            self._close_env()
            self._factory = None  # drop the old runtime before loading the next one
            if self.torch_threads > 0:
                import torch

                torch.set_num_threads(self.torch_threads)
            self._factory = self.builders[policy]()
            self._policy = policy
        if task != self._task or self._env is None:
            self._close_env()
            self._env = TabletopEnv(task, image_size=self.image_size)
            assert self._factory is not None
            self._agent = self._factory(self._env)
            self._task = task

    def _close_env(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._agent, self._task = None, None, None


def evaluate_ray(
    builders: Mapping[str, AgentBuilder],
    tasks: Sequence[str] | None = None,
    episodes: int = 20,
    seed_offset: int = 0,
    image_size: int = 64,
    progress: bool = True,
    workers: int = 2,
    address: str | None = None,
    record_actions: bool = False,
    torch_threads: int = 1,
) -> dict[str, Any]:
    """:func:`kv_vla.eval.harness.evaluate` on ``workers`` Ray actors (an embedded Ray, or the cluster
    at ``address``). ``torch_threads`` per worker (0: leave torch's default); one per worker keeps
    ``workers`` of them from oversubscribing the cores."""
    check_backend("ray", workers, address)
    tasks = check_tasks(tasks)
    seeds = eval_seeds(episodes, seed_offset)
    calls = [(p, t, s, record_actions) for p in builders for t in tasks for s in seeds]
    t0 = time.perf_counter()
    records = []
    with ray_session(workers, address) as ray:
        ray_start_s = time.perf_counter() - t0
        actor_cls = ray.remote(num_cpus=1)(EvalWorker)
        actors = [actor_cls.remote(dict(builders), image_size, torch_threads) for _ in range(workers)]
        if calls:
            ray.get([a.warm.remote(calls[0][0], calls[0][1]) for a in actors])
        t_warm = time.perf_counter()
        bar = tqdm(total=len(calls), desc=f"eval (ray, {workers} workers)", disable=not progress)
        for rec in map_on_actors(actors, calls):
            records.append(rec)
            bar.update(1)
            bar.set_postfix(policy=rec["policy"], task=rec["task"])
        bar.close()
        episodes_s = time.perf_counter() - t_warm
        workers_start_s = t_warm - t0 - ray_start_s
    result = assemble(records, list(builders), tasks, seeds, image_size)
    result["config"]["backend"] = {
        "name": "ray",
        "workers": workers,
        "address": address,
        "wall_s": time.perf_counter() - t0,  # including Ray's start-up and the workers' model loads
        "ray_start_s": ray_start_s,
        "workers_start_s": workers_start_s,  # actor processes up, first agent and env built
        "episodes_s": episodes_s,
    }
    return result
