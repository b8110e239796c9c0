"""Run a function on N spawned CPU processes joined by gloo, every wait bounded."""

from __future__ import annotations

import os
import random
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (32768 where unreadable)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT), drawn below the kernel's range for
    outgoing connections: a port the kernel hands out (bind to 0) can be handed again, before the
    test binds it, to any connection, such as another test's TCPStore client."""
    rng, below = random.Random(), _ephemeral_low()  # not the tests' seeded global generator: two draws must differ
    for _ in range(50 if below > 11000 else 0):  # a host whose range starts low has no ports outside it
        port = rng.randrange(10000, below)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables torchrun gives each worker."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, out: Path, args: tuple[Any, ...]) -> None:
    os.environ.update(rank_env(rank, world, port))
    torch.set_num_threads(1)  # two busy cores: one thread per rank
    try:
        result = fn(rank, world, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - reported to the parent through a file
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.exit(1)


def run_ranks(fn: Callable[..., Any], world: int, out: Path, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Call fn(rank, world, *args) in `world` spawned processes; return their results, rank 0
    first. Raises if any process fails or all have not finished within `timeout` seconds."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join(10)
    errors = [(out / f"rank{r}.err").read_text() for r in range(world) if (out / f"rank{r}.err").exists()]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    if alive:
        raise TimeoutError(f"{len(alive)} rank(s) still running after {timeout} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
