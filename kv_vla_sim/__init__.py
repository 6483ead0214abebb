"""PyBullet tabletop simulation for kv_vla: env, tasks, scripted experts, demonstrations.

Imports pybullet, numpy, tqdm and matplotlib only (never torch, never rclpy).
"""

from kv_vla_sim.env import TabletopEnv, make_env
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
