"""Stated bounds for comparing floats across code paths that may legitimately round differently.

Exact equality is right only where the same kernels run on the same tensors in one process. MKL
picks kernels by memory alignment, so the same weights loaded from a file (mmapped at another
alignment) can give outputs one float32 ulp away from the model built in memory; CPU vs CUDA and the
training forward vs the runtime's cached steps differ likewise. Those comparisons use these bounds.
"""

from __future__ import annotations

import torch

LOGIT_ATOL = 1e-5
"""Largest |Δ logit| accepted between two float32 paths over the same weights and inputs."""


def assert_logits_close(got: torch.Tensor, ref: torch.Tensor, atol: float = LOGIT_ATOL) -> None:
    """max |got - ref| <= atol, reporting the observed difference."""
    assert got.shape == ref.shape, f"shapes differ: {tuple(got.shape)} vs {tuple(ref.shape)}"
    diff = (got.float() - ref.float()).abs().max().item() if got.numel() else 0.0
    assert diff <= atol, f"max |Δ| = {diff:.3g} > {atol:g}"


def near_ties(ref: torch.Tensor, atol: float = LOGIT_ATOL) -> torch.Tensor:
    """Bool mask over ``ref[..., 0]``: where the top two logits lie within ``atol`` (argmax may flip)."""
    top2 = ref.float().topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) <= atol


def assert_same_argmax(got: torch.Tensor, ref: torch.Tensor, atol: float = LOGIT_ATOL) -> None:
    """Argmax (action bins) equal everywhere except where ``ref``'s top two logits are within ``atol``."""
    assert got.shape == ref.shape
    differ = got.argmax(-1) != ref.argmax(-1)
    bad = differ & ~near_ties(ref, atol)
    assert not bad.any(), f"{int(bad.sum())} argmax differ outside near ties (of {differ.numel()})"
