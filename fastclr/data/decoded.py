"""Images decoded once into a file that every process maps.

A built-in dataset whose files must be turned to be read (STL-10's column-major planes) is
decoded once into `<name>.npy` (uint8 (N, H, W, C)) beside its files, or in the user cache where
that folder is read-only, and memory-mapped from then on. The processes of a node (torchrun's
ranks) then share one copy in the page cache instead of each holding its own (STL-10: 3.0 GB a
process before), and a later start decodes nothing. `<name>.json` beside it names the size and
modification time of each source file: a source changed since (fetched again) is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from fastclr.errors import warn_stderr
from fastclr.files import WriteFailed, atomic_write_all


def _key(sources: Sequence[Path], shape: tuple[int, ...]) -> dict[str, object]:
    """What the decoded file was made from: each source's size and modification time, and the shape."""
    files = {}
    for p in sources:
        st = p.stat()
        files[p.name] = [st.st_size, st.st_mtime_ns]
    return {"shape": list(shape), "sources": files}


def decoded_path(folder: Path, name: str, cache: Path) -> Path:
    """Where `name`.npy of the files in `folder` is kept: in `folder`, or where the user cannot
    write there, in `cache` under a name of the folder's path (each folder its own)."""
    if os.access(folder, os.W_OK):
        return folder / f"{name}.npy"
    tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return cache / f"{name}-{tag}.npy"


def _valid(path: Path, key: dict[str, object]) -> np.ndarray | None:
    """The mapped array at `path` when its record matches `key`, else None."""
    try:
        if json.loads(path.with_suffix(".json").read_text(encoding="utf-8")) != key:
            return None
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if images.dtype != np.uint8 or list(images.shape) != key["shape"]:
        return None
    return images


def decoded_once(sources: Sequence[Path], name: str, shape: tuple[int, ...],
                 blocks: Callable[[], Iterable[np.ndarray]], cache: Path) -> np.ndarray | None:
    """The uint8 array `shape` that `blocks()` yields row block by row block (decoded from
    `sources`, which lie in one folder), as a read-only memory map of `name`.npy, written the first
    time (atomically, the record last) and whenever a source has changed since. None, with a
    warning line, where neither the folder nor `cache` can hold it (the caller then decodes into
    memory): a full disk costs memory, never the run."""
    key = _key(sources, shape)
    path = decoded_path(sources[0].parent, name, cache)
    images = _valid(path, key)
    if images is not None:
        return images

    def write_array(f: IO[bytes]) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        rows = 0
        for block in blocks():
            f.write(np.ascontiguousarray(block, dtype=np.uint8).tobytes())
            rows += len(block)
        if rows != shape[0]:
            raise OSError(f"decoded {rows} rows, not {shape[0]}")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)  # an array being replaced is never taken for the old one
        atomic_write_all([(path, write_array),
                          (path.with_suffix(".json"), lambda f: f.write(json.dumps(key).encode()))])
    except (WriteFailed, OSError) as e:
        reason = e.reason if isinstance(e, WriteFailed) else str(e)
        warn_stderr(f"warning: cannot write {path} ({reason}); decoding the images into memory instead (each "
                    "process holds its own copy)")
        return None
    return _valid(path, key)
