"""Gymnasium registration: every task passes the env checker, wraps the same episodes as TabletopEnv,
and runs in subprocesses under AsyncVectorEnv."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import kv_vla_sim
from kv_vla_sim import TASKS, make_env
from kv_vla_sim.gym_envs import TabletopGymEnv, env_id, register_all


def test_every_task_is_registered():
    ids = register_all()
    assert ids == [env_id(t) for t in TASKS]
    assert all(i in gym.registry for i in ids)
    assert env_id("late_cued_reach") == "kv_vla_sim/LateCuedReach-v0"


@pytest.mark.parametrize("task", list(TASKS))
def test_env_checker_passes_without_warnings(task):
    register_all()  # tasks registered after ``import kv_vla_sim`` are covered too
    env = gym.make(env_id(task), render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checker warning (space bounds, dtypes, seeding) fails
        check_env(env.unwrapped)
    env.close()


def test_same_episode_as_the_sim_api_with_render_and_instruction():
    env = gym.make("kv_vla_sim/LateCuedReach-v0", render_mode="rgb_array")
    sim = make_env("late_cued_reach")
    obs, info = env.reset(seed=3)
    ref, ref_info = sim.reset(seed=3)
    assert np.array_equal(obs["image"], ref["image"]) and np.array_equal(obs["proprio"], ref["proprio"])
    assert obs["instruction"] == info["instruction"] == ref_info["instruction"]
    assert obs in env.observation_space
    assert np.array_equal(env.render(), obs["image"])
    action = np.array([0.5, -0.2, 0.1, -1.0], dtype=np.float32)
    for _ in range(3):
        obs, reward, _, _, info = env.step(action)
        ref, ref_reward, *_ = sim.step(action)
        assert np.array_equal(obs["image"], ref["image"]) and reward == ref_reward
        assert info["instruction"] == obs["instruction"] == ref_info["instruction"]
        assert np.array_equal(env.render(), obs["image"])
    assert isinstance(env.unwrapped, TabletopGymEnv) and env.unwrapped.sim.task.name == "late_cued_reach"
    env.close()
    sim.close()


def test_unseeded_resets_follow_np_random():
    env = gym.make("kv_vla_sim/Reach-v0")
    env.reset(seed=11)
    a = [env.reset()[1]["seed"] for _ in range(3)]
    env.reset(seed=11)
    b = [env.reset()[1]["seed"] for _ in range(3)]
    assert a == b and len(set(a)) == 3
    env.close()


def test_bad_task_and_render_mode_are_refused():
    with pytest.raises(ValueError, match="unknown task"):
        TabletopGymEnv("no_such_task")
    with pytest.raises(ValueError, match="render_mode"):
        TabletopGymEnv("reach", render_mode="human")


def test_async_vector_env_runs_tasks_in_subprocesses():
    """Two tasks in two worker processes; each sub-env reproduces the in-process episode."""
    tasks = ["reach", "late_cued_reach"]
    fns = [lambda t=t: gym.make(env_id(t)) for t in tasks]
    venv = gym.vector.AsyncVectorEnv(fns, shared_memory=False)
    try:
        obs, _ = venv.reset(seed=[5, 6])
        assert obs["image"].shape == (2, 64, 64, 3)
        actions = np.tile(np.array([[0.3, 0.1, -0.2, -1.0]], dtype=np.float32), (2, 1))
        for _ in range(2):
            obs, reward, terminated, _, _ = venv.step(actions)
        assert reward.shape == (2,) and terminated.shape == (2,)
    finally:
        venv.close()
    for i, (task, seed) in enumerate(zip(tasks, [5, 6])):
        sim = make_env(task)
        ref, ref_info = sim.reset(seed=seed)
        for _ in range(2):
            ref, *_ = sim.step(actions[i])
        assert np.array_equal(obs["image"][i], ref["image"])
        assert obs["instruction"][i] == ref_info["instruction"]
        sim.close()
    assert kv_vla_sim.gym_envs.NAMESPACE == "kv_vla_sim"
