"""What this process's cgroups allow it: CPU time (a quota) and memory (a limit), from the cgroup
v1 or v2 files as the kernel lays them out. A container (`docker run --cpus 2 --memory 4g`, a
Kubernetes pod's limits) shows the host's CPUs and MemAvailable everywhere else; these files are
where its own limits are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
V1_UNLIMITED = 2**62  # cgroup v1 writes "no memory limit" as a page-rounded 2^63 - 1


@dataclass(frozen=True)
class Controller:
    """How one cgroup controller states its limit, in each version; a reader returns None for "no
    limit here" and raises OSError or ValueError where the folder has no such file."""

    v1_mounts: tuple[str, ...]
    """Names of its cgroup v1 hierarchy's folder under the root (the first is the controller's name)."""
    v2: Callable[[Path], float | None]
    v1: Callable[[Path], float | None]


def _cpu_v2(folder: Path) -> float | None:
    """cpu.max holds "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit: CPUs' worth."""
    quota, period = (folder / "cpu.max").read_text().split()
    return None if quota == "max" else int(quota) / int(period)


def _cpu_v1(folder: Path) -> float | None:
    quota = int((folder / "cpu.cfs_quota_us").read_text())  # -1: no limit
    return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text())


def _working_set(folder: Path, usage_file: str, inactive_key: str) -> int:
    """Bytes charged to the cgroup less the page cache the kernel would drop first (inactive file
    pages), as container runtimes count it before they kill."""
    usage = int((folder / usage_file).read_text())
    stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
    return max(0, usage - int(stat.get(inactive_key, 0)))


def _memory_v2(folder: Path) -> float | None:
    """Bytes left under memory.max ("max": no limit)."""
    limit = (folder / "memory.max").read_text().strip()
    return None if limit == "max" else max(0, int(limit) - _working_set(folder, "memory.current", "inactive_file"))


def _memory_v1(folder: Path) -> float | None:
    limit = int((folder / "memory.limit_in_bytes").read_text())
    if limit >= V1_UNLIMITED:
        return None
    return max(0, limit - _working_set(folder, "memory.usage_in_bytes", "total_inactive_file"))


CPU = Controller(("cpu", "cpu,cpuacct", "cpuacct,cpu"), _cpu_v2, _cpu_v1)
MEMORY = Controller(("memory",), _memory_v2, _memory_v1)


def _along(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits set on the process's cgroup and each of its ancestors (each applies), and on the
    mount's root: without a cgroup namespace a container sees the host's path in /proc/self/cgroup
    but its own cgroup mounted at the root."""
    folder = mount / path.strip("/")
    folders = [folder, *(p for p in folder.parents if p.is_relative_to(mount))]
    found = []
    for f in dict.fromkeys([*folders, mount]):
        try:
            limit = read(f)
        except (OSError, ValueError):  # no such cgroup here, or no such controller in it
            continue
        if limit is not None:
            found.append(limit)
    return found


def smallest_limit(controller: Controller, root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The tightest limit `controller` sets on this process over all its cgroups, or None when
    none is set or none can be read."""
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
            limits += _along(root, path, controller.v2)
        elif controller.v1_mounts[0] in controllers.split(","):
            for mount in dict.fromkeys([root / controllers, *(root / m for m in controller.v1_mounts)]):
                if mount.is_dir():
                    limits += _along(mount, path, controller.v1)
                    break
    return min(limits, default=None)
