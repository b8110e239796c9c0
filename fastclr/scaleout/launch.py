"""`fastclr-torchrun`: torchrun with fastclr's exit codes.

It takes torchrun's arguments unchanged and runs torchrun's own launcher in this process. What
differs is only how it ends. torchrun turns a SIGTERM or SIGINT it receives into an exception
after forwarding the signal to the ranks, and any rank that did not exit 0 into a failure report:
both end in exit 1 with a traceback, so a scheduler cannot tell a stopped, resumable run from a
broken one. Here a stop (a signal to the launcher, or ranks that all exited 75 because a signal
reached them directly) exits 75 as a single-process run does, and ranks that failed with one
line (exit 2) exit 2, with one line naming what to do, and that line is printed once on the node,
not once a rank (`once.print_once_a_node`). And each rank's CPU threads are its share of
the node's usable CPUs (`share_cpus`), not torchrun's default of one.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import MutableMapping, Sequence
from types import FrameType

import torch
import torch.distributed.elastic.multiprocessing.api as elastic_api
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed import DistError
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import determine_local_world_size, parse_args, run

from fastclr.cli import EXIT_USAGE
from fastclr.cpus import usable_cpus
from fastclr.scaleout.once import ONCE_DIR
from fastclr.signals import EXIT_STOPPED, STOP_SIGNALS, ignore_signals, kept_ignored
from fastclr.streams import outliving_readers


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


def share_cpus(nproc: int, cpus: int, environ: MutableMapping[str, str]) -> int | None:
    """Set OMP_NUM_THREADS for `nproc` ranks on a node of `cpus` usable CPUs to each one's share
    (at least 1), unless it is set already; returns the count set, None when left alone.
    torchrun sets 1 for more than one rank: rank 0 then fits the final linear probe on one thread
    while the node's other CPUs idle (on the EPYC Zen 4: 12.9-13.3 s on 1 thread against 7.7-8.2 s
    on 2, docs/benchmarks.md section 8, "Threads a rank"), and a CPU (gloo) run trains on one thread a rank."""
    if "OMP_NUM_THREADS" in environ or nproc <= 1:
        return None
    share = max(1, cpus // nproc)
    environ["OMP_NUM_THREADS"] = str(share)
    return share


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with `argv` (torchrun's own arguments); return 0, 75 (stopped) or 2."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        nproc = determine_local_world_size(args.nproc_per_node)
    except ValueError as e:  # torchrun's own report of it was a traceback, as was a count of 0
        nproc, why = 0, str(e)
    else:
        why = "not a count of 1 or more"
    if nproc < 1:
        kinds = "cpu, gpu or auto" if torch.cuda.is_available() else "cpu or auto (no GPU is visible here)"
        print(f"error: --nproc_per_node {args.nproc_per_node} ({why}); give the processes to start on this node: a "
              f"count of 1 or more, or {kinds}", file=sys.stderr)
        return EXIT_USAGE
    if args.max_restarts > 0 and not torch.cuda.is_available():
        print(f"error: --max-restarts {args.max_restarts}: a restarted round of CPU (gloo) ranks hangs with torch "
              f"{torch.__version__} (a plain torch script too: its ranks dial the dead round's addresses); give "
              "--max-restarts 0 and, after a failure, run the same command with --resume auto RUN_DIR", file=sys.stderr)
        return EXIT_USAGE
    cpus = usable_cpus()
    share = share_cpus(nproc, cpus, os.environ)
    if share is not None:
        print(f"fastclr-torchrun: OMP_NUM_THREADS={share} for each of the {nproc} ranks on this node ({cpus} usable "
              "CPUs); set OMP_NUM_THREADS to choose another", file=sys.stderr)
    # torchrun installs the handler it finds under this name when it starts the ranks.
    elastic_api._terminate_process_handler = _stop_once
    elastic_api.logger.addFilter(said_exit)
    args.signals_to_handle = signals_to_handle(args.signals_to_handle)
    os.environ[ONCE_DIR] = once = tempfile.mkdtemp(prefix="fastclr-torchrun-")
    try:
        with outliving_readers():  # its last line after a hang-up, or to a closed pipe, is dropped, not a traceback
            return _launch(args)
    finally:
        shutil.rmtree(once, ignore_errors=True)


def said_exit(record: logging.LogRecord) -> bool:
    """False for torchrun's "failed (exitcode: 2|75) ... of binary" record: a fastclr rank that exits 2
    or 75 has said why in one line, and the launcher says what follows; the record repeated it as an
    error beside them. Other exits (a crash, a kill) keep it."""
    return not (str(record.msg).startswith("failed (exitcode:") and isinstance(record.args, tuple)
                and bool(record.args) and record.args[0] in (EXIT_USAGE, EXIT_STOPPED))


def signals_to_handle(names: str) -> str:
    """torchrun's `--signals-to-handle` without the signals this process was started ignoring, as
    the ranks' own handling keeps them ignored (`signals.kept_ignored`: nohup's SIGHUP, the SIGINT of a
    script's background job): torchrun handled them whatever it found and stopped the ranks on them."""
    kept = [n.strip() for n in names.split(",")]
    return ",".join(n for n in kept if not (hasattr(signal, n) and kept_ignored(getattr(signal, n))))


