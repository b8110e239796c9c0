"""Frozen features of a finished run's exported encoder on a labelled built-in dataset, shared by
the benchmarks that study what is done with h (probe dtype, kNN shortlist)."""

from __future__ import annotations

from pathlib import Path

import torch

from fastclr.config import DataConfig
from fastclr.data import load_data
from fastclr.export import load_encoder
from fastclr.evaluation.features import features_of
from fastclr.runtime import resolve_precision


def run_features(run_dir: Path, data: str = "fashion-mnist") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train h, train labels, test h, test labels) of `run_dir/encoder.safetensors` on the CPU, at the precision auto resolves."""
    ds = load_data(DataConfig(name=data))
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    enc, spec = load_encoder(run_dir / "encoder.safetensors")
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    ftr = features_of(enc, spec, ds.train.images, cpu, precision)
    fte = features_of(enc, spec, ds.test.images, cpu, precision)
    return ftr, torch.from_numpy(ds.train.labels), fte, torch.from_numpy(ds.test.labels)
