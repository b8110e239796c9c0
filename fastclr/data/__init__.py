"""Stored images: built-in datasets by name, their file formats, and device-side batching."""

from __future__ import annotations

import os
from pathlib import Path

from fastclr.config import DataConfig
from fastclr.data.datasets import REGISTRY, Dataset, ImageSet, load_builtin
from fastclr.data.store import open_store

__all__ = ["REGISTRY", "Dataset", "ImageSet", "absolute_name", "load_builtin", "load_data", "open_store"]


def absolute_name(name: str) -> str:
    """A built-in name as it is, a store path made absolute: a run records its data so that every
    later command (finetune, report, export's check) finds the same store from any directory."""
    return name if name in REGISTRY else str(Path(name).expanduser().resolve())


def load_data(cfg: DataConfig) -> Dataset:
    """The dataset a config names: a built-in dataset by name, or a prepared store by path
    (built-in names win over a directory of the same name)."""
    if cfg.name not in REGISTRY and ("/" in cfg.name or os.sep in cfg.name or Path(cfg.name).is_dir()):
        return open_store(cfg.name)
    return load_builtin(cfg.name, cfg.root or None, cfg.download)
