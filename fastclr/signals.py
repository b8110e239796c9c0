"""Graceful stop: SIGTERM/SIGINT/SIGHUP ask the training loop to checkpoint and exit at the next step.

The handler only sets a flag; the loop checks it at step boundaries, writes a checkpoint
(atomically, see checkpoint.py) and returns, and the CLI exits with EXIT_STOPPED so a job
scheduler can tell "stopped, resumable" from success and from failure. Further signals while
stopping are acknowledged and ignored, so a second Ctrl-C cannot interrupt the checkpoint write.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

EXIT_STOPPED = 75
"""Exit code of a run stopped by SIGTERM/SIGINT after writing its checkpoint (EX_TEMPFAIL:
'try again later', i.e. resume with `fastclr pretrain --resume RUN_DIR`)."""


class Terminated(SystemExit):
    """A SIGTERM or SIGHUP turned into an exit (`cleanup_on_sigterm`): status 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class StopRequested(Exception):
    """Raised inside an interruptible phase (the probe after training) when a stop signal arrives."""


class StopFlag:
    """Set by the signal handler, read by the training loop at step boundaries. Phases with no
    step boundary (the final probe) run inside `interruptible()`, where a signal ends them at
    once with StopRequested instead: what was complete before them is kept."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.raising = False
        self.training_over = False
        """Set by the loop after its last step: a stop signal then ends the run once its encoder is saved."""
        self.finished = False
        """Set by the command once the run is complete: a stop signal then finds nothing to stop."""

    def __call__(self, step: int) -> bool:
        """The `stop` callback of `pretrain`: True once a stop was requested."""
        return self.signal is not None

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside: a stop request (or one already pending) raises StopRequested."""
        try:
            self.raising = True  # before the check: a signal between the two would set the flag and not raise
            if self.signal is not None:
                raise StopRequested()
            yield
        finally:
            self.raising = False


HANGUP: int | None = getattr(signal, "SIGHUP", None)
"""POSIX: the terminal closed (an SSH connection lost, a window shut); Windows has none."""

KEPT_IGNORED: tuple[int, ...] = tuple(s for s in (signal.SIGINT, HANGUP) if s is not None)
"""Stop signals that, ignored when the process starts, stay ignored: SIGHUP under `nohup`, and
SIGINT in a script's background job (the shell ignores it there so that a Ctrl-C for the command in
the foreground, which reaches the whole process group, does not stop the job; `kill` stops it).
SIGTERM is always taken over: it is how schedulers ask for the checkpoint."""

# Windows: Ctrl-Break (SIGBREAK) is the console's other stop key; its SIGTERM cannot be caught.
STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT,
                                 *(s for s in [HANGUP, getattr(signal, "SIGBREAK", None)] if s is not None))


def kept_ignored(sig: int) -> bool:
    """Whether `sig` is one of KEPT_IGNORED and this process ignores it (was started ignoring it)."""
    return sig in KEPT_IGNORED and signal.getsignal(sig) == signal.SIG_IGN


def terminal_outputs() -> list[int]:
    """Which of stdout and stderr (descriptors 1, 2) are a terminal, asked before it can hang up."""
    found = []
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                found.append(fd)
        except OSError:
            pass
    return found


