"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al. 2018).

Each test feature votes with its k most similar training features, each vote weighted by
exp(similarity / tau). Cheap and label-light: the online monitor during pretraining uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    k: int = 20,
    tau: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class (int64 (Q,)) of each query by similarity-weighted kNN votes."""
    c = num_classes or int(train_y.max()) + 1
    bank = F.normalize(train_x.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query_x.shape[0], chunk):
        q = F.normalize(query_x[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(q.shape[0], c, device=q.device)
        votes.scatter_add_(1, train_y[idx], torch.exp(sim / tau))
        out.append(votes.argmax(1))
    return torch.cat(out)


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 20, tau: float = 0.07
) -> float:
    """Fraction of test features whose kNN prediction equals their label."""
    pred = knn_predict(train_x, train_y, test_x, k, tau, int(max(train_y.max(), test_y.max())) + 1)
    return float((pred == test_y).float().mean())
