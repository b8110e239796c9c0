"""How many CPUs this process may use, and PyTorch's thread count sized to it.

PyTorch sizes its thread pool from the affinity mask, not from a cgroup CPU quota: in a container
started with `docker run --cpus 2` or under a Kubernetes CPU limit on a 64-core host it runs 32 or
64 threads on 2 CPUs' worth of time, and the kernel throttles them together. Measured on the EPYC
Zen 3 (2 CPUs) under a quota of one CPU: the default training step ran 692-771 pairs/s with
PyTorch's 2 threads against 970-979 with 1 (docs/benchmarks.md, section 4).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
P = ParamSpec("P")
R = TypeVar("R")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _v2_limit(folder: Path) -> float | None:
    """cgroup v2: cpu.max holds "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit."""
    quota, period = (folder / "cpu.max").read_text().split()
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(folder: Path) -> float | None:
    """cgroup v1: cpu.cfs_quota_us is -1 for no limit."""
    quota = int((folder / "cpu.cfs_quota_us").read_text())
    return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text())


def _limits_along(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits set on the process's cgroup and each of its ancestors (the smallest applies),
    and on the mount's root: without a cgroup namespace a container sees the host's path in
    /proc/self/cgroup but its own cgroup mounted at the root."""
    folder = mount / path.strip("/")
    folders = [folder, *(p for p in folder.parents if p.is_relative_to(mount))]
    found = []
    for f in dict.fromkeys([*folders, mount]):
        try:
            limit = read(f)
        except (OSError, ValueError):  # no such cgroup here, or no cpu controller in it
            continue
        if limit is not None:
            found.append(limit)
    return found


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The CPUs' worth of time per period this process's cgroups allow (cgroup v1 or v2), or None
    when no quota is set or none can be read."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            limits += _limits_along(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                if mount.is_dir():
                    limits += _limits_along(mount, path, _v1_limit)
                    break
    return min(limits, default=None)


def usable_cpus(limit: float | None = None) -> int:
    """CPUs this process may run on: its affinity mask, and no more than its cgroup CPU quota
    rounded up (`limit`; read from the cgroup files when None)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit() if limit is None else limit
    return cpus if limit is None else max(1, min(cpus, math.ceil(limit)))


def set_threads(threads: int, warn: Callable[[str], None] = _stderr) -> int:
    """Use `threads` CPU threads for PyTorch; 0: PyTorch's choice, but at most one per usable CPU.
    A count above the usable CPUs is honoured with one warning line. Returns the count in use;
    `gives_threads_back` restores the caller's."""
    cpus = usable_cpus()
    if threads > cpus:
        warn(f"warning: --threads {threads} is more than the {cpus} CPUs this process may use (its affinity mask "
             f"and cgroup CPU quota), so the threads take turns on them; leave --threads out to use {cpus}")
    torch.set_num_threads(threads if threads > 0 else min(torch.get_num_threads(), cpus))
    return torch.get_num_threads()


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
