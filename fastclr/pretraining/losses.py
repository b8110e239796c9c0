"""NT-Xent, SimCLR's contrastive loss (Chen et al. 2020, eq. 1), and its contrastive accuracy.

For 2N projections z (the two views of N images), with s_ik the cosine similarity and t the
temperature:  l(i, j) = -log( exp(s_ij / t) / sum_{k != i} exp(s_ik / t) ),  averaged over all 2N
anchors i, where j is i's other view. This is a cross-entropy over each row of the 2N x 2N
similarity matrix with the diagonal removed and the positive as the target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclr.config import MIN_TEMPERATURE


def pair_indices(local: int, total: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, self) candidate index of each anchor, both int64 (2 * local,).

    Anchors are this rank's rows [z1_local; z2_local] (`local` images each); candidates are the
    gathered rows [Z1_all; Z2_all] (`total` images each), in which this rank's images start at
    `offset`. View-1 anchor i is candidate offset + i and its positive is total + offset + i;
    view-2 anchor i is candidate total + offset + i and its positive is offset + i. With one rank
    (local == total, offset 0) the positive of anchor i is i + N for i < N and i - N after.
    """
    i = torch.arange(local, device=device) + offset
    own = torch.cat([i, i + total])
    return torch.cat([i + total, i]), own


def nt_xent_logits(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked similarity logits (2B, 2G) in float32 (float64 for float64 input) and the positive index of each row.

    z1, z2: the anchors' two views (B, D). candidates: the two views (G, D) of the whole global
    batch, gathered from every rank, with this rank's B images at rows [offset, offset + B) of
    each; None means the anchors are the whole batch (one process: G = B, the 2N x 2N matrix).

    Computed in float32 outside autocast whatever the input dtype: under bf16 the cosine of a
    pair would carry only ~3 significant digits, and at t = 0.05 that is a logit error of ~0.2.
    Each anchor's own column (self-similarity) is set to the most negative finite float32, so it
    drops out of the softmax exactly (exp underflows to 0) and stays finite, unlike -inf, whose
    gradients and reductions can produce NaN.
    """
    check_loss_inputs(z1, z2, temperature, candidates, offset)
    b = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a = unit_rows(torch.cat([z1, z2]))  # (2B, D)
        c = a if candidates is None else unit_rows(torch.cat(candidates))  # (2G, D)
        g = c.shape[0] // 2
        positive, own = pair_indices(b, g, offset, z1.device)
        logits = a @ c.T / temperature  # (2B, 2G)
        mask = torch.arange(2 * g, device=z1.device)[None, :] == own[:, None]
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    return logits, positive


def check_loss_inputs(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                      candidates: tuple[torch.Tensor, torch.Tensor] | None, offset: int) -> None:
    """Refuse what gives no NT-Xent: a temperature below config.MIN_TEMPERATURE (1e-40 made every
    logit infinite), halves that are not the two views of the same N >= 1 images (unequal ones gave
    a torch size error, the blockwise form a number; an empty batch NaN), and gathered candidates
    that are not two such halves holding the anchors at rows [offset, offset + N)."""
    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:g}, got {temperature}")
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] == 0:
        raise ValueError(f"z1 and z2 must be the two views of the same images, (N, D) each with N >= 1; got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    if candidates is not None:
        c1, c2 = candidates
        if c1.dim() != 2 or c1.shape != c2.shape or c1.shape[1] != z1.shape[1] or \
                not 0 <= offset <= c1.shape[0] - z1.shape[0]:
            raise ValueError(f"candidates must be the two views (G, {z1.shape[1]}) each of a batch holding the "
                             f"{z1.shape[0]} anchors at rows [offset, offset + {z1.shape[0]}); got "
                             f"{tuple(c1.shape)} and {tuple(c2.shape)}, offset {offset}")


def unit_rows(z: torch.Tensor) -> torch.Tensor:
    """float32 (float64 kept) rows scaled to unit length."""
    return F.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The NT-Xent loss of two batches of projections (N, D), (N, D): a float32 scalar."""
    logits, target = nt_xent_logits(z1, z2, temperature)
    return F.cross_entropy(logits, target)


@torch.no_grad()
def positive_rank(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's positive among its 2N - 1 candidates: int64 (2N,). A candidate
    scored the same as the positive ranks above it: a collapsed encoder (every cosine equal) ranks
    its positives last, not first (SimCLR's argmax picks the first of ties: about 1/N)."""
    pos = logits.gather(1, target[:, None])  # (2N, 1)
    return (logits >= pos).sum(dim=1)  # the positive counts itself; the own column is -inf


@torch.no_grad()
def contrastive_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-1 and top-5 accuracy of finding the positive, and its mean rank (device scalars)."""
    return rank_metrics(positive_rank(logits, target))


@torch.no_grad()
def rank_metrics(rank: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-1 and top-5 accuracy and mean rank from 1-based positive ranks (2N,)."""
    rank = rank.float()
    return {"top1": (rank <= 1).float().mean(), "top5": (rank <= 5).float().mean(), "mean_rank": rank.mean()}
