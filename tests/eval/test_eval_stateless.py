"""The ``stateless`` baseline has neither memory nor a clock; the ``none`` cache has a clock.

Why it matters: every cache keeps RoPE positions, so a policy whose cache is emptied each step
(``none``) still sees how many steps have passed (the frame's distance from the pinned prompt).
``stateless`` restarts the episode before every step, so the same frame gives the same action at
any step, whatever came before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_vla.cache import EpisodeCacheConfig
from kv_vla.eval.stateless import StatelessAgent
from kv_vla.model import CompactVLA, CompactVLAConfig
from kv_vla.runtime import EpisodeRuntime

INSTR = "touch the red cube, then the blue cube"


def _runtime(policy: str) -> EpisodeRuntime:
    torch.manual_seed(0)
    model = CompactVLA(CompactVLAConfig()).eval()
    return EpisodeRuntime(model, EpisodeCacheConfig(policy=policy, chunk_size=20), device="cpu")


def _logits_per_step(agent, frames: np.ndarray) -> list[torch.Tensor]:
    agent.reset(INSTR)
    out = []
    for f in frames:
        agent.step(f)
        rt = agent.runtime if isinstance(agent, StatelessAgent) else agent
        out.append(rt.last_action_logits.clone())
    return out


def test_stateless_gives_the_same_action_for_the_same_frame_at_any_step():
    rng = np.random.default_rng(0)
    f0, f1, f2 = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    frames = np.stack([f0, f1, f2, f0, f0])
    stateless = _logits_per_step(StatelessAgent(_runtime("full")), frames)
    assert torch.equal(stateless[3], stateless[0]) and torch.equal(stateless[4], stateless[0])
    assert not torch.equal(stateless[1], stateless[0])  # it does look at the frame


def test_none_cache_keeps_a_clock_that_stateless_removes():
    frame = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    frames = np.stack([frame] * 4)
    none = _logits_per_step(_runtime("none"), frames)
    # nothing is remembered, yet the same frame gives other logits later: its position moved on
    assert not torch.allclose(none[3], none[0], atol=1e-4)
    stateless = _logits_per_step(StatelessAgent(_runtime("full")), frames)
    assert all(torch.equal(s, stateless[0]) for s in stateless)


def test_stateless_refuses_a_step_before_reset():
    with pytest.raises(RuntimeError, match="reset"):
        StatelessAgent(_runtime("full")).step(np.zeros((64, 64, 3), dtype=np.uint8))
