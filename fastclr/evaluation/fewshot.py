"""Few labels on frozen features: the linear probe fitted on a small stratified subset.

The L2 strength is chosen the only honest way a user with n labels per class could: by the
cross-entropy on a held-out, class-balanced 20% of those n labels (never the test split), as the
full-label probe chooses (fastclr.evaluation.probe), from that probe's grid
without its weakest penalty, since few samples need more regularisation; then refitted on all n.
Class-balanced, so that from 5 labels per class no class goes unseen by the selection fits or
unscored by the held-out part;
not cross-validated: over 10 subsets at 10 and 100 labels per class, 5-fold cross-validation chose
no better (-0.04 to +0.02 points) for five times the fits, and the best penalty in hindsight was
worth at most 0.10 points over this choice (docs/benchmarks.md section 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fastclr.cpus import at_most_threads
from fastclr.evaluation.curve import label_sweep
from fastclr.evaluation.probe import ProbeResult, SelectBy, linear_probe

FEWSHOT_L2_GRID = (1e-3, 1e-2, 1e-1)
FEWSHOT_FOLDS = 5  # the held-out part is one of 5 class-balanced folds: 20%
# L-BFGS iterations (final fit, each selection fit). On a 3-epoch Fashion-MNIST encoder, 100/50
# instead of the full probe's 300/100 changed test accuracy by at most 0.05 points at 10, 100 and
# 500 labels per class, and took a third of the time (at 500/class: 3.5 s instead of 9.7 s).
FEWSHOT_ITERS = (100, 50)
# At most this many labelled images, a fit runs on one thread. Its matrices are too small for a
# second thread to pay much, and beside any other busy process the threads wait on each other: on a
# 2-vCPU Xeon (AVX-512, no bf16), 5 subsets of 100 labels per class took 1.9 s on 2 threads and
# 2.1-2.4 s on one alone, 5.9-8.2 s against 2.0-2.5 s beside one busy process; at 200 and 500 per
# class 2 threads are 1.3-1.5x faster alone (docs/benchmarks.md section 5, "Threads of the few-label fits").
ONE_THREAD_UP_TO = 1000


# The whole (short) grid: a held-out part of a few images per class scores penalties noisily,
# so a walk that stops at the first worse score would stop at noise.
def fewshot_fit(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, seed: int,
                stats: tuple[torch.Tensor, torch.Tensor] | None = None, select_by: SelectBy = "loss") -> ProbeResult:
    """The few-label probe of one subset: L2 chosen by the held-out cross-entropy of a class-balanced
    20% of it, refitted on all of it; features standardised with `stats` (mean, std) when given, else
    with the subset's own."""
    with at_most_threads(1 if len(x) <= ONE_THREAD_UP_TO else torch.get_num_threads()):
        return linear_probe(x, y, test_x, test_y, l2_grid=FEWSHOT_L2_GRID, folds=FEWSHOT_FOLDS, seed=seed,
                            max_iter=FEWSHOT_ITERS[0], select_iter=FEWSHOT_ITERS[1], stop_early=False, stats=stats,
                            select_by=select_by)


def fewshot_probe(
    train_x: torch.Tensor,
    train_y: np.ndarray,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    per_class: tuple[int, ...],
    seeds: tuple[int, ...],
    classes: list[str],
    log: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """Linear-probe test accuracy for every (labels per class, seed) subset of the training features."""
    ytr, yte = torch.from_numpy(train_y), torch.from_numpy(test_y)

    def one(idx: np.ndarray, seed: int) -> dict[str, Any]:
        i = torch.from_numpy(idx)
        res = fewshot_fit(train_x[i], ytr[i], test_x, yte, seed)
        return {"accuracy": res.accuracy, "l2": res.l2}

    return label_sweep(train_y, per_class, seeds, classes, one, log, "few-label probe")
