"""The recurrent chunk gate: save/load, causal step == sequence forward, live threshold changes."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_logits_close

from kv_vla.cache import ChunkGate, EpisodeCache, EpisodeCacheConfig, GateConfig
from kv_vla.cache.testing import run_episode, tiny_config

CHUNK = 15


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gate_save_load_round_trip(tmp_path, cell):
    gate = ChunkGate.for_model(tiny_config("qwen2"), seed=4, cell=cell)
    x = torch.randn(9, gate.feature_dim)
    path = tmp_path / "gate" / "gate.safetensors"
    gate.save(path)
    assert path.exists() and path.with_suffix(".json").exists()
    loaded = ChunkGate.load(path)
    assert loaded.config == gate.config
    assert_logits_close(loaded(x), gate(x))  # loaded from disk: may round differently (MKL alignment)
    assert not list((tmp_path / "gate").glob("*.tmp"))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gate_step_equals_differentiable_forward(cell):
    gate = ChunkGate.for_model(tiny_config("llama"), seed=1, cell=cell)
    x = torch.randn(12, gate.feature_dim, requires_grad=True)
    utilities = gate(x)
    assert utilities.shape == (12,) and ((utilities > 0) & (utilities < 1)).all()
    state, stepped = None, []
    for row in x.detach():
        u, state = gate.step(row, state)
        stepped.append(u)
    assert torch.allclose(torch.stack(stepped), utilities.detach(), atol=1e-6)
    utilities.sum().backward()  # a trainer can backpropagate through a recorded episode
    assert x.grad is not None and gate.layer_proj.weight.grad is not None
    with pytest.raises(ValueError, match=r"^summaries:"):
        gate(torch.randn(3, gate.feature_dim + 1))
    with pytest.raises(ValueError, match=r"^cell:"):
        GateConfig(num_layers=2, head_dim=8, cell="rnn")


def test_feature_dim_follows_model_config():
    cfg = tiny_config("gemma", hidden=64, layers=2)  # head_dim 16
    gate = ChunkGate.for_model(cfg)
    assert gate.feature_dim == 2 * 4 * 16 + 2


def test_cache_utilities_are_the_gates_forward_over_chunk_summaries(tiny_models):
    model = tiny_models("llama")
    # no budget: every chunk is kept, so the kept chunks' summaries are the whole episode's
    cfg = EpisodeCacheConfig(
        policy="gated", chunk_size=CHUNK, recent_chunks=2, gate_threshold=0.0, max_tokens=None
    )
    cache = EpisodeCache(cfg, model.config)
    run_episode(model, cache, list(range(10)), 8, 12, 3)
    summaries = cache.chunk_summaries()
    assert summaries.shape == (8, cache.gate.feature_dim)
    expected = cache.gate(summaries)
    got = torch.tensor([c.utility for c in cache.chunks])
    assert torch.allclose(got, expected.detach(), atol=1e-6)


def test_threshold_change_takes_effect_at_next_decision(tiny_models):
    model = tiny_models("mistral")
    cfg = EpisodeCacheConfig(
        policy="gated", chunk_size=CHUNK, recent_chunks=1, gate_threshold=0.0, max_tokens=None
    )
    cache = EpisodeCache(cfg, model.config)
    gate = ChunkGate.for_model(model.config, seed=7)
    cache.set_gate(gate)
    run_episode(model, cache, list(range(10)), 6, 12, 3)
    assert cache.stats().evicted_chunks == 0  # threshold 0 keeps every chunk
    cache.update_config(gate_threshold=1.0)
    assert cache.stats().evicted_chunks == 0  # no decision yet
    # one more step (a chunk completes): every old chunk is now under the threshold
    gen_ids = [int(i) for i in torch.arange(12) + 20]
    pos = cache.get_seq_length()
    model(
        input_ids=torch.tensor([gen_ids]),
        position_ids=torch.arange(pos, pos + 12)[None],
        past_key_values=cache,
    )
    assert cache.stats().evicted_chunks == 0  # chunk still open
    pos += 12
    model(
        input_ids=torch.tensor([[1, 2, 3]]),
        position_ids=torch.arange(pos, pos + 3)[None],
        past_key_values=cache,
    )
    stats = cache.stats()
    assert stats.evicted_chunks == 6 and stats.kept_chunks == 1
    assert stats.kept_tokens == 10 + CHUNK


def test_stacked_layer_summaries_equal_one_layer_at_a_time():
    from kv_vla.cache.summary import layer_summary, layers_summary

    torch.manual_seed(0)
    buffers = [torch.randn(1, 2, 20, 8) for _ in range(3)]
    keys = [b[:, :, 4:12] for b in buffers]  # strided views, as a static layer's chunk columns
    values = [b[:, :, 5:13] * 2 for b in buffers]
    each = torch.cat([layer_summary(k, v) for k, v in zip(keys, values)])
    assert layers_summary(keys, values).shape == each.shape == (3 * 2 * (8 + 8),)
    torch.testing.assert_close(layers_summary(keys, values), each, rtol=0, atol=1e-6)
    # layers of different widths (no stacking) take the per-layer path, in layer order
    wide = [torch.randn(1, 2, 8, 16)]
    mixed = layers_summary(keys[:1] + wide, values[:1] + wide)
    torch.testing.assert_close(mixed, torch.cat([each[:32], layer_summary(wide[0], wide[0])]), rtol=0, atol=1e-6)
    # a chunk of the small bench preset's size, off-centre as real keys are: the two-pass
    # statistics of the stacked path agree with torch.std_mean's per layer
    big = [3.0 + 0.5 * torch.randn(1, 4, 283, 64) for _ in range(4)]
    reference = torch.cat([layer_summary(k, k * 2) for k in big])
    torch.testing.assert_close(layers_summary(big, [k * 2 for k in big]), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("positions", ["episode", "cache"])
def test_unrotated_summaries_read_the_keys_before_rope(positions):
    """``summary_keys="unrotated"``: every chunk's summary equals the one of the keys the model
    computed before applying RoPE (captured from ``k_proj``), in both position modes; the rotated
    summaries differ from them."""
    from kv_vla.cache.summary import layer_summary
    from kv_vla.cache.testing import tiny_model

    model = tiny_model("llama", seed=4)
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // 4
    pre_rope: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(
            lambda _m, _i, out, i=i: pre_rope[i].append(out.reshape(1, -1, heads, dim).transpose(1, 2))
        )
        for i, layer in enumerate(model.model.layers)
    ]
    cfg = EpisodeCacheConfig(policy="full", chunk_size=4, positions=positions)
    unrotated = EpisodeCache(cfg, model.config, record_summaries=True, summary_keys="unrotated")
    run_episode(model, unrotated, [1, 2, 3], 5, 3, 1, seed=2)
    for h in hooks:
        h.remove()
    rotated = EpisodeCache(cfg, model.config, record_summaries=True)
    run_episode(model, rotated, [1, 2, 3], 5, 3, 1, seed=2)
    got = unrotated.chunk_summaries()
    keys = [torch.cat(blocks, dim=2)[:, :, 3:] for blocks in pre_rope]  # after the 3 prompt tokens
    values = [layer.values[:, :, 3:] for layer in unrotated.layers]
    want = torch.stack(
        [
            torch.cat([layer_summary(k[:, :, 4 * c : 4 * c + 4], v[:, :, 4 * c : 4 * c + 4]) for k, v in zip(keys, values)])
            for c in range(got.shape[0])
        ]
    )
    assert got.shape[0] == 5
    torch.testing.assert_close(got[:, :-2], want, rtol=0, atol=1e-5)
    assert (rotated.chunk_summaries()[1:, :-2] - want[1:]).abs().max() > 1e-2  # RoPE moves them


def test_unrotated_summaries_are_refused_without_rope():
    from transformers import GPT2Config

    gpt2 = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96)
    cfg = EpisodeCacheConfig(policy="gated", chunk_size=4)
    with pytest.raises(ValueError, match=r"^summary_keys: 'unrotated' needs keys whose RoPE can be undone"):
        EpisodeCache(cfg, gpt2, summary_keys="unrotated")
    cache = EpisodeCache(cfg, gpt2)
    gate = ChunkGate(GateConfig(num_layers=2, head_dim=8, summary_keys="unrotated"))
    with pytest.raises(ValueError, match=r"^summary_keys: 'unrotated'"):
        cache.set_gate(gate)
    assert cache.gate is None  # refused: nothing changed
    with pytest.raises(ValueError, match=r"^summary_keys: 'sideways' is not allowed"):
        GateConfig(num_layers=2, head_dim=8, summary_keys="sideways")
