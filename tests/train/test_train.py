"""Behaviour cloning and gate training on tiny synthetic episodes (real model, real optimiser)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from kv_vla.train.bc import TrainConfig, train_bc
from kv_vla.train.data import collate, sample_step_visibility, tokenize_episodes
from kv_vla.train.gate import GateTrainConfig, gate_loss, train_gate
from kv_vla.train.model_parts import build_model, cache_vision_patches

TINY = {
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_layers": 1,
    "vision_num_heads": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@dataclass
class _Episode:
    frames: np.ndarray
    actions: np.ndarray
    instruction: str
    task: str
    seed: int
    success: bool = True


def _episodes(n: int, steps: int = 6) -> list[_Episode]:
    """A memory task in miniature: the first frame's colour decides every later action's sign."""
    rng = np.random.default_rng(0)
    eps = []
    for k in range(n):
        sign = 1.0 if k % 2 == 0 else -1.0
        frames = np.full((steps, 64, 64, 3), 90, dtype=np.uint8)
        frames[0, :, :, 0 if sign > 0 else 2] = 250  # the cue, shown once
        actions = np.zeros((steps, 4), dtype=np.float32)
        actions[:, 0] = sign * 0.8
        actions[:, 1] = rng.uniform(-0.2, 0.2, steps)
        actions[:, 3] = 1.0
        eps.append(_Episode(frames, actions, "touch the cube that was lit", "cued_reach", 1_000_000 + k))
    return eps


def test_visibility_keeps_recent_window_and_drops_whole_steps():
    gen = torch.Generator().manual_seed(0)
    vis = sample_step_visibility(3, 10, recent=2, drop_rates=[1.0], generator=gen)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    expected = (i - j <= 2) & (j <= i)
    assert torch.equal(vis[0] & (j <= i), expected)
    vis = sample_step_visibility(1, 10, recent=0, drop_rates=[0.0], generator=gen)
    assert vis[0][j <= i].all()


def test_short_bc_run_lowers_the_loss_and_resumes(tmp_path):
    eps = _episodes(8)
    cfg = TrainConfig(
        data=[],
        out=str(tmp_path / "run"),
        epochs=20,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=5,
        max_steps=10,
        model_overrides=TINY,
        device="cpu",
    )
    train_bc(cfg, episodes=eps)
    first = json.loads((tmp_path / "run" / "loss.json").read_text())["history"]
    assert len(first) == 10
    # resume from the step-10 checkpoint and continue to 40 updates
    cfg.max_steps = 40
    model_dir = train_bc(cfg, episodes=eps)
    hist = json.loads((tmp_path / "run" / "loss.json").read_text())["history"]
    assert [h["step"] for h in hist] == list(range(1, 41))  # nothing lost, nothing repeated
    assert hist[:10] == first
    early = np.mean([h["loss"] for h in hist[:4]])
    late = np.mean([h["loss"] for h in hist[-4:]])
    assert late < 0.6 * early, (early, late)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert (model_dir / "model.safetensors").exists()


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it calls ``os.system``, so loading it must be refused."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_resume_refuses_a_checkpoint_that_needs_unpickling_code(tmp_path, monkeypatch):
    """Resume reads a checkpoint with ``weights_only=True``: tensors, numbers and RNG tuples only, so
    a crafted checkpoint.pt cannot run code; it is refused and nothing ran."""
    import pickle

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"step": 1, "history": [], "payload": _RunsCodeWhenUnpickled()}, run / "checkpoint.pt")
    cfg = TrainConfig(data=[], out=str(run), max_steps=2, model_overrides=TINY, device="cpu")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train_bc(cfg, episodes=_episodes(2))
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_budget_bias_keeps_all_within_budget_and_makes_old_chunks_compete_over_it():
    from kv_vla.train.gate import budget_step_bias

    u = torch.tensor([0.9, 0.1, 0.1, 0.1, 0.5, 0.5], requires_grad=True)
    bias = budget_step_bias(u, recent=1, budget=2)
    # step 3 sees chunks 0 and 1 as old: two, within the budget, so both are fully kept
    assert torch.equal(bias[3], torch.zeros(6))
    # step 5 sees chunks 0-3 as old (utility mass 1.2): 0 keeps weight 1 (2 * 0.9 / 1.2 > 1), the
    # others share the rest; the recent chunks 4 and 5 are never biased
    expected = torch.log(torch.tensor([1.0, 2 * 0.1 / 1.2, 2 * 0.1 / 1.2, 2 * 0.1 / 1.2]))
    torch.testing.assert_close(bias[5, :4], expected)
    assert torch.equal(bias[5, 4:], torch.zeros(2))
    # competition: raising chunk 1's utility lowers chunk 2's weight at step 5
    (grad,) = torch.autograd.grad(bias[5, 2], u)
    assert grad[1] < 0 and grad[2] > 0
    with pytest.raises(ValueError, match="budget_chunks"):
        GateTrainConfig(model="m", data=[], out="x", budget_chunks=0).validate()


@pytest.mark.parametrize("budget_chunks", [None, 2])
def test_gate_training_lowers_its_objective(tmp_path, budget_chunks):
    eps = _episodes(6, steps=8)
    bc = TrainConfig(
        data=[],
        out=str(tmp_path / "bc"),
        epochs=30,
        batch_size=6,
        lr=3e-3,
        warmup_steps=2,
        max_steps=25,
        model_overrides=TINY,
        device="cpu",
        drop_rates=[0.0],
    )
    model_dir = train_bc(bc, episodes=eps)
    cfg = GateTrainConfig(
        model=str(model_dir),
        data=[],
        out=str(tmp_path / "gate"),
        epochs=15,
        lr=1e-2,
        sparsity=0.05,
        recent_chunks=1,
        device="cpu",
        hidden_size=16,
        budget_chunks=budget_chunks,
    )

    from kv_vla.cache import ChunkGate
    from kv_vla.model.compact import CompactVLA
    from kv_vla.train.gate import episode_summaries

    model = CompactVLA.from_pretrained(model_dir).eval()
    data = tokenize_episodes(model, eps)

    def objective(gate: ChunkGate) -> float:
        total = 0.0
        for ep in data:
            s = episode_summaries(model, ep)
            with torch.no_grad():
                full = model.forward_episode([ep.prompt_ids], ep.frames[None], ep.action_ids[None])
                teacher = torch.log_softmax(full.action_logits[0].float(), -1)
                total += float(gate_loss(model, gate, ep, s, teacher, cfg)[0])
        return total / len(data)

    untrained = ChunkGate.for_model(model.language_model.config, seed=cfg.seed, hidden_size=16)
    path = train_gate(cfg, episodes=eps)
    trained = ChunkGate.load(path)
    before, after = objective(untrained), objective(trained)
    assert after < before - 1e-3, (before, after)
    report = json.loads((tmp_path / "gate" / "gate_train.json").read_text())["meta"]
    assert "utility_by_task" in report


def test_invalid_train_config_is_refused():
    with pytest.raises(ValueError, match="drop_rates"):
        TrainConfig(data=[], out="x", drop_rates=[1.5]).validate()


@pytest.mark.parametrize("decoding", ["autoregressive", "parallel", "parallel_highlight"])
def test_gate_features_offline_equal_the_runtime_cache(decoding):
    """Gate training reads the chunk summaries a live episode cache computes: the offline pass over
    a recorded episode (``episode_summaries``) equals the runtime's own, for both action decodings."""
    from kv_vla.cache import EpisodeCacheConfig
    from kv_vla.model.compact import CompactVLA, CompactVLAConfig
    from kv_vla.model.prompt import build_prompt
    from kv_vla.runtime import EpisodeRuntime
    from kv_vla.train.data import EpisodeTensors
    from kv_vla.train.gate import episode_summaries

    torch.manual_seed(1)
    lit = decoding.endswith("_highlight")
    model = CompactVLA(
        CompactVLAConfig(**TINY, action_decoding=decoding.removesuffix("_highlight"), highlight=lit)
    ).eval()
    if lit:
        with torch.no_grad():
            model.highlight.weight.normal_(0, 0.5)
            model.highlight.bias.normal_(0, 0.5)
    frames = np.random.default_rng(3).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    step = model.num_image_tokens + model.action_dim
    rt = EpisodeRuntime(
        model, EpisodeCacheConfig(policy="gated", chunk_size=step, gate_threshold=0.0, max_tokens=None)
    )  # no eviction: the offline pass sees every chunk
    instruction = "touch the cube that was lit"
    rt.reset(instruction)
    ids = [torch.as_tensor(rt.step(f).action_token_ids) for f in frames]
    online = rt.cache.chunk_summaries()
    ep = EpisodeTensors(
        model.prompt_ids(build_prompt(instruction))[0], frames, torch.stack(ids), "cued_reach", 0
    )
    torch.testing.assert_close(episode_summaries(model, ep), online, atol=1e-5, rtol=1e-4)


