"""Images decoded once into a file that every process maps.

A built-in dataset whose files must be turned to be read (STL-10's column-major planes) is
decoded once into `<name>.npy` (uint8 (N, H, W, C)) beside its files, or in the user cache where
that folder cannot hold it, and memory-mapped from then on. The processes of a node (torchrun's
ranks) then share one copy in the page cache instead of each holding its own (STL-10: 3.0 GB a
process before), and a later start decodes nothing. `<name>.json` beside it records the size and
modification time of each source file, its inode and status-change time, and the decoding's
version: a source changed since (fetched again, or copied over with its old time kept, as `cp -p`,
`rsync -t` and tar do) is decoded again. So is one whose status changed (a chmod, a new hard link) or
that moved to another file system: a decoding of a minute or so, against pixels served stale.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from fastclr.errors import warn_stderr
from fastclr.files import WriteFailed, atomic_write_all

VERSION = 1
"""Of the decoding: a file decoded otherwise before is decoded again."""

SPARE_BYTES = 1 << 30
"""Left free beside a decoded file: a disk it would fill is not used (other writers need room)."""

STALE_S = 3600.0
"""A temporary of a decoding that is older than this was left by a process that died writing it."""

_failed: set[Path] = set()
"""Files this process could not write: not tried (nor warned about) again."""


def _key(sources: Sequence[Path], shape: tuple[int, ...]) -> dict[str, object]:
    """What the decoded file was made from: each source's size, modification time, inode and
    status-change time (which no copy can set back), the shape."""
    files = {}
    for p in sources:
        st = p.stat()
        files[p.name] = [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino), int(st.st_ctime_ns)]
    return {"version": VERSION, "shape": [int(s) for s in shape], "sources": files}


def decoded_paths(folder: Path, name: str, cache: Path) -> list[Path]:
    """Where `name`.npy of the files in `folder` may be kept, in order: in `folder`, then in
    `cache` under a name of the folder's path (each folder its own)."""
    tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return [folder / f"{name}.npy", cache / f"{name}-{tag}.npy"]


def _valid(path: Path, key: dict[str, object]) -> np.ndarray | None:
    """The array at `path`, mapped copy-on-write (no page is ever written, so all stay shared),
    when its record matches `key`; else None."""
    try:
        if json.loads(path.with_suffix(".json").read_text(encoding="utf-8")) != key:
            return None
        images = np.load(path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    if images.dtype != np.uint8 or list(images.shape) != key["shape"]:
        return None
    return images


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of `path` that a process killed while writing left behind (gigabytes each)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_S:
                tmp.unlink()
        except OSError:
            pass


def _write(path: Path, key: dict[str, object], shape: tuple[int, ...],
           blocks: Callable[[], Iterable[np.ndarray]]) -> str:
    """Write `path` and its record; "" when done, else why not."""
    def write_array(f: IO[bytes]) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        rows = 0
        for block in blocks():
            f.write(np.ascontiguousarray(block, dtype=np.uint8).data)  # the block's bytes, not a copy
            rows += len(block)
        if rows != shape[0]:
            raise OSError(f"decoded {rows} rows, not {shape[0]}")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        need = int(np.prod(shape)) + SPARE_BYTES
        free = shutil.disk_usage(path.parent).free
        if free < need:
            return f"{free / 2**30:.1f} GiB free there, {need / 2**30:.1f} GiB needed"
        _remove_stale_temporaries(path)
        path.with_suffix(".json").unlink(missing_ok=True)  # an array being replaced is never taken for the old one
        atomic_write_all([(path, write_array),
                          (path.with_suffix(".json"), lambda f: f.write(json.dumps(key).encode()))])
    except WriteFailed as e:
        return e.reason
    except OSError as e:
        return e.strerror or str(e)
    return ""


def decoded_once(sources: Sequence[Path], name: str, shape: tuple[int, ...],
                 blocks: Callable[[], Iterable[np.ndarray]], cache: Path) -> np.ndarray | None:
    """The uint8 array `shape` that `blocks()` yields row block by row block (decoded from
    `sources`, which lie in one folder), mapped from `name`.npy: in their folder, else in `cache`
    (`decoded_paths`), written the first time (atomically, its record last) and whenever a source
    has changed since. None, with one warning line, where neither can hold it (the caller then
    decodes into memory): a full disk costs memory, never the run."""
    key = _key(sources, shape)
    paths = decoded_paths(sources[0].parent, name, cache)
    for path in paths:
        images = _valid(path, key)
        if images is not None:
            return images
    reasons = []
    for path in paths:
        if path in _failed:
            return None  # said once already
        why = _write(path, key, shape, blocks)
        images = None if why else _valid(path, key)
        if images is not None:
            return images
        reasons.append(f"{path} ({why or 'changed while written'})")
    _failed.update(paths)
    warn_stderr(f"warning: cannot write {' nor '.join(reasons)}; decoding the images into memory instead (each "
                "process holds its own copy)")
    return None
