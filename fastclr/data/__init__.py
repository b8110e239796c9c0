"""Stored images: built-in datasets by name, their file formats, and device-side batching."""

from __future__ import annotations

import os
from pathlib import Path

from fastclr.config import DataConfig
from fastclr.data.datasets import REGISTRY, Dataset, ImageSet, load_builtin
from fastclr.data.store import open_store

__all__ = ["REGISTRY", "Dataset", "ImageSet", "absolute_name", "load_builtin", "load_data", "open_store"]


def names_a_store(name: str) -> bool:
    """Whether `load_data` reads `name` as a store's path: built-in names win over a directory of
    the same name; anything else with a path separator, or an existing directory, is a path."""
    return name not in REGISTRY and ("/" in name or os.sep in name or Path(name).is_dir())


def absolute_name(name: str) -> str:
    """A store's path made absolute, any other name as it is: a run records its data so that every
    later command (finetune, report, export's check) finds the same store from any directory."""
    return str(Path(name).expanduser().resolve()) if names_a_store(name) else name


def load_data(cfg: DataConfig) -> Dataset:
    """The dataset a config names: a built-in dataset by name, or a prepared store by path
    (`names_a_store`)."""
    if names_a_store(cfg.name):
        return open_store(cfg.name)
    return load_builtin(cfg.name, cfg.root or None, cfg.download)
