"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al. 2018).

Each test feature votes with its k most similar training features, each vote weighted by
exp(similarity / tau). Cheap and label-light: the online monitor during pretraining uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclr.errors import FastclrError
from fastclr.evaluation.features import class_labels, require_finite

from fastclr.runtime import FP32, Precision, bf16_native_on


def topk_columns(values: torch.Tensor, k: int, top: torch.return_types.topk | None = None) -> torch.Tensor:
    """Columns (q, k), ascending, of the k largest values of each row of `values` (q, N); among
    values equal to the k-th largest, the first columns. (`topk` alone picks an arbitrary subset
    of a tie, so duplicate images or all-zero features made results depend on its internals.)
    `top`: `values.topk(min(k + 1, N), dim=1)` when the caller has it already."""
    n = values.shape[1]
    top = top if top is not None else values.topk(min(k + 1, n), dim=1)  # one more: a tie across the k-th place shows
    cols, kth = top.indices[:, :k].sort(dim=1).values, top.values[:, k - 1 : k]  # (q, k), (q, 1)
    crowded = (top.values[:, k] == kth[:, 0]).nonzero()[:, 0] if k < n else cols.new_empty(0)
    if crowded.numel():
        v, kv = values[crowded], kth[crowded]
        above, tied = v > kv, v == kv
        keep = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
        cols[crowded] = keep.nonzero()[:, 1].view(-1, k)
    return cols


