"""Nearest-neighbour positives (--nn-support S; NNCLR, Dwibedi et al. 2021).

Each anchor is replaced by its nearest neighbour (cosine) in a support set: the projections of the
first view of the last S images the run has seen, by the online network, without gradient. The
anchor's positives are still its image's other views, so a view is pulled towards whatever image
the support holds nearest to its partner: a positive that another augmentation cannot produce
(another garment of the same kind, not another crop of this one). The loss keeps the form of the
run's objective (with two views, NT-Xent's: every other view of the batch a negative;
fastclr.pretraining.multi_positive), not NNCLR's cross-view-only one; the gradient flows through
the candidates only, since the neighbours are held fixed.

The support is a ring buffer (`RowQueue`), filled after every update with every rank's first views
in rank order, so all ranks hold the same support; while it is empty (the first step, or a run
resumed with the option newly on or S changed) the anchors are the views themselves. It is part of
the checkpoint.
"""

from __future__ import annotations

import torch

from fastclr.pretraining.losses import unit_rows


@torch.no_grad()
def nearest_neighbours(z: torch.Tensor, support: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """For each row of z (M, D), the support row (of (S, D)) most similar to it by cosine, as a unit
    row: (M, D) float32 (float64 kept), without gradient; of equal ones, the first. In fp32 and in
    chunks of anchors, so its memory stays (chunk x S) whatever the batch. Not fastclr's kNN search
    (`cosine_topk`): its re-ranking of near ties sizes tensors from the data, which would wait for
    a GPU at every step, and a training positive needs no tie order stable across machines."""
    dtype = torch.promote_types(torch.promote_types(z.dtype, support.dtype), torch.float32)
    unit_support = unit_rows(support.to(dtype))  # (S, D)
    rows = torch.cat([(unit_rows(q.to(dtype)) @ unit_support.T).argmax(1) for q in z.detach().split(chunk)])  # (M,)
    return unit_support[rows].to(torch.promote_types(z.dtype, torch.float32))
