"""Output that outlives its reader: `fastclr pretrain ... | head -3` must not end the run.

Python ignores SIGPIPE, so a write to a pipe whose reader has gone raises BrokenPipeError. Raised
from a progress line, it ended a run at its first steps without a word (the message went to the
same closed pipe) and without a checkpoint. The guarded stream drops what follows instead, and
points the file descriptor at the null device so that the interpreter's own flush at exit does
not fail (which would make the exit code 120)."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO


class ClosedPipeGuard:
    """A text stream that turns writes after its reader closed the pipe into no-ops. A write the
    file behind it refuses (`> log` on a full disk) raises OSError naming that file, once: what
    follows is dropped, so the error line (on the other stream) is the last word."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.reader_gone = stream, False
        try:
            self.terminal = stream.isatty()  # asked now: a terminal that hung up may not say so later
        except (OSError, ValueError, AttributeError):
            self.terminal = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                try:
                    return self.stream.write(text)
                except UnicodeEncodeError:  # a path the stream's encoding lacks (Windows' cp1252 into a file): \u732b
                    encoding = getattr(self.stream, "encoding", None) or "ascii"
                    return self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
            except BrokenPipeError:
                self._drop_the_rest()
            except OSError as e:
                self._refused(e)
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop_the_rest()
            except OSError as e:
                self._refused(e)

    def _refused(self, e: OSError) -> None:
        if self.terminal and e.errno == errno.EIO:  # the terminal hung up (a job left running as it closed)
            self._drop_the_rest()
            return
        where = self._target()
        self._drop_the_rest()
        raise OSError(e.errno, e.strerror, where) from None

    def _target(self) -> str:
        """The file the stream writes to (Linux names it under /proc), else which stream it is: without
        it, a full disk behind `> log` was told as "cannot write a file" with the current folder's space."""
        try:
            fd = self.stream.fileno()
            return os.readlink(f"/proc/self/fd/{fd}")
        except (OSError, ValueError, io.UnsupportedOperation):
            return "<stdout>" if self.stream is sys.__stdout__ else "<stderr>" if self.stream is sys.__stderr__ else "<output>"

    def _drop_the_rest(self) -> None:
        self.reader_gone = True
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the stream's own
        return getattr(self.stream, name)


def null_if_closed(stream: TextIO | None, fd: int) -> TextIO:
    """`stream`, or the null device where the command was started with `fd` closed (`>&-`): Python
    then has no sys.stdout (None: the first print raised AttributeError, exit 120), and the next
    file opened takes the free descriptor, where a library's or a child's write to `fd` would land
    in that file. A free `fd` is taken by the null device; one a library took already is left."""
    if stream is not None:
        return stream
    try:
        os.fstat(fd)
    except OSError:  # still free
        null = os.open(os.devnull, os.O_WRONLY)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    return open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - the process's stream until it exits


@contextlib.contextmanager
def outliving_readers() -> Iterator[None]:
    """sys.stdout and sys.stderr guarded while inside (each as it is at entry, restored after)."""
    out, err = sys.stdout, sys.stderr
    guards = ClosedPipeGuard(null_if_closed(out, 1)), ClosedPipeGuard(null_if_closed(err, 2))
    sys.stdout, sys.stderr = guards  # type: ignore[assignment]
    try:
        yield
    finally:
        for g in guards:  # what is still buffered, while a closed pipe is still forgiven (else exit code 120)
            g.flush()
        sys.stdout, sys.stderr = out, err


def shown(text: str) -> str:
    """`text` for a terminal: control characters (an image file named with an escape sequence cleared
    the screen and retitled the window) written as Python escapes, everything printable as is."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))