def test_fine_tuning_into_highlight_keeps_every_trained_weight_and_refuses_shape_changes():
    """``--init`` with ``--model-config '{"highlight": true}'``: the rebuilt model has the trained
    weights and a zero-gain highlight, so it computes exactly what the trained model did; a change
    that would resize
    trained weights, or an unknown field, is refused with the reason."""
    from kv_vla.model.compact import CompactVLA, CompactVLAConfig
    from kv_vla.model.prompt import build_prompt
    from kv_vla.train.model_parts import with_overrides

    torch.manual_seed(2)
    trained = CompactVLA(CompactVLAConfig(**TINY, action_decoding="parallel")).eval()
    lit = with_overrides(trained, {"highlight": True}).eval()
    assert lit.config.highlight and not trained.config.highlight
    frame = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    ids = lit.prompt_ids(build_prompt("reach the red cube"))
    with torch.no_grad():
        assert torch.equal(
            lit.embed_image(frame, lit.instruction_condition(ids)), trained.embed_image(frame)
        )
    with pytest.raises(ValueError, match="shape"):
        with_overrides(trained, {"hidden_size": 2 * trained.config.hidden_size})
    with pytest.raises(ValueError, match="not a CompactVLAConfig field"):
        with_overrides(trained, {"flim": True})


