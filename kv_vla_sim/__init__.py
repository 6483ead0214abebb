"""PyBullet tabletop simulation for kv_vla: env, tasks, scripted experts, demonstrations.

Imports pybullet, numpy, gymnasium, tqdm and matplotlib only (never torch, never rclpy). The
environment is imported lazily, so reading demonstrations (``kv_vla_sim.demos``) works on a training
machine that has no pybullet (e.g. a GPU box). Importing the package registers every task with
Gymnasium (``kv_vla_sim.gym_envs``) when gymnasium is installed.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from kv_vla_sim.tasks import MEMORY_TASKS, PLAIN_TASKS, TASKS, EpisodeSpec, SceneState, Task

__all__ = [
    "MEMORY_TASKS",
    "PLAIN_TASKS",
    "TASKS",
    "EpisodeSpec",
    "SceneState",
    "TabletopEnv",
    "Task",
    "make_env",
]

if importlib.util.find_spec("gymnasium") is not None:
    from kv_vla_sim import gym_envs as _gym_envs  # noqa: F401  (registers kv_vla_sim/<Task>-v0)


def __getattr__(name: str) -> Any:
    if name in ("TabletopEnv", "make_env"):
        from kv_vla_sim import env

        return getattr(env, name)
    raise AttributeError(f"module 'kv_vla_sim' has no attribute {name!r}")
