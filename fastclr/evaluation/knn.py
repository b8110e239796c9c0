"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al. 2018).

Each test feature votes with its k most similar training features, each vote weighted by
exp(similarity / tau). Cheap and label-light: the online monitor during pretraining uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclr.runtime import FP32, Precision


def topk_columns(values: torch.Tensor, k: int) -> torch.Tensor:
    """Columns (q, k), ascending, of the k largest values of each row of `values` (q, N); among
    values equal to the k-th largest, the first columns. (`topk` alone picks an arbitrary subset
    of a tie, so duplicate images or all-zero features made results depend on its internals.)"""
    n = values.shape[1]
    top = values.topk(min(k + 1, n), dim=1)  # one more: a tie across the k-th place shows in it
    cols, kth = top.indices[:, :k].sort(dim=1).values, top.values[:, k - 1 : k]  # (q, k), (q, 1)
    crowded = (top.values[:, k] == kth[:, 0]).nonzero()[:, 0] if k < n else cols.new_empty(0)
    if crowded.numel():
        v, kv = values[crowded], kth[crowded]
        above, tied = v > kv, v == kv
        keep = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
        cols[crowded] = keep.nonzero()[:, 1].view(-1, k)
    return cols


@torch.no_grad()
def cosine_topk(
    bank: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    precision: Precision = FP32,
    shortlist: int = 2,
    chunk: int = 256,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k bank rows most cosine-similar to each query: similarities (Q, k) and row indices
    (Q, k), most similar first, ties in row order. The one nearest-neighbour search of fastclr
    (the kNN classifier, the report's retrievals, `fastclr neighbours`, and the support set of
    nearest-neighbour positives in pretraining).

    Similarities are computed in the inputs' dtype (float32 at least). For each chunk of queries
    one (q, D) x (D, N) product shortlists the `shortlist * k` (at least 2k) most similar rows;
    their similarities are then recomputed row by row, each the same reduction over D, and the k
    nearest taken from those. The product alone gives bitwise-identical rows different values by
    their position in the matrix kernel's blocks (a store holding an image twice returned the copies
    out of row order). The product is the cost of kNN on wide h (10k x 60k x 12544 for a 12544-d
    readout: 89 s in fp32 on 2 cores); where bf16 is native (`precision` bf16) and `shortlist` > 0
    it runs in bf16, so results differ from the exact search only if a true neighbour falls outside
    the shortlist (on 12544-d Fashion-MNIST features all 10k test predictions were equal with
    shortlist 2: 37 s against 94 s; docs/benchmarks.md). Elsewhere bf16 is emulated, and the product
    is fp32.
    exclude: (Q,) a bank row each query must not return (itself, when queries come from the bank).
    """
    dtype = torch.promote_types(bank.dtype, torch.float32)
    unit_bank = F.normalize(bank.to(dtype), dim=1)
    n = unit_bank.shape[0]
    k = min(k, n)
    m = min(max(shortlist, 2) * k, n)
    bank16 = unit_bank.to(torch.bfloat16) if precision.name == "bf16" and shortlist > 0 else None
    everything = torch.arange(n, device=unit_bank.device)[None]
    sims, rows = [], []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start : start + chunk].to(dtype), dim=1)  # (q, D)
        rough = q.to(torch.bfloat16) @ bank16.T if bank16 is not None else q @ unit_bank.T  # (q, N)
        own = exclude[start : start + chunk].to(q.device)[:, None] if exclude is not None else None
        if own is not None:
            rough = rough.masked_fill(everything == own, -2.0)
        cand = topk_columns(rough, m)  # (q, m) shortlisted rows, ascending
        sim = (unit_bank[cand] * q[:, None, :]).sum(-1)  # (q, m): the same sum for every row
        if own is not None:
            sim = sim.masked_fill(cand == own, -2.0)
        pos = topk_columns(sim, k)  # (q, k) columns of `sim`, ascending, so rows ascending too
        row, val = cand.gather(1, pos), sim.gather(1, pos)
        by_value = val.sort(dim=1, descending=True, stable=True).indices  # equal similarities stay in row order
        sims.append(val.gather(1, by_value))
        rows.append(row.gather(1, by_value))
    return torch.cat(sims), torch.cat(rows)


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
    """Predicted class (int64 (Q,)) of each query by similarity-weighted votes of its k nearest
    bank features (`cosine_topk`)."""
    c = num_classes or int(train_y.max()) + 1
    sim, idx = cosine_topk(train_x, query_x, k, precision, shortlist, chunk)
    votes = torch.zeros(query_x.shape[0], c, device=sim.device)
    # exp(s / tau) overflows float32 once tau < 1/88.7 (then every inf vote ties and the lowest
    # class wins); scaling a query's votes by exp(-s_max / tau) leaves its argmax as it is.
    sim = sim.float()
    votes.scatter_add_(1, train_y[idx], torch.exp((sim - sim[:, :1]) / tau))
    return votes.argmax(1)


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 20,
    tau: float = 0.07, precision: Precision = FP32,
) -> float:
    """Fraction of test features whose kNN prediction equals their label."""
    pred = knn_predict(train_x, train_y, test_x, k, tau, int(max(train_y.max(), test_y.max())) + 1,
                       precision=precision)
    return float((pred == test_y).float().mean())
