"""How many CPUs this process may use, and PyTorch's thread count sized to it.

PyTorch sizes its thread pool from the affinity mask, not from a cgroup CPU quota: in a container
started with `docker run --cpus 2` or under a Kubernetes CPU limit on a 64-core host it runs 32 or
64 threads on 2 CPUs' worth of time, and the kernel throttles them together. Measured on the EPYC
Zen 3 (2 CPUs) under a quota of one CPU: the default training step ran 624-847 pairs/s with
PyTorch's 2 threads against 964-1009 with 1 (docs/benchmarks.md, section 4).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

from fastclr.cgroups import CPU, MOUNTINFO, SELF_CGROUP, smallest_limit
from fastclr.errors import FastclrError, warn_stderr

P = ParamSpec("P")
R = TypeVar("R")


def cgroup_cpu_limit(self_cgroup: Path = SELF_CGROUP, mountinfo: Path = MOUNTINFO) -> float | None:
    """The CPUs' worth of time per period this process's cgroups allow (cgroup v1 or v2), or None
    when no quota is set or none can be read."""
    return smallest_limit(CPU, self_cgroup, mountinfo)


def usable_cpus(limit: float | None = None) -> int:
    """CPUs this process may run on: its affinity mask, and no more than its cgroup CPU quota
    rounded up (`limit`; read from the cgroup files when None)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit() if limit is None else limit
    return cpus if limit is None else max(1, min(cpus, math.ceil(limit)))


def default_threads(cpus: int) -> int:
    """The count fastclr runs with when --threads is left out: PyTorch's own, at most `cpus`."""
    return min(torch.get_num_threads(), cpus)


MAX_THREADS_PER_CPU = 64
"""Beyond this many threads a CPU, more only take turns; far beyond it (100,000 on 2 CPUs) the
OpenMP runtime crashes while starting them."""


def set_threads(threads: int, warn: Callable[[str], None] = warn_stderr) -> int:
    """Use `threads` CPU threads for PyTorch; 0: PyTorch's choice, but at most one per usable CPU.
    A count above the usable CPUs is honoured with one warning line. Returns the count in use;
    `gives_threads_back` restores the caller's."""
    if threads < 0:  # every command's --threads comes here
        raise FastclrError(f"--threads must be 0 (one per usable CPU) or more, got {threads}")
    cpus = usable_cpus()
    default = default_threads(cpus)
    if threads > MAX_THREADS_PER_CPU * cpus:  # OpenMP's pool of 100,000 threads ended the process with SIGSEGV
        raise FastclrError(f"--threads {threads} is more than {MAX_THREADS_PER_CPU} for each of the {cpus} CPUs this "
                           f"process may use; give at most {MAX_THREADS_PER_CPU * cpus}, or leave --threads out to use "
                           f"{default}")
    if threads > cpus:
        warn(f"warning: --threads {threads} is more than the {cpus} CPUs this process may use (its affinity mask "
             f"and cgroup CPU quota), so the threads take turns on them; leave --threads out to use {default}")
    torch.set_num_threads(threads if threads > 0 else default)
    return torch.get_num_threads()


@contextlib.contextmanager
def at_most_threads(n: int) -> Iterator[None]:
    """PyTorch's thread count lowered to at most `n` inside the block, the caller's given back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gives_threads_back(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` with PyTorch's thread count as the caller had it given back when it returns or raises:
    a notebook that calls `fastclr.evaluate(..., EvaluateOptions(threads=1))` keeps its own."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapper
