"""A tiny pretrained run for the evaluation and report tests: 10 classes of synthetic 28 px
images (a bright bar whose position is the class), a width-0.125 CNN, one short epoch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synthetic_images, write_idx
from fastclr.data import Dataset, ImageSet
from fastclr.data.datasets import FASHION_CLASSES, IDX_FILES
from fastclr.presets import apply_preset
from fastclr.train import pretrain

N_TRAIN, N_TEST = 600, 200


def tiny_dataset() -> Dataset:
    """Fashion-MNIST-shaped synthetic data with all ten classes present."""
    xtr, ytr = synthetic_images(N_TRAIN, 28, seed=11, classes=10)
    xte, yte = synthetic_images(N_TEST, 28, seed=12, classes=10)
    train = ImageSet(xtr, ytr)
    return Dataset("fashion-mnist", train, train, ImageSet(xte, yte), list(FASHION_CLASSES))


def write_tiny_idx(folder: Path, ds: Dataset) -> None:
    """The dataset as the four IDX files of $FASTCLR_DATA/fashion-mnist, for the command line."""
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    for name, arr in zip(IDX_FILES, (ds.train.images[..., 0], ds.train.labels.astype(np.uint8),
                                     ds.test.images[..., 0], ds.test.labels.astype(np.uint8))):
        write_idx(folder / name, arr)


def tiny_run(run_dir: Path, ds: Dataset) -> Path:
    """Pretrain the tiny run into `run_dir` (about a second on a CPU core)."""
    cfg = apply_preset({
        "model.width": 0.125, "model.head_hidden": 32, "model.proj_dim": 16, "train.batch_size": 64,
        "train.epochs": 1.0, "train.log_every": 2, "train.run_dir": str(run_dir), "augment.blur_p": 0.0,
        "train.device": "cpu", "eval.probe": False,
    })
    pretrain(cfg, dataset=ds, log=lambda s: None, progress=False)
    return run_dir


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One PyTorch thread: these tests' tensors are tiny, and on a busy machine a second thread
    mostly waits (measured: t-SNE of 240 points, 0.24 s on one thread, 5.5 s on two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
