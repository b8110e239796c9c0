"""NT-Xent with several positives per anchor: K views of each image, supervised contrastive
learning, and extra negatives (a queue).

Rows of z carry a group id: rows of one group are positives of each other (the K views of an
image; with labels, every view of every image of a class). For anchor i with positives P(i) and
candidates A(i) (every other row, and any extra negatives):

    l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t) )

averaged over the anchors that have a positive. This is the "L_out" form of supervised
contrastive learning (Khosla et al. 2020, eq. 2), which its authors found better than putting
the 1/|P| inside the log; with two views and one image per group it is exactly NT-Xent (Chen et
al. 2020, eq. 1), and with K views and an image per group it is the multi-view form of the same
loss. Rows of unlabelled images get a group of their own, so they fall back to NT-Xent.

Extra negatives (rows of another source: a memory of past projections) join every anchor's
denominator and are never positives. The anchors may be rows other than the candidates they
stand for (nearest-neighbour positives, fastclr.pretraining.neighbours): anchor i then scores
its replacement against the candidates, with the same positives and own column as row i.
"""

from __future__ import annotations

import torch

from fastclr.pretraining.losses import unit_rows

Metrics = dict[str, torch.Tensor]


def multi_positive_logits(z: torch.Tensor, temperature: float | torch.Tensor, candidates: torch.Tensor | None = None,
                          offset: int = 0) -> torch.Tensor:
    """Similarity logits (M, N) of anchors z (M, D) against `candidates` (N, D; None: z itself), in
    float32 outside autocast (float64 kept): s / t, with each anchor's own column (offset + i) at
    the most negative finite value, so that it drops out of every softmax (see losses.py)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        a = unit_rows(z)  # (M, D)
        c = a if candidates is None else unit_rows(candidates).to(a.dtype)  # (N, D)
        logits = a @ c.T / temperature
        m = a.shape[0]
        own = torch.arange(logits.shape[1], device=z.device)[None, :] == (torch.arange(m, device=z.device) + offset)[:, None]
        return logits.masked_fill(own, torch.finfo(logits.dtype).min)


def positives_mask(groups: torch.Tensor, candidate_groups: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(M, N) bool: candidate k is a positive of anchor i (same group, not the anchor itself)."""
    same = groups[:, None] == candidate_groups[None, :]
    same.diagonal(offset).fill_(False)  # anchor i is candidate offset + i
    return same


def multi_positive_loss(z: torch.Tensor, groups: torch.Tensor, temperature: float | torch.Tensor,
                        extra: torch.Tensor | None = None, candidates: torch.Tensor | None = None,
                        candidate_groups: torch.Tensor | None = None, offset: int = 0,
                        anchors: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """The loss above for anchors z (M, D) with group ids (M,), and its contrastive metrics: top-1
    (the best-scored candidate is a positive), top-5 (a positive among the five best) and the mean
    rank of each anchor's best-scored positive among its non-positives.

    candidates, candidate_groups: every rank's rows (N, D), (N,), with this rank's anchors at rows
    [offset, offset + M); None: the anchors are all rows. extra: negatives only (Q, D). anchors:
    (M, D) rows scored in place of z's (z then enters as candidates only)."""
    if candidates is None or candidate_groups is None:
        candidates, candidate_groups, offset = z, groups, 0
    rows = z if anchors is None else anchors
    logits = multi_positive_logits(rows, temperature, candidates, offset)  # (M, N)
    pos = positives_mask(groups, candidate_groups, offset)
    lse = torch.logsumexp(logits, dim=1, keepdim=True)  # (M, 1)
    extra_logits = None
    if extra is not None:
        # Extra rows are negatives only: they enter the denominator and the rank, and no mask or
        # per-element product is spent on their (M, Q) block (at Q = 16384 those cost ~10x the rest).
        with torch.autocast(device_type=z.device.type, enabled=False):
            extra_logits = unit_rows(rows) @ unit_rows(extra).to(logits.dtype).T / temperature  # (M, Q)
        lse = torch.logaddexp(lse, torch.logsumexp(extra_logits, dim=1, keepdim=True))
    log_prob = logits - lse  # own column: hugely negative, never a positive
    count = pos.sum(1)  # (M,)
    # Means over the anchors that have a positive, by a 0/1 mask rather than a boolean index (which
    # sizes its result from the data, a wait for a GPU at every step); with no such anchor, 0.
    has = count > 0  # (M,)
    n = has.sum().clamp(min=1)
    per_anchor = -(log_prob * pos).sum(1) / count.clamp(min=1)  # (M,)
    with torch.no_grad():
        best_pos = logits.masked_fill(~pos, torch.finfo(logits.dtype).min).amax(1, keepdim=True)  # (M, 1)
        above = ((logits >= best_pos) & ~pos).sum(1)  # ties against the positive, as positive_rank
        if extra_logits is not None:
            above = above + (extra_logits.detach() >= best_pos).sum(1)
        rank = above.float() + 1
        metrics = {"top1": ((rank <= 1) & has).sum() / n, "top5": ((rank <= 5) & has).sum() / n,
                   "mean_rank": (rank * has).sum() / n}
        metrics = {k: v.float() for k, v in metrics.items()}
    return (per_anchor * has).sum() / n, metrics


def view_groups(images: int, views: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """Group ids of K stacked views of B images (view 1 of every image, then view 2, ...):
    offset + image index, int64 (K * B,)."""
    return (torch.arange(images, device=device) + offset).repeat(views)


def label_groups(labels: torch.Tensor, image_ids: torch.Tensor, views: int) -> torch.Tensor:
    """Supervised contrastive groups for K stacked views: the class of a labelled image (>= 0),
    and for an unlabelled one (label < 0) a group of its own (-1 - its image id, never a class)."""
    own = labels.long().where(labels >= 0, -1 - image_ids.long())
    return own.repeat(views)
