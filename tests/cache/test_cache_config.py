"""Invalid cache configurations are refused with a ValueError naming the field and allowed values."""

from __future__ import annotations

import pytest

from kv_vla.cache import POLICIES, EpisodeCache, EpisodeCacheConfig
from kv_vla.cache.testing import tiny_config


@pytest.mark.parametrize(
    ("changes", "field", "allowed"),
    [
        (dict(chunk_size=-3), "chunk_size", "[0, 65536]"),
        (dict(chunk_size=1.5), "chunk_size", "an integer"),
        (dict(gate_threshold=1.5), "gate_threshold", "[0, 1]"),
        (dict(gate_threshold=-0.1), "gate_threshold", "[0, 1]"),
        (dict(policy="lru"), "policy", "'window'"),
        (dict(recent_chunks=-1), "recent_chunks", "[0, 4096]"),
        (dict(sink_tokens=-1), "sink_tokens", "[0, 65536]"),
        (dict(max_tokens=-1, policy="window"), "max_tokens", "[0, 10000000]"),
        (dict(policy="sinks", sink_tokens=0), "sink_tokens", ">= 1"),
    ],
)
def test_invalid_config_names_field_and_allowed_values(changes, field, allowed):
    with pytest.raises(ValueError) as err:
        EpisodeCacheConfig(**changes)
    message = str(err.value)
    assert message.startswith(field + ":")
    assert allowed in message


def test_replace_validates_and_rejects_unknown_fields():
    cfg = EpisodeCacheConfig(policy="window", chunk_size=8)
    assert cfg.replace(chunk_size=4).chunk_size == 4
    assert cfg.chunk_size == 8
    with pytest.raises(ValueError, match=r"^chunk_size:"):
        cfg.replace(chunk_size=-1)
    with pytest.raises(ValueError, match=r"^colour:"):
        cfg.replace(colour="red")


def test_budget_smaller_than_pinned_prefix_is_refused_at_pin_time():
    model_config = tiny_config("llama")
    cfg = EpisodeCacheConfig(policy="window", chunk_size=4, recent_chunks=1, max_tokens=20)
    cache = EpisodeCache(cfg, model_config)
    import torch

    k = torch.zeros(1, 2, 16, 8)
    for layer in range(model_config.num_hidden_layers):
        cache.update(k, k, layer)  # a 16-token prompt: 16 + (1 + 1) * 4 = 24 > 20
    with pytest.raises(
        ValueError, match=r"^max_tokens: 20 .*allowed values: 0 \(no budget\) or an int >= 24"
    ):
        cache.pin_prefix()
    cache.update_config(max_tokens=24)
    assert cache.pin_prefix() == 16
    with pytest.raises(ValueError, match=r"^max_tokens:"):
        cache.update_config(max_tokens=23)
    assert cache.config.max_tokens == 24


def test_zero_budget_is_no_budget_and_full_takes_none():
    """One meaning for "no budget" (0, as the node spells it, or None), and `full` never evicts, so
    the default budget does not apply to it rather than refusing a full-history run."""
    assert EpisodeCacheConfig(policy="window", max_tokens=0).max_tokens is None
    assert EpisodeCacheConfig(policy="full").max_tokens == 80
    assert EpisodeCacheConfig(policy="full").effective_max_tokens is None
    assert EpisodeCacheConfig(policy="window", max_tokens=64).effective_max_tokens == 64


def test_one_control_step_is_chunk_size_zero_resolved_once():
    cfg = EpisodeCacheConfig(policy="window")
    assert cfg.chunk_size == 0 and cfg.resolve(8).chunk_size == 8
    assert EpisodeCacheConfig(policy="window", chunk_size=5).resolve(8).chunk_size == 5  # explicit stays
    with pytest.raises(ValueError, match=r"^chunk_size: 0 means one control step"):
        EpisodeCache(cfg, tiny_config("llama"))


def test_none_forces_no_recent_chunks_and_window_no_sinks():
    assert EpisodeCacheConfig(policy="none", recent_chunks=3).effective_recent_chunks == 0
    assert EpisodeCacheConfig(policy="window", sink_tokens=4).effective_sink_tokens == 0
    assert EpisodeCacheConfig(policy="sinks", sink_tokens=4).effective_sink_tokens == 4


def test_registry_lists_every_policy():
    assert {"full", "none", "window", "sinks", "attention", "random", "gated"} <= set(POLICIES)
