"""What pretraining measures of its own encoder: the kNN monitor during training and the linear
probe at the end (beside the same network untrained). Both see only h, through evaluation's
functions, on the dataset's labelled splits."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fastclr.config import Config, weights_seed
from fastclr.data import Dataset
from fastclr.evaluation.features import features_of
from fastclr.evaluation.knn import knn_accuracy
from fastclr.evaluation.probe import ProbeResult, linear_probe, probe_record
from fastclr.evaluation.reference import small_lift, untrained_encoder
from fastclr.models import EncoderSpec
from fastclr.runtime import Precision

MONITOR_BANK, MONITOR_QUERIES = 10000, 2000


def labelled(dataset: Dataset) -> bool:
    """Whether the dataset has the labelled train and test splits the monitor and probe need."""
    return (dataset.train is not None and dataset.test is not None and dataset.train.labels is not None
            and dataset.test.labels is not None)


def monitor_knn(encoder: nn.Module, dataset: Dataset, spec: EncoderSpec, device: torch.device, cfg: Config,
                precision: Precision) -> float:
    """kNN accuracy on fixed subsets (10k training images as the bank, 2k test queries): cheap
    enough to run every epoch, and comparable from epoch to epoch."""
    assert dataset.train is not None and dataset.test is not None and dataset.train.labels is not None
    assert dataset.test.labels is not None
    tr = np.linspace(0, len(dataset.train) - 1, min(MONITOR_BANK, len(dataset.train))).astype(np.int64)
    te = np.linspace(0, len(dataset.test) - 1, min(MONITOR_QUERIES, len(dataset.test))).astype(np.int64)
    kw: dict[str, Any] = dict(channels_last=cfg.train.channels_last)
    ftr = features_of(encoder, spec, dataset.train.images[tr], device, precision, **kw)
    fte = features_of(encoder, spec, dataset.test.images[te], device, precision, **kw)
    return knn_accuracy(ftr, torch.from_numpy(dataset.train.labels[tr]), fte, torch.from_numpy(dataset.test.labels[te]),
                        k=cfg.eval.knn_k, precision=precision)


class KnnMonitor:
    """The kNN monitor at every `eval.monitor_every`-th epoch end, skipped while its passes so far
    cost more than `eval.monitor_share` of the training wall time (its time counts in the budget),
    so its frequency follows what this machine measures. `measure` is `monitor_knn` unless a test
    replaces it."""

    def __init__(self, dataset: Dataset, spec: EncoderSpec, device: torch.device, cfg: Config, precision: Precision,
                 enabled: bool, measure: Callable[..., float] | None = None) -> None:
        self.dataset, self.spec, self.device, self.cfg, self.precision = dataset, spec, device, cfg, precision
        self.enabled = enabled and bool(cfg.eval.monitor_every) and labelled(dataset)
        self.measure = measure
        self.seconds = 0.0

    def due(self, epoch_ended: int | None, train_seconds: float) -> bool:
        """Whether a pass runs now; `epoch_ended` is the epoch that just ended (None mid-epoch)."""
        return (self.enabled and epoch_ended is not None and epoch_ended % self.cfg.eval.monitor_every == 0
                and self.seconds <= self.cfg.eval.monitor_share * train_seconds)

    def __call__(self, encoder: nn.Module, clock: Callable[[], float]) -> float:
        """One pass: the accuracy; its seconds are added to the monitor's total."""
        t0 = clock()
        measure = self.measure or monitor_knn
        acc = measure(encoder, self.dataset, self.spec, self.device, self.cfg, self.precision)
        self.seconds += clock() - t0
        return acc


def probe_encoder(encoder: nn.Module, dataset: Dataset, spec: EncoderSpec, device: torch.device, cfg: Config,
                  precision: Precision) -> ProbeResult:
    """Linear probe on frozen h: all labelled training images, accuracy on the test split."""
    assert dataset.train is not None and dataset.test is not None
    assert dataset.train.labels is not None and dataset.test.labels is not None
    kw: dict[str, Any] = dict(channels_last=cfg.train.channels_last)
    ftr = features_of(encoder, spec, dataset.train.images, device, precision, **kw)
    fte = features_of(encoder, spec, dataset.test.images, device, precision, **kw)
    return linear_probe(ftr, torch.from_numpy(dataset.train.labels), fte, torch.from_numpy(dataset.test.labels),
                        feature_dtype=precision.feature_dtype)


def final_probe(encoder: nn.Module, dataset: Dataset, spec: EncoderSpec, device: torch.device, cfg: Config,
                precision: Precision) -> tuple[dict[str, Any], str]:
    """The end-of-pretraining probe record (probe.json) and its log line; with
    `eval.untrained_reference`, the same probe on the same network untrained and the lift."""
    t0 = time.perf_counter()
    res = probe_encoder(encoder, dataset, spec, device, cfg, precision)
    record = probe_record(res)
    versus = ""
    if cfg.eval.untrained_reference and spec.rebuildable:
        ref = probe_encoder(untrained_encoder(spec, weights_seed(cfg), device), dataset, spec, device, cfg, precision)
        lift = res.accuracy - ref.accuracy
        record.update(random_init_accuracy=ref.accuracy, lift=lift)
        flag = "; SMALL: most of it is the architecture's" if small_lift(lift) else ""
        versus = f" (the same network untrained: {ref.accuracy * 100:.2f}%, lift {lift * 100:+.2f} points{flag})"
    record["probe_seconds"] = time.perf_counter() - t0
    line = f"linear probe accuracy (frozen h, {dataset.name} test split): {res.accuracy * 100:.2f}%{versus}"
    return record, line
