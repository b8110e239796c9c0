"""Fixed, stratified label subsets: the labelled images the few-label protocols may use.

For a seed, every class's training images are put in one random order, and the subset with n
labels per class takes the first n of each class. Subsets are therefore identical for the same
(labels, seed), exactly n per class, and nested (the 10-per-class subset is inside the 20-per-class
one), so a label-efficiency curve compares growing label sets rather than unrelated draws. The
few-label probe, the supervised baseline and fine-tuning all call this, so at the same (n, seed)
they see the very same images.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fastclr.errors import FastclrError


def class_orders(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """For each class 0..num_classes-1, the indices of its images in a random order fixed by `seed`."""
    rng = np.random.default_rng([seed, 20200213])  # second word: SimCLR's arXiv date, any constant will do
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def stratified_subset(labels: np.ndarray, per_class: int, seed: int,
                      class_names: list[str] | None = None) -> np.ndarray:
    """Sorted int64 indices of `per_class` images of every class; a one-line error when a class has fewer."""
    labels = np.asarray(labels)
    if per_class < 1:
        raise FastclrError(f"labels per class must be at least 1, got {per_class}")
    k = len(class_names) if class_names else int(labels.max()) + 1
    orders = class_orders(labels, k, seed)
    counts = [len(o) for o in orders]
    short = int(np.argmin(counts))
    if counts[short] < per_class:
        name = f"{short} ({class_names[short]})" if class_names else str(short)
        if counts[short] == 0:
            raise FastclrError(f"class {name} has no labelled training images, and a class-balanced subset takes "
                               "some of every class; label some of its images, or leave the class out")
        raise FastclrError(
            f"asked for {per_class} labels per class but class {name} has only {counts[short]} labelled training "
            f"images; use --labels-per-class values of at most {counts[short]}"
        )
    return np.sort(np.concatenate([o[:per_class] for o in orders])).astype(np.int64)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0 .. folds-1) of every row, int64 (N,): the classes in a random order, each class's
    rows in a random order (both fixed by `seed`), are dealt to the folds in turn, the next class
    going on where the last one stopped. So every fold holds each class's n / folds rows give or
    take one, and the folds' sizes differ by at most one: a held-out fold has the labelled set's
    class balance, which a plain random split of 20 of 100 labels does not (one class could go
    unseen, another be held out three times). A class of fewer than `folds` rows is in that many
    folds, which ones drawn with the seed."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 20200213, 2])  # not stratified_subset's stream: a subset is not re-dealt in its own order
    dealt = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in rng.permutation(np.unique(labels))])
    fold = np.empty(len(labels), dtype=np.int64)
    fold[dealt] = np.arange(len(dealt)) % folds
    return fold


def smallest_class(labels: np.ndarray, num_classes: int) -> int:
    """The labelled images of the class with fewest (0 when a class has none)."""
    return int(np.bincount(np.asarray(labels), minlength=num_classes)[:num_classes].min())


def fraction_per_class(labels: np.ndarray, fraction: float, num_classes: int) -> int:
    """Labels per class of a class-balanced subset holding `fraction` of the labels (at least 1).

    SimCLR's 1% and 10% ImageNet subsets are class-balanced in the same way (Chen et al. 2020, §6).
    """
    if not 0 < fraction <= 1:
        raise FastclrError(f"a label fraction must be in (0, 1], got {fraction}; e.g. 0.01 for 1%")
    return max(1, int(round(fraction * len(labels) / num_classes)))


def labels_for_fraction(labels: np.ndarray, fraction: float, num_classes: int, flag: str) -> int:
    """`fraction_per_class`, with a one-line error naming `flag` when a class has fewer labelled
    images than that (a class of none is named by `stratified_subset`)."""
    n = fraction_per_class(labels, fraction, num_classes)
    fewest = smallest_class(labels, num_classes)
    if 0 < fewest < n:
        raise FastclrError(f"{flag} {fraction:g} asks for {n} labels per class but a class has only {fewest} labelled "
                           f"training images; use {flag} of at most {fewest * num_classes / len(labels):.4g}")
    return n


def subset_id(indices: np.ndarray) -> str:
    """A short fingerprint of a subset, recorded in the results so that equal subsets can be checked."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]
