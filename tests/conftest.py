"""Shared fixtures: small datasets written by the tests in the real on-disk formats."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import resource
import signal
import struct
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    """Write a uint8 array as an IDX file (big-endian dims), gzipped by default."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def synthetic_images(n: int, size: int = 28, channels: int = 1, seed: int = 0, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a bright bar at one of `classes` positions, plus noise: learnable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 60, (n, size, size, channels)).astype(np.uint8)
    band = size // classes
    for c in range(classes):
        x[y == c, c * band : (c + 1) * band, :, :] = 220
    return x, y.astype(np.int64)


def write_idx_dataset(folder: Path, n_train: int = 256, n_test: int = 64, size: int = 28) -> tuple[np.ndarray, ...]:
    """The four MNIST-layout IDX files of a synthetic dataset in `folder`."""
    xtr, ytr = synthetic_images(n_train, size, seed=1)
    xte, yte = synthetic_images(n_test, size, seed=2)
    write_idx(folder / "train-images-idx3-ubyte.gz", xtr[..., 0])
    write_idx(folder / "train-labels-idx1-ubyte.gz", ytr.astype(np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", xte[..., 0])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", yte.astype(np.uint8))
    return xtr, ytr, xte, yte


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated $FASTCLR_DATA holding synthetic fashion-mnist and mnist, and an empty cache."""
    root = tmp_path / "data"
    write_idx_dataset(root / "fashion-mnist")
    write_idx_dataset(root / "mnist")
    monkeypatch.setenv("FASTCLR_DATA", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "no-system-data")
    return root


def write_stl10(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A small STL-10 in its real format under root/stl10_binary (3 train, 2 test, 4 unlabelled)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    imgs = {name: rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8) for name, n in
            (("train", 3), ("test", 2), ("unlabeled", 4))}
    for name, x in imgs.items():
        # STL-10 stores each image as 3 planes of 96x96 in column-major order
        x.transpose(0, 3, 2, 1).tofile(folder / f"{name}_X.bin")
    np.array([1, 10, 5], np.uint8).tofile(folder / "train_y.bin")
    np.array([2, 3], np.uint8).tofile(folder / "test_y.bin")
    return imgs


def write_cifar(folder: Path, n_per_batch: int = 8, hundred: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR python batches (pickled dicts, data (N, 3072) as R, G, B planes)."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = b"fine_labels" if hundred else b"labels"
    all_x, all_y = [], []
    for name in names:
        x = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 100 if hundred else 10, n_per_batch).tolist()
        data = x.transpose(0, 3, 1, 2).reshape(n_per_batch, -1)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, key: y, b"filenames": [b"x"] * n_per_batch}, f)
        all_x.append(x)
        all_y.append(np.array(y))
    meta_name, meta_key = ("meta", b"fine_label_names") if hundred else ("batches.meta", b"label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"class{i}".encode() for i in range(100 if hundred else 10)]}, f)
    return np.concatenate(all_x), np.concatenate(all_y)


# The packages of pyproject's `test` extra that some tests import, skipping where they do not.
# `make test` installs them and sets FASTCLR_REQUIRE_EXTRAS=1: there one that is missing, or that
# fails to import (two of them pinning protobufs the other cannot use), stops the suite instead of
# quietly skipping what it tests. Checked in a child process: the suite's own process imports
# none of them before the tests that use them.
TEST_EXTRAS = ("sklearn", "onnx", "onnxscript", "onnxruntime", "mlflow", "wandb", "tensorboard")


def pytest_configure(config: pytest.Config) -> None:
    # The tests' signals reach this process and its children as from a terminal: a suite started as a
    # script's background job (SIGINT ignored) or under nohup (SIGHUP ignored) passes those ignores on,
    # and fastclr keeps them (signals.KEPT_IGNORED); the tests of that keep set them themselves.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if os.environ.get("FASTCLR_REQUIRE_EXTRAS") != "1":
        return
    probe = ("import importlib\n"
             f"for name in {TEST_EXTRAS!r}:\n"
             "    try:\n        importlib.import_module(name)\n"
             "    except Exception as e:\n        print(f'{name} does not import ({type(e).__name__}: {e})'.splitlines()[0])")
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise pytest.UsageError("FASTCLR_REQUIRE_EXTRAS=1 but importing the test extras took over 300 s") from None
    failed = r.stdout.strip().splitlines() or ([f"the check failed: {r.stderr.strip()[-300:]}"] if r.returncode else [])
    if failed:
        raise pytest.UsageError(f"FASTCLR_REQUIRE_EXTRAS=1 but {'; '.join(failed)}: install the test tools, "
                                f"pip install -e '.[test]'")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES, ids=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device present: the CPU, and CUDA where there is a GPU.

    The loss, augmentation and resume tests take this fixture so that the same specification (the
    same assertions, on the same inputs) is checked on every device the machine has: training runs
    on the GPU, while CI has only the CPU. On a CPU-only machine the tests run exactly once, on the
    CPU, as before.
    """
    return torch.device(request.param)


REPO = Path(__file__).resolve().parents[1]


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: synthetic mnist in an isolated $FASTCLR_DATA."""
    write_idx_dataset(tmp_path / "data" / "mnist", n_train=256, n_test=64)
    e = dict(os.environ, FASTCLR_DATA=str(tmp_path / "data"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run `python -m fastclr ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "fastclr", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def sealed(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with the checksum `evaluate` would have written for it: a state set up by hand."""
    from fastclr.evaluation.run import CHECKSUM_KEY, content_checksum

    return {**record, CHECKSUM_KEY: content_checksum(record)}


def call_main(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`run_cli` through the command's own `main` in this process: the same arguments, environment,
    working directory, exit code and output, without a second interpreter's start (about 5 s here:
    torch, then torch._dynamo, which the first optimiser imports). For commands whose test needs no
    process of its own (no signal, kill, resource limit or interpreter exit to observe)."""
    from fastclr.cli import main

    threads, environ, here = torch.get_num_threads(), dict(os.environ), Path.cwd()
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(args)
    except SystemExit as e:  # argparse's usage errors
        code = e.code if isinstance(e.code, int) else 1
    finally:  # also what the command itself set (MLflow's patience, say)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(here)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def limit_files(limit: int) -> None:
    """No file of this process may grow past `limit` bytes (`ulimit -f`); a write past it fails with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """This process may not grow any file past `limit` bytes while inside."""
    old_handler = signal.getsignal(signal.SIGXFSZ)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit_files(limit)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


def _requirement(text: str) -> tuple[str, frozenset[str]]:
    """A requirement as its name and set of clauses ("wandb>=0.19,<1" and "wandb<1,>=0.19" alike)."""
    name = re.match(r"[A-Za-z0-9._-]+", text)
    assert name is not None, text
    return name.group(0).lower(), frozenset(c.strip() for c in text[name.end():].split(",") if c.strip())


def installs(command: str, extra: str) -> bool:
    """Whether `command` is `PYTHON -m pip install ...` for this Python and exactly pyproject.toml's
    requirements of `extra`: `pip install 'fastclr[wandb]'` failed wherever fastclr did not come from
    a package index (it is on none)."""
    reqs = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    words = shlex.split(command)
    return words[:4] == [sys.executable, "-m", "pip", "install"] and \
        sorted(map(_requirement, words[4:])) == sorted(map(_requirement, reqs[extra]))
