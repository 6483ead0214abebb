"""Demonstration recording: round trip, and resuming after a real interruption (SIGKILL)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kv_vla_sim import make_env
from kv_vla_sim.demos import DEMO_SEED_OFFSET, collect, load_episodes
from kv_vla_sim.experts import run_expert_episode


def test_collect_then_load_round_trip(tmp_path):
    counts = collect("reach", 3, str(tmp_path), progress=False, noise=0.1)
    assert counts == {"reach": 3}
    eps = load_episodes(str(tmp_path))
    assert [e.seed for e in eps] == [DEMO_SEED_OFFSET, DEMO_SEED_OFFSET + 1, DEMO_SEED_OFFSET + 2]
    ref = run_expert_episode(make_env("reach"), DEMO_SEED_OFFSET + 1, noise=0.1, record=True)
    ep = eps[1]
    assert ep.task == "reach" and ep.success and ep.instruction == ref["instruction"]
    assert ep.frames.dtype == np.uint8 and ep.frames.shape[1:] == (64, 64, 3)
    assert ep.actions.dtype == np.float32 and ep.actions.shape == (len(ep), 4)
    assert np.array_equal(ep.frames, ref["frames"])
    assert np.array_equal(ep.actions, ref["actions"])
    assert np.array_equal(ep.proprio, ref["proprio"])
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["seed"] for e in index["episodes"]] == [e.seed for e in eps]
    assert all(e["steps"] == len(x) for e, x in zip(index["episodes"], eps))


def test_collect_refuses_evaluation_seeds(tmp_path):
    with pytest.raises(ValueError, match="1000000"):
        collect("reach", 1, str(tmp_path), seed_offset=5, progress=False)


def test_collect_all_tasks_and_image_size(tmp_path):
    collect("all", 1, str(tmp_path), image_size=32, progress=False)
    eps = load_episodes(str(tmp_path))
    assert sorted(e.task for e in eps) == sorted(
        ["cued_pick", "cued_reach", "late_cued_reach", "pick_place", "push", "reach", "touch_sequence"]
    )
    assert all(e.frames.shape[1:] == (32, 32, 3) for e in eps)
    assert [e.task for e in load_episodes(str(tmp_path), tasks=["push"])] == ["push"]


def test_interrupted_collection_resumes_without_loss_or_duplicates(tmp_path):
    out = str(tmp_path / "demos")
    target = 12
    cmd = [sys.executable, "-m", "kv_vla.cli", "collect", "--task", "reach", "--episodes", str(target)]
    cmd += ["--out", out, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while len(glob.glob(os.path.join(out, "*.npz"))) < 3:
            assert proc.poll() is None, "collector exited before it could be interrupted"
            assert time.time() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # no cleanup, no index flush
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {os.path.basename(p): os.path.getmtime(p) for p in glob.glob(os.path.join(out, "*.npz"))}
    assert 3 <= len(before) < target

    collect("reach", target, out, progress=False)
    eps = load_episodes(out)
    seeds = [e.seed for e in eps]
    assert len(seeds) == target and len(set(seeds)) == target
    assert all(e.success and len(e) > 0 for e in eps)
    for name, mtime in before.items():  # finished episodes were kept, not redone
        assert os.path.getmtime(os.path.join(out, name)) == mtime
    assert not glob.glob(os.path.join(out, ".tmp-*"))
    index = json.loads((tmp_path / "demos" / "index.json").read_text())
    assert sorted(e["seed"] for e in index["episodes"]) == sorted(seeds)

    collect("reach", target, out, progress=False)  # already complete: nothing new
    assert len(load_episodes(out)) == target


def test_stale_or_unsigned_recordings_are_skipped_and_verifiable(tmp_path, caplog):
    """Episodes recorded by a different simulator never reach training: a wrong signature is
    skipped with a warning; an unsigned file is skipped until ``stamp_verified`` re-renders its first
    frame, which signs a faithful file and leaves one whose frame no longer matches unsigned."""
    from kv_vla_sim.demos import Episode, save_episode, sim_signature, stamp_verified

    collect("reach", 3, str(tmp_path), progress=False)
    eps = load_episodes(str(tmp_path))
    assert all(e.sim_signature == sim_signature("reach") for e in eps)
    faithful, edited, foreign = eps

    def resave(ep: Episode, signature: str, frames: np.ndarray | None = None) -> None:
        os.unlink(tmp_path / f"reach-{ep.seed}.npz")
        if frames is not None:
            ep.frames = frames
        save_episode(str(tmp_path), ep, 64, 0.1, signature=signature)

    resave(faithful, "")  # recorded before signatures: unsigned but still true to the simulator
    resave(edited, "", frames=255 - edited.frames)  # unsigned and no longer what the sim renders
    resave(foreign, "0123456789abcdef")  # signed by some other simulator
    with caplog.at_level("WARNING", logger="kv_vla_sim.demos"):
        assert load_episodes(str(tmp_path)) == []
    assert "skipping 3 of 3 episodes" in caplog.text and "2 unsigned" in caplog.text
    assert len(load_episodes(str(tmp_path), check_signature=False)) == 3

    assert stamp_verified(str(tmp_path), progress=False) == {"stamped": 1, "stale": 1, "already": 1}
    assert [e.seed for e in load_episodes(str(tmp_path))] == [faithful.seed]


def test_without_the_simulator_signatures_must_agree(tmp_path, caplog, monkeypatch):
    """On a training machine without PyBullet the majority signature per task stands in for the
    simulator's: a file signed by another simulator, or unsigned, is still skipped, with a warning
    that says the directory as a whole was not verified."""
    from kv_vla_sim import demos
    from kv_vla_sim.demos import save_episode

    collect("reach", 3, str(tmp_path), progress=False)
    eps = load_episodes(str(tmp_path))
    odd = eps[0]
    os.unlink(tmp_path / f"reach-{odd.seed}.npz")
    save_episode(str(tmp_path), odd, 64, 0.1, signature="0123456789abcdef")

    monkeypatch.setattr(demos, "_simulator_available", lambda: False)
    monkeypatch.setattr(demos, "sim_signature", lambda *a: pytest.fail("needs the simulator"))
    with caplog.at_level("WARNING", logger="kv_vla_sim.demos"):
        kept = load_episodes(str(tmp_path))
    assert sorted(e.seed for e in kept) == sorted(e.seed for e in eps[1:])
    assert "PyBullet is not installed" in caplog.text and "skipping 1 of 3" in caplog.text

    for ep in eps:  # a directory with no signed file at all: nothing to agree with, nothing loaded
        os.unlink(tmp_path / f"reach-{ep.seed}.npz")
        save_episode(str(tmp_path), ep, 64, 0.1, signature="")
    assert load_episodes(str(tmp_path)) == []
