"""The ranks' start: every rank checks in on the job's key-value store before the process group forms.

Without it, a rank that stopped before joining (a --config file missing on its node, a flag its
node's fastclr refuses) left every other rank inside `init_process_group` for the whole
--dist-timeout (10 minutes by default), deaf to a stop signal, which then blamed the network. Here a
rank that cannot start leaves its one line on the store (`tell_start_failure`), and the ranks
waiting for it (`check_in`) end with that line within a poll; a rank that never comes is named by
count when the timeout ends, and a stop signal ends the wait.

The store is the one the process group then uses: torchrun's agent's (TORCHELASTIC_USE_AGENT_STORE),
or else one rank 0 serves at MASTER_ADDR:MASTER_PORT, as torch's env:// rendezvous makes them.
Where torchrun may start the ranks again (`restartable`) there is no check-in: the store outlives
the rounds, and its keys could not tell one round from the next.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from fastclr.errors import FastclrError, PeerFailure


class StoppedBeforeStart(FastclrError):
    """A stop signal while the ranks were checking in: exit 75, as a stop (a scheduler requeues it)."""


POLL_S = 0.25
"""How soon a waiting rank first looks at the store again (two small requests each time); the wait
between looks then grows to POLL_MAX_S, so that thousands of ranks waiting for a late node ask the
store about once a second each, and a stop signal or a failure is seen within that."""

POLL_MAX_S = 2.0

FAILURE_STORE_WAIT_S = 30.0
"""How long a rank that failed waits to reach the store, then for the others to arrive and read its
line (the store ends with its server: rank 0 outside torchrun, node 0's agent under it)."""

_checked_in = False
"""True once this process checked in: its failures from then on reach the others through the group."""


def _key(name: str) -> str:
    return f"fastclr/start/{name}"


def restartable() -> bool:
    """Whether torchrun may start these ranks again on the same store: each node's agent counts its
    own restarts (one restarted for another node's failure does not), and the store outlives the
    rounds, so no key tells one round from the next. There the ranks join as before, without a
    check-in."""
    def whole(name: str) -> int:
        try:
            return int(os.environ.get(name, "0") or "0")
        except ValueError:
            return 0
    return whole("TORCHELASTIC_MAX_RESTARTS") > 0 or whole("TORCHELASTIC_RESTART_COUNT") > 0


def _agent_store() -> bool:
    """Whether torchrun's agent serves the store (TORCHELASTIC_USE_AGENT_STORE)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def serves_store(rank: int) -> bool:
    """Whether this process serves the store: rank 0, unless torchrun's agent does."""
    return rank == 0 and not _agent_store()


def holds_store(rank: int) -> bool:
    """Whether the store ends soon after this process: it serves it (`serves_store`), or under torchrun its
    node's agent does (node 0's, GROUP_RANK 0), which ends once its ranks have."""
    return serves_store(rank) or (_agent_store() and os.environ.get("GROUP_RANK", "") == "0")


def job_store(rank: int, world: int, timeout_s: float) -> dist.Store:
    """The job's TCP store at MASTER_ADDR:MASTER_PORT (ValueError where either is unset or wrong)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not addr or not port:
        raise ValueError(f"environment variable {'MASTER_PORT' if addr else 'MASTER_ADDR'} expected, but not set")
    # multi_tenant: a second store on the port in this process shares the server (torch's own env:// does the same)
    return dist.TCPStore(addr, int(port), world, is_master=serves_store(rank), timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False, multi_tenant=True)


def check_in(store: dist.Store, rank: int, world: int, timeout_s: float,
             stopping: Callable[[], bool] | None = None) -> None:
    """Say this rank has started, and wait until every rank has: a rank's failure told on the store
    ends the wait with its line (FastclrError), as does a stop signal; the timeout a PeerFailure
    naming how many never came."""
    global _checked_in
    arrived = int(store.add(_key("count"), 1))
    _checked_in = True
    deadline, pause = time.monotonic() + timeout_s, POLL_S
    while True:
        if store.check([_key("failed")]):  # also once all have come: a rank stopped there had counted itself
            raise FastclrError(f"rank {rank}: {store.get(_key('failed')).decode(errors='replace')}")
        if arrived >= world:
            return
        if stopping is not None and stopping():
            store.set(_key("failed"), f"rank {rank} was stopped before training (a stop signal); start every rank "
                                      "again")
            if holds_store(rank):  # the store ends with this process: the ranks still to come read the line first
                _linger(store, world)
            raise StoppedBeforeStart(f"rank {rank}: stopped while waiting for the other ranks to start; nothing was "
                                     "trained or written: run the same command again")
        if time.monotonic() > deadline:
            missing = world - arrived
            raise PeerFailure(f"rank {rank}: {missing} of the {world} ranks did not start within {timeout_s:g} s "
                              "(--dist-timeout); start the same command on every node (--nnodes, --node_rank), "
                              "check that each reaches MASTER_ADDR:MASTER_PORT, and read their logs")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic()) + 0.01))
        pause = min(POLL_MAX_S, pause * 1.5)
        arrived = int(store.add(_key("count"), 0))


def _linger(store: dist.Store, world: int) -> None:
    """Wait, FAILURE_STORE_WAIT_S at most, until every rank has checked in or failed, and a poll more
    (the last to arrive reads the failure at its next poll)."""
    end = time.monotonic() + FAILURE_STORE_WAIT_S
    while int(store.add(_key("count"), 0)) + int(store.add(_key("fallen"), 0)) < world and time.monotonic() < end:
        time.sleep(POLL_S)
    time.sleep(POLL_MAX_S + POLL_S)  # the last to arrive reads the failure at its next look


def tell_start_failure(line: str) -> None:
    """Leave `line` (why this rank stopped) on the store for the ranks waiting in `check_in`, then,
    where the store ends soon after this process (`holds_store`), wait up to FAILURE_STORE_WAIT_S for
    every other rank to arrive and read it.
    Best effort and bounded: a rank that cannot reach the store leaves the others to their timeout,
    as before. Nothing once this rank has checked in, or where torchrun may restart the ranks."""
    if _checked_in or restartable():
        return
    try:
        from fastclr.scaleout.distributed import env_world

        rank, world, _ = env_world()
        if world <= 1:
            return
        store = job_store(rank, world, FAILURE_STORE_WAIT_S)
        store.set(_key("failed"), f"rank {rank} stopped before training ({line.removeprefix('error: ')[:500]}); fix "
                                  "that and start every rank again")
        store.add(_key("fallen"), 1)
        if holds_store(rank):  # elsewhere the store outlives this process, and a look at it after its server ended
            _linger(store, world)  # printed the store client's C++ stack under this rank's line
    except Exception:  # noqa: BLE001 - a courtesy to the others; this rank's own error is already said
        return
