"""Stored images: built-in datasets by name, their file formats, and device-side batching."""

from __future__ import annotations

from fastclr.config import DataConfig
from fastclr.data.datasets import REGISTRY, Dataset, ImageSet, load_builtin

__all__ = ["REGISTRY", "Dataset", "ImageSet", "load_builtin", "load_data"]


def load_data(cfg: DataConfig) -> Dataset:
    """The dataset a config names: a built-in dataset by name."""
    return load_builtin(cfg.name, cfg.root or None, cfg.download)
