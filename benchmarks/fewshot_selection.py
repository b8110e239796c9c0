"""How the few-label probe chooses its L2 strength, on one trained run and the same network untrained.

The features of the 60k training and 10k test images are extracted once per network (as
`fastclr evaluate` extracts them); on the same stratified subsets (`stratified_subset`), four ways
of choosing the penalty from the few-label grid, each then refitted on the whole subset as the
product does:

    random20  one held-out 20% of the subset drawn without regard to class (fastclr before
              2026-12-04: at 10 labels per class 20 images, some classes absent, others 4 or 5)
    fold0     one class-balanced held-out fold of 5 (2 images of every class at 10 per class;
              `fewshot_fit`: what evaluate runs), the penalty of the lowest held-out cross-entropy
              (since 2026-12-07)
    fold0_accuracy  the same fold, the penalty of the highest held-out accuracy (2026-12-04 to -06)
    cv5       5-fold cross-validation on class-balanced folds, each label held out once
    oracle    the penalty with the best test accuracy: a bound no user can reach, to show how much
              the choice itself is worth (over --oracle-grid; its record gives every penalty's
              mean test accuracy)

    python benchmarks/fewshot_selection.py runs/RUN --per-class 10,100 --seeds 0-9 --out selection.jsonl
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastclr.evaluation.fewshot import FEWSHOT_FOLDS, FEWSHOT_ITERS, FEWSHOT_L2_GRID, fewshot_fit
from fastclr.evaluation.probe import fit_logistic_regression, linear_probe
from fastclr.evaluation.subsets import stratified_subset

from fewshot_variants import network_features, seeds_of
from harness import describe, record

WAYS = ("random20", "fold0", "fold0_accuracy", "cv5", "oracle")


def random20(x: torch.Tensor, y: torch.Tensor, te: torch.Tensor, yte: torch.Tensor, seed: int) -> tuple[float, float]:
    """The selection fastclr ran before 2026-12-04, transcribed: a random 20% held out, the grid
    walked from the strongest penalty with warm starts, ties to the stronger; (test accuracy, L2)."""
    k = int(max(int(y.max()), int(yte.max())) + 1)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(len(perm) * 0.2))
    val, fit = perm[:n_val], perm[n_val:]
    best_l2, best_val, best, previous = FEWSHOT_L2_GRID[0], -1.0, None, None
    for l2 in sorted(FEWSHOT_L2_GRID, reverse=True):
        previous = fit_logistic_regression(x[fit], y[fit], k, l2, FEWSHOT_ITERS[1], init=previous)
        acc = previous.accuracy(x[val], y[val])
        if acc > best_val:
            best_l2, best_val, best = l2, acc, previous
    model = fit_logistic_regression(x, y, k, best_l2, FEWSHOT_ITERS[0], init=best)
    return model.accuracy(te, yte), best_l2


def penalty_scores(x: torch.Tensor, y: torch.Tensor, te: torch.Tensor, yte: torch.Tensor,
                   grid: tuple[float, ...]) -> dict[float, float]:
    """Test accuracy of each penalty of `grid`, fitted on the whole subset."""
    k = int(max(int(y.max()), int(yte.max())) + 1)
    return {l2: fit_logistic_regression(x, y, k, l2, FEWSHOT_ITERS[0]).accuracy(te, yte) for l2 in grid}


def choose(way: str, x: torch.Tensor, y: torch.Tensor, te: torch.Tensor, yte: torch.Tensor,
           seed: int, scores: dict[float, float]) -> tuple[float, float]:
    """(test accuracy, chosen L2) of one way of choosing."""
    if way == "random20":
        return random20(x, y, te, yte, seed)
    if way == "fold0":
        r = fewshot_fit(x, y, te, yte, seed)
        return r.accuracy, r.l2
    if way == "fold0_accuracy":
        r = fewshot_fit(x, y, te, yte, seed, select_by="accuracy")
        return r.accuracy, r.l2
    if way == "cv5":
        r = linear_probe(x, y, te, yte, l2_grid=FEWSHOT_L2_GRID, folds=FEWSHOT_FOLDS, cross_validate=True, seed=seed,
                         max_iter=FEWSHOT_ITERS[0], select_iter=FEWSHOT_ITERS[1], stop_early=False)
        return r.accuracy, r.l2
    if way == "oracle":
        best = max(scores, key=lambda l2: scores[l2])
        return scores[best], best
    raise SystemExit(f"unknown way {way!r}; choose from {', '.join(WAYS)}")


def main() -> None:
    """One JSON line per (network, way, labels per class): mean and spread over the subset seeds."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--per-class", default="10,100")
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--networks", default="trained,untrained")
    ap.add_argument("--oracle-grid", default=",".join(str(v) for v in FEWSHOT_L2_GRID))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    labels, ytr, yte, networks = network_features(a.run_dir, a.networks.split(","))
    seeds = seeds_of(a.seeds)
    grid = tuple(float(v) for v in a.oracle_grid.split(","))
    for which, tr, te in networks:
        for n in (int(s) for s in a.per_class.split(",")):
            for way in a.ways.split(","):
                t0 = time.perf_counter()
                got, per_penalty = [], []
                for seed in seeds:
                    idx = torch.from_numpy(stratified_subset(labels, n, seed))
                    scores = penalty_scores(tr[idx], ytr[idx], te, yte, grid) if way == "oracle" else {}
                    per_penalty.append(scores)
                    got.append(choose(way, tr[idx], ytr[idx], te, yte, seed, scores))
                accs = [100 * acc for acc, _ in got]
                rec: dict[str, Any] = {
                    "benchmark": "fewshot_selection", "machine": describe(), "run": str(a.run_dir), "network": which,
                    "way": way, "per_class": n, "seeds": len(seeds), "mean": round(float(np.mean(accs)), 2),
                    "std": round(float(np.std(accs, ddof=1)), 2) if len(accs) > 1 else 0.0,
                    "accuracies": [round(v, 2) for v in accs], "l2": [l2 for _, l2 in got],
                    "seconds": round(time.perf_counter() - t0, 1)}
                if way == "oracle":
                    rec["per_penalty"] = {str(l2): round(100 * float(np.mean([p[l2] for p in per_penalty])), 2)
                                          for l2 in grid}
                record(a.out, rec)


if __name__ == "__main__":
    main()
