"""The linear probe on frozen h: the standard SimCLR evaluation (Chen et al. 2020, §4).

A multinomial logistic regression on standardised features (fastclr.evaluation.features makes
them), fitted full-batch with L-BFGS; its L2 strength is chosen by the cross-entropy on a held-out,
class-balanced 10% of the training split, never on the test split, then the probe is refitted on
the whole training split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from fastclr.evaluation.features import class_labels, require_finite
from fastclr.evaluation.subsets import stratified_folds


@dataclass
class LogisticModel:
    """A fitted multinomial logistic regression on standardised features."""

    weight: torch.Tensor  # (K, D)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (N, K) of raw features (N, D)."""
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of rows whose arg-max class equals the label."""
        return float((self.logits(x).argmax(1) == y).float().mean())


def standardize(x: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = 4096,
                stats: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x - mean) / std column-wise, stored in `dtype`, with the mean and std (fp32, std >= 1e-6):
    x's own, or `stats` (mean, std) when given (those of a larger unlabelled set).

    Written block by block: the whole-matrix expression keeps two fp32 temporaries of x's size,
    which for 120000 x 12544 features (the flip-augmented probe of the default encoder) are 12 GB
    and ran a 24 GiB machine out of memory."""
    if stats is not None:
        mean, std = stats[0].float(), stats[1].float().clamp(min=1e-6)
    elif x.dtype == torch.float32:  # one row has no spread: a constant column's clamped std, as in fp64 below
        mean, std = x.mean(0), (x.std(0) if len(x) > 1 else torch.zeros(x.shape[1])).clamp(min=1e-6)
    else:  # two passes over fp32 copies of one block at a time, accumulated in fp64
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        for s in range(0, len(x), block):
            total += x[s:s + block].double().sum(0)
        mean64 = total / len(x)
        sq = torch.zeros_like(total)
        for s in range(0, len(x), block):
            sq += ((x[s:s + block].double() - mean64) ** 2).sum(0)
        mean, std = mean64.float(), (sq / max(len(x) - 1, 1)).sqrt().float().clamp(min=1e-6)
    out = torch.empty(x.shape, dtype=dtype)
    for s in range(0, len(x), block):
        out[s:s + block] = ((x[s:s + block].float() - mean) / std).to(dtype)
    return out, mean, std


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 300,
    init: LogisticModel | None = None, feature_dtype: torch.dtype = torch.float32,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LogisticModel:
    """Minimise mean cross-entropy + l2/2 * ||W||^2 (bias not penalised) with full-batch L-BFGS,
    starting from zero or from `init`'s weights (a warm start along a regularisation path).

    feature_dtype=torch.bfloat16 stores the standardised features in bf16 for the two matmuls of
    every L-BFGS evaluation (logits and gradient, accumulated in fp32). Those matmuls read the
    whole (N, D) matrix and are memory-bound: bf16 halves their time (60k x 3136 on one core:
    644 -> 324 ms per evaluation); the weights, loss and line search stay in fp32.
    `stats` standardises with a given (mean, std) instead of x's own (see `standardize`).
    """
    xs, mean, std = standardize(x, feature_dtype, stats=stats)
    w0 = init.weight.clone() if init is not None else torch.zeros(num_classes, x.shape[1])
    b0 = init.bias.clone() if init is not None else torch.zeros(num_classes)
    w, b = w0.requires_grad_(), b0.requires_grad_()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (xs @ w.to(feature_dtype).T).float() + b
        loss = F.cross_entropy(logits, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(w.detach(), b.detach(), mean, std)


@dataclass
class ProbeResult:
    """Outcome of a linear probe."""

    accuracy: float
    """Test accuracy of the probe refitted on the whole training split."""
    l2: float
    val_accuracy: float
    train_accuracy: float
    val_loss: float = float("nan")
    """Mean held-out cross-entropy at the chosen L2 (NaN where nothing was held out)."""
    path: tuple[tuple[float, float, float], ...] = ()
    """(L2, held-out accuracy, held-out loss) of each penalty walked, in the order walked."""
    model: LogisticModel | None = field(default=None, repr=False, compare=False)
    """The refitted logistic regression whose test accuracy is `accuracy` (fine-tuning's head starts
    from it: fastclr.evaluation.finetune)."""


def probe_record(res: ProbeResult) -> dict[str, Any]:
    """A probe's figures for eval.json and probe.json; what nothing held out leaves undefined, and a
    loss that is not finite (which strict JSON readers refuse), as null."""
    def number(v: float) -> float | None:
        return v if res.path and math.isfinite(v) else None

    return {"accuracy": res.accuracy, "l2": res.l2, "val_accuracy": number(res.val_accuracy),
            "val_loss": number(res.val_loss), "train_accuracy": res.train_accuracy,
            "l2_path": [[l2, acc, loss if math.isfinite(loss) else None] for l2, acc, loss in res.path]}


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
SelectBy = Literal["loss", "accuracy"]


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    l2_grid: tuple[float, ...] = L2_GRID,
    folds: int = 10,
    cross_validate: bool = False,
    seed: int = 0,
    max_iter: int = 300,
    select_iter: int = 50,
    feature_dtype: torch.dtype = torch.float32,
    stop_early: bool = True,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    select_by: SelectBy = "loss",
) -> ProbeResult:
    """Linear-probe test accuracy with the L2 strength selected on held-out parts of train.

    The training rows are dealt into `folds` class-balanced folds (`stratified_folds`). The L2
    strength is chosen on the first fold held out (1 / folds of the rows), or with `cross_validate`
    on each fold held out in turn, by the held-out mean cross-entropy pooled over the folds (or,
    with select_by="accuracy", the held-out accuracy). The loss, not the accuracy: a count of
    correct images ties between neighbouring penalties to within a few images, and the kernels'
    rounding then chooses one or the other. The default run's untrained network (seed 2) held out
    5,035 and 5,031 of 6,000 right at 1e-3 and 1e-2 with AVX-512 kernels, 5,034 and 5,036 with AVX2
    kernels, penalties whose test accuracies differ by 1.05 points; its held-out losses, 0.434 and
    0.458 with either kernels, do not tie (docs/benchmarks.md section 5). Held-out rows of a class
    the fit part lacks (a class with fewer rows than folds) are left out of the loss: wrong at every
    penalty, their loss falls as the penalty grows, whatever the features.
    The grid is walked from the strongest to the weakest penalty, each fold's fit warm-started from
    its previous solution (a regularisation path), and the final fit on all training data starts
    from the first fold's fit at the selected penalty (`stats`, when given, standardise every fit;
    see `standardize`): L-BFGS here is memory-bound on the (N, D) features, so every pass saved counts.
    With `stop_early` the walk ends at the first penalty whose held-out score does not improve on
    the best so far, a tie included (held-out accuracy and loss along an L2 path improve, peak and
    worsen; the stronger of two tied penalties is kept).
    The selection fits stop at `select_iter` iterations: on the default Fashion-MNIST encoder
    (60000 x 12544 features, selection by accuracy) 50 instead of 100 picked the same L2 and gave 92.14 against 92.16%
    test accuracy in 192 against 266 s (docs/benchmarks.md, "The probe"); the final fit runs to
    convergence (it stopped before 150 of its `max_iter` iterations there).
    """
    if select_by not in ("loss", "accuracy"):
        raise ValueError(f"select_by is 'loss' or 'accuracy', not {select_by!r}")
    train_y, test_y = class_labels(train_x, train_y, "the training"), class_labels(test_x, test_y, "the test")
    require_finite(train_x, "the training features")
    require_finite(test_x, "the test features")
    k = int(max(int(train_y.max()), int(test_y.max())) + 1)
    best_l2, best_score, best_val, best_loss, best_model = l2_grid[0], -math.inf, -1.0, math.nan, None
    path: list[tuple[float, float, float]] = []
    folds = min(folds, len(train_y))
    if len(l2_grid) > 1 and folds > 1:
        fold = torch.from_numpy(stratified_folds(train_y.cpu().numpy(), folds, seed)).to(train_y.device)
        parts = [(fold == f, fold != f) for f in (range(folds) if cross_validate else [0])]
        previous: list[LogisticModel | None] = [None] * len(parts)
        held_out = sum(int(val.sum()) for val, _ in parts)
        # each part's held-out labels, and which of them the fit part has a class for (the same at every penalty)
        labels = [(train_y[val], torch.isin(train_y[val], train_y[fit].unique())) for val, fit in parts]
        scored = sum(int(seen.sum()) for _, seen in labels)
        for l2 in sorted(l2_grid, reverse=True):
            correct, loss = 0.0, 0.0
            for p, ((val, fit), (yv, seen)) in enumerate(zip(parts, labels)):
                previous[p] = model = fit_logistic_regression(train_x[fit], train_y[fit], k, l2, select_iter,
                                                              init=previous[p], feature_dtype=feature_dtype, stats=stats)
                logits = model.logits(train_x[val])
                correct += float((logits.argmax(1) == yv).sum())
                loss += float(F.cross_entropy(logits[seen], yv[seen], reduction="sum"))
            acc, loss = correct / held_out, (loss / scored if scored else math.nan)
            path.append((l2, acc, loss))
            # a loss that is not finite (no row scored, an overflow) ranks last; the first penalty is always taken
            score = acc if select_by == "accuracy" else -loss if math.isfinite(loss) else -math.inf
            if best_model is None or score > best_score:
                best_l2, best_score, best_val, best_loss, best_model = l2, score, acc, loss, previous[0]
            elif stop_early:
                break  # the held-out score worsened: the weaker penalties overfit more still
    model = fit_logistic_regression(train_x, train_y, k, best_l2, max_iter, init=best_model, feature_dtype=feature_dtype,
                                    stats=stats)
    return ProbeResult(model.accuracy(test_x, test_y), best_l2, best_val, model.accuracy(train_x, train_y), best_loss,
                       tuple(path), model)
