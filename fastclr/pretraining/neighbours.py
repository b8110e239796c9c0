"""Nearest-neighbour positives (--nn-support S; NNCLR, Dwibedi et al. 2021).

Each anchor is replaced by its nearest neighbour (cosine) in a support set: the projections of the
first view of the last S images the run has seen, by the online network, without gradient. The
anchor's positives are still its image's other views, so a view is pulled towards whatever image
the support holds nearest to its partner: a positive that another augmentation cannot produce
(another garment of the same kind, not another crop of this one). The loss keeps NT-Xent's form
(every other view of the batch a negative, fastclr.pretraining.multi_positive); the gradient flows
through the candidates only, since the neighbours are held fixed.

The support is a ring buffer (`NegativeQueue`), filled after every update with every rank's first
views in rank order, so all ranks hold the same support; while it is empty (the first step) the
anchors are the views themselves and the loss is NT-Xent's. It is part of the checkpoint.
"""

from __future__ import annotations

import torch

from fastclr.pretraining.losses import unit_rows


@torch.no_grad()
def nearest_neighbours(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """For each row of z (M, D), the support row (of (S, D)) most similar to it by cosine, as a unit
    row: (M, D) float32 (float64 kept), without gradient."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        a = unit_rows(z)
        s = unit_rows(support).to(a.dtype)
        return s[(a @ s.T).argmax(dim=1)]
