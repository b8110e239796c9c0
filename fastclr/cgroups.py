"""What this process's cgroups allow it: CPU time (a quota) and memory (a limit), from the cgroup
v1 or v2 files as the kernel lays them out. A container (`docker run --cpus 2 --memory 4g`, a
Kubernetes pod's limits) shows the host's CPUs and MemAvailable everywhere else; these files are
where its own limits are.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SELF_CGROUP = Path("/proc/self/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")
V1_UNLIMITED = 2**62  # cgroup v1 writes "no memory limit" as a page-rounded 2^63 - 1


@dataclass(frozen=True)
class Controller:
    """How one cgroup controller states its limit, in each version; a reader returns None for "no
    limit here" and raises OSError or ValueError where the folder has no such file."""

    name: str
    """Its name in /proc/self/cgroup and in a v1 mount's options."""
    v2: Callable[[Path], float | None]
    v1: Callable[[Path], float | None]


def _cpu_v2(folder: Path) -> float | None:
    """cpu.max holds "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit: CPUs' worth."""
    quota, period = (folder / "cpu.max").read_text(encoding="utf-8").split()
    return None if quota == "max" else int(quota) / int(period)


def _cpu_v1(folder: Path) -> float | None:
    quota = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))  # -1: no limit
    return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))


def _unreclaimable(folder: Path, usage_file: str, reclaimable: tuple[str, ...]) -> int:
    """Bytes charged to the cgroup that reclaim cannot free: the charge less its file pages (active
    and inactive: the kernel drops both before it kills) and, in v2, its reclaimable slab; what
    MemAvailable counts as free on a whole machine."""
    usage = int((folder / usage_file).read_text(encoding="utf-8"))
    lines = (folder / "memory.stat").read_text(encoding="utf-8").splitlines()
    stat = dict(line.split() for line in lines if line.count(" ") == 1)
    return max(0, usage - sum(int(stat.get(key, 0)) for key in reclaimable))


def _memory_v2(folder: Path) -> float | None:
    """Bytes left under memory.max ("max": no limit)."""
    limit = (folder / "memory.max").read_text(encoding="utf-8").strip()
    if limit == "max":
        return None
    used = _unreclaimable(folder, "memory.current", ("active_file", "inactive_file", "slab_reclaimable"))
    return max(0, int(limit) - used)


def _memory_v1(folder: Path) -> float | None:
    limit = int((folder / "memory.limit_in_bytes").read_text(encoding="utf-8"))
    if limit >= V1_UNLIMITED:
        return None
    # The hierarchical (total_) counters: usage_in_bytes counts the cgroup's descendants too.
    return max(0, limit - _unreclaimable(folder, "memory.usage_in_bytes", ("total_active_file", "total_inactive_file")))


CPU = Controller("cpu", _cpu_v2, _cpu_v1)
MEMORY = Controller("memory", _memory_v2, _memory_v1)


@dataclass(frozen=True)
class Mount:
    """A cgroup hierarchy as /proc/self/mountinfo shows it."""

    point: Path
    """Where it is mounted."""
    root: str
    """Which cgroup of the hierarchy the mount point shows ("/" on a host; a container without a
    cgroup namespace sees its own cgroup, e.g. "/docker/ID")."""
    version: int
    options: frozenset[str]
    """The superblock options: a v1 hierarchy names its controllers there."""


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as a 3-digit octal escape."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """The cgroup v1 and v2 mounts this process sees (none where mountinfo cannot be read)."""
    try:
        lines = mountinfo.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(Mount(Path(_unescape(fields[4])), _unescape(fields[3]), 1 if tail[0] == "cgroup" else 2,
                            frozenset(tail[2].split(","))))
    return mounts


def _folders(mount: Mount, path: str) -> list[Path]:
    """The folders of the process's cgroup `path` and of each ancestor the mount shows, from the
    mount's root down; only the mount point when the path is not below the mount's root."""
    root = mount.root.rstrip("/")
    if ".." in path.split("/") or not (path == root or path.startswith(root + "/")):
        return [mount.point]
    parts = [p for p in path[len(root):].split("/") if p]
    return [mount.point.joinpath(*parts[:n]) for n in range(len(parts) + 1)]


def smallest_limit(controller: Controller, self_cgroup: Path = SELF_CGROUP, mountinfo: Path = MOUNTINFO) -> float | None:
    """The tightest limit `controller` sets on this process over its cgroup and the cgroup's
    ancestors (each applies) in every hierarchy that has the controller, or None when none is set
    or none can be read."""
    try:
        lines = self_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    mounts = cgroup_mounts(mountinfo)
    name = controller.name
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        version = 2 if controllers == "" else 1
        if version == 1 and name not in controllers.split(","):
            continue
        # The last: a mount over another at the same point (a container's own cgroup bound over the
        # host's hierarchy) hides it.
        mount = next((m for m in reversed(mounts) if m.version == version and (version == 2 or name in m.options)),
                     None)
        if mount is None:
            continue
        read = controller.v2 if version == 2 else controller.v1
        for folder in _folders(mount, path):
            try:
                limit = read(folder)
            except (OSError, ValueError):  # no such cgroup here, or no such controller in it
                continue
            if limit is not None:
                limits.append(limit)
    return min(limits, default=None)
