"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al. 2018).

Each test feature votes with its k most similar training features, each vote weighted by
exp(similarity / tau). Cheap and label-light: the online monitor during pretraining uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclr.runtime import FP32, Precision


@torch.no_grad()
def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    k: int = 20,
    tau: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 256,
    shortlist: int = 2,
    precision: Precision = FP32,
) -> torch.Tensor:
    """Predicted class (int64 (Q,)) of each query by similarity-weighted kNN votes.

    Similarities of every query to every bank feature are one (Q, D) x (D, N) product per chunk:
    the cost of kNN on wide h (10k x 60k x 12544 for Fashion-MNIST's default: 89 s in fp32 on
    2 cores). With `shortlist` > 0 that product runs in bf16 (about 3x the fp32 matmul rate
    here) only to shortlist the `shortlist * k` most similar bank features; their similarities
    are then recomputed in fp32 and the k nearest taken from those, so the votes use fp32
    similarities and differ from the exact ones only if a true neighbour falls outside the
    shortlist. On the default Fashion-MNIST encoder's features all 10k test predictions equal
    the exact ones with shortlist 2 (37 s) and 4 (56 s) against 94 s exact (docs/benchmarks.md,
    section 4). The shortlist is used only where bf16 is native (`precision` bf16): elsewhere bf16
    is emulated and slower than the exact fp32 product, which `shortlist=0` always gives.
    """
    if precision.name != "bf16":
        shortlist = 0
    c = num_classes or int(train_y.max()) + 1
    bank = F.normalize(train_x.float(), dim=1)
    k = min(k, bank.shape[0])
    m = min(shortlist * k, bank.shape[0])
    bank16 = bank.to(torch.bfloat16) if shortlist > 0 else bank
    out = []
    for start in range(0, query_x.shape[0], chunk):
        q = F.normalize(query_x[start : start + chunk].float(), dim=1)
        if shortlist > 0:
            cand = (q.to(torch.bfloat16) @ bank16.T).topk(m, dim=1).indices  # (q, m)
            exact = torch.bmm(bank[cand], q[:, :, None])[:, :, 0]  # (q, m) fp32 similarities
            sim, pos = exact.topk(k, dim=1)
            idx = cand.gather(1, pos)
        else:
            sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(q.shape[0], c, device=q.device)
        votes.scatter_add_(1, train_y[idx], torch.exp(sim / tau))
        out.append(votes.argmax(1))
    return torch.cat(out)


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 20,
    tau: float = 0.07, precision: Precision = FP32,
) -> float:
    """Fraction of test features whose kNN prediction equals their label."""
    pred = knn_predict(train_x, train_y, test_x, k, tau, int(max(train_y.max(), test_y.max())) + 1,
                       precision=precision)
    return float((pred == test_y).float().mean())
