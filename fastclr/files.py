"""Writing the files a user keeps: whole or not at all, with the user's umask, and a failed write
(full disk, quota, file-size limit, permissions) told in one line, whatever the writer raised.

Every file fastclr writes (checkpoints, the exported encoder, config, metrics, results, report,
embeddings) goes through `atomic_write`: a temporary file in the same directory, flush, fsync,
`os.replace` onto the final name, fsync of the directory. A crash or a failure at any moment
leaves the old file (or none), never a half-written one under the final name; the temporary a
writer killed outright leaves is removed by the next write of that file.

torch's writer does not raise OSError when the disk fills: it raises RuntimeError
("[enforce fail at inline_container.cc:672] . unexpected pos ...", measured on a full tmpfs and
under a file-size limit alike, torch 2.13), so the failure is recognised by where it happened,
inside the write, not by its type.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from fastclr.errors import FastclrError
from fastclr.signals import STOP_SIGNALS

try:
    import resource  # POSIX only: the file-size limit in a failed write's reason
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

WINDOWS = os.name == "nt"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""Mode of every file fastclr writes: what open() would give under the user's umask."""


class WriteFailed(FastclrError):
    """A file could not be written completely; the message names it, the cause and what is free."""

    def __init__(self, path: Path, reason: str, cause: BaseException | None = None) -> None:
        self.path, self.reason, self.cause = path, reason, cause
        super().__init__(f"cannot write {path} ({reason})")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # (a process pool's pickle of it)
        return type(self), (self.path, self.reason)


def unwritable(path: Path) -> tuple[str, str]:
    """Why the folder `path` takes no files, and the fix: a read-only file system (a read-only mount,
    a snapshot) is remounted, not given other permissions."""
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # Windows has no statvfs
        read_only = False
    return ("is on a read-only file system", "remount it read-write") if read_only else \
        ("is not writable", "fix its permissions")


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def size_text(n: int) -> str:
    """`n` bytes in binary units, one decimal: '1.5 KiB', '10.0 MiB'."""
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)) if n >= s or s == 1)
    return f"{n / scale:.1f} {unit}"


def write_failure_reason(e: BaseException, path: Path) -> str:
    """Why writing `path` failed, in a few words: the system's reason, the space left there and,
    when one is set, the file-size limit (`ulimit -f`)."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
        if e.errno in (errno.EROFS, errno.ENAMETOOLONG):
            return reason  # no write can succeed there, or by that name: the space left is beside the point
    else:  # torch's writer: "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = "the writer stopped: " + text.split("] . ")[-1]
    # A device or pipe (stdout sent to /dev/full, a named pipe, "pipe:[N]", "<stdout>"): the space of the
    # folder holding it is beside the point.
    free = None if _not_a_file(path) else _free_bytes(path.parent)
    if free is not None:
        reason += f"; {size_text(free)} free there"
    if resource is not None:
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            reason += f"; files are limited to {size_text(soft)} (ulimit -f)"
    return reason


def _not_a_file(path: Path) -> bool:
    if str(path).startswith(("<", "pipe:", "socket:", "anon_inode:")):
        return True
    try:
        return path.is_char_device() or path.is_fifo()
    except OSError:  # a disk failing (EIO): no space figure for it either
        return True


def set_mode(fd: int) -> None:
    """Give a file made by mkstemp (0600) the mode open() would give under the user's umask.
    Windows has no fchmod before Python 3.13 and no modes beyond read-only: nothing to do there."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, FILE_MODE)


def write_way_out(e: BaseException | None, elsewhere: str) -> str:
    """What to do about a failed write (`is_write_error`): on a read-only file system, write to
    `elsewhere` or remount it; after an I/O error, check the disk; otherwise free space there or
    write to `elsewhere`."""
    code = e.errno if isinstance(e, OSError) else None
    if code == errno.EROFS:
        return f"choose {elsewhere} on a writable file system (or remount it read-write)"
    if code == errno.EIO:
        return "check the disk (the system reported an I/O error)"
    if code == errno.ENAMETOOLONG:
        return "choose a shorter name (255 bytes at most on most file systems)"
    return f"free space there or choose {elsewhere}"


