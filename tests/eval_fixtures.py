"""The evaluation and report tests' data: the tiny run (tests/tiny.py) on ten classes, shaped like
Fashion-MNIST, and the same images as IDX files for the command line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_idx
from fastclr.data import Dataset
from fastclr.data.datasets import IDX_FILES
from tiny import tiny_dataset as tiny_labelled
from tiny import tiny_run

__all__ = ["N_TEST", "N_TRAIN", "one_thread", "tiny_dataset", "tiny_run", "write_tiny_idx"]

N_TRAIN, N_TEST = 600, 200


def tiny_dataset() -> Dataset:
    """Fashion-MNIST-shaped synthetic data with all ten classes present."""
    return tiny_labelled(N_TRAIN, classes=10, n_test=N_TEST, name="fashion-mnist")


def write_tiny_idx(folder: Path, ds: Dataset) -> None:
    """The dataset as the four IDX files of $FASTCLR_DATA/fashion-mnist, for the command line."""
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    for name, arr in zip(IDX_FILES, (ds.train.images[..., 0], ds.train.labels.astype(np.uint8),
                                     ds.test.images[..., 0], ds.test.labels.astype(np.uint8))):
        write_idx(folder / name, arr)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One PyTorch thread: these tests' tensors are tiny, and on a busy machine a second thread
    mostly waits (measured: t-SNE of 240 points, 0.24 s on one thread, 5.5 s on two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def alter_encoder(run_dir: Path, change: Callable[[torch.Tensor], object]) -> None:
    """Apply `change` in place to the first parameter of the run's exported encoder and save it
    back: a run whose encoder.safetensors no longer is what it trained (moved, or NaN)."""
    from fastclr.export import save_encoder
    from fastclr.pretrained import load_run

    loaded = load_run(run_dir)
    with torch.no_grad():
        change(next(loaded.encoder.parameters()))
    save_encoder(run_dir / "encoder.safetensors", loaded.encoder, loaded.spec)
