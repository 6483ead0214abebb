"""The runtime's settings: the evaluated defaults, the gate file's own settings, one meaning for
"one control step", and the one rule for how long an instruction may be (the budget's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kv_vla import settings
from kv_vla.cache import ChunkGate, EpisodeCacheConfig
from kv_vla.runtime import EpisodeRuntime, shipped_gate

MODEL = Path(__file__).resolve().parents[1] / "models" / "compact-vla"
INSTR = "touch the cube that was lit"
EVALUATED = {"policy": "gated", "chunk_size": 0, "recent_chunks": 2, "max_tokens": 80, "gate_threshold": 0.0}


def _grey_episode(rt: EpisodeRuntime, steps: int) -> list:
    rt.reset(INSTR)
    frame = np.full((64, 64, 3), 128, np.uint8)
    return [rt.step(frame).cache_stats for _ in range(steps)]


def test_defaults_are_the_evaluated_setting_and_the_shipped_gate_carries_it():
    assert {k: settings.default(k) for k in EVALUATED} == EVALUATED
    cfg = EpisodeCacheConfig()
    assert {k: getattr(cfg, k) for k in EVALUATED} == EVALUATED
    gate = ChunkGate.load(shipped_gate(MODEL))
    assert gate.settings == EVALUATED
    assert EpisodeCacheConfig.evaluated(gate) == EpisodeCacheConfig(**EVALUATED)


def test_from_pretrained_then_gated_at_80_tokens_keeps_threshold_0():
    """The issue's bug: the old defaults' 0.5 threshold evicted every old chunk the shipped gate
    scores under 0.5 (a late cue's best chunk scores about 0.22). Now gated at the budget keeps old
    chunks until the budget, not the threshold, forces them out (lowest utility first)."""
    rt = EpisodeRuntime.from_pretrained(MODEL)
    assert rt.gate is not None  # the gate saved beside the model is used by default
    rt.update_cache_config(policy="gated", max_tokens=80)
    assert rt.cache_config.gate_threshold == 0.0
    stats = _grey_episode(rt, 12)
    kept = [s.kept_tokens for s in stats]
    # old chunks survive until the budget (which reserves room for the open 8-token chunk) is full
    assert 80 - 2 * 8 <= max(kept) <= 80 and max(kept) > stats[-1].pinned_tokens + 3 * 8
    assert stats[-1].kept_tokens >= 80 - 2 * 8  # to the end: evictions come from the budget only


def test_gate_settings_apply_unless_given(tmp_path):
    gate = ChunkGate.load(shipped_gate(MODEL))
    gate.settings = {"policy": "gated", "max_tokens": 64, "recent_chunks": 1}
    gate.save(tmp_path / "gate.safetensors")
    rt = EpisodeRuntime.from_pretrained(MODEL, gate_path=tmp_path / "gate.safetensors")
    assert (rt.cache_config.max_tokens, rt.cache_config.recent_chunks) == (64, 1)
    assert rt.cache_config.gate_threshold == settings.default("gate_threshold")
    rt.update_cache_config(max_tokens=96)  # a given setting wins, the others stay the gate's
    assert (rt.cache_config.max_tokens, rt.cache_config.recent_chunks) == (96, 1)
    explicit = EpisodeCacheConfig(policy="window", recent_chunks=3)
    rt = EpisodeRuntime.from_pretrained(MODEL, cache_config=explicit, gate_path=tmp_path / "gate.safetensors")
    assert rt.cache_config.policy == "window" and rt.cache_config.max_tokens == 80


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"colour": "red"}, r"settings\.colour is not a cache setting"),
        ({"max_tokens": -5}, r"settings\.max_tokens"),
    ],
)
def test_a_gate_file_with_bad_settings_is_refused_naming_the_file(tmp_path, bad, match):
    gate = ChunkGate.load(shipped_gate(MODEL))
    gate.settings = bad
    gate.save(tmp_path / "gate.safetensors")
    with pytest.raises(ValueError, match=match) as err:
        ChunkGate.load(tmp_path / "gate.safetensors")
    assert "gate.json" in str(err.value)


def test_one_control_step_is_resolved_at_reset_and_explicit_sizes_stay():
    rt = EpisodeRuntime.from_pretrained(MODEL)
    assert rt.requested_config.chunk_size == 0 and rt.cache_config.chunk_size == rt.step_tokens == 8
    rt.update_cache_config(chunk_size=4)
    rt.reset(INSTR)
    assert rt.cache.config.chunk_size == 4
    rt.update_cache_config(chunk_size=0)  # back to one control step, live
    assert rt.cache.config.chunk_size == 8 and rt.requested_config.chunk_size == 0


def test_the_budget_is_the_instruction_limit_and_its_refusal_gives_the_numbers():
    """One rule: an instruction is accepted when its prompt fits the budget beside the recent chunks
    and the open chunk (max_instruction_chars only caps the message first). A refused instruction
    leaves the running episode as it was."""
    rt = EpisodeRuntime.from_pretrained(MODEL)
    rt.reset(INSTR)
    before = rt.cache.stats()
    room = rt.cache_config.prompt_room()
    assert room == 80 - 3 * 8
    long = INSTR + " and then" * 20  # far under max_instruction_chars (1000) yet over the budget
    assert len(long) < settings.default("max_instruction_chars")
    with pytest.raises(
        ValueError, match=r"^instruction: its prompt is \d+ tokens, but max_tokens=80 leaves room for 56"
    ):
        rt.reset(long)
    assert rt.cache.stats() == before and rt.instruction == INSTR
    rt.update_cache_config(max_tokens=0)  # no budget: the prompt may be as long as the message
    rt.reset(long)
    assert torch.is_tensor(rt.cache.layers[0].keys)


def test_reset_applies_changes_with_the_instruction_or_not_at_all():
    """The node's next-episode changes go in with the new instruction: checked together, so a
    refusal (here a prompt the new budget cannot hold) keeps the old episode and the old settings."""
    rt = EpisodeRuntime.from_pretrained(MODEL)
    rt.reset(INSTR)
    before, requested = rt.cache.stats(), rt.requested_config
    with pytest.raises(ValueError, match=r"^instruction: its prompt is 19 tokens, but max_tokens=40"):
        rt.reset(INSTR, max_tokens=40, recent_chunks=2)  # 19-token prompt + (2 + 1) x 8 > 40
    assert rt.requested_config == requested and rt.cache.stats() == before
    with pytest.raises(ValueError, match=r"^low_bits:"):
        rt.reset(INSTR, low_bits=3)
    rt.reset(INSTR, max_tokens=40, recent_chunks=1)  # 19 + (1 + 1) x 8 <= 40
    assert (rt.cache.config.max_tokens, rt.cache.config.recent_chunks) == (40, 1)