def _named_target_episodes(n: int, steps: int = 5) -> list[_Episode]:
    """An instruction-named task in miniature: identical frames, the colour word decides the sign."""
    eps = []
    for k in range(n):
        colour, sign = ("red", 1.0) if k % 2 == 0 else ("blue", -1.0)
        frames = np.full((steps, 64, 64, 3), 90, dtype=np.uint8)
        actions = np.zeros((steps, 4), dtype=np.float32)
        actions[:, 0] = sign * 0.8
        actions[:, 3] = 1.0
        eps.append(_Episode(frames, actions, f"reach the {colour} cube", "reach", 2_000_000 + k))
    return eps


def test_frozen_vision_fine_tune_keeps_the_backbone_and_lowers_the_loss(tmp_path):
    """``--init M --freeze-vision``: the backbone's features are computed once, its weights stay
    bit-identical, the projector moves, the loss falls."""
    from kv_vla.model.compact import CompactVLA

    eps = _named_target_episodes(8)
    base = TrainConfig(
        data=[],
        out=str(tmp_path / "base"),
        epochs=5,
        batch_size=4,
        max_steps=2,
        model_overrides=TINY | {"action_decoding": "parallel"},
        device="cpu",
    )
    base_dir = train_bc(base, episodes=eps)
    cfg = TrainConfig(
        data=[],
        out=str(tmp_path / "frozen"),
        epochs=40,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        max_steps=40,
        init_from=str(base_dir),
        freeze_vision=True,
        film_lr_mult=3.0,
        device="cpu",
        drop_rates=[0.0],
    )
    frozen_dir = train_bc(cfg, episodes=eps)
    before, after = CompactVLA.from_pretrained(base_dir), CompactVLA.from_pretrained(frozen_dir)
    for name, weight in before.vision.state_dict().items():
        assert torch.equal(weight, after.vision.state_dict()[name]), name
    assert not torch.equal(before.projector.fc1.weight, after.projector.fc1.weight)
    hist = json.loads((tmp_path / "frozen" / "loss.json").read_text())["history"]
    early = np.mean([h["loss"] for h in hist[:4]])
    late = np.mean([h["loss"] for h in hist[-4:]])
    assert late < 0.7 * early, (early, late)
    with pytest.raises(ValueError, match="init_from"):
        TrainConfig(data=[], out="x", freeze_vision=True).validate()
    with pytest.raises(ValueError, match="film_lr_mult"):
        TrainConfig(data=[], out="x", film_lr_mult=0.0).validate()


def test_forward_on_cached_vision_patches_equals_the_forward_on_frames():
    """The frozen-backbone path feeds precomputed patch features; its logits equal the usual pass."""
    from kv_vla.model.compact import CompactVLA, CompactVLAConfig

    torch.manual_seed(4)
    model = CompactVLA(CompactVLAConfig(**TINY, action_decoding="parallel")).eval()
    data = tokenize_episodes(model, _named_target_episodes(2))
    _assert_cached_patches_give_the_frames_logits(model, data)