def _exact(unit_bank: torch.Tensor, q: torch.Tensor, cand: torch.Tensor, budget: int = 64 << 20) -> torch.Tensor:
    """Similarities (q, m) of each query with its candidate rows `cand` (q, m), each one the same
    elementwise product and sum over D whatever the row's place (a matrix kernel's blocks differ),
    in slices of queries whose gathered rows stay under `budget` bytes."""
    per_query = max(1, cand.shape[1] * unit_bank.shape[1] * unit_bank.element_size())
    step = max(1, budget // per_query)
    parts = [(unit_bank[cand[s : s + step]] * q[s : s + step, None, :]).sum(-1) for s in range(0, len(q), step)]
    return torch.cat(parts) if parts else cand.new_zeros(cand.shape, dtype=q.dtype)


def _rank_exactly(unit_bank: torch.Tensor, q: torch.Tensor, sim: torch.Tensor, row: torch.Tensor, val: torch.Tensor,
                  close: torch.Tensor, near: float) -> None:
    """For the queries marked `close` (q,), rank every row whose product value in `sim` (q, N) is
    within `near` of their k-th or above again, on `_exact` values; `row` and `val` (q, k) are
    updated in place. An excluded row (-2 in `sim`) is never among them: k < N then, so the k-th
    is a cosine, at least -1."""
    k = row.shape[1]
    kth = val.min(1).values
    for i in close.nonzero()[:, 0].tolist():
        cand = (sim[i] >= kth[i] - near).nonzero()[:, 0][None]  # (1, c), c >= k, ascending
        exact = _exact(unit_bank, q[i : i + 1], cand)
        pos = topk_columns(exact, k)
        row[i], val[i] = cand.gather(1, pos)[0], exact.gather(1, pos)[0]


ROUGH_ERROR = 2.0**-6
"""How far a bf16 product of unit rows can be from the exact cosine: each input rounded to bf16
(a relative 2^-8 each) and the product rounded to bf16 (2^-8 of a value at most 1): at most 3 x
2^-8 (fp32 accumulation adds under 1e-5 at 12544 dimensions); 2^-6 leaves a margin."""


def _search(unit_bank: torch.Tensor, q: torch.Tensor, own: torch.Tensor | None, k: int,
            near: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact search: rows (q, k), ascending, and their similarities, from one (q, D) x (D, N)
    product; `own` (q, 1): the row each query must not return."""
    n = unit_bank.shape[0]
    sim = q @ unit_bank.T  # (q, N)
    sim = sim if own is None else sim.masked_fill(torch.arange(n, device=q.device)[None] == own, -2.0)
    top = sim.topk(min(k + 1, n), dim=1)
    row = topk_columns(sim, k, top)
    val = sim.gather(1, row)
    # values this close among the k nearest, or between the k-th and the next, may be one row twice
    close = (top.values[:, :-1] - top.values[:, 1:] <= near).any(1)
    _rank_exactly(unit_bank, q, sim, row, val, close, near)
    return row, val


MOSTLY_UNSURE = 0.5
"""Beyond which share of a chunk's queries searched exactly again the later chunks search exactly
from the start (on 512-d h nearly every query was: the shortlist then cost 2-4x the exact search)."""


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
    (Q, k), most similar first, ties in row order. The nearest-neighbour search of evaluation
    (the kNN classifier, the report's retrievals, `fastclr neighbours`); the training step's
    search for nearest-neighbour positives is an argmax of its own, which never waits for a GPU.

    Similarities are computed in the inputs' dtype (float32 at least), for each chunk of queries as
    one (q, D) x (D, N) product: the cost of kNN on wide h (10k x 60k x 12544 for a 12544-d readout:
    89 s in fp32 on 2 cores). That product gives bitwise-identical rows values a few ulps apart by
    their place in the matrix kernel's blocks (a store holding an image twice returned the copies
    out of row order); so a query whose k nearest include values that close, or have rivals that
    close to the k-th, is ranked again on values recomputed the same way for every row (`_exact`).
    Where bf16 is native (`precision` bf16) and `shortlist` > 0, the product runs in bf16 only to
    shortlist the `shortlist * k` most similar rows, whose similarities are then recomputed exactly;
    a query for which a row left out could still be a true neighbour (its bf16 value within
    ROUGH_ERROR of the k-th exact similarity) is ranked again over every such row, so the result
    is the exact search's. Elsewhere bf16 is emulated, and the product is fp32.
    exclude: (Q,) a bank row each query must not return (itself, when queries come from the bank);
    with it, at most n - 1 rows are returned, so a k beyond the bank never returns the excluded one.
    """
    dtype = torch.promote_types(bank.dtype, torch.float32)
    unit_bank = F.normalize(bank.to(dtype), dim=1)
    n = unit_bank.shape[0]
    k = min(k, n if exclude is None else n - 1)
    if k < 1:  # no neighbour to give: k of 0, an empty bank, or one row that each query excludes
        empty = torch.empty(queries.shape[0], 0, device=unit_bank.device)
        return empty.to(dtype), empty.long()
    native = precision.name == "bf16" and bf16_native_on(unit_bank.device.type)  # a GPU run's bank may be on the CPU
    m = min(shortlist * k, n) if native and shortlist > 0 else 0
    bank16 = unit_bank.to(torch.bfloat16) if m else None
    # How far apart the product may put two identical rows: at most 2.5 eps measured for unit rows
    # of 16 to 12544 dimensions (benchmarks/knn_copy_spread.py, docs/benchmarks.md section 5).
    near = 16 * torch.finfo(dtype).eps
    everything = torch.arange(n, device=unit_bank.device)[None]
    sims, rows = [], []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start : start + chunk].to(dtype), dim=1)  # (q, D)
        own = exclude[start : start + chunk].to(q.device)[:, None] if exclude is not None else None
        if bank16 is not None:
            rough = q.to(torch.bfloat16) @ bank16.T
            rough = rough if own is None else rough.masked_fill(everything == own, -2.0)
            top = rough.topk(min(m + 1, n), dim=1)
            cand = topk_columns(rough, m, top)
            sim = _exact(unit_bank, q, cand)  # (q, m)
            sim = sim if own is None else sim.masked_fill(cand == own, -2.0)
            pos = topk_columns(sim, k)  # (q, k) columns of `sim`, ascending, so rows ascending too
            row, val = cand.gather(1, pos), sim.gather(1, pos)
            # A row left out of the shortlist can be a true neighbour only if its bf16 value is within
            # ROUGH_ERROR of the k-th exact one (features nearly alike, cosines all within 0.99-0.999,
            # are 2 or 3 bf16 values: the shortlist was arbitrary there, and kNN read 60.6% where the
            # exact search read 84.8%): such queries are searched exactly, together.
            unsure = ((top.values[:, m].float() >= val.min(1).values - ROUGH_ERROR).nonzero()[:, 0] if m < n
                      else cand.new_empty(0))
            if unsure.numel():
                row[unsure], val[unsure] = _search(unit_bank, q[unsure], None if own is None else own[unsure], k, near)
            if unsure.numel() > len(q) * MOSTLY_UNSURE:
                bank16 = None  # the shortlist saves nothing on these features: the next chunks search exactly
        else:
            row, val = _search(unit_bank, q, own, k, near)
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
    """Fraction of test features whose kNN prediction equals their label (right / all, in float64)."""
    named = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    for name, given in named.items():
        if not isinstance(given, torch.Tensor):  # numpy's failed on .dim() deep inside
            raise FastclrError(f"knn_accuracy takes torch tensors; {name} is a {type(given).__module__}."
                               f"{type(given).__name__} (torch.from_numpy makes one of an array)")
    if k < 1 or not tau > 0:  # k 0 voted for no class (every query class 0); tau 0 divided by zero
        raise FastclrError(f"kNN needs k >= 1 and tau > 0, got k {k} and tau {tau}")
    train_y, test_y = class_labels(train_x, train_y, "the bank's"), class_labels(test_x, test_y, "the queries'")
    require_finite(train_x, "the bank's features")
    require_finite(test_x, "the queries' features")
    pred = knn_predict(train_x, train_y, test_x, k, tau, int(max(train_y.max(), test_y.max())) + 1,
                       precision=precision)
    return int((pred == test_y).sum()) / len(test_y)  # 286/300 was 0.95333331823349, a float32 mean
