"""Exclusive claims on a directory that one process writes: a run directory, a store being
prepared. An advisory `flock` on DIR/.lock, which the kernel drops when its process dies."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a directory is then not guarded
    fcntl = None  # type: ignore[assignment]

from fastclr.errors import FastclrError
from fastclr.streams import shown

LOCK_FILE = ".lock"
HELD = frozenset({errno.EWOULDBLOCK, errno.EAGAIN})
"""flock's answer when another process holds the lock; any other error is a filesystem without locks."""


class RunLock:
    """This process's claim on a run directory (or a store being written: `what` and `way_out` word
    its messages): an exclusive `flock` on DIR/.lock, which holds the owner's PID and host. The kernel drops the lock when its process dies, so a lock left by a
    killed run is taken over (and said so) while a live owner is refused by name."""

    def __init__(self, run_dir: Path, log: Callable[[str], None] = print, what: str = "this run",
                 way_out: str = "wait for it to finish (or stop it), or choose another --run-dir") -> None:
        self.path = run_dir / LOCK_FILE
        self._fd = -1
        if fcntl is None:
            return
        while True:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                _lock_soon(self._fd)
            except OSError as e:
                if e.errno not in HELD:  # a filesystem without locks (Lustre without -o flock, NFS without lockd)
                    os.close(self._fd)
                    self._fd = -1
                    log(f"warning: cannot lock {self.path} ({e.strerror}): this filesystem has no file locks, so "
                        f"nothing stops a second process writing {what}; start one at a time")
                    return
                owner = _owner(self._fd)
                os.close(self._fd)
                raise FastclrError(f"{run_dir} is being written by {owner}; {way_out}") from None
            if self._still_the_lock_file():
                break
            # The owner released (and removed) the file between our open and our lock: the lock we hold
            # is on a file no one else will open; take the one now at the path instead.
            os.close(self._fd)
        previous = _as_line(os.pread(self._fd, 256, 0))
        os.ftruncate(self._fd, 0)  # this process's line first: one refused meanwhile names it, not the dead owner
        os.pwrite(self._fd, f"PID {os.getpid()} on {socket.gethostname()}".encode(), 0)
        if previous:
            log(f"took over {self.path} from {previous}, which is no longer running")

    def _still_the_lock_file(self) -> bool:
        """Whether the file we locked is the one at the path (not one its owner removed meanwhile)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Give the directory up (the file goes, so the next owner finds no previous claim)."""
        if self._fd < 0:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1


OWNER_WAIT_S = 0.5
"""How long a refused process waits for the owner's line: the owner writes it just after taking the
lock, and a process refused in between said "another process" without its PID and host."""


def _lock_soon(fd: int) -> None:
    """An exclusive flock on `fd`, tried again for up to OWNER_WAIT_S while it is held: a reader's
    probe (`locked_by_another`) holds a shared lock for an instant, and an owner that is just
    releasing it may be leaving; only a lock still held then refuses."""
    end = time.monotonic() + OWNER_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in HELD or time.monotonic() > end:
                raise
        time.sleep(0.02)


def _owner(fd: int) -> str:
    """The owner's line in the lock file `fd`, waited for up to OWNER_WAIT_S."""
    end = time.monotonic() + OWNER_WAIT_S
    while True:
        text = _as_line(os.pread(fd, 256, 0))
        if text or time.monotonic() > end:
            return text or "another process"
        time.sleep(0.02)


def _as_line(raw: bytes) -> str:
    """A lock file's text as part of one terminal line: anyone who can write the file chooses it, and
    a newline or an escape sequence there split the error or reached the terminal."""
    return shown(raw.decode(errors="replace").strip())


def locked_by_another(run_dir: Path) -> str:
    """The owner ('PID n on host') of a run directory some live process is writing, else ''."""
    path = run_dir / LOCK_FILE
    if fcntl is None:
        return ""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO put there does not hang the probe
    except OSError:
        return ""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return ""
    except OSError as e:  # a filesystem without locks cannot say: not held, as RunLock then takes it
        return _owner(fd) if e.errno in HELD else ""
    finally:
        os.close(fd)
