"""Frozen features of a finished run's exported encoder on a labelled built-in dataset, shared by
the benchmarks that study what is done with h (probe dtype, kNN shortlist)."""

from __future__ import annotations

from pathlib import Path

import torch

from fastclr.config import DataConfig
from fastclr.data import load_data
from fastclr.export import load_encoder
from fastclr.probe import extract_features


def run_features(run_dir: Path, data: str = "fashion-mnist") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train h, train labels, test h, test labels) of `run_dir/encoder.safetensors`, bf16 pass on the CPU."""
    ds = load_data(DataConfig(name=data))
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    enc, info = load_encoder(run_dir / "encoder.safetensors")
    mean, std = torch.tensor(info["mean"]), torch.tensor(info["std"])
    cpu = torch.device("cpu")
    ftr = extract_features(enc, ds.train.images, mean, std, cpu, precision="bf16", size=0, channels_last=True)
    fte = extract_features(enc, ds.test.images, mean, std, cpu, precision="bf16", size=0, channels_last=True)
    return ftr, torch.from_numpy(ds.train.labels), fte, torch.from_numpy(ds.test.labels)
