"""The one small training setup every test builds on: synthetic labelled images (a bright bar
whose position is the class), a width-0.125 CNN, a few steps. Python tests call `tiny_config`
and `tiny_dataset`; command-line tests pass `TINY_FLAGS`, the same settings as flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import synthetic_images
from fastclr.config import Config
from fastclr.presets import config_for
from fastclr.data import Dataset, ImageSet
from fastclr.data.datasets import FASHION_CLASSES
from fastclr.pretraining import pretrain

TINY: dict[str, Any] = {
    "model.width": 0.125, "model.head_hidden": 32, "model.proj_dim": 16, "train.batch_size": 16,
    "train.epochs": 2.0, "train.time_budget": 0.0, "train.log_every": 3, "eval.monitor_every": 0, "eval.probe": False, "augment.blur_p": 0.0,
}
"""The small model and short schedule, as config keys."""

TINY_FLAGS = ["--width", "0.125", "--head-hidden", "32", "--proj-dim", "16", "--batch-size", "32", "--log-every", "2",
              "--monitor-every", "1", "--quiet", "--blur-p", "0"]
"""The same model for the command line (batch 32 on its 256-image synthetic mnist: 8 steps per epoch)."""


def tiny_dataset(n: int = 96, size: int = 28, classes: int = 4, n_test: int = 32, name: str = "tiny") -> Dataset:
    """n training (= pretraining) and n_test test images of `classes` bar positions."""
    x, y = synthetic_images(n, size, seed=11, classes=classes)
    xt, yt = synthetic_images(n_test, size, seed=12, classes=classes)
    names = list(FASHION_CLASSES) if classes == 10 else [str(c) for c in range(classes)]
    train = ImageSet(x, y)
    return Dataset(name, train, train, ImageSet(xt, yt), names)


def tiny_config(run_dir: Path, **over: Any) -> Config:
    """TINY writing to `run_dir`, with `section__key=value` overrides, resolved as the command line
    resolves a config (the dataset's preset first)."""
    return config_for(None, {**TINY, "train.run_dir": str(run_dir), **{k.replace("__", "."): v for k, v in over.items()}})


def straight_and_resumed(root: Path, **over: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last checkpoints of TINY (with `over`) run straight into root/a and, into root/b, stopped
    after step 5 and resumed: for tests that the two end bit-equal."""
    from fastclr.checkpoint import list_checkpoints, load_checkpoint

    ds = tiny_dataset()
    pretrain(tiny_config(root / "a", **over), dataset=ds, progress=False, log=lambda s: None)
    first = pretrain(tiny_config(root / "b", **over), dataset=ds, progress=False, log=lambda s: None,
                     stop=lambda step: step == 5)
    assert first.stopped
    pretrain(tiny_config(root / "b", **over), resume=root / "b", dataset=ds, progress=False, log=lambda s: None)
    return load_checkpoint(list_checkpoints(root / "a")[-1]), load_checkpoint(list_checkpoints(root / "b")[-1])


def tiny_run(run_dir: Path, ds: Dataset, **over: Any) -> Path:
    """Pretrain the tiny model on `ds` into `run_dir` (about a second on a CPU core)."""
    pretrain(tiny_config(run_dir, train__batch_size=64, train__epochs=1.0, train__log_every=2, train__device="cpu",
                         **over), dataset=ds, log=lambda s: None, progress=False)
    return run_dir
