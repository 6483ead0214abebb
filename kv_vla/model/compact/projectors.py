"""The vision-to-decoder projector of the compact VLA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpaceToDepthProjector(nn.Module):
    """Patch grid ``[B, g*g, C]`` -> ``[B, (g/p)^2, D]``: concatenate p x p neighbours, then LN + MLP.

    Why space-to-depth and not average pooling: nothing is averaged away, so a small cue such as
    a lit lamp survives the cut from 64 patches to a few tokens.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: int, pool: int) -> None:
        super().__init__()
        self.grid, self.pool = grid, pool
        cat = in_dim * pool * pool
        self.norm = nn.LayerNorm(cat)
        self.fc1 = nn.Linear(cat, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def reset_parameters(self) -> None:
        for lin in (self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, _, c = patches.shape
        g, p = self.grid, self.pool
        x = (
            patches.reshape(b, g // p, p, g // p, p, c)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(b, (g // p) ** 2, p * p * c)
        )
        return self.fc2(F.gelu(self.fc1(self.norm(x))))
