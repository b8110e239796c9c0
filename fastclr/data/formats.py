"""Readers for the on-disk formats of the built-in datasets. Each returns uint8 (N, H, W, C).

- IDX (MNIST, Fashion-MNIST): http://yann.lecun.com/exdb/mnist/ "FILE FORMATS" section.
- CIFAR-10/100 "python version": pickled dicts with b"data" (N, 3072) row-major RGB planes.
- STL-10 binary: uint8 (N, 3, 96, 96) in column-major order per plane; labels 1..10.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fastclr.errors import FastclrError
from fastclr.files import size_text

_IDX_DTYPES: dict[int, type] = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32}


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


LOOK_PAST = 1 << 20
"""How far past the size its header declares an IDX file is read: enough to name a few stray bytes,
and no more of a gzip file that unpacks to gigabytes (a 60 MB file of 13 GiB ended in MemoryError,
or the out-of-memory killer, from the whole file unpacked before its header was read)."""


def _read_at_most(f: _Reader, limit: int) -> bytes:
    """Up to `limit` bytes of `f`, read a chunk at a time (a header declaring 2^64 bytes asks for none at once)."""
    out = bytearray()
    while len(out) < limit:
        chunk = f.read(min(1 << 24, limit - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _physical_memory() -> int:
    """This machine's memory in bytes; unknown (no sysconf: Windows) counts as unlimited."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 1 << 62


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its declared dtype and shape; a gzip
    file is unpacked only as far as its header declares (and LOOK_PAST beyond, to find a longer file)."""
    with open(path, "rb") as raw:
        zipped = raw.read(2) == b"\x1f\x8b"
    shape: tuple[int, ...] = ()
    declared = 0
    try:
        with (gzip.open(path, "rb") if zipped else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise FastclrError(f"{path} is not an IDX file (bad magic number); delete it and fetch it again")
            ndim = head[3]
            dims = f.read(4 * ndim) if 1 <= ndim <= 4 else b""
            if not 1 <= ndim <= 4 or len(dims) < 4 * ndim:
                raise FastclrError(f"{path} is not an IDX file of images or labels (header declares {ndim} dimensions "
                                   f"in {len(head) + len(dims)} bytes); delete it and fetch it again")
            shape = struct.unpack(f">{ndim}I", dims)
            dtype = np.dtype(_IDX_DTYPES[head[2]]).newbyteorder(">")
            count = math.prod(shape)  # Python ints: a crafted header cannot wrap around to a small count
            declared = count * dtype.itemsize
            body = _read_at_most(f, declared + LOOK_PAST)
    except (OSError, EOFError, zlib.error) as e:
        raise FastclrError(f"{path} is a damaged gzip file ({e}); delete it and fetch it again") from None
    except MemoryError:
        if declared <= _physical_memory():  # a size this machine holds: short of memory now, not a damaged file
            raise
        raise FastclrError(f"{path} declares {shape} ({size_text(declared)}), more than this machine can hold: "
                           "not this dataset's file, or damaged; delete it and fetch it again") from None
    held = len(body)
    if held < declared:
        raise FastclrError(f"{path} is truncated: header says {shape} but holds {held} bytes; delete it and fetch it "
                           "again")
    if held > declared:  # another file appended, or not the file its name says
        more = f"{held - declared} bytes" if held < declared + LOOK_PAST else f"at least {LOOK_PAST} bytes"
        raise FastclrError(f"{path} holds {more} more than its header declares for {shape}: not this dataset's file, "
                           "or damaged; delete it and fetch it again")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_images(path: Path) -> np.ndarray:
    """IDX image file -> uint8 (N, H, W, 1)."""
    arr = read_idx(path)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise FastclrError(f"{path} should hold uint8 images (N, H, W), found {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr[..., None])


def read_idx_labels(path: Path) -> np.ndarray:
    """IDX label file -> int64 (N,)."""
    arr = read_idx(path)
    if arr.ndim != 1:
        raise FastclrError(f"{path} should hold labels (N,), found shape {arr.shape}")
    return arr.astype(np.int64)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a crafted file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3's pickles of the same data: protocol 5 (3.14's default) rebuilds arrays from their
        # buffer, protocol 2 writes bytes through codecs' encode; neither can run code
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_pickle(path: Path) -> dict[Any, Any]:
    """Read one CIFAR python batch or meta file (a pickled dict) without executing code."""
    with open(path, "rb") as f:
        try:
            obj = _ArraysOnlyUnpickler(f, encoding="bytes").load()
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise FastclrError(f"{path} is not a CIFAR python batch ({e}); delete it and fetch it again") from None
    if not isinstance(obj, dict):
        raise FastclrError(f"{path} is not a CIFAR python batch; delete it and fetch it again")
    return obj


def read_cifar_batches(paths: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR python batches -> uint8 (N, 32, 32, 3), int64 (N,)."""
    images, labels = [], []
    for p in paths:
        d = read_cifar_pickle(p)
        if b"data" not in d or label_key not in d:
            raise FastclrError(f"{p} lacks b'data' or {label_key!r}; it is not a CIFAR batch of this dataset")
        x = np.asarray(d[b"data"])
        if x.dtype != np.uint8:  # a cast would turn floats in [0, 1] to 0 and 1, and wrap values past 255
            raise FastclrError(f"{p}: data is {x.dtype}, not CIFAR's uint8 pixels; it is not a CIFAR batch as "
                               "published: fetch it again")
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise FastclrError(f"{p}: data has shape {x.shape}, expected (N, 3072)")
        y = np.asarray(d[label_key], dtype=np.int64)
        if y.shape != (len(x),):  # checked per batch: one short and one long would shift every label after
            raise FastclrError(f"{p} holds {len(x)} images and {y.size} labels; it is damaged: delete it and fetch it again")
        images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def stl10_count(path: Path, size: int = 96) -> int:
    """How many images an STL-10 `*_X.bin` holds (a one-line error for a truncated file)."""
    if path.is_dir():
        raise FastclrError(f"{path} is a directory, not STL-10's file; remove it and fetch the file again")
    n_bytes, per = path.stat().st_size, 3 * size * size
    if n_bytes == 0 or n_bytes % per:
        raise FastclrError(f"{path} holds {n_bytes} bytes, not a multiple of {per}; it is truncated, fetch it again")
    return n_bytes // per


