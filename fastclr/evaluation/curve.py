"""The label-efficiency sweep: one protocol evaluated on the fixed subset of every (labels per
class, seed), summarised per label count as mean and spread over seeds."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fastclr.evaluation.subsets import stratified_subset, subset_id
from fastclr.evaluation.table import same_subsets


def mean_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def label_sweep(
    labels: np.ndarray,
    per_class: Sequence[int],
    seeds: Sequence[int],
    classes: list[str],
    evaluate: Callable[[np.ndarray, int], dict[str, Any]],
    log: Callable[[str], None] = lambda s: None,
    name: str = "",
) -> list[dict[str, Any]]:
    """For each n in `per_class`: `evaluate(indices, seed)` (which returns at least "accuracy") on
    the stratified subset of n labels per class for every seed, and the summary of the accuracies.

    Every protocol that calls this with the same labels and seeds sees the same subsets.
    """
    out = []
    for n in per_class:
        runs = []
        for seed in seeds:
            idx = stratified_subset(labels, n, seed, classes)
            runs.append(dict(evaluate(idx, seed), seed=seed, subset=subset_id(idx)))
        accs = [r["accuracy"] for r in runs]
        out.append({"labels_per_class": n, **mean_and_spread(accs), "runs": runs})
        log(f"{name} {n}/class: {100 * statistics.fmean(accs):.2f}% over {len(accs)} seed(s){same_subsets(runs)}")
    return out
