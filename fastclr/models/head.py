"""The projection head g: h -> z, used only by the contrastive loss and discarded afterwards."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """An MLP of `layers` linear layers: (Linear, [BatchNorm], ReLU) x (layers - 1), then Linear.

    layers=2 is SimCLR's head; layers=3 with BatchNorm has SimCLRv2's depth (Chen et al. 2020b),
    whose official code also ends in BatchNorm (its last Linear without a bias, then BN without a
    shift); here the last layer is a plain Linear, as in SimCLR's head.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128, layers: int = 2, batch_norm: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError("a projection head needs at least one layer")
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden_dim, bias=not batch_norm)]
            if batch_norm:
                mods.append(nn.BatchNorm1d(hidden_dim))
            mods.append(nn.ReLU(inplace=True))
            d = hidden_dim
        mods.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*mods)
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, in_dim) -> z (B, out_dim); z is not normalised here, the loss does it."""
        return self.net(h)
