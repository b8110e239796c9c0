"""Stored images: built-in datasets by name, their file formats, and device-side batching."""

from __future__ import annotations

import os
from pathlib import Path

from fastclr.config import DataConfig
from fastclr.errors import FastclrError
from fastclr.data.datasets import REGISTRY, Dataset, ImageSet, load_builtin
from fastclr.data.store import is_store, open_store

__all__ = ["REGISTRY", "Dataset", "ImageSet", "absolute_name", "load_builtin", "load_data", "open_store"]


def names_a_store(name: str) -> bool:
    """Whether `load_data` reads `name` as a store's path: built-in names win over a directory of
    the same name (a run records a store's path absolute, so its bare name is the built-in; where a
    user types one beside such a store, the commands refuse it, `refuse_ambiguous`); anything else
    with a path separator, or an existing directory, is a path."""
    return bool(name.strip()) and name not in REGISTRY and ("/" in name or os.sep in name or Path(name).is_dir())


def refuse_ambiguous(name: str) -> None:
    """One line when `name`, as a user typed it, is both a built-in dataset and a store in this
    folder (`fastclr prepare --out mnist`): `embed` took the built-in and `neighbours` the store,
    each without a word. Not for a name a run recorded: that one is the built-in. An empty name
    (an unset variable) is refused too: `embed` took it for this folder and embedded all of it."""
    if not name.strip():
        raise FastclrError(f"--data {name!r} names nothing (an unset variable?); give a built-in dataset "
                           f"({', '.join(REGISTRY)}) or a path (. for this folder)")
    if name in REGISTRY and is_store(Path(name)):
        raise FastclrError(f"--data {name} names the built-in dataset {name} and the store ./{name} in this folder; "
                           f"give ./{name} for the store, or rename the store to use the built-in")


def absolute_name(name: str) -> str:
    """A store's path made absolute, any other name as it is: a run records its data so that every
    later command (finetune, report, export's check) finds the same store from any directory."""
    return str(Path(os.path.expanduser(name)).resolve()) if names_a_store(name) else name


def load_data(cfg: DataConfig) -> Dataset:
    """The dataset a config names: a built-in dataset by name, or a prepared store by path
    (`names_a_store`)."""
    if names_a_store(cfg.name):
        return open_store(cfg.name)
    return load_builtin(cfg.name, cfg.root or None, cfg.download)