def _assert_cached_patches_give_the_frames_logits(model, data) -> None:
    """Cache the episodes' backbone features, then check the pass over them equals the one over frames."""
    cache_vision_patches(model, data)
    b = collate(data)
    with torch.no_grad():
        ref = model.forward_episode(b["prompt_ids"], b["frames"], b["action_ids"])
        cached = model.forward_episode(
            b["prompt_ids"], None, b["action_ids"], vision_patches=b["vision_patches"].float()
        )
    torch.testing.assert_close(cached.action_logits, ref.action_logits, atol=2e-3, rtol=1e-3)


def _shown_target_episodes(n: int, steps: int = 3) -> list[_Episode]:
    """Frames that draw the seed's first target cube as a bright square where it lies."""
    from kv_vla_sim.tasks import first_target_xy

    eps = []
    for k in range(n):
        seed = 3_000_000 + k
        x, y = ((first_target_xy("reach", seed) + 1) / 2 * 52).astype(int)
        frames = np.full((steps, 64, 64, 3), 60, dtype=np.uint8)
        frames[:, x : x + 12, y : y + 12] = 250
        actions = np.zeros((steps, 4), dtype=np.float32)
        actions[:, 3] = 1.0
        eps.append(_Episode(frames, actions, "reach the red cube", "reach", seed))
    return eps


def test_target_aux_loss_is_logged_lowered_and_checkpointed(tmp_path):
    """``--target-aux``: frame 0's image tokens learn to say where the first target cube is (labels
    from the task's seed); the head's state is in the checkpoint so a resumed run keeps it."""
    eps = _shown_target_episodes(16)
    cfg = TrainConfig(
        data=[],
        out=str(tmp_path / "run"),
        epochs=100,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        max_steps=80,
        model_overrides=TINY | {"action_decoding": "parallel"},
        target_aux=1.0,
        device="cpu",
        drop_rates=[0.0],
        checkpoint_every=20,
        shift_pad=0,
    )
    train_bc(cfg, episodes=eps)
    hist = json.loads((tmp_path / "run" / "loss.json").read_text())["history"]
    mse = [h["target_mse"] for h in hist]
    assert np.mean(mse[-10:]) < 0.5 * np.mean(mse[:5]), mse
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["target_head"] is not None and "net.0.weight" in state["target_head"]
    with pytest.raises(ValueError, match="target_aux"):
        TrainConfig(data=[], out="x", target_aux=-1.0).validate()


def test_target_aux_of_an_ordered_highlight_model_names_both_targets(tmp_path):
    """A model with two ordered highlight slots gets the two-target label (first, then second cube)
    so its second slot is asked for touch_sequence's second cube; the saved model keeps the slots.
    A late_cued_reach episode (no label: frame 0 does not show its cue) in every batch leaves the
    loss of the labelled ones on (a NaN label row would make the logged error NaN). With
    --freeze-vision the highlight is frozen with the backbone (its pixels feed the cached features)
    and only the rest learns."""
    eps = _shown_target_episodes(4)
    late = eps[0]
    eps.append(_Episode(late.frames, late.actions, "touch the cube that was lit", "late_cued_reach", 5))
    model = build_model(eps, TINY | {"highlight": True, "highlight_slots": 2}, seed=0)
    b = collate(tokenize_episodes(model, eps))
    assert b["target_valid"].tolist() == [True] * 4 + [False] and torch.isnan(b["target_xy"][4]).all()
    cfg = TrainConfig(
        data=[],
        out=str(tmp_path / "run"),
        epochs=5,
        batch_size=5,
        warmup_steps=1,
        max_steps=3,
        model_overrides=TINY | {"action_decoding": "parallel", "highlight": True, "highlight_slots": 2},
        target_aux=1.0,
        device="cpu",
        drop_rates=[0.0],
        shift_pad=0,
    )
    train_bc(cfg, episodes=eps)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["target_head"]["net.2.weight"].shape[0] == 4
    hist = json.loads((tmp_path / "run" / "loss.json").read_text())["history"]
    assert len(hist) == 3 and all(np.isfinite(h["target_mse"]) for h in hist)
    from kv_vla.model.compact import CompactVLA

    assert CompactVLA.from_pretrained(tmp_path / "run" / "model").config.highlight_slots == 2
    frozen = replace(cfg, out=str(tmp_path / "frozen"), init_from=str(tmp_path / "run" / "model"))
    frozen_dir = train_bc(replace(frozen, freeze_vision=True, model_overrides={}, target_aux=0.0), episodes=eps)
    before, after = CompactVLA.from_pretrained(tmp_path / "run" / "model"), CompactVLA.from_pretrained(frozen_dir)
    for part in ("vision", "highlight", "film_words"):
        for name, weight in getattr(before, part).state_dict().items():
            assert torch.equal(weight, getattr(after, part).state_dict()[name]), (part, name)
    assert not torch.equal(before.projector.fc1.weight, after.projector.fc1.weight)


