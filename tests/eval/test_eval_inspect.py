"""`kv-vla inspect`: per-step chunk fates agree with the cache's own accounting, survive a cache that
forgets evicted chunks, and end up in a JSON + PNG pair."""

from __future__ import annotations

import json

import pytest
import torch

from kv_vla.cli import main as kv_vla_main
from kv_vla.eval.inspector import EVICTED, KEPT, LOW, PENDING, record_episode
from kv_vla.model.compact import CompactVLA, CompactVLAConfig
from kv_vla.runtime import EpisodeRuntime
from kv_vla_sim.env import TabletopEnv


def _tiny_runtime(policy: str, **options) -> EpisodeRuntime:
    torch.manual_seed(0)
    rt = EpisodeRuntime(CompactVLA(CompactVLAConfig.tiny()).eval())
    rt.update_cache_config(policy=policy, **options)
    return rt


class _ForgetfulCache:
    """Read-only view of a cache that lists only live chunks: the shape of a cache that keeps no
    record of a chunk after evicting it (DESIGN.md), which the recorder must read the same way."""

    def __init__(self, cache):
        self._cache = cache

    @property
    def chunks(self):
        return [c for c in self._cache.chunks if not c.evicted]

    def __getattr__(self, name):
        return getattr(self._cache, name)


def _check_accounting(episode, chunk_size):
    n = len(episode["steps"])
    assert [c["step"] for c in episode["chunks"]] == list(range(n))  # one chunk per control step
    for c in episode["chunks"]:
        assert len(c["fate"]) == len(c["utility"]) == n and c["length"] == chunk_size
        fate = c["fate"]
        assert fate[: c["step"]] == [PENDING] * c["step"] and fate[c["step"]] != PENDING
        if EVICTED in fate:  # eviction is final
            assert set(fate[fate.index(EVICTED) :]) == {EVICTED}
    for t, step in enumerate(episode["steps"]):
        held = sum(c["length"] for c in episode["chunks"] if c["fate"][t] in (KEPT, LOW))
        assert (
            step["kept_tokens"] == episode["pinned_tokens"] + held
        )  # the recorder sees what the cache holds
        assert step["kept_tokens"] <= episode["cache_config"]["max_tokens"]


@pytest.mark.parametrize("forgetful", [False, True])
def test_fates_match_the_cache_accounting(forgetful, monkeypatch):
    rt = _tiny_runtime("gated", recent_chunks=2, max_tokens=130, gate_threshold=0.0)
    if forgetful:
        original_reset = rt.reset

        def reset(instruction):
            original_reset(instruction)
            rt.cache = _ForgetfulCache(rt.cache)

        monkeypatch.setattr(rt, "reset", reset)
    env = TabletopEnv("cued_reach")
    episode = record_episode(rt, env, seed=1)
    env.close()
    frames = episode.pop("_frames")
    assert len(frames) == len(episode["steps"]) and frames[0].shape == (64, 64, 3)
    _check_accounting(episode, rt.step_tokens)
    fates = [c["fate"][-1] for c in episode["chunks"]]
    assert fates.count(EVICTED) > 0 and fates[-2:] == [KEPT, KEPT]  # budget bites; recent chunks stay
    assert episode["cue_steps"] == [0, 1, 2] and episode["go_step"] > 30
    assert all(len(s["action"]) == 4 for s in episode["steps"])


def test_low_precision_chunks_are_recorded():
    rt = _tiny_runtime(
        "gated_tiered", recent_chunks=1, max_tokens=None, gate_threshold=0.0, full_threshold=1.0
    )
    env = TabletopEnv("reach")
    episode = record_episode(rt, env, seed=0)
    env.close()
    fates = [c["fate"][-1] for c in episode["chunks"]]
    assert LOW in fates and EVICTED not in fates  # threshold 0 evicts nothing; full needs utility 1
    kv = [s["kv_bytes"] for s in episode["steps"]]
    assert kv[-1] < kv[0] * len(kv)  # low-precision chunks hold fewer bytes than full ones would


@pytest.mark.slow
def test_inspect_cli_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "insp"
    argv = ["inspect", "--task", "late_cued_reach", "--seed", "3", "--policy", "gated", "--out", str(out)]
    assert kv_vla_main(argv) == 0
    info = json.loads((out / "inspect.json").read_text())
    assert (
        info["task"] == "late_cued_reach" and info["seed"] == 3 and info["cache_config"]["max_tokens"] == 80
    )
    _check_accounting(info, info["cache_config"]["chunk_size"])
    assert (out / "inspect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "late_cued_reach seed 3 (gated)" in printed and "cue chunks: t=" in printed


def test_inspect_refuses_model_free_agents_and_unknown_tasks(tmp_path):
    with pytest.raises(SystemExit, match="needs a cache policy"):
        kv_vla_main(["inspect", "--policy", "expert", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--task: unknown task 'nope'"):
        kv_vla_main(["inspect", "--task", "nope", "--out", str(tmp_path)])
    # options are part of a task's name, as in kv-vla eval; a malformed one is refused by name
    with pytest.raises(SystemExit, match="lead=soon"):
        kv_vla_main(["inspect", "--task", "late_cued_reach:lead=soon", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="evaluation seeds"):
        kv_vla_main(["inspect", "--seed", "1000000", "--out", str(tmp_path)])
