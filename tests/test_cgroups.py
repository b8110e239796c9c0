"""What the process's cgroups allow it, read as the kernel lays the files out: a CPU quota (the
thread count follows it, test_cpus.py) and a memory limit, whose room is what fastclr's memory
checks compare against (MemAvailable in a container is the host's), so a run that would be killed
for memory stops first with one line. Layouts written here: cgroup v1 and v2, nested limits, a
container with and without a cgroup namespace; then the real kernel files where this machine lets
a test make a cgroup."""

from __future__ import annotations

from pathlib import Path

import pytest

import fastclr.runtime as runtime
from fastclr.cgroups import CPU, MEMORY, Controller, cgroup_mounts, smallest_limit
from real_cgroup import run_in_cgroup

GIB = 2**30


class Layout:
    """A fake /proc/self/mountinfo and /proc/self/cgroup, and the cgroup folders they point to."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mounts: list[str] = [f"22 1 0:21 / {tmp}/proc rw - proc proc rw"]
        self.cgroups: list[str] = []

    def mount(self, point: str, root: str, fstype: str, options: str) -> Path:
        self.mounts.append(f"{30 + len(self.mounts)} 25 0:{40 + len(self.mounts)} {root} {self.tmp}/{point} "
                           f"rw,nosuid,relatime shared:9 - {fstype} {fstype} {options}")
        (self.tmp / point).mkdir(parents=True, exist_ok=True)
        return self.tmp / point

    def files(self, folder: Path, **files: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name.replace("__", ".")).write_text(text + "\n")

    def limit(self, controller: Controller) -> float | None:
        (self.tmp / "mountinfo").write_text("\n".join(self.mounts) + "\n")
        (self.tmp / "cgroup").write_text("\n".join(self.cgroups) + "\n")
        return smallest_limit(controller, self.tmp / "cgroup", self.tmp / "mountinfo")


@pytest.mark.parametrize(("limits", "expected"), [
    ({"a/b": "150000 100000", "a": "max 100000"}, 1.5),  # the process's own cgroup
    ({"a/b": "max 100000", "a": "300000 100000"}, 3.0),  # an ancestor's quota applies to its children
    ({"a/b": "400000 100000", "a": "250000 100000"}, 2.5),  # the smallest along the path
    ({"a/b": "50000 200000"}, 0.25),  # a period other than 100 ms
    ({"a/b": "max 100000", "a": "max 100000"}, None),  # no quota anywhere
    ({"a/b": "garbage"}, None),  # unreadable: no quota assumed rather than an error
    ({}, None),  # no cpu controller in this hierarchy
])
def test_v2_cpu_quota_is_the_smallest_along_the_path(tmp_path: Path, limits: dict[str, str],
                                                     expected: float | None) -> None:
    lay = Layout(tmp_path)
    fs = lay.mount("sys/fs/cgroup", "/", "cgroup2", "rw,nsdelegate")
    for folder, text in limits.items():
        lay.files(fs / folder, cpu__max=text)
    lay.cgroups = ["0::/a/b"]
    assert lay.limit(CPU) == expected


def test_a_v1_container_without_a_cgroup_namespace_finds_its_cgroup_below_the_mount_root(tmp_path: Path) -> None:
    """Docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path
    /docker/ID/sub, the mount shows the cgroup /docker/ID at its point, so `sub` is one folder
    below it. The quota set on `sub` (one CPU) is tighter than the container's (two). The
    container's mount is bound over the host's hierarchy at the same point, which it hides."""
    lay = Layout(tmp_path)
    lay.mount("sys/fs/cgroup/cpu,cpuacct", "/", "cgroup", "rw,cpu,cpuacct")
    cpu = lay.mount("sys/fs/cgroup/cpu,cpuacct", "/docker/0123abcd", "cgroup", "rw,cpu,cpuacct")
    lay.files(cpu, cpu__cfs_quota_us="200000", cpu__cfs_period_us="100000")
    lay.files(cpu / "sub", cpu__cfs_quota_us="100000", cpu__cfs_period_us="100000")
    lay.cgroups = ["4:cpu,cpuacct:/docker/0123abcd/sub", "3:memory:/docker/0123abcd/sub"]
    assert lay.limit(CPU) == 1.0
    lay.cgroups = ["4:cpu,cpuacct:/docker/0123abcd"]
    assert lay.limit(CPU) == 2.0
    lay.cgroups = ["4:cpu,cpuacct:/elsewhere/x"]  # a path the mount does not show: only its point is read
    assert lay.limit(CPU) == 2.0


def test_a_v2_container_with_a_cgroup_namespace_reads_its_root(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    fs = lay.mount("sys/fs/cgroup", "/", "cgroup2", "rw")
    lay.files(fs, cpu__max="200000 100000")
    lay.cgroups = ["0::/"]
    assert lay.limit(CPU) == 2.0


def test_v1_cpu_quota_minus_one_is_no_limit_and_other_hierarchies_are_ignored(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    cpu = lay.mount("sys/fs/cgroup/cpu", "/", "cgroup", "rw,cpu")
    acct = lay.mount("sys/fs/cgroup/cpuacct", "/", "cgroup", "rw,cpuacct")  # "cpuacct" is not "cpu"
    lay.files(cpu / "kubepods" / "pod1", cpu__cfs_quota_us="50000", cpu__cfs_period_us="100000")
    lay.files(acct / "kubepods" / "pod1", cpu__cfs_quota_us="10000", cpu__cfs_period_us="100000")
    lay.mount("sys/fs/cgroup/unified", "/", "cgroup2", "rw")  # a hybrid system's empty v2 hierarchy
    lay.cgroups = ["5:cpuacct:/kubepods/pod1", "4:cpu:/kubepods/pod1", "0::/kubepods/pod1"]
    assert lay.limit(CPU) == 0.5
    lay.files(cpu / "kubepods" / "pod1", cpu__cfs_quota_us="-1")
    assert lay.limit(CPU) is None


def test_unreadable_files_mean_no_limit_never_an_error(tmp_path: Path) -> None:
    assert smallest_limit(CPU, tmp_path / "none", tmp_path / "none") is None
    lay = Layout(tmp_path)
    lay.cgroups = ["garbage", "0::/a", "1:cpu:"]
    assert lay.limit(CPU) is None  # no cgroup mount at all
    assert cgroup_mounts(tmp_path / "none") == []


def test_mount_points_with_escaped_characters(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text(f"30 25 0:26 / {tmp_path}/my\\040cgroups rw - cgroup2 cgroup2 rw\n")
    (mount,) = cgroup_mounts(tmp_path / "mountinfo")
    assert mount.point == tmp_path / "my cgroups" and mount.version == 2 and mount.root == "/"


def test_v2_memory_room_is_the_limit_less_what_cannot_be_dropped(tmp_path: Path) -> None:
    """4 GiB limit, 3.5 GiB charged of which 1 GiB is file pages (a file read twice is active, the
    kernel drops it all the same before it kills) and 0.5 GiB reclaimable slab: 2 GiB of room;
    the pod's own limit (5 GiB, 4.5 used by all its members) leaves less."""
    lay = Layout(tmp_path)
    fs = lay.mount("sys/fs/cgroup", "/", "cgroup2", "rw")
    lay.files(fs / "pod" / "app", memory__max=str(4 * GIB), memory__current=str(7 * GIB // 2),
              memory__stat=f"anon {2 * GIB}\nactive_file {3 * GIB // 4}\ninactive_file {GIB // 4}\n"
                           f"slab_reclaimable {GIB // 2}\nslab_unreclaimable 4096\nshmem 0")
    lay.files(fs / "pod", memory__max="max", memory__current=str(3 * GIB), memory__stat="inactive_file 0")
    lay.cgroups = ["0::/pod/app"]
    assert lay.limit(MEMORY) == 2 * GIB
    lay.files(fs / "pod", memory__max=str(5 * GIB), memory__current=str(9 * GIB // 2))
    assert lay.limit(MEMORY) == GIB // 2
    lay.files(fs / "pod", memory__max="max")
    lay.files(fs / "pod" / "app", memory__max="max")
    assert lay.limit(MEMORY) is None


def test_v1_memory_room_and_the_unlimited_value(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    mem = lay.mount("sys/fs/cgroup/memory", "/", "cgroup", "rw,memory")
    lay.files(mem / "docker" / "abc", memory__limit_in_bytes=str(2 * GIB), memory__usage_in_bytes=str(GIB),
              memory__stat=f"cache {GIB // 2}\nactive_file 0\ninactive_file 0\ntotal_cache {GIB // 2}\n"
                           f"total_active_file {GIB // 4}\ntotal_inactive_file {GIB // 8}")
    lay.cgroups = ["6:memory:/docker/abc", "3:cpu,cpuacct:/docker/abc"]
    assert lay.limit(MEMORY) == 2 * GIB - (GIB - GIB // 4 - GIB // 8)  # the hierarchical counters
    lay.files(mem / "docker" / "abc", memory__limit_in_bytes="9223372036854771712")  # v1's "no limit"
    assert lay.limit(MEMORY) is None


def test_available_memory_is_the_smaller_of_meminfo_and_the_cgroup(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemAvailable:   8388608 kB\n")  # 8 GiB free on the host
    monkeypatch.setattr(runtime, "smallest_limit", lambda controller: 2 * GIB)
    assert runtime.available_memory(meminfo) == 2 * GIB
    monkeypatch.setattr(runtime, "smallest_limit", lambda controller: None)
    assert runtime.available_memory(meminfo) == 8 * GIB
    assert runtime.available_memory(tmp_path / "none") is None


def test_a_real_memory_limit_is_what_the_memory_check_sees() -> None:
    """The kernel's own files: a process in a cgroup limited to 2 GiB sees at most 2 GiB whatever the
    machine has free, and a 3 GiB allocation is refused in one line instead of being killed."""
    code = ("from fastclr.errors import FastclrError; from fastclr.runtime import available_memory, require_memory\n"
            "print(available_memory())\n"
            "try:\n    require_memory(3 * 2**30, 'the features', 'use fewer images')\n"
            "except FastclrError as e:\n    print(e)\n")
    room, message = run_in_cgroup("memory", "memory.limit_in_bytes", str(2 * GIB), code).splitlines()
    assert 0 < int(room) <= 2 * GIB
    assert message.startswith("the features needs about 3.0 GiB but ") and message.endswith("; use fewer images")


def test_memory_room_never_exceeds_the_limit(tmp_path: Path) -> None:
    """memory.current and memory.stat are read one after the other: file pages counted past the
    charge (pages dropped between the two reads) leave the whole limit as room, never more."""
    lay = Layout(tmp_path)
    fs = lay.mount("sys/fs/cgroup", "/", "cgroup2", "rw")
    lay.files(fs / "app", memory__max=str(4 * GIB), memory__current=str(GIB),
              memory__stat=f"anon 0\nactive_file {GIB}\ninactive_file {GIB}\nslab_reclaimable 0")
    lay.cgroups = ["0::/app"]
    assert lay.limit(MEMORY) == 4 * GIB


def test_a_cgroup_whose_name_only_begins_like_the_mount_root_is_not_below_it(tmp_path: Path) -> None:
    """The mount shows /docker/0123abcd; the process's cgroup /docker/0123abcdef is another one
    (a name that only shares the prefix), not the folder "ef" below it: only the mount point is read."""
    lay = Layout(tmp_path)
    cpu = lay.mount("sys/fs/cgroup/cpu", "/docker/0123abcd", "cgroup", "rw,cpu")
    lay.files(cpu, cpu__cfs_quota_us="200000", cpu__cfs_period_us="100000")
    lay.files(cpu / "ef", cpu__cfs_quota_us="50000", cpu__cfs_period_us="100000")
    lay.cgroups = ["4:cpu:/docker/0123abcdef"]
    assert lay.limit(CPU) == 2.0
    lay.cgroups = ["4:cpu:/docker/0123abcd/ef"]  # the folder below it: its quota applies
    assert lay.limit(CPU) == 0.5