def test_cached_patches_of_a_frozen_highlight_model_equal_the_forward_on_frames():
    """A highlight model's cached features are of each episode's highlighted pixels, so the frozen
    path's logits equal the pass over frames; with the highlight trainable they are refused."""
    from kv_vla.model.compact import CompactVLA, CompactVLAConfig
    from kv_vla.train.model_parts import freeze_vision_path

    torch.manual_seed(5)
    config = CompactVLAConfig(**TINY, action_decoding="parallel", highlight=True, highlight_slots=2)
    model = CompactVLA(config).eval()
    with torch.no_grad():
        # not the identity: per slot b = 2 and a = 0.5 light every pixel, the weights vary it
        model.highlight.weight.normal_(0.0, 0.5)
        model.highlight.bias.view(2, -1)[:, 3] = 2.0
        model.highlight.bias.view(2, -1)[:, 4:] = 0.5
    data = tokenize_episodes(model, _named_target_episodes(2))
    b = collate(data)
    with pytest.raises(ValueError, match="trainable highlight"):
        model.forward_episode(b["prompt_ids"], None, b["action_ids"], vision_patches=torch.zeros(2, 5, 64, 8))
    freeze_vision_path(model)
    _assert_cached_patches_give_the_frames_logits(model, data)
    with torch.no_grad():
        plain = [
            model.vision_patches(model.pixel_values(torch.as_tensor(e.frames))).float() for e in data
        ]
    # the highlight changed the features: caching plain frames would have been wrong
    assert max((e.patches.float() - q).abs().max().item() for e, q in zip(data, plain)) > 1e-2


def test_position_gaps_shift_later_steps_and_equal_a_longer_episode():
    """A position gap moves every step after the split by whole steps; the logits of a short
    episode with a gap of g steps equal those of the same steps placed g steps later, which is what
    the augmentation claims (rotary positions: only relative distances count), and malformed
    offsets are refused."""
    from kv_vla.model.compact import CompactVLA, CompactVLAConfig
    from kv_vla.train.data import sample_position_gaps

    gen = torch.Generator().manual_seed(0)
    valid = torch.ones(64, 10, dtype=torch.bool)
    valid[0, 6:] = False
    off = sample_position_gaps(valid, 5, 8, gen)
    assert off.shape == (64, 10) and (off[:, 0] == 0).all() and (off.diff(dim=1) >= 0).all()
    assert set((off % 8).unique().tolist()) == {0} and int(off.max()) <= 40
    shifted = off.amax(1) > 0
    assert 10 < int(shifted.sum()) < 54  # about half the episodes
    torch.manual_seed(6)
    model = CompactVLA(CompactVLAConfig(**TINY, action_decoding="parallel")).eval()
    data = tokenize_episodes(model, _named_target_episodes(1, steps=4))
    b = collate(data)
    per_step = model.config.num_image_tokens + model.config.action_dim
    gap = torch.tensor([[0, 0, 3 * per_step, 3 * per_step]])
    with torch.no_grad():
        out = model.forward_episode(b["prompt_ids"], b["frames"], b["action_ids"], step_position_offset=gap)
        # the same steps, with the history they see masked so that the gap holds no tokens: the
        # later steps of a 7-step episode whose steps 2-4 are hidden from everything
        frames = np.concatenate([b["frames"][:, :2], b["frames"][:, :3], b["frames"][:, 2:]], axis=1)
        ids = torch.cat([b["action_ids"][:, :2], b["action_ids"][:, :3], b["action_ids"][:, 2:]], dim=1)
        keep = torch.ones(1, 7, 7, dtype=torch.bool)
        keep[:, :, 2:5] = False
        longer = model.forward_episode(b["prompt_ids"], frames, ids, step_keep=keep)
    torch.testing.assert_close(out.action_logits[:, :2], longer.action_logits[:, :2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.action_logits[:, 2:], longer.action_logits[:, 5:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="non-decreasing"):
        model.forward_episode(
            b["prompt_ids"], b["frames"], b["action_ids"], step_position_offset=torch.tensor([[0, 8, 0, 8]])
        )
