"""NT-Xent, SimCLR's contrastive loss (Chen et al. 2020, eq. 1), and its contrastive accuracy.

For 2N projections z (the two views of N images), with s_ik the cosine similarity and t the
temperature:  l(i, j) = -log( exp(s_ij / t) / sum_{k != i} exp(s_ik / t) ),  averaged over all 2N
anchors i, where j is i's other view. This is a cross-entropy over each row of the 2N x 2N
similarity matrix with the diagonal removed and the positive as the target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_index(n: int, device: torch.device) -> torch.Tensor:
    """For anchors 0..2N-1 laid out as [view 1; view 2], the index of each one's positive."""
    i = torch.arange(n, device=device)
    return torch.cat([i + n, i])


def nt_xent_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked similarity logits (2N, 2N) in float32 (float64 for float64 input) and the positive index of each row.

    Computed in float32 outside autocast whatever the input dtype: under bf16 the cosine of a
    pair would carry only ~3 significant digits, and at t = 0.05 that is a logit error of ~0.2.
    The diagonal (self-similarity) is set to the most negative finite float32, so it drops out of
    the softmax exactly (exp underflows to 0) and stays finite, unlike -inf, whose gradients and
    reductions can produce NaN.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z = torch.cat([z1, z2])
        if z.dtype != torch.float64:
            z = z.float()
        z = F.normalize(z, dim=1)  # (2N, D)
        logits = z @ z.T / temperature  # (2N, 2N)
        eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, torch.finfo(logits.dtype).min)
    return logits, positive_index(n, z1.device)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The NT-Xent loss of two batches of projections (N, D), (N, D): a float32 scalar."""
    logits, target = nt_xent_logits(z1, z2, temperature)
    return F.cross_entropy(logits, target)


@torch.no_grad()
def positive_rank(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's positive among its 2N - 1 candidates: int64 (2N,)."""
    pos = logits.gather(1, target[:, None])  # (2N, 1)
    return (logits > pos).sum(dim=1) + 1


@torch.no_grad()
def contrastive_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-1 and top-5 accuracy of finding the positive, and its mean rank (device scalars)."""
    rank = positive_rank(logits, target).float()
    return {"top1": (rank <= 1).float().mean(), "top5": (rank <= 5).float().mean(), "mean_rank": rank.mean()}
