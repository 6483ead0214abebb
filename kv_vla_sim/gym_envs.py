"""Every kv_vla_sim task as a Gymnasium environment: ``gymnasium.make("kv_vla_sim/LateCuedReach-v0")``.

Why: Gymnasium's API is what other robot-learning code (vector envs, env checkers, LeRobot's
``gym_*`` envs) expects. :class:`TabletopGymEnv` is a thin wrapper: it owns one
:class:`kv_vla_sim.env.TabletopEnv` (``.sim``) and adds spaces, seeding through ``np_random``,
``render()`` and the instruction in the observation; the sim's own API stays as it is.

Registration runs on ``import kv_vla_sim`` (entry points are strings, so pybullet is imported only
when an env is made) and covers every task in :data:`kv_vla_sim.tasks.TASKS`, so tasks added there
are registered without touching this file.
"""

from __future__ import annotations

import string
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from kv_vla_sim.tasks import TASKS

NAMESPACE = "kv_vla_sim"
VERSION = 0
MAX_INSTRUCTION_CHARS = 256
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + string.punctuation + " "
#: ``reset(seed=None)`` draws the episode seed from ``np_random`` below this bound: the evaluation
#: range (demonstration seeds start at 1_000_000, see ``kv_vla_sim.demos``).
UNSEEDED_SEED_BOUND = 1_000_000
# proprio = end-effector xyz (m, robot base at the origin; the Panda reaches < 0.9 m) + finger gap (m)
PROPRIO_LOW = np.array([-1.0, -1.0, -0.2, -0.01], dtype=np.float32)
PROPRIO_HIGH = np.array([1.0, 1.0, 1.2, 0.1], dtype=np.float32)


def env_id(task: str) -> str:
    """``late_cued_reach`` -> ``kv_vla_sim/LateCuedReach-v0``."""
    camel = "".join(part.capitalize() for part in task.split("_"))
    return f"{NAMESPACE}/{camel}-v{VERSION}"


class TabletopGymEnv(gym.Env):
    """Gymnasium view of one task.

    Observation: ``{"image": uint8 [S, S, 3], "proprio": float32 [4], "instruction": str}``; action:
    float32 ``[dx, dy, dz, gripper]`` in [-1, 1]; reward 1.0 on the success step, else 0.0. The
    episode terminates on success or an unrecoverable failure and is truncated at the task's
    ``max_steps`` (the sim decides both, so no ``TimeLimit`` wrapper is registered).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 5}

    def __init__(
        self, task: str, image_size: int = 64, render_mode: str | None = None, **sim_kwargs: Any
    ) -> None:
        from kv_vla_sim.env import TabletopEnv

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} is not supported; use 'rgb_array' or None")
        self.render_mode = render_mode
        self.sim = TabletopEnv(task, image_size=image_size, **sim_kwargs)
        s = self.sim.image_size
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (s, s, 3), np.uint8),
                "proprio": spaces.Box(PROPRIO_LOW, PROPRIO_HIGH, (4,), np.float32),
                "instruction": spaces.Text(MAX_INSTRUCTION_CHARS, charset=INSTRUCTION_CHARSET),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
        self._frame: np.ndarray | None = None
        self._instruction = ""

    def _observe(self, obs: dict[str, np.ndarray]) -> dict[str, Any]:
        self._frame = obs["image"]
        return {"image": obs["image"], "proprio": obs["proprio"], "instruction": self._instruction}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A given ``seed`` is the sim's episode seed (same seed, same episode as ``TabletopEnv``);
        without one the next episode seed is drawn from ``np_random``."""
        super().reset(seed=seed)
        episode_seed = seed if seed is not None else int(self.np_random.integers(UNSEEDED_SEED_BOUND))
        obs, info = self.sim.reset(seed=episode_seed, options=options)
        self._instruction = str(info["instruction"])
        return self._observe(obs), info

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.sim.step(action)
        info["instruction"] = self._instruction
        return self._observe(obs), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        """The RGB frame of the last observation (``render_mode="rgb_array"``), else None."""
        if self.render_mode != "rgb_array" or self._frame is None:
            return None
        return self._frame.copy()

    def close(self) -> None:
        self.sim.close()


def register_all() -> list[str]:
    """Register (idempotently) one Gymnasium id per task in ``TASKS``; returns the ids."""
    ids = []
    for task in TASKS:
        name = env_id(task)
        if name not in gym.registry:
            gym.register(
                id=name,
                entry_point="kv_vla_sim.gym_envs:TabletopGymEnv",
                kwargs={"task": task},
                disable_env_checker=False,
            )
        ids.append(name)
    return ids


register_all()