def is_write_error(e: BaseException) -> bool:
    """An OSError that means the file system refused to take more (not a missing input file)."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write(f)` on a temporary file beside `path`, then make it `path` in one rename.

    On any failure the temporary file is removed and `path` is left as it was. A failure of the
    file system (OSError) or of the writer while writing (torch's RuntimeError) raises
    `WriteFailed`; an interrupt passes through unchanged.
    """
    atomic_write_all([(path, write)])


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Inside: a SIGINT or SIGTERM (or Windows' SIGBREAK) is noted, and its handler runs on the way out. For a few renames
    that must all happen or none. Python-level, not a thread's signal mask: the kernel hands a
    process-directed signal (Ctrl-C, kill) to any thread not blocking it, torch's own included,
    and Python then runs the handler in the main thread regardless."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can be changed in the main thread only (and run there)
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    held = {s: h for s, h in previous.items() if h is not None}  # None: a handler not set from Python
    for s in held:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, h in held.items():
            signal.signal(s, h)
        for n in pending:
            handler = held[signal.Signals(n)]
            if callable(handler):
                handler(n, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(n)


def atomic_write_all(writes: Sequence[tuple[Path, Callable[[IO[bytes]], object]]]) -> None:
    """`atomic_write` of files that belong together (an array and the index of its rows): every
    file is written in full to its temporary first, and the final names are replaced only when
    all were, so a failure of any write (a full disk, a file-size limit) leaves every old file as
    it was. The renames that follow are one after the other: a rename refused between them (which
    a full disk does not cause) leaves the files before it replaced."""
    done: list[tuple[str, Path]] = []  # (temporary, final name)
    try:
        for path, write in writes:
            try:
                fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
            except OSError as e:
                raise WriteFailed(path, write_failure_reason(e, path), e) from None
            done.append((tmp, path))
            remove_stale_temporaries_of(path, now=os.fstat(fd).st_mtime)
            try:
                set_mode(fd)  # mkstemp makes 0600; the file is the user's, readable as their umask says
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
            except (OSError, RuntimeError) as e:
                raise WriteFailed(path, write_failure_reason(e, path), e) from None
        with stop_signals_held():  # a Ctrl-C between two renames left a new array beside an old index
            for tmp, path in done:
                try:
                    os.replace(tmp, path)
                except OSError as e:
                    raise WriteFailed(path, write_failure_reason(e, path), e) from None
    except BaseException:
        for tmp, _ in done:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for parent in {path.parent for _, path in done}:
        fsync_path(parent)


def not_a_folder(path: Path) -> str:
    """What `path`, which is not a directory, is instead: 'does not exist' (a typo's usual case, which
    "is not a directory" hid) or 'is a file, not a directory'."""
    return "is a file, not a directory" if path.exists() else "does not exist"


def through_link(path: Path) -> Path:
    """Where a user's output named `path` should land: a symbolic link's target, else `path`; for a
    command to resolve once, before it derives a format or a sidecar's name from it (`atomic_write`
    itself replaces a link: a run's files linked into another run, by `cp -rs`, stay that run's). A
    target that cannot be written is refused, as `open` would (a rename ignores the file's mode)."""
    if not os.path.islink(path):
        return path
    target = Path(os.path.realpath(path))
    if target.exists() and not os.access(target, os.W_OK):
        raise FastclrError(f"{path} links to {target}, which is read-only; give another output name, or make it writable")
    return target


TEMP_NAME_KEPT = 200
"""How many bytes of a file's name its temporary's name keeps: `.NAME.XXXXXXXX.tmp` of a valid name of
238 to 255 bytes went past the 255-byte limit of a name, and the write failed."""


def temp_prefix(path: Path) -> str:
    """The prefix of `path`'s temporary: `.NAME.`, its name cut to TEMP_NAME_KEPT bytes (the
    temporaries of the run's own files, whose names are short, are found again by that prefix)."""
    raw = path.name.encode("utf-8", "surrogateescape")
    if len(raw) <= TEMP_NAME_KEPT:
        return f".{path.name}."
    return f".{raw[:TEMP_NAME_KEPT].decode('utf-8', 'ignore')}."


STALE_TEMPORARY_S = 600.0
"""How old (since its last write) a temporary of `atomic_write` must be to be another writer's
leftover, not a live write: a writer killed outright (kill -9, a power cut) leaves its
`.NAME.XXXXXXXX.tmp`, which nothing else removes (the run's own are swept under its lock)."""


def remove_stale_temporaries_of(path: Path, now: float, older_than_s: float = STALE_TEMPORARY_S) -> list[Path]:
    """Delete the temporaries of `path` (`.NAME.` then mkstemp's 8 characters, `.tmp`) last written
    `older_than_s` before `now`, a time of the file system holding them (the new temporary's mtime:
    a file server's clock, not this machine's, which may differ); returns them. A name too long
    for its prefix to be its own alone (`temp_prefix` cuts it) is left to its own writers."""
    prefix = temp_prefix(path)
    if prefix != f".{path.name}.":  # cut: another file's temporaries would share it
        return []
    shape = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}\.tmp")
    removed = []
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if not entry.name.startswith(prefix) or not shape.fullmatch(entry.name):
                    continue
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
                except OSError:  # its writer renamed or removed it meanwhile, or it is not ours to remove
                    pass
    except OSError:  # an unreadable folder: the write itself says what is wrong
        return removed
    return removed


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a directory: so that a rename in it survives a crash).

    Windows flushes a file only through a handle open for writing and cannot open a directory, so
    there a file is opened for writing and a directory is left alone: a rename made just before a
    power cut may be lost there (the file it replaced stays whole), an accepted limit."""
    if WINDOWS and path.is_dir():
        return
    fd = os.open(path, os.O_RDWR if WINDOWS else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriteOnly:
    """A file seen only through `write`. numpy then writes an array through it in checked chunks;
    given a real file it hands the descriptor to C stdio instead, whose failure at the final flush
    it ignores: a full disk gave a truncated .npy and no error (numpy 2.4)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.write = f.write


def npy_writer(array: np.ndarray) -> Callable[[IO[bytes]], object]:
    """The writer `atomic_write` takes for `array` as a .npy file, every byte of it checked."""
    return lambda f: np.save(_WriteOnly(f), array)  # type: ignore[arg-type]


def write_text(path: Path, text: str) -> None:
    """`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: Path, fix: str) -> dict[str, Any]:
    """A run file written by `write_json` (eval.json, probe.json): its object, or one line naming the
    file and the `fix` when it is damaged or not an object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(obj, dict):
            raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FastclrError(f"{path} is damaged ({e}); {fix}") from None
    return obj


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed command created (deepest first) that are still empty: a mistyped
    folder is not left behind empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another process's file, one kept from an unpack), or gone
            return
