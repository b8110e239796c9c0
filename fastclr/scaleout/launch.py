"""`fastclr-torchrun`: torchrun with fastclr's exit codes.

It takes torchrun's arguments unchanged and runs torchrun's own launcher in this process. What
differs is only how it ends. torchrun turns a SIGTERM or SIGINT it receives into an exception
after forwarding the signal to the ranks, and any rank that did not exit 0 into a failure report:
both end in exit 1 with a traceback, so a scheduler cannot tell a stopped, resumable run from a
broken one. Here a stop (a signal to the launcher, or ranks that all exited 75 because a signal
reached them directly) exits 75 as a single-process run does, and ranks that failed with one
line (exit 2) exit 2, with one line naming what to do.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import torch.distributed.elastic.multiprocessing.api as elastic_api
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from fastclr.cli import EXIT_USAGE
from fastclr.signals import EXIT_STOPPED, STOP_SIGNALS, ignore_signals


def _stop_once(signum: int, frame: FrameType | None) -> None:
    """torchrun's handler for the first stop signal (it raises SignalException, and torchrun forwards
    the signal to the ranks and waits for them to checkpoint and exit); later ones are acknowledged.
    torchrun's own raised again from inside that wait: the launcher exited 75 while its ranks were
    still writing their checkpoints and holding the run's lock, so a requeued resume was refused."""
    name = signal.Signals(signum).name
    if _stopping:
        print(f"\n{name} received again: already stopping, the ranks are writing their checkpoints", file=sys.stderr,
              flush=True)
        return
    _stopping.append(signum)
    raise SignalException(f"Process {os.getpid()} got signal: {name}", sigval=signal.Signals(signum))


_stopping: list[int] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with `argv` (torchrun's own arguments); return 0, 75 (stopped) or 2."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    # torchrun installs the handler it finds under this name when it starts the ranks.
    elastic_api._terminate_process_handler = _stop_once
    try:
        run(args)
    except SignalException as e:
        # Interpreter shutdown resets Python's handlers to the default: a signal then would kill the
        # launcher (exit -15, not 75). Ignored from the first atexit callback on, as a stopped run does.
        atexit.register(ignore_signals, STOP_SIGNALS)
        # torchrun has forwarded the signal to the ranks and waited for them (up to its
        # --shutdown-timeout, 30 s by default). The ranks agree to stop where they already
        # synchronise, at the next logging or checkpoint step (every --log-every steps), then
        # checkpoint and exit 75: with slow steps, lower --log-every or raise the timeout.
        print(f"stopped by {e.sigval.name}: the ranks were asked to checkpoint at their next logging step; "
              "continue with the same command and --resume RUN_DIR", file=sys.stderr)
        return EXIT_STOPPED
    except ChildFailedError as e:
        # Once one rank fails, torchrun ends the others with SIGTERM: a rank still starting up
        # dies of it (-15) before its handler is installed. Those deaths follow the failure.
        codes = {f.exitcode for f in e.failures.values()} - {-signal.SIGTERM}
        if codes == {EXIT_STOPPED}:
            print("stopped: every failed rank exited 75 after a stop signal; continue with --resume RUN_DIR",
                  file=sys.stderr)
            return EXIT_STOPPED
        if codes and codes <= {EXIT_USAGE, EXIT_STOPPED}:
            print("error: a rank ended with an error (its line is above); fix it and run again", file=sys.stderr)
            return EXIT_USAGE
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
