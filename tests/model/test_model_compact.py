"""The compact VLA: construction, tokenizer, save/load, and the whole-episode training path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from numerics import assert_logits_close

from kv_vla.model import CompactVLA, CompactVLAConfig, build_prompt
from kv_vla.model.text_tokenizer import DEFAULT_WORDS, build_text_tokenizer


def make_model(seed: int = 0, **overrides) -> CompactVLA:
    torch.manual_seed(seed)
    return CompactVLA(CompactVLAConfig.tiny(**overrides)).eval()


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


def test_default_size_and_layout():
    torch.manual_seed(0)
    m = CompactVLA(CompactVLAConfig())
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params < 5_000_000
    assert m.num_image_tokens == 16 and m.action_dim == 4 and m.config.step_tokens == 20
    # action ids = last 256 ids of the decoder vocabulary
    vocab = m.language_model.config.vocab_size
    assert m.action_tokenizer.action_token_begin_idx == vocab - 256
    assert len(m.tokenizer) == vocab
    assert m.embed_image(frames(1, 0)[0]).shape == (1, 16, 192)


def test_tokenizer_covers_prompt_and_instructions():
    tok = build_text_tokenizer(DEFAULT_WORDS)
    text = build_prompt("Touch the cube that was lit at the start, then push the blue one to the green zone")
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids
    assert tok("frobnicate the cube").input_ids[1] == tok.unk_token_id


def test_save_load_round_trip_is_exact(tmp_path):
    m = make_model(3)
    m.norm_stats = {
        "demo": {"action": {"q01": [-0.5] * 4, "q99": [0.5] * 4, "mask": [True, True, True, False]}}
    }
    m.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "norm_stats.json"} <= files
    assert json.loads((tmp_path / "ckpt" / "norm_stats.json").read_text()) == m.norm_stats
    m2 = CompactVLA.from_pretrained(tmp_path / "ckpt").eval()
    assert m2.norm_stats == m.norm_stats
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)  # the stored bits come back exactly
    f = frames(1, 1)[0]
    with torch.no_grad():  # a reloaded model may round differently (MKL alignment): stated bound
        assert_logits_close(m2.embed_image(f), m.embed_image(f))
    # saving again over an existing folder replaces it atomically
    m2.save_pretrained(tmp_path / "ckpt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        CompactVLA.from_pretrained(tmp_path / "nope")


def _episode_inputs(m: CompactVLA, n_steps: int, seed: int, instruction: str = "touch the red cube"):
    rng = np.random.default_rng(seed)
    ids = m.prompt_ids(build_prompt(instruction))[0]
    acts = rng.uniform(-1, 1, size=(n_steps, m.action_dim))
    act_ids = torch.as_tensor(m.action_tokenizer.encode(acts))
    return ids, frames(n_steps, seed), act_ids


def test_forward_episode_loss_and_shapes():
    m = make_model()
    ids, fr, act = _episode_inputs(m, 3, 0)
    out = m.forward_episode([ids], fr[None], act[None])
    assert out.action_logits.shape == (1, 3, 4, 256)
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    out.loss.backward()
    assert m.vision.embeddings.patch_embedding.weight.grad is not None


def test_forward_episode_batch_with_different_prompt_lengths_matches_single():
    m = make_model()
    a = _episode_inputs(m, 3, 0, "touch the red cube")
    b = _episode_inputs(m, 3, 1, "push the blue cube to the green zone then touch the yellow cube")
    assert a[0].numel() != b[0].numel()
    with torch.no_grad():
        batch = m.forward_episode([a[0], b[0]], np.stack([a[1], b[1]]), torch.stack([a[2], b[2]]))
        one_a = m.forward_episode([a[0]], a[1][None], a[2][None])
        one_b = m.forward_episode([b[0]], b[1][None], b[2][None])
    torch.testing.assert_close(batch.action_logits[0], one_a.action_logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.action_logits[1], one_b.action_logits[0], atol=1e-5, rtol=1e-5)


def test_forward_episode_step_keep_masks_only_later_steps():
    m = make_model()
    ids, fr, act = _episode_inputs(m, 4, 2)
    with torch.no_grad():
        ref = m.forward_episode([ids], fr[None], act[None]).action_logits
        same = m.forward_episode([ids], fr[None], act[None], step_keep=torch.ones(1, 4, dtype=torch.bool))
        keep = torch.tensor([[True, False, True, True]])
        dropped = m.forward_episode([ids], fr[None], act[None], step_keep=keep).action_logits
    assert torch.equal(same.action_logits, ref)
    # steps 0 and 1 cannot see step 1 from the past anyway: unchanged; steps 2, 3 lose it: changed
    torch.testing.assert_close(dropped[:, :2], ref[:, :2], atol=1e-6, rtol=1e-6)
    assert (dropped[:, 2:] - ref[:, 2:]).abs().max() > 1e-4


def test_forward_episode_step_valid_excludes_padding_from_loss():
    m = make_model()
    ids, fr, act = _episode_inputs(m, 3, 4)
    with torch.no_grad():
        short = m.forward_episode([ids], fr[None, :2], act[None, :2])
        padded = m.forward_episode([ids], fr[None], act[None], step_valid=torch.tensor([[True, True, False]]))
    torch.testing.assert_close(padded.loss, short.loss, atol=1e-5, rtol=1e-5)


def test_forward_episode_rejects_bad_shapes():
    m = make_model()
    ids, fr, act = _episode_inputs(m, 2, 0)
    with pytest.raises(ValueError):
        m.forward_episode([ids], fr[None], act[None, :, :3])
    with pytest.raises(ValueError):
        m.forward_episode([ids], fr[None, :1], act[None])


def test_forward_episode_step_bias_soft_mask():
    m = make_model()
    ids, fr, act = _episode_inputs(m, 4, 6)
    with torch.no_grad():
        ref = m.forward_episode([ids], fr[None], act[None]).action_logits
        zero = m.forward_episode([ids], fr[None], act[None], step_bias=torch.zeros(1, 4, 4)).action_logits
        keep = torch.tensor([[True, False, True, True]])
        dropped = m.forward_episode([ids], fr[None], act[None], step_keep=keep).action_logits
        hard = torch.zeros(1, 4, 4)
        hard[:, :, 1] = -1e4  # dims step 1 for every later step to ~zero weight
        soft = m.forward_episode([ids], fr[None], act[None], step_bias=hard).action_logits
    assert torch.equal(zero, ref)
    torch.testing.assert_close(soft, dropped, atol=1e-5, rtol=1e-5)
    # differentiable w.r.t. the bias (the gate's utilities)
    bias = torch.zeros(1, 4, 4, requires_grad=True)
    out = m.forward_episode([ids], fr[None], act[None], step_bias=bias)
    out.action_logits[:, 3].logsumexp(-1).sum().backward()
    assert bias.grad is not None and bias.grad[0, 3, :3].abs().sum() > 0
    assert bias.grad[0, 0].abs().sum() == 0  # step 0 has no earlier steps


def test_binned_cross_entropy_soft_targets_respect_bin_order():
    """sigma=0 is plain cross-entropy; with sigma>0 a prediction one bin off costs less than one far
    off (one-hot cross-entropy scores them the same), and the exact bin still costs least."""
    import torch.nn.functional as F

    from kv_vla.model.compact.episode import binned_cross_entropy as _binned_cross_entropy

    labels = torch.tensor([100])

    def peaked(at: int) -> torch.Tensor:
        logits = torch.zeros(1, 256)
        logits[0, at] = 8.0
        return logits

    exact, near, far = peaked(100), peaked(101), peaked(200)
    assert torch.equal(_binned_cross_entropy(near, labels, 0.0), F.cross_entropy(near, labels))
    assert torch.allclose(_binned_cross_entropy(near, labels, 0.0), _binned_cross_entropy(far, labels, 0.0))
    soft = [float(_binned_cross_entropy(x, labels, 2.0)) for x in (exact, near, far)]
    assert soft[0] < soft[1] < soft[2]


def test_legacy_config_keys_load_and_removed_features_are_refused():
    """Older config.json files carry ``film: false``, ``projector: "space_to_depth"`` and
    ``num_keypoints``: they load as before. FiLM or another projector is refused by name, since
    this code no longer computes them (a silently different model would be worse)."""
    cfg = CompactVLAConfig.tiny(film=False, projector="space_to_depth", num_keypoints=32)
    assert not hasattr(cfg, "film") and not hasattr(cfg, "num_keypoints")
    with pytest.raises(ValueError, match="film=True"):
        CompactVLAConfig.tiny(film=True)
    with pytest.raises(ValueError, match="projector='spatial_softmax'"):
        CompactVLAConfig.tiny(projector="spatial_softmax")


def test_colour_highlight_starts_as_identity_then_lights_the_named_colour(tmp_path):
    """The instruction's colour highlight adds ``a * relu(w . rgb + b)`` to the pixels; its gain is
    zero at the start (same tokens as the model without it). With a gain and a "red" direction, a
    red-instruction frame changes only where the pixels are red; it needs the condition, cannot use
    cached backbone features, and saves and loads."""
    plain = make_model(6, action_decoding="parallel")
    lit = make_model(6, action_decoding="parallel", highlight=True)
    missing = lit.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["film_words.weight", "highlight.bias", "highlight.weight"]
    f = frames(1, 3)[0]
    red = lit.prompt_ids(build_prompt("reach the red cube"))
    cond = lit.instruction_condition(red)
    with torch.no_grad():
        assert torch.equal(lit.embed_image(f, cond), plain.embed_image(f))
        lit.highlight.weight.zero_()
        lit.highlight.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
        lit.highlight.weight[0].copy_(cond[0] / cond[0].pow(2).sum())  # w_r = 1, b = 0: relu(red)
        img = np.zeros((64, 64, 3), dtype=np.uint8)
        img[10:20, 10:20, 0] = 255  # a red square on black
        pix = lit.pixel_values(img)
        out = lit.highlight_pixels(pix, cond)
        changed = (out - pix).abs().sum(1)[0] > 1e-4
        red_px = pix[0, 0] > 0  # pixels are scaled to [-1, 1]: black is -1
        assert changed.any() and torch.equal(changed, changed & red_px)
        assert (lit.embed_image(img, cond) - plain.embed_image(img)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="instruction_condition"):
        lit.embed_image(f)
    ids = torch.full((1, 2, 4), lit.action_tokenizer.action_token_begin_idx, dtype=torch.long)
    with pytest.raises(ValueError, match="cached vision_patches"):
        lit.forward_episode([red[0]], None, ids, vision_patches=torch.zeros(1, 2, 64, 8))
    lit.save_pretrained(tmp_path / "lit")
    again = CompactVLA.from_pretrained(tmp_path / "lit").eval()
    assert again.config.highlight
    with torch.no_grad():
        assert_logits_close(again.embed_image(img, cond), lit.embed_image(img, cond))  # reloaded


def test_ordered_highlight_slots_tell_word_order_apart(tmp_path):
    """With ``highlight_slots=2`` the two reads of the prompt depend on word order ("red, then
    blue" vs "blue, then red" give different conditions, where a bag of words gives the same one),
    each slot has a highlight of its own whose gain starts at zero (same tokens as a model without
    it, into which a trained one loads), and it saves and loads. Several slots need the highlight."""
    rb = build_prompt("touch the red cube, then the blue cube")
    br = build_prompt("touch the blue cube, then the red cube")
    bag = make_model(6, action_decoding="parallel", highlight=True)
    assert torch.allclose(
        bag.instruction_condition(bag.prompt_ids(rb)),
        bag.instruction_condition(bag.prompt_ids(br)),
        atol=1e-5,
    )
    plain = make_model(6, action_decoding="parallel")
    two = make_model(6, action_decoding="parallel", highlight=True, highlight_slots=2)
    missing = two.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [
        "film_words.weight",
        "highlight.bias",
        "highlight.weight",
    ]
    c_rb, c_br = (two.instruction_condition(two.prompt_ids(p)) for p in (rb, br))
    h = two.config.hidden_size
    assert c_rb.shape == (1, 2 * h)
    assert (c_rb - c_br).abs().max() > 1e-3  # the order matters to each read
    f = frames(1, 3)[0]
    with torch.no_grad():
        assert torch.equal(two.embed_image(f, c_rb), plain.embed_image(f))
        two.highlight.bias.view(2, 7)[1, 3:] = 1.0  # slot 1 only: threshold and gain
        assert (two.embed_image(f, c_rb) - plain.embed_image(f)).abs().max() > 1e-4
    two.save_pretrained(tmp_path / "two")
    again = CompactVLA.from_pretrained(tmp_path / "two").eval()
    assert again.config.highlight_slots == 2
    with torch.no_grad():
        assert_logits_close(again.instruction_condition(again.prompt_ids(rb)), c_rb)  # reloaded
        assert_logits_close(again.embed_image(f, c_rb), two.embed_image(f, c_rb))
    with pytest.raises(ValueError, match="highlight_slots"):
        CompactVLAConfig.tiny(highlight=False, highlight_slots=2)


def test_ordered_reads_see_the_instruction_words_not_the_template():
    """The ordered reads run over the instruction inside OpenVLA's fixed template (whose ten prefix
    words would otherwise take the early read); a prompt not in the template's form is read whole."""
    from kv_vla.model.compact.conditioning import word_order_weights

    two = make_model(6, action_decoding="parallel", highlight=True, highlight_slots=2)
    ids = two.prompt_ids(build_prompt("touch the red cube, then the blue cube"))
    words = two.instruction_words(ids)
    assert two.tokenizer.convert_ids_to_tokens(words[0].tolist()) == [
        "touch", "the", "red", "cube", ",", "then", "the", "blue", "cube",
    ]  # fmt: skip
    weights = word_order_weights(words.shape[1], 2)
    expected = torch.einsum("pk,bph->bkh", weights, two.film_words(words)).flatten(1)
    assert torch.equal(two.instruction_condition(ids), expected)
    bare = two.prompt_ids("touch the red cube")
    assert torch.equal(two.instruction_words(bare), bare)


def test_ordered_reads_weigh_the_first_and_the_last_colour_of_each_template():
    """In every touch_sequence template the first read weighs the first colour at least 10x the
    second and the last read the reverse; a one-word instruction is read alike by both."""
    from kv_vla.model.compact.conditioning import word_order_weights
    from kv_vla_sim.tasks import TASKS

    model = make_model(6, action_decoding="parallel", highlight=True, highlight_slots=2)
    for template in TASKS["touch_sequence"].templates:
        ids = model.instruction_words(model.prompt_ids(build_prompt(template.format(a="red", b="blue"))))
        words = model.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        a, b = words.index("red"), words.index("blue")
        w = word_order_weights(len(words), 2)
        assert w[a, 0] > 10 * w[b, 0] and w[b, 1] > 10 * w[a, 1], (template, w[:, 0], w[:, 1])
    assert torch.equal(word_order_weights(1, 2), torch.ones(1, 2))
