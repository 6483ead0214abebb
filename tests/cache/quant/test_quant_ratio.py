"""ZipVL layer-adaptive ratio on hand-made attention distributions."""

from __future__ import annotations

import pytest
import torch

from kv_vla.cache.quant.ratio import (
    chunk_scores,
    normalized_scores,
    select_important,
    select_important_chunks,
    visible_query_counts,
)


def _causal_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over keys with the probe queries bottom-right aligned (causal)."""
    _heads, q, kv = logits.shape
    visible = torch.arange(kv)[None, :] <= (kv - q + torch.arange(q))[:, None]
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


def test_visible_counts_are_causal() -> None:
    assert visible_query_counts(3, 6).tolist() == [3, 3, 3, 3, 2, 1]
    assert visible_query_counts(1, 4).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        visible_query_counts(5, 4)


def test_normalisation_divides_by_visible_queries() -> None:
    # Every query attends uniformly to what it sees: normalised scores must then be
    # 1/(visible keys) averaged only over queries that see the key -> the newest key, seen by
    # one query that spreads over 6 keys, must not be penalised against the oldest.
    probs = _causal_probs(torch.zeros(2, 3, 6))
    s = normalized_scores(probs)
    raw = probs.sum(dim=(0, 1)) / 2
    assert raw[-1] < raw[0] / 2  # raw sum punishes recent keys
    assert s[-1] == pytest.approx(1 / 6)
    assert s[0] == pytest.approx((1 / 4 + 1 / 5 + 1 / 6) / 3)
    explicit = torch.arange(6)[None, :] <= (3 + torch.arange(3))[:, None]
    assert torch.allclose(normalized_scores(probs, explicit), s)


def test_peaked_selects_few_flat_selects_many() -> None:
    g = torch.Generator().manual_seed(0)
    kv, q = 200, 8
    peaked_logits = torch.randn(4, q, kv, generator=g) * 0.1
    peaked_logits[..., [3, 50, 120]] += 8.0  # three heavy hitters
    flat_logits = torch.randn(4, q, kv, generator=g) * 0.1
    peaked = select_important(normalized_scores(_causal_probs(peaked_logits)), tau=0.9)
    flat = select_important(normalized_scores(_causal_probs(flat_logits)), tau=0.9)
    assert set(peaked.indices[:3].tolist()) == {3, 50, 120}
    assert peaked.ratio < 0.05
    assert flat.ratio > 0.8
    assert peaked.mass >= 0.9 and flat.mass >= 0.9


def test_selection_is_minimal() -> None:
    s = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    sel = select_important(s, tau=0.8)
    assert sel.indices.tolist() == [1, 3]
    assert sel.ratio == pytest.approx(0.4)
    # Dropping the least-scored selected token falls below tau.
    assert float(s[sel.indices[:-1]].sum()) < 0.8
    assert select_important(s, tau=0.81).indices.tolist() == [1, 3, 2]
    assert select_important(s, tau=1.0).ratio == 1.0


def test_tau_monotone() -> None:
    g = torch.Generator().manual_seed(1)
    scores = normalized_scores(_causal_probs(torch.randn(4, 6, 150, generator=g) * 2))
    ratios = [select_important(scores, t).ratio for t in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)]
    assert ratios == sorted(ratios)
    assert ratios[0] < ratios[-1]
    sets = [set(select_important(scores, t).indices.tolist()) for t in (0.2, 0.6, 0.95)]
    assert sets[0] <= sets[1] <= sets[2]


def test_chunk_scores_and_selection() -> None:
    s = torch.tensor([1.0, 1.0, 0.0, 0.0, 5.0, 1.0, 0.5, 0.5])
    shares = chunk_scores(s, [2, 2, 2, 2])
    assert torch.allclose(shares, torch.tensor([2.0, 0.0, 6.0, 1.0]) / 9)
    sel = select_important_chunks(s, [2, 2, 2, 2], tau=0.85)
    assert sel.indices.tolist() == [2, 0]
    assert sel.ratio == pytest.approx(0.5)
    with pytest.raises(ValueError):
        chunk_scores(s, [2, 2])


def test_rejects_bad_tau() -> None:
    with pytest.raises(ValueError):
        select_important(torch.ones(3), 0.0)
    with pytest.raises(ValueError):
        select_important(torch.ones(3), 1.5)


def test_demotion_without_history_is_the_complement_of_the_important_set():
    from kv_vla.cache.quant.ratio import demote_within_allowance

    g = torch.Generator().manual_seed(4)
    for tau in (0.5, 0.8, 0.95):
        s = torch.rand(40, generator=g) ** 3
        keep = set(select_important(s, tau).indices.tolist())
        demote = set(demote_within_allowance(s, torch.zeros(40, dtype=torch.bool), tau).tolist())
        assert keep.isdisjoint(demote) and keep | demote == set(range(40))


def test_demotion_charges_earlier_demotions_against_the_allowance():
    from kv_vla.cache.quant.ratio import demote_within_allowance

    flat = torch.ones(10)
    low = torch.zeros(10, dtype=torch.bool)
    assert demote_within_allowance(flat, low, 0.8).numel() == 2
    low[[7, 9]] = True  # already at low precision: the 20 % allowance is spent
    assert demote_within_allowance(flat, low, 0.8).numel() == 0
    low[:] = False
    low[9] = True
    assert demote_within_allowance(flat, low, 0.8).tolist() == [0]
    # peaked: all mass on item 3, everything else can go, whatever was demoted before
    peaked = torch.zeros(10)
    peaked[3] = 1.0
    assert sorted(demote_within_allowance(peaked, low, 0.9).tolist()) == [0, 1, 2, 4, 5, 6, 7, 8]