def leave_terminal(fds: list[int]) -> None:
    """After SIGHUP: the terminal `fds` wrote to is gone, and each write there would fail (EIO) in
    the middle of stopping. They now write to the null device; a file or pipe they write to is
    left as it is (a log kept by `> log` still gets the stop's lines). Not flushed first: a flush
    from a signal handler can land inside a write to the same stream (a reentrant call)."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(null, fd)
    finally:
        os.close(null)


@contextmanager
def cleanup_on_sigterm() -> Iterator[None]:
    """Inside: a SIGTERM or SIGHUP that would kill the process outright (its default action, in the
    main thread) raises SystemExit(128 + signal) instead, so `finally` blocks remove what they made
    (a download's part file) and the process still ends with the status that kill gives in a shell.
    Where a signal already has a handler (a training run's stop flag), it keeps it; where it is
    ignored (`nohup`), it stays ignored."""
    signals = [s for s in (signal.SIGTERM, HANGUP) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ttys = terminal_outputs()

    def handler(signum: int, frame: FrameType | None) -> None:
        if signum == HANGUP:
            leave_terminal(ttys)
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signals if signal.getsignal(s) == signal.SIG_DFL}
    try:
        yield
    finally:
        for s, h in previous.items():
            if signal.getsignal(s) is handler:  # not one installed inside and kept on purpose (a finished run's)
                signal.signal(s, h)


class Deferred:
    """Stop signals held back by `deferred_signals`, acted on at `run_pending`."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}

    def run_pending(self) -> None:
        """Call the handler each held-back signal had (it raises, as it would have where it came)."""
        while self.pending:
            signum = self.pending.pop(0)
            self.previous[signum](signum, None)


@contextmanager
def deferred_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[Deferred]:
    """Inside: a stop signal whose handler raises (Ctrl-C's KeyboardInterrupt, `cleanup_on_sigterm`'s
    exit) is held back until the block calls `run_pending`, or leaves without an error. Raised where
    it lands, inside a process pool's bookkeeping (a lock taken and not yet in its `with`), it can
    leave the pool's shutdown waiting on that lock for good: the likely cause of a prepare that a
    SIGHUP to its group left hanging once in about fifteen tries. Ignored and default-action
    signals are left as they are."""
    deferred = Deferred()
    if threading.current_thread() is not threading.main_thread():
        yield deferred
        return

    def hold(signum: int, frame: FrameType | None) -> None:
        deferred.pending.append(signum)

    deferred.previous = {s: h for s in signals if callable(h := signal.getsignal(s))}
    for s in deferred.previous:
        signal.signal(s, hold)

    def restore() -> None:
        for s, h in deferred.previous.items():
            if signal.getsignal(s) is hold:
                signal.signal(s, h)

    try:
        yield deferred
    except BaseException:
        restore()
        raise
    restore()
    deferred.run_pending()


@contextmanager
def graceful_stop(signals: tuple[int, ...] = STOP_SIGNALS, process_ends: bool = True) -> Iterator[StopFlag]:
    """Install flag-setting handlers for `signals` for the duration of the block; those of
    KEPT_IGNORED the process was started ignoring stay ignored. `process_ends`: the process exits
    after the block (a command); False where it goes on (`fastclr.pretrain` in a notebook), whose
    handlers are then given back whatever happened."""
    flag = StopFlag()
    ttys = terminal_outputs()

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == HANGUP:
            leave_terminal(ttys)
        if flag.signal is None:
            flag.signal = signum
            if flag.finished:  # the run is complete: the command exits 0 as it would have
                print(f"\n{name} received after the run finished: nothing to stop", file=sys.stderr, flush=True)
                return
            if flag.raising:
                print(f"\n{name} received: stopping now", file=sys.stderr, flush=True)
                raise StopRequested()
            print(f"\n{name} received: " + ("stopping once the encoder is saved (training is over)" if flag.training_over
                                           else "writing a checkpoint at the next step, then stopping"),
                  file=sys.stderr, flush=True)
        elif flag.finished:
            pass  # said once
        else:
            print(f"\n{name} received again: already stopping, the checkpoint is being written", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in signals if not kept_ignored(s)}
    try:
        yield flag
    finally:
        # Once stopping, keep acknowledging signals until the process exits: restoring the
        # default handler here let a second Ctrl-C land as KeyboardInterrupt in interpreter
        # shutdown (seen in CI) and turned exit code 75 into a traceback.
        # Interpreter shutdown then resets Python-level handlers to SIG_DFL, so a signal in that
        # window would kill the process (exit -2 instead of 75); ignoring them from the first
        # atexit callback on closes it (CPython keeps SIG_IGN through finalisation).
        # A finished run keeps them too: its interpreter's exit (0.7 s on a 2-vCPU Xeon) was a window
        # in which a SIGTERM killed a complete run with 143, which a scheduler reads as failed.
        if (flag.signal is None and not flag.finished) or not process_ends:
            for s, h in previous.items():
                signal.signal(s, h)
        else:
            atexit.register(ignore_signals, tuple(previous))


def ignore_signals(signals: tuple[int, ...]) -> None:
    """Ignore `signals` from now on (an atexit callback of a process that is stopping)."""
    for s in signals:
        signal.signal(s, signal.SIG_IGN)


def die_with_parent(parent: int, sig: int) -> None:
    """Linux: this process gets `sig` when its parent dies (prctl PR_SET_PDEATHSIG), so a parent
    killed outright does not leave it running: `prepare`'s decoders (SIGKILL), torchrun's ranks
    (SIGTERM: they stop at their next step with a checkpoint, and release the run's lock).
    Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call: nothing will signal us
        os.kill(os.getpid(), sig)
