"""Loading demonstrations for training: a per-task cap draws from every folder that holds the task."""

from __future__ import annotations

import numpy as np

from kv_vla.train.data import load_demonstrations
from kv_vla_sim.demos import Episode, save_episode, sim_signature


def _write(folder, task: str, seeds: range) -> None:
    folder.mkdir()
    for seed in seeds:
        ep = Episode(
            frames=np.zeros((2, 64, 64, 3), np.uint8),
            actions=np.zeros((2, 4), np.float32),
            proprio=np.zeros((2, 4), np.float32),
            instruction="touch the cube that was lit",
            task=task,
            seed=seed,
            success=True,
        )
        save_episode(str(folder), ep, 64, 0.0, signature=sim_signature(task, 64))


def test_max_per_task_takes_turns_between_folders(tmp_path):
    # replay-like folder first, lead-like folder second: the same task name in both
    _write(tmp_path / "replay", "late_cued_reach", range(100, 106))
    _write(tmp_path / "lead", "late_cued_reach", range(200, 203))
    _write(tmp_path / "other", "reach", range(300, 302))
    dirs = [tmp_path / "replay", tmp_path / "lead", tmp_path / "other"]

    capped = load_demonstrations(dirs, max_per_task=4)
    assert [e.seed for e in capped] == [100, 200, 101, 201, 300, 301]
    # a cap above what there is takes everything, and no cap keeps folder order
    assert sorted(e.seed for e in load_demonstrations(dirs, max_per_task=50)) == sorted(
        e.seed for e in load_demonstrations(dirs)
    )
    assert [e.seed for e in load_demonstrations(dirs)][:7] == [100, 101, 102, 103, 104, 105, 200]
