"""What `fastclr evaluate` does by default: the protocols, label counts, seeds and budgets.

The defaults are sized so that the whole default evaluation of the default Fashion-MNIST run
fits in 10 minutes on 2 CPU cores (measurements: docs/benchmarks.md, benchmarks/evaluate_time.py);
every number can be raised from the command line when time allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fastclr.config import SEED_MAX
from fastclr.errors import FastclrError
from fastclr.evaluation.classifier import TrainRecipe

PROTOCOLS = ("linear", "knn", "fewshot", "supervised", "finetune", "quality")
"""Run by default, in this order."""
EXTRA_PROTOCOLS = ("pixels",)
"""Run only when asked for: the linear probe and kNN on raw pixels, the floor any encoder must beat."""
LABELLED = ("linear", "knn", "fewshot", "supervised", "finetune", "pixels")
"""Protocols that need the labelled train and test splits."""


LIST_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "seeds": (f"seeds from 0 to {SEED_MAX}", lambda v: 0 <= v <= SEED_MAX),
    "labels_per_class": ("counts of at least 1", lambda v: v >= 1),
    "finetune_fractions": ("fractions above 0 and at most 1", lambda v: 0 < v <= 1),
}
"""What each list option takes (every *_seeds list takes seeds), in words and as a test."""


@dataclass
class EvaluateOptions:
    """Choices of one evaluation."""

    protocols: tuple[str, ...] = PROTOCOLS
    labels_per_class: tuple[int, ...] = (10, 20, 50, 100, 200, 500)
    """The few-label points of the label-efficiency curve (the issue's list)."""
    seeds: tuple[int, ...] = tuple(range(10))
    """Subset seeds of the few-label probe, whose fits take well under a second each. Ten, because at
    10 labels per class which images are labelled moves the figure by about 1.1 points (sample std
    over subsets) and the same seeds draw the same subsets for every run: three fixed subsets lay
    below the ten's mean on each of three runs (docs/benchmarks.md section 2, "Ten label subsets")."""
    supervised_seeds: tuple[int, ...] = (0, 1, 2)
    """Subset seeds of the supervised baseline, each a full training run: the first of the few-label
    probe's, so that "over from scratch" compares the same labels (`table.paired_gap`)."""
    finetune_fractions: tuple[float, ...] = (0.01, 0.1)
    """SimCLR's semi-supervised label fractions."""
    finetune_seeds: tuple[int, ...] = (0,)
    knn_k: int = 0
    """0: the run's own eval.knn_k (the monitor's k)."""
    knn_tau: float = 0.07
    """Vote temperature of Wu et al. 2018, as the monitor uses."""
    steps: int = 200
    """Optimiser steps of every supervised or fine-tuning run (equal compute for both)."""
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1
    shift_fraction: float = 0.0625
    """Largest random shift when training from scratch, as a fraction of the side (2 px at 28 px).
    Fashion-MNIST, 100 labels/class, 200 steps: 84.1% with 2 px, 83.6% with 4 px, 83.0% with none."""
    finetune_shift_fraction: float = 0.0
    """The same for fine-tuning, where shifts hurt: 10% labels, 200 steps, lr 1e-3: 87.3% with
    none, 84.9% with 4 px (a pretrained encoder is already shift-robust; shifted views then only
    move its inputs away from the centred test images)."""
    quality_images: int = 2048
    """Images (and view pairs) for the label-free measures: pairwise uniformity is O(n^2)."""
    view_seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    """auto (this machine's choice, fastclr.runtime), bf16, fp16 or fp32: features, probe, kNN and training."""
    threads: int = 0
    """CPU threads for PyTorch; 0: PyTorch's choice, at most one per usable CPU (affinity and cgroup CPU quota)."""

    def check(self) -> None:
        """One line, before any feature is computed, for a choice no evaluation can run with, named
        by its flag: the command line's checks, made for `fastclr.evaluate` called from Python too
        (there "3 seeds" of one repeated seed were the same subset, shown as a spread of 0)."""
        known = PROTOCOLS + EXTRA_PROTOCOLS
        bad = [p for p in self.protocols if p not in known]
        if bad or not self.protocols:
            raise FastclrError(f"unknown protocol {', '.join(bad) or repr('')}; choose from: {', '.join(known)} (or all)")
        for name in ("labels_per_class", "seeds", "supervised_seeds", "finetune_fractions", "finetune_seeds"):
            values, flag = getattr(self, name), "--" + name.replace("_", "-")
            example = ",".join(str(v) for v in getattr(EvaluateOptions(), name))
            if not values:
                raise FastclrError(f"{flag} is empty; give at least one value, e.g. {flag} {example}")
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:  # a repeated seed is the same draw again: its spread of 0 would pass for agreement
                raise FastclrError(f"{flag} repeats {', '.join(map(str, repeated))}: each value is one measurement; "
                                   f"give distinct values, e.g. {flag} {example}")
            kind, fits = LIST_RANGES["seeds" if name.endswith("seeds") else name]
            if not all(fits(v) for v in values):
                raise FastclrError(f"{flag} takes {kind}, got {','.join(map(str, values))}; e.g. {flag} {example}")
        # BatchNorm trains on at least 2 images a batch; uniformity compares at least 2 features; k 0 is the run's own.
        for name, least in (("steps", 1), ("batch_size", 2), ("quality_images", 2), ("knn_k", 0)):
            if getattr(self, name) < least:
                at_least = "1 (0: the run's own k)" if name == "knn_k" else least
                raise FastclrError(f"--{name.replace('_', '-')} must be at least {at_least}, got {getattr(self, name)}")
        for name in ("knn_tau", "lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise FastclrError(f"--{name.replace('_', '-')} must be a finite number above 0, got "
                                   f"{getattr(self, name)}; e.g. --{name.replace('_', '-')} {getattr(EvaluateOptions(), name)}")

    def recipe(self, flip_p: float, finetune: bool = False) -> TrainRecipe:
        """The training recipe from scratch (or for fine-tuning); `flip_p` is the run's."""
        shift = self.finetune_shift_fraction if finetune else self.shift_fraction
        return TrainRecipe(self.steps, self.batch_size, self.lr, self.weight_decay, self.warmup_fraction, shift, flip_p)