def _launch(args: argparse.Namespace) -> int:
    """torchrun's `run(args)`, its ends turned into fastclr's exit codes."""
    port = getattr(args, "master_port", None)
    if isinstance(port, int) and not 0 < port < 65536:  # a typo (295001) was torchrun's ValueError traceback
        print(f"error: --master_port {port} is not a TCP port (1-65535); give the same free port on every node",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        run(args)
    except (DistError, RendezvousError) as e:
        # The nodes never met (one not started, started late past the timeout, or a mistyped address or port):
        # torchrun's traceback after minutes of silence, 40-80 lines, told nothing the first line does not.
        # (c10d's timeout error has no text at all: its first line was an IndexError's traceback)
        said = (str(e).splitlines() or [type(e).__name__])[0][:200] or type(e).__name__
        key = "timeout" if args.rdzv_backend == "static" else "join_timeout"  # what each backend reads
        print(f"error: the nodes did not meet ({said}); start every node with the same --nnodes ({args.nnodes}) and "
              f"rendezvous address ({_meeting_point(args)}), all within the rendezvous timeout (--rdzv-conf "
              f"{key}=SECONDS), and check that this host can reach it", file=sys.stderr)
        return EXIT_USAGE
    except SignalException as e:
        # Interpreter shutdown resets Python's handlers to the default: a signal then would kill the
        # launcher (exit -15, not 75). Ignored from the first atexit callback on, as a stopped run does.
        atexit.register(ignore_signals, STOP_SIGNALS)
        # torchrun has forwarded the signal to the ranks and waited for them (up to its
        # --shutdown-timeout, 30 s by default). The ranks agree to stop at their next logging or
        # checkpoint step, or sooner with slow steps (about every 5 s of steps: loop.STOP_WITHIN_S),
        # then checkpoint and exit 75. `--resume auto`: the ranks may have been ended before their
        # first checkpoint (a checkpoint that takes longer to write than the grace left).
        print(f"stopped by {e.sigval.name}: the ranks were asked to checkpoint within about 5 s of training (and "
              "torchrun's --shutdown-timeout); continue with the same command and --resume auto RUN_DIR (from its "
              "checkpoint, or afresh where none was written)", file=sys.stderr)
        return EXIT_STOPPED
    except ChildFailedError as e:
        # Once one rank fails, torchrun ends the others with SIGTERM: a rank still starting up
        # dies of it (-15) before its handler is installed. Those deaths follow the failure.
        codes = {f.exitcode for f in e.failures.values()} - {-signal.SIGTERM}
        if codes == {EXIT_STOPPED}:
            print("stopped: every failed rank exited 75 after a stop signal; continue with the same command and "
                  "--resume RUN_DIR", file=sys.stderr)
            return EXIT_STOPPED
        if codes and codes <= {EXIT_USAGE, EXIT_STOPPED}:
            print("error: a rank ended with an error (its line is above); fix it and run again", file=sys.stderr)
            return EXIT_USAGE
        print(f"error: {first_failure(e)}; a run's last checkpoint, if it wrote one, is kept: once the cause is "
              "fixed, continue with the same command and --resume auto RUN_DIR (afresh where none was written)",
              file=sys.stderr)
        return 1
    return 0


def _meeting_point(args: argparse.Namespace) -> str:
    """Where the nodes meet: --rdzv-endpoint, else --master_addr:--master_port."""
    endpoint = getattr(args, "rdzv_endpoint", "")
    return str(endpoint) if endpoint else f"{getattr(args, 'master_addr', '?')}:{getattr(args, 'master_port', '?')}"


def first_failure(e: ChildFailedError) -> str:
    """The rank that failed first, and how: a rank killed outright (the out-of-memory killer's
    SIGKILL) made torchrun print its failure table under the launcher's traceback. Deaths that
    follow a failure are passed over: SIGTERM (torchrun ending the others), SIGABRT (NCCL's
    watchdog ending a rank whose peer is gone), and the one-line exits of ranks that lost a peer."""
    follow_on = {-signal.SIGTERM, -signal.SIGABRT, EXIT_USAGE, EXIT_STOPPED}
    failures = {r: f for r, f in e.failures.items() if f.exitcode not in follow_on} or e.failures
    rank = min(failures, key=lambda r: (failures[r].timestamp, r))
    code = failures[rank].exitcode
    if code < 0:
        name = failures[rank].signal_name()
        return f"rank {rank} was killed by {name}" + (" (the kernel's out-of-memory killer sends it, as do kill -9 and "
                                                      "torchrun ending a rank that hung)" if code == -signal.SIGKILL else "")
    return f"rank {rank} failed with exit code {code} (its output above says why)"


if __name__ == "__main__":
    sys.exit(main())