def stl10_blocks(path: Path, size: int = 96, rows: int = 1024) -> Iterator[np.ndarray]:
    """STL-10 `*_X.bin` as uint8 (n, 96, 96, 3) blocks of up to `rows` images, in file order. Planes
    are stored column-major; each block is read (not mapped: mapped pages count as resident) and
    turned on its own, so memory holds one block."""
    n = stl10_count(path, size)
    block = np.empty((min(n, rows), 3, size, size), np.uint8)
    with path.open(mode="rb") as f:
        for start in range(0, n, len(block)):
            part = block[:min(len(block), n - start)]
            if f.readinto(part.data) != part.nbytes:
                raise FastclrError(f"{path} ended early (it is being written or was cut); fetch it again")
            yield part.transpose(0, 3, 2, 1)  # (N, C, W, H) on disk because of the column-major planes -> (N, H, W, C)


def read_stl10_images(path: Path, size: int = 96, out: np.ndarray | None = None) -> np.ndarray:
    """STL-10 `*_X.bin` -> uint8 (N, 96, 96, 3), into `out` when given (N rows), a block of rows at
    a time (`stl10_blocks`), so memory holds the result alone: reading the whole file and then its
    transposed copy (and then concatenating the unlabelled images with the training ones) took
    6.1 GB for the 3.0 GB of STL-10's images."""
    n = stl10_count(path, size)
    dest = np.empty((n, size, size, 3), np.uint8) if out is None else out
    if dest.shape != (n, size, size, 3):
        raise ValueError(f"out has shape {dest.shape}, not {(n, size, size, 3)}")
    start = 0
    for block in stl10_blocks(path, size):
        dest[start:start + len(block)] = block
        start += len(block)
    return dest


def read_stl10_labels(path: Path) -> np.ndarray:
    """STL-10 `*_y.bin` (labels 1..10) -> int64 (N,) in 0..9."""
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if y.size == 0 or y.min() < 1 or y.max() > 10:
        raise FastclrError(f"{path} does not hold STL-10 labels in 1..10; fetch it again")
    return y - 1
