"""ZipVL's layer-adaptive important-token ratio (He et al., arXiv 2410.08584).

A fixed budget ("keep the top 30 %") is wrong for most layers: some concentrate their attention on
a handful of tokens, others spread it out. ZipVL instead fixes the *share of attention mass* that
the important set must hold, ``tau``, and lets each layer's ratio ``p`` follow from its own
attention distribution: the important set is the smallest top-``p`` set of tokens whose scores
hold at least ``tau`` of the total.

Scores come from probe queries (the newest step's queries). Under a causal mask a key near the
end is visible to fewer probe queries than an old one, so the raw attention it receives is
normalised by the number of probe queries that can see it; otherwise the newest tokens would
always look unimportant.

The episode cache stores chunks, so :func:`chunk_scores` aggregates token scores into each chunk's
share of the mass and :func:`select_important_chunks` applies the same rule at chunk granularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """Outcome of an important-set selection.

    ``indices`` are the selected items (tokens or chunks) in descending score order; ``ratio`` is
    the fraction of *tokens* they cover (ZipVL's ``p``); ``mass`` the share of score they hold.
    """

    indices: torch.Tensor
    ratio: float
    mass: float


def visible_query_counts(q_len: int, kv_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """How many of ``q_len`` probe queries can see each of ``kv_len`` keys under a causal mask.

    The probe queries are the last ``q_len`` positions of the ``kv_len`` keys (bottom-right
    aligned, as when the newest step's tokens are appended to the cache): query ``i`` sees keys
    ``0 .. kv_len - q_len + i``.
    """
    if not 0 < q_len <= kv_len:
        raise ValueError(f"need 0 < q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
    j = torch.arange(kv_len, device=device)
    first_new = kv_len - q_len
    return (q_len - (j - first_new).clamp(min=0)).to(torch.float32)


def normalized_scores(attn: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Per-key importance: attention received, averaged over heads and over the queries that see it.

    ``attn`` is ``[heads, q, kv]`` (or ``[batch, heads, q, kv]`` with batch 1) of post-softmax
    probabilities. ``visible`` is an optional ``[q, kv]`` boolean mask of which query sees which
    key; by default the causal bottom-right alignment of :func:`visible_query_counts`.
    """
    if attn.dim() == 4:
        if attn.shape[0] != 1:
            raise ValueError("normalized_scores takes one sequence (batch size 1)")
        attn = attn[0]
    if attn.dim() != 3:
        raise ValueError(f"attn must be [heads, q, kv], got shape {tuple(attn.shape)}")
    heads, q_len, kv_len = attn.shape
    if visible is None:
        counts = visible_query_counts(q_len, kv_len, attn.device)
    else:
        if visible.shape != (q_len, kv_len):
            raise ValueError(f"visible must be [{q_len}, {kv_len}], got {tuple(visible.shape)}")
        counts = visible.sum(dim=0).to(torch.float32)
    received = attn.float().sum(dim=(0, 1)) / heads
    return torch.where(counts > 0, received / counts.clamp(min=1), torch.zeros_like(received))


def _smallest_top_set(scores: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (descending score) of the smallest prefix holding ``tau`` of the mass, and the sort."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError("scores must be a non-empty 1-d tensor")
    if bool((scores < 0).any()):
        raise ValueError("scores must be non-negative")
    order = torch.argsort(scores.float(), descending=True, stable=True)
    total = scores.float().sum()
    if total <= 0:
        # No signal at all: nothing is distinguishable, so everything is important.
        return order, order
    cum = torch.cumsum(scores.float()[order], dim=0)
    # Relative slack so that tau = 1 is reached despite rounding in the cumulative sum.
    need = tau * total * (1 - 1e-6)
    k = int((cum < need).sum()) + 1
    return order[: min(k, scores.numel())], order


def select_important(scores: torch.Tensor, tau: float) -> Selection:
    """Smallest set of tokens whose normalised scores hold at least ``tau`` of the total."""
    idx, _ = _smallest_top_set(scores, tau)
    total = float(scores.float().sum())
    mass = float(scores.float()[idx].sum()) / total if total > 0 else 1.0
    return Selection(indices=idx, ratio=idx.numel() / scores.numel(), mass=mass)


def chunk_scores(scores: torch.Tensor, chunk_lengths: list[int] | torch.Tensor) -> torch.Tensor:
    """Each chunk's share of the total score mass; chunks are consecutive runs of tokens."""
    lengths = torch.as_tensor(chunk_lengths, dtype=torch.long, device=scores.device)
    if int(lengths.sum()) != scores.numel():
        raise ValueError(f"chunk lengths sum to {int(lengths.sum())}, but there are {scores.numel()} tokens")
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=scores.device), lengths)
    mass = torch.zeros(lengths.numel(), dtype=torch.float32, device=scores.device)
    mass.index_add_(0, ids, scores.float())
    total = mass.sum()
    return mass / total if total > 0 else torch.full_like(mass, 1.0 / max(1, lengths.numel()))


def select_important_chunks(
    scores: torch.Tensor, chunk_lengths: list[int] | torch.Tensor, tau: float
) -> Selection:
    """Smallest set of chunks whose combined token scores hold at least ``tau`` of the total.

    ``ratio`` is the fraction of tokens inside the selected chunks.
    """
    shares = chunk_scores(scores, chunk_lengths)
    idx, _ = _smallest_top_set(shares, tau)
    lengths = torch.as_tensor(chunk_lengths, dtype=torch.long)
    covered = int(lengths[idx.cpu()].sum())
    return Selection(indices=idx, ratio=covered / int(lengths.sum()), mass=float(shares[idx].sum()))


def demote_within_allowance(mass: torch.Tensor, is_low: torch.Tensor, tau: float) -> torch.Tensor:
    """Which full-precision items to store at low precision, given some already are (irreversibly).

    ZipVL's rule (the smallest top set holding ``tau`` of the mass stays at full precision) is the
    same as: demote the largest bottom set whose mass is at most ``(1 - tau)`` of the total. A
    cache cannot restore a demoted chunk, so the mass already at low precision is charged against
    that allowance first and only the rest is spent, lowest-scored first. Without earlier demotions
    this is exactly :func:`select_important`'s complement; with them it keeps the invariant that at
    least ``tau`` of the newest attention lands on full-precision KV, instead of letting every
    decision demote a fresh ``1 - tau`` (which, in a flat layer, would demote everything over time).

    Returns the indices to demote (ascending score order).
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    mass = mass.float()
    total = float(mass.sum())
    if total <= 0:
        return torch.empty(0, dtype=torch.long)
    allowance = (1.0 - tau) * total * (1 + 1e-6) - float(mass[is_low].sum())
    full = (~is_low).nonzero().squeeze(1)
    order = full[torch.argsort(mass[full], stable=True)]
    cum = torch.cumsum(mass[order], dim=0)
    return order[cum <= allowance]
