"""EpisodeRuntime on a tiny random compact VLA: conditioning, determinism, every cache policy,
input validation, save/load, and equality with the whole-episode (training) forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numerics import assert_logits_close, assert_same_argmax

from kv_vla.cache import POLICIES, EpisodeCacheConfig
from kv_vla.model import CompactVLA, CompactVLAConfig, build_prompt
from kv_vla.runtime import EpisodeRuntime

STEP = 20  # 16 image tokens + 4 action tokens
# Full history, one control step per chunk: the reference these tests compare against. The default
# (the evaluated setting: gated at an 80-token budget) is sized for the shipped model, not this one.
FULL = EpisodeCacheConfig(policy="full")
INSTR = "touch the cube that was lit at the start"


def make_model(seed: int = 0) -> CompactVLA:
    torch.manual_seed(seed)
    return CompactVLA(CompactVLAConfig.tiny()).eval()


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


def run(rt: EpisodeRuntime, fr: np.ndarray, instruction: str = INSTR):
    rt.reset(instruction)
    results, logits = [], []
    for f in fr:
        results.append(rt.step(f))
        logits.append(rt.last_action_logits.clone())
    return results, torch.stack(logits)


@pytest.fixture(scope="module")
def model() -> CompactVLA:
    return make_model()


def test_step_result_fields(model):
    rt = EpisodeRuntime(model, FULL)
    res, logits = run(rt, frames(2, 0))
    r = res[-1]
    assert r.action.shape == (4,) and r.action.dtype == np.float32
    assert np.all(np.abs(r.action) <= 1.0)
    assert set(r.timings_ms) >= {"vision", "prefill", "decode", "total"}
    assert logits.shape == (2, 4, 256)
    prompt_len = model.prompt_ids(build_prompt(INSTR)).shape[1]
    assert r.cache_stats.seen_tokens == prompt_len + 2 * STEP
    # the action is the un-normalised argmax bin of each dim
    bins = logits[-1].argmax(-1).numpy()
    np.testing.assert_allclose(r.action, model.action_tokenizer.decode_bin_index(bins))
    assert np.array_equal(r.action_token_ids, bins + model.action_tokenizer.action_token_begin_idx)


def test_actions_are_the_unnormalised_clipped_bins():
    """The runtime's per-bin action table gives exactly OpenVLA's un-normalisation of the decoded
    bins, clipped to the dataset's range, with a masked (un-normalised) dimension passed through."""
    from kv_vla.model.action_tokenizer import compute_norm_stats, unnormalize_actions

    rng = np.random.default_rng(1)
    acts = rng.normal(size=(200, 4)) * np.array([0.3, 2.0, 5.0, 1.0]) + np.array([0.1, -1.0, 3.0, 0.0])
    torch.manual_seed(0)
    stats = {"demo": compute_norm_stats(acts, mask=[True, True, True, False])}
    model = CompactVLA(CompactVLAConfig.tiny(), norm_stats=stats).eval()
    rt = EpisodeRuntime(model, FULL)
    results, _ = run(rt, frames(6, 3))
    tok = model.action_tokenizer
    for r in results:
        normalized = tok.decode(r.action_token_ids)
        want = np.clip(unnormalize_actions(normalized[None], stats)[0], rt.action_low, rt.action_high)
        np.testing.assert_array_equal(r.normalized_action, normalized)
        np.testing.assert_array_equal(r.action, want.astype(np.float32))
        assert r.action.dtype == np.float32 and r.normalized_action.dtype == np.float32


def test_frames_and_instructions_change_the_logits(model):
    rt = EpisodeRuntime(model, FULL)
    _, a = run(rt, frames(1, 0))
    _, b = run(rt, frames(1, 1))
    _, c = run(rt, frames(1, 0), "push the blue cube to the green zone")
    assert (a - b).abs().max() > 1e-4
    assert (a - c).abs().max() > 1e-4


def test_deterministic_for_a_seed():
    fr = frames(6, 3)
    cfg = EpisodeCacheConfig(policy="random", chunk_size=STEP, recent_chunks=1, max_tokens=100, seed=7)
    r1, l1 = run(EpisodeRuntime(make_model(5), cfg), fr)
    r2, l2 = run(EpisodeRuntime(make_model(5), cfg), fr)
    assert torch.equal(l1, l2)
    assert [r.cache_stats for r in r1] == [r.cache_stats for r in r2]
    # the same runtime reset twice gives the same episode
    rt = EpisodeRuntime(make_model(5), cfg)
    _, l3 = run(rt, fr)
    _, l4 = run(rt, fr)
    assert torch.equal(l3, l4) and torch.equal(l1, l3)


