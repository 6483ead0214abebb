"""Position modes: both equal DynamicCache without eviction; ``cache`` positions equal the
re-indexed references with eviction, stay bounded, and are refused where RoPE cannot move a key."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GPT2Config, LlamaConfig

from kv_vla.cache import EpisodeCache, EpisodeCacheConfig
from kv_vla.cache.testing import FAMILIES, run_episode, tiny_model
from kv_vla.cache.testing_positions import kept_sequence_logits, replay_logits

PROMPT = list(range(3, 13))
STEPS, OBS, DECODE = 30, 12, 3
CHUNK = OBS + DECODE
EVICTING = {
    "window": dict(recent_chunks=3),
    "sinks": dict(sink_tokens=4, recent_chunks=2),
    "random": dict(recent_chunks=1, max_tokens=100, seed=3),
    "gated": dict(recent_chunks=2, max_tokens=130, gate_threshold=0.45),
}
# the fast lane runs one policy per family; the slow lane every policy
POLICY_PARAMS = [p if p == "gated" else pytest.param(p, marks=pytest.mark.slow) for p in sorted(EVICTING)]
# Re-rotating a key composes two float32 rotations where the reference computes one: a few ulp
# per key, so float32 logits agree to this bound (not bit for bit).
BOUND = 1e-5


def _max_diff(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    assert len(got) == len(ref)
    return max((a - b).abs().max().item() for a, b in zip(got, ref))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["episode", "cache"])
def test_no_eviction_equals_dynamic_cache_exactly(tiny_models, family, mode):
    model = tiny_models(family)
    ref = run_episode(model, DynamicCache(config=model.config), PROMPT, 12, OBS, DECODE, seed=1)
    cache = EpisodeCache(EpisodeCacheConfig(policy="full", chunk_size=CHUNK, positions=mode), model.config)
    got = run_episode(model, cache, PROMPT, 12, OBS, DECODE, seed=1)
    assert got.ids == ref.ids
    for a, b in zip(got.logits, ref.logits):
        assert torch.equal(a, b)  # same kernels on the same tensors: nothing moved, nothing differs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICY_PARAMS)
def test_one_layer_cache_positions_equal_forward_of_kept_tokens(family, policy):
    """One layer: each forward equals an uncached forward of the kept ids + its block at 0.."""
    model = tiny_model(family, layers=1)
    cfg = EpisodeCacheConfig(policy=policy, chunk_size=CHUNK, positions="cache", **EVICTING[policy])
    cache = EpisodeCache(cfg, model.config)
    record = run_episode(model, cache, PROMPT, STEPS, OBS, DECODE, seed=1)
    assert cache.stats().evicted_tokens > 0
    assert _max_diff(record.logits, kept_sequence_logits(model, record)) <= BOUND


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICY_PARAMS)
def test_cache_positions_equal_replay_reference(tiny_models, family, policy):
    model = tiny_models(family)
    cfg = EpisodeCacheConfig(policy=policy, chunk_size=CHUNK, positions="cache", **EVICTING[policy])
    cache = EpisodeCache(cfg, model.config)
    record = run_episode(model, cache, PROMPT, STEPS, OBS, DECODE, seed=1)
    stats = cache.stats()
    assert stats.evicted_tokens > 0
    assert _max_diff(record.logits, replay_logits(model, record)) <= BOUND
    # the re-indexing really changed the outputs: the episode-position run differs
    episode = EpisodeCache(cfg.replace(positions="episode"), model.config)
    other = run_episode(model, episode, PROMPT, STEPS, OBS, DECODE, seed=1)
    assert _max_diff(other.logits[-5:], record.logits[-5:]) > 10 * BOUND


def test_positions_stay_bounded_in_cache_mode(tiny_models):
    model = tiny_models("llama")
    budget = 100
    maxima = {}
    for mode in ("episode", "cache"):
        cfg = EpisodeCacheConfig(
            policy="random", chunk_size=CHUNK, recent_chunks=1, max_tokens=budget, positions=mode
        )
        cache = EpisodeCache(cfg, model.config)
        run_episode(model, cache, PROMPT, 40, OBS, DECODE, seed=2)
        maxima[mode] = cache.stats().max_position
        assert cache.stats().kept_tokens <= budget
    assert maxima["episode"] == len(PROMPT) + 40 * CHUNK - 1
    assert maxima["cache"] < budget + OBS  # pinned + kept + one forward's block


def test_reset_and_update_config_switch_modes(tiny_models):
    model = tiny_models("qwen2")
    cfg = EpisodeCacheConfig(policy="window", chunk_size=CHUNK, recent_chunks=1)
    cache = EpisodeCache(cfg, model.config)
    run_episode(model, cache, PROMPT, 4, OBS, DECODE, seed=3)
    cache.update_config(positions="cache")  # mid-episode: applies from the next episode
    assert cache.position_mode == "episode"
    assert cache.get_seq_length() == len(PROMPT) + 4 * CHUNK
    cache.reset()
    assert cache.position_mode == "cache"
    run_episode(model, cache, PROMPT, 4, OBS, DECODE, seed=3)
    assert cache.get_seq_length() == cache.stats().kept_tokens == len(PROMPT) + CHUNK


def _refused(model_config, match: str, **kw) -> None:
    cfg = EpisodeCacheConfig(policy="window", chunk_size=CHUNK, positions="cache", **kw)
    with pytest.raises(ValueError, match=match):
        EpisodeCache(cfg, model_config)


def test_model_without_rope_is_refused_cache_positions():
    gpt2 = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96)
    _refused(gpt2, r"positions: 'cache' is not supported for model_type 'gpt2': it has no rotary")
    cache = EpisodeCache(EpisodeCacheConfig(policy="window", chunk_size=CHUNK), gpt2)  # episode: fine
    with pytest.raises(ValueError, match="positions"):
        cache.update_config(positions="cache")
    assert cache.config.positions == "episode"


def test_unsupported_rope_variants_are_refused():
    def llama(**kw):
        return LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, **kw)

    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    _refused(llama(rope_parameters=dynamic), "rope_type 'dynamic'")
    _refused(llama(partial_rotary_factor=0.5), "partial rotary")
    with pytest.raises(ValueError, match="positions: 'absolute' is not allowed; allowed values: episode, cache"):
        EpisodeCacheConfig(positions="absolute")


def test_quantised_storage_is_refused_cache_positions(tiny_models):
    model = tiny_models("llama")
    cfg = EpisodeCacheConfig(policy="zipvl", chunk_size=CHUNK, positions="cache")
    with pytest.raises(ValueError, match="re-rotated exactly"):
        EpisodeCache(cfg, model.config)


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0}, {"rope_type": "llama3", **LLAMA3}])
def test_scaled_rope_tables_match_replay(rope):
    params = {"rope_theta": 10000.0, **rope}
    model = tiny_model("llama", layers=2)
    config = model.config
    config.rope_parameters = params
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    cfg = EpisodeCacheConfig(policy="window", chunk_size=CHUNK, recent_chunks=2, positions="cache")
    cache = EpisodeCache(cfg, model.config)
    record = run_episode(model, cache, PROMPT, 10, OBS, DECODE, seed=4)
    assert _max_diff(record.logits, replay_logits(model, record)) <= BOUND
