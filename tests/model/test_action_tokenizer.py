"""OpenVLA-compatible action tokenizer, prompt and (un)normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from kv_vla.model.action_tokenizer import (
    ActionTokenizer,
    compute_norm_stats,
    identity_norm_stats,
    normalize_actions,
    unnormalize_actions,
)
from kv_vla.model.prompt import build_prompt

VOCAB = 32064  # OpenVLA-7B's padded Llama-2 vocabulary


def test_ids_are_the_last_256_of_the_vocabulary():
    tok = ActionTokenizer(VOCAB)
    a = np.linspace(-1, 1, 10_001)
    ids = tok.encode(a)
    assert ids.min() == VOCAB - 256 and ids.max() == VOCAB - 1
    assert len(np.unique(ids)) == 256
    # monotone: larger actions -> smaller ids (OpenVLA: vocab_size - digitize)
    assert np.all(np.diff(ids) <= 0)


def test_matches_openvla_reference_formula():
    tok = ActionTokenizer(VOCAB)
    rng = np.random.default_rng(0)
    a = rng.uniform(-1.5, 1.5, size=(100, 7))
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    ref_ids = VOCAB - np.digitize(np.clip(a, -1, 1), bins)
    assert np.array_equal(tok.encode(a), ref_ids)
    ref_dec = centers[np.clip(VOCAB - ref_ids - 1, 0, 254)]
    np.testing.assert_allclose(tok.decode(ref_ids), ref_dec.astype(np.float32))


@pytest.mark.parametrize("n_bins", [256, 16])
def test_round_trip_within_half_a_bin_including_edges(n_bins):
    tok = ActionTokenizer(1000, n_bins=n_bins)
    eps = 1e-9
    edges = tok.bins
    a = np.concatenate(
        [
            np.linspace(-1, 1, 4001),
            [-1.0, 1.0, -1 + eps, 1 - eps],
            edges[1:-1] - eps,  # just inside the lower bin of every edge
            edges[1:-1] + eps,  # just inside the upper bin
        ]
    )
    back = tok.decode(tok.encode(a)).astype(np.float64)
    assert np.max(np.abs(back - a)) <= tok.max_roundtrip_error + 1e-6
    # decoded values are bin centres, strictly inside [-1, 1]
    assert back.min() > -1 and back.max() < 1
    # an edge value goes to the bin above it; just below it to the bin below
    k = n_bins // 2
    assert tok.encode(edges[k] - eps) == tok.encode(edges[k]) + 1


def test_clipping_outside_the_range():
    tok = ActionTokenizer(1000)
    assert tok.encode(5.0) == tok.encode(1.0)
    assert tok.encode(-5.0) == tok.encode(-1.0)
    assert tok.encode(1.0 + 1e-12) == tok.encode(1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_actions_are_refused(bad):
    tok = ActionTokenizer(1000)
    with pytest.raises(ValueError, match="non-finite"):
        tok.encode(np.array([0.1, bad, 0.2]))
    with pytest.raises(ValueError, match="non-finite"):
        unnormalize_actions(np.array([0.1, bad]), {"d": identity_norm_stats(2)})


def test_decode_bin_index_matches_token_decode():
    tok = ActionTokenizer(500)
    k = np.arange(256)
    assert np.array_equal(tok.decode_bin_index(k), tok.decode(k + 500 - 256))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        ActionTokenizer(100, n_bins=256)
    with pytest.raises(ValueError):
        ActionTokenizer(1000, min_action=1, max_action=-1)


def test_unnormalize_openvla_semantics_with_mask():
    stats = {
        "bridge": {"action": {"q01": [-0.1, 0.0, 2.0], "q99": [0.3, 1.0, 4.0], "mask": [True, True, False]}}
    }
    x = np.array([[-1.0, 0.0, 0.5], [1.0, 1.0, -0.25]])
    out = unnormalize_actions(x, stats, "bridge")
    np.testing.assert_allclose(out[0], [-0.1, 0.5, 0.5], atol=1e-7)
    np.testing.assert_allclose(out[1], [0.3, 1.0, -0.25], atol=1e-7)
    # inverse on masked-in dims, identity elsewhere
    np.testing.assert_allclose(normalize_actions(out, stats, "bridge"), x, atol=1e-6)


def test_unnorm_key_selection():
    stats = {"a": identity_norm_stats(2), "b": identity_norm_stats(2, 0, 2)}
    with pytest.raises(ValueError, match="unnorm_key"):
        unnormalize_actions(np.zeros(2), stats)
    with pytest.raises(ValueError, match="not in norm_stats"):
        unnormalize_actions(np.zeros(2), stats, "c")
    np.testing.assert_allclose(unnormalize_actions(np.zeros(2), stats, "b"), [1.0, 1.0])
    np.testing.assert_allclose(unnormalize_actions(np.zeros(2), {"a": stats["a"]}), [0.0, 0.0])


def test_compute_norm_stats_quantiles_and_mask():
    rng = np.random.default_rng(1)
    acts = rng.uniform(-2, 2, size=(1000, 3))
    s = compute_norm_stats(acts, mask=[True, True, False])["action"]
    np.testing.assert_allclose(s["q01"], np.quantile(acts, 0.01, axis=0))
    assert s["mask"] == [True, True, False]
    with pytest.raises(ValueError):
        compute_norm_stats(np.zeros((0, 3)))


def test_prompt_template():
    assert (
        build_prompt("pick up the red cube")
        == "In: What action should the robot take to pick up the red cube?\nOut:"
    )
    assert (
        build_prompt("  Touch The BLUE cube \n")
        == "In: What action should the robot take to touch the blue cube?\nOut:"
    )
    for bad in ("", "   \n"):
        with pytest.raises(ValueError, match="empty"):
            build_prompt(bad)