def _policy_config(policy: str, prompt_len: int) -> EpisodeCacheConfig:
    cls = POLICIES[policy]
    kw = dict(policy=policy, chunk_size=STEP, recent_chunks=2, seed=1)
    if cls.uses_sinks:
        kw["sink_tokens"] = 4
    kw["max_tokens"] = prompt_len + 4 + 6 * STEP if cls.allows_budget else None
    return EpisodeCacheConfig(**kw)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_runs_a_50_step_episode(model, policy):
    prompt_len = model.prompt_ids(build_prompt(INSTR)).shape[1]
    cfg = _policy_config(policy, prompt_len)
    rt = EpisodeRuntime(model, cfg)
    rt.reset(INSTR)
    rng = np.random.default_rng(0)
    for t in range(50):
        res = rt.step(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
        own = rt.cache.stats()
        assert res.cache_stats == own
        assert own.seen_tokens == prompt_len + (t + 1) * STEP
        assert own.kept_tokens + own.evicted_tokens == own.seen_tokens
        assert rt.cache.layers[0].held_tokens() == own.kept_tokens
        if cfg.max_tokens is not None:
            assert own.kept_tokens <= cfg.max_tokens
        assert np.all(np.isfinite(res.action))
    final = rt.cache.stats()
    lm_cfg = model.language_model.config
    full_bytes = (
        final.seen_tokens * 2 * lm_cfg.num_hidden_layers * lm_cfg.num_key_value_heads * lm_cfg.head_dim * 4
    )
    if policy == "full":
        assert final.evicted_tokens == 0 and final.kv_bytes == full_bytes
    elif policy == "none":
        assert final.kept_tokens < prompt_len + 2 * STEP
    else:  # every other policy evicts or compresses something in 50 steps under this budget
        assert final.evicted_tokens > 0 or final.kv_bytes < full_bytes


def test_update_cache_config_is_validated_and_applied(model):
    cfg = EpisodeCacheConfig(policy="gated", chunk_size=STEP, gate_threshold=0.5, max_tokens=None)
    rt = EpisodeRuntime(model, cfg)
    rt.reset(INSTR)
    rt.step(frames(1, 0)[0])
    with pytest.raises(ValueError, match="gate_threshold"):
        rt.update_cache_config(gate_threshold=2.0)
    assert rt.cache_config.gate_threshold == 0.5 and rt.cache.config.gate_threshold == 0.5
    rt.update_cache_config(gate_threshold=0.2)
    assert rt.cache_config.gate_threshold == 0.2 and rt.cache.config.gate_threshold == 0.2
    rt.step(frames(1, 1)[0])
    rt.reset(INSTR)  # later episodes keep the new value
    assert rt.cache.config.gate_threshold == 0.2


BAD_INPUTS = [
    (np.zeros((64, 64, 3), dtype=np.float32), "dtype"),
    (np.zeros((64, 64, 2), dtype=np.uint8), "channels"),
    (np.zeros((0, 64, 3), dtype=np.uint8), "empty"),
    (np.zeros((1, 64, 64, 3), dtype=np.uint8), "HxWx3"),
    ([[0, 0, 0]], "numpy"),
    (torch.zeros(64, 64, 3, dtype=torch.uint8), "numpy"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_INPUTS)
def test_bad_input_raises_and_episode_continues(model, bad, reason):
    fr = frames(3, 9)
    ref = EpisodeRuntime(model, FULL)
    ref_res, ref_logits = run(ref, fr)
    rt = EpisodeRuntime(model, FULL)
    rt.reset(INSTR)
    rt.step(fr[0])
    before = rt.cache.stats()
    with pytest.raises(ValueError, match=reason):
        rt.step(bad)
    assert rt.cache.stats() == before
    rt.step(fr[1])
    res = rt.step(fr[2])
    assert torch.equal(rt.last_action_logits, ref_logits[2])
    assert res.cache_stats == ref_res[2].cache_stats
    np.testing.assert_array_equal(res.action, ref_res[2].action)


def test_step_before_reset_and_empty_instruction(model):
    rt = EpisodeRuntime(model, FULL)
    with pytest.raises(RuntimeError, match="reset"):
        rt.step(frames(1, 0)[0])
    with pytest.raises(ValueError, match="empty"):
        rt.reset("   ")


def test_other_image_sizes_and_formats_are_converted(model):
    rt = EpisodeRuntime(model, FULL)
    big = np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    rt.reset(INSTR)
    rt.step(big)
    rgba = np.concatenate([frames(1, 0)[0], np.full((64, 64, 1), 255, np.uint8)], axis=2)
    _, l_rgba = run(rt, rgba[None])
    _, l_rgb = run(rt, frames(1, 0))
    assert torch.equal(l_rgba, l_rgb)
    rt.reset(INSTR)
    rt.step(np.zeros((64, 64), dtype=np.uint8))  # greyscale


def test_save_load_reproduces_runtime_outputs(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    fr = frames(4, 2)
    cfg = EpisodeCacheConfig(policy="window", chunk_size=STEP, recent_chunks=1)
    _, l1 = run(EpisodeRuntime(model, cfg), fr)
    _, l2 = run(EpisodeRuntime.from_pretrained(tmp_path / "m", cache_config=cfg), fr)
    # a model loaded from disk may round differently (MKL alignment): logits within the bound, and
    # the same action bins except at near ties
    assert_logits_close(l2, l1)
    assert_same_argmax(l2, l1)


def test_gate_path_loads_a_saved_gate(model, tmp_path):
    from kv_vla.cache import ChunkGate

    model.save_pretrained(tmp_path / "m")
    gate = ChunkGate.for_model(model.language_model.config, seed=3)
    gate.save(tmp_path / "gate.pt")
    cfg = EpisodeCacheConfig(policy="gated", chunk_size=STEP, max_tokens=None)
    rt = EpisodeRuntime.from_pretrained(tmp_path / "m", cache_config=cfg, gate_path=tmp_path / "gate.pt")
    rt.reset(INSTR)
    sd = rt.cache.gate.state_dict()
    assert all(torch.equal(v, gate.state_dict()[k]) for k, v in sd.items())


def _visibility_from_runtime(rt: EpisodeRuntime, fr: np.ndarray, prompt_len: int):
    """Run the episode and record which earlier steps each step could attend to when it started."""
    rt.reset(INSTR)
    n = len(fr)
    vis = torch.zeros(n, n, dtype=torch.bool)
    logits = []
    for i, f in enumerate(fr):
        kept = rt.cache.kept_positions()
        steps_kept = {int(p - prompt_len) // STEP for p in kept if p >= prompt_len}
        for j in range(i):
            vis[i, j] = j in steps_kept
        rt.step(f)
        logits.append(rt.last_action_logits.clone())
    return torch.stack(logits), vis


@pytest.fixture(scope="module")
def parallel_model() -> CompactVLA:
    torch.manual_seed(3)
    model = CompactVLA(CompactVLAConfig.tiny(action_decoding="parallel")).eval()
    with torch.no_grad():  # queries far from zero, so a wrong slot/offset cannot agree by accident
        model.action_queries.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def highlight_model() -> CompactVLA:
    torch.manual_seed(4)
    model = CompactVLA(CompactVLAConfig.tiny(action_decoding="parallel", highlight=True)).eval()
    with torch.no_grad():  # trained-looking conditioning (zero-initialised, it would be a no-op)
        model.action_queries.normal_(0, 1.0)
        model.highlight.weight.normal_(0, 0.5)
        model.highlight.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def ordered_highlight_model() -> CompactVLA:
    torch.manual_seed(5)
    config = CompactVLAConfig.tiny(action_decoding="parallel", highlight=True, highlight_slots=2)
    model = CompactVLA(config).eval()
    with torch.no_grad():
        model.action_queries.normal_(0, 1.0)
        model.highlight.weight.normal_(0, 0.5)
        model.highlight.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("decoding", ["autoregressive", "parallel", "parallel_highlight", "parallel_ordered"])
@pytest.mark.parametrize("policy", ["full", "window", "random"])
def test_runtime_equals_full_sequence_forward(
    model, parallel_model, highlight_model, ordered_highlight_model, policy, decoding
):
    """The step-by-step cached runtime and the one-pass training forward agree (with eviction: the
    training pass masks the same evicted steps), tying the runtime and training paths together;
    for autoregressive and parallel (OpenVLA-OFT) action decoding, with one colour-highlight
    conditioning, and with two ordered highlights (the shipped model's)."""
    model = {
        "autoregressive": model,
        "parallel": parallel_model,
        "parallel_highlight": highlight_model,
        "parallel_ordered": ordered_highlight_model,
    }[decoding]
    prompt_ids = model.prompt_ids(build_prompt(INSTR))[0]
    prompt_len = prompt_ids.numel()
    kw = {"max_tokens": prompt_len + 3 * STEP} if policy == "random" else {}
    cfg = EpisodeCacheConfig(policy=policy, chunk_size=STEP, recent_chunks=1, seed=2, **kw)
    fr = frames(6, 11)
    rt = EpisodeRuntime(model, cfg)
    rt_logits, vis = _visibility_from_runtime(rt, fr, prompt_len)
    if policy == "full":
        assert vis[-1, :-1].all()
    else:
        assert not vis[-1, :-1].all()  # something really was evicted before the last step
    action_ids = torch.tensor(np.stack([rt_logits[t].argmax(-1).numpy() for t in range(len(fr))]))
    action_ids = action_ids + model.action_tokenizer.action_token_begin_idx
    with torch.no_grad():
        ref = model.forward_episode(
            [prompt_ids], fr[None], action_ids[None], step_keep=vis[None]
        ).action_logits[0]
    torch.testing.assert_close(rt_logits, ref, atol=2e-5, rtol=1e-4)
    assert_same_argmax(rt_logits, ref, atol=2e-5)  # cached steps vs one training pass: other kernels


def test_parallel_decoding_is_one_forward_and_ignores_labels(parallel_model):
    """Parallel slots: the training logits do not depend on the label ids fed in (no ground truth
    in the context), and a runtime step runs the decoder once (not once per action dim)."""
    prompt_ids = parallel_model.prompt_ids(build_prompt(INSTR))[0]
    fr = frames(4, 5)
    begin = parallel_model.action_tokenizer.action_token_begin_idx
    a = torch.randint(0, 256, (1, 4, 4)) + begin
    b = torch.randint(0, 256, (1, 4, 4)) + begin
    with torch.no_grad():
        la = parallel_model.forward_episode([prompt_ids], fr[None], a).action_logits
        lb = parallel_model.forward_episode([prompt_ids], fr[None], b).action_logits
    assert torch.equal(la, lb)
    rt = EpisodeRuntime(parallel_model, FULL)
    rt.reset(INSTR)
    calls = []
    hook = parallel_model.language_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        res = rt.step(fr[0])
    finally:
        hook.remove()
    assert len(calls) == 1
    assert rt.cache.stats().kept_tokens == prompt_ids.numel() + STEP  # 16 frame + 4 slot tokens
    assert res.action.shape == (4,)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        EpisodeRuntime.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="adapters"):
        EpisodeRuntime.from_pretrained(tmp_path)


def test_refused_reset_keeps_the_running_episode(model):
    rt = EpisodeRuntime(
        model, EpisodeCacheConfig(policy="window", chunk_size=STEP, recent_chunks=1, max_tokens=60)
    )
    rt.reset("go")  # short prompt: fits the budget
    rt.step(frames(1, 0)[0])
    before = rt.cache.stats()
    with pytest.raises(ValueError, match="max_tokens"):
        rt.reset("push the blue cube to the green zone then touch the yellow cube that was lit at the start")
    assert rt.cache.stats() == before and rt.instruction == "go"
    rt.step(frames(1, 1)[0])


def test_attention_policy_survives_a_shared_model(model):
    """A runtime with another policy on the same model object must not starve the attention probe."""
    prompt_len = model.prompt_ids(build_prompt(INSTR)).shape[1]
    cfg = _policy_config("attention", prompt_len)
    alone = EpisodeRuntime(make_model(), cfg)  # same weights, its own model object
    att = EpisodeRuntime(model, cfg)
    full = EpisodeRuntime(model, FULL)
    for rt in (alone, att, full):
        rt.reset(INSTR)
    for f in frames(12, 4):
        full.step(f)  # switches the shared model back to plain SDPA
        res = att.step(f)  # must switch the probe on again before its forward
        ref = alone.step(f)
        assert res.cache_stats == ref.cache_stats
        assert torch.equal(att.cache.kept_positions(), alone.cache.kept_positions())
    assert res.cache_stats.evicted_chunks > 0
