"""An online linear probe for the pretraining monitor: a linear classifier on detached h, one
optimiser step per pretraining step on that step's views and their labels (the "online linear
evaluation" of solo-learn, da Costa et al. 2022).

Why online rather than a fit at each epoch's end: on 2 CPU cores, fitting a logistic regression to
the kNN monitor's 10,000 features took 3.5-7 s (50-100 L-BFGS iterations), a third or more of a
Fashion-MNIST epoch; the online head costs one (2B, D) x (D, K) matmul per step. Its features are
detached, so it cannot change what the encoder learns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OnlineLinearProbe(nn.Module):
    """Linear head trained on detached features as pretraining runs; `accuracy` on held-out h."""

    def __init__(self, feature_dim: int, num_classes: int, lr: float = 1e-3):
        super().__init__()
        self.linear = nn.Linear(feature_dim, num_classes)
        self.opt = torch.optim.Adam(self.linear.parameters(), lr=lr)

    def step(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One update on h (2B, D) of both views ([view 1; view 2] as `two_views` lays them out) and
        the B labels of their images; returns the loss as a device scalar (no host sync)."""
        target = torch.cat([labels, labels])  # (2B,)
        loss = F.cross_entropy(self.linear(h.detach().float()), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def accuracy(self, h: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of features h (N, D) classified as their labels (N,)."""
        pred = self.linear(h.float().to(self.linear.weight.device)).argmax(1).cpu()
        return float((pred == labels.cpu()).float().mean())
