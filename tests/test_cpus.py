"""CPUs a process may use (affinity and cgroup CPU quota) and the thread count fastclr sets from
them: the quota read from cgroup v1 and v2 files as the kernel lays them out, PyTorch's count
capped by it, an explicit count above it warned about, and the caller's count given back."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import fastclr.cpus as cpus
from fastclr.cli import main as cli_main
from fastclr.cpus import cgroup_cpu_limit, gives_threads_back, set_threads, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _cgroup_v2(root: Path, path: str, limits: dict[str, str]) -> Path:
    """A cgroup v2 tree under `root`: cpu.max in each folder of `limits`; the process in `path`."""
    for folder, text in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(text + "\n")
    self_cgroup = root / "self-cgroup"
    self_cgroup.write_text(f"0::{path}\n")
    return self_cgroup


@pytest.mark.parametrize(("limits", "expected"), [
    ({"a/b": "150000 100000", "a": "max 100000"}, 1.5),  # the process's own cgroup
    ({"a/b": "max 100000", "a": "300000 100000"}, 3.0),  # an ancestor's quota applies to its children
    ({"a/b": "400000 100000", "a": "250000 100000"}, 2.5),  # the smallest along the path
    ({"a/b": "50000 200000"}, 0.25),  # a period other than 100 ms
    ({"a/b": "max 100000", "a": "max 100000"}, None),  # no quota anywhere
    ({"a/b": "garbage"}, None),  # unreadable: no quota assumed rather than an error
    ({}, None),  # no cpu controller in this hierarchy
])
def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path: Path, limits: dict[str, str],
                                                        expected: float | None) -> None:
    self_cgroup = _cgroup_v2(tmp_path, "/a/b", limits)
    assert cgroup_cpu_limit(tmp_path, self_cgroup) == expected


def test_a_container_without_cgroup_namespace_reads_its_own_cgroup_at_the_mount(tmp_path: Path) -> None:
    """/proc/self/cgroup names the host's path (/docker/ID), which is not inside the container's
    mount; the container's own cgroup, with its quota, is the mount's root."""
    self_cgroup = _cgroup_v2(tmp_path, "/docker/0123abcd", {".": "200000 100000"})
    assert cgroup_cpu_limit(tmp_path, self_cgroup) == 2.0


def test_cgroup_v1_quota_from_the_cpu_controller(tmp_path: Path) -> None:
    folder = tmp_path / "cpu,cpuacct" / "kubepods" / "pod1"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("50000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # the root: no limit
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("5:memory:/kubepods/pod1\n4:cpu,cpuacct:/kubepods/pod1\n0::/\n")
    assert cgroup_cpu_limit(tmp_path, self_cgroup) == 0.5
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path, self_cgroup) is None
    assert cgroup_cpu_limit(tmp_path, tmp_path / "no-such-file") is None


@pytest.mark.parametrize(("limit", "expected"), [
    (0.25, 1),  # a fraction of a CPU still runs one thread
    (1.0, 1),
    (1.5, min(AFFINITY, 2)),  # rounded up: two threads share 1.5 CPUs' time, one would leave 0.5 idle
    (1000.0, AFFINITY),  # never more than the affinity mask allows
])
def test_usable_cpus_is_the_affinity_mask_capped_by_the_quota(limit: float, expected: int) -> None:
    assert usable_cpus(limit) == expected


@pytest.fixture
def caller_threads() -> object:
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_the_default_count_is_capped_at_the_usable_cpus(monkeypatch: pytest.MonkeyPatch, caller_threads: object) -> None:
    torch.set_num_threads(4)  # what PyTorch picks on a larger host, whose quota allows one CPU
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 1)
    warned: list[str] = []
    assert set_threads(0, warn=warned.append) == 1 and torch.get_num_threads() == 1 and warned == []
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 8)
    torch.set_num_threads(2)
    assert set_threads(0, warn=warned.append) == 2  # never raised above PyTorch's own choice
    assert warned == []


def test_an_explicit_count_above_the_usable_cpus_runs_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                                       caller_threads: object) -> None:
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 2)
    warned: list[str] = []
    assert set_threads(3, warn=warned.append) == 3
    assert warned == ["warning: --threads 3 is more than the 2 CPUs this process may use (its affinity mask and "
                      "cgroup CPU quota), so the threads take turns on them; leave --threads out to use 2"]
    assert set_threads(2, warn=warned.append) == 2 and len(warned) == 1


def test_the_callers_count_is_given_back_on_return_and_on_error(caller_threads: object) -> None:
    @gives_threads_back
    def work(n: int, fail: bool) -> int:
        torch.set_num_threads(n)
        if fail:
            raise RuntimeError("boom")
        return torch.get_num_threads()

    torch.set_num_threads(3)
    assert work(1, fail=False) == 1 and torch.get_num_threads() == 3
    with pytest.raises(RuntimeError, match="boom"):
        work(2, fail=True)
    assert torch.get_num_threads() == 3


def test_info_reports_the_quota_and_the_threads_fastclr_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastclr.info as info

    monkeypatch.setattr(info, "cgroup_cpu_limit", lambda: 1.0)
    monkeypatch.setattr(info, "available_memory", lambda: 3 * 2**29)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli_main(["info", "--json", "--no-measure"]) == 0
    report = json.loads(buf.getvalue())
    cpu = report["cpu"]
    assert cpu["cgroup_cpu_quota"] == 1.0 and cpu["cores_usable"] == 1 and cpu["torch_threads"] == 1
    assert report["memory_available_gib"] == 1.5
    text = info.format_report(report)
    assert "1 usable cores (cgroup CPU quota 1), 1 torch threads" in text and "memory      1.5 GiB available" in text


def _quota_cgroup() -> Path | None:
    """A fresh cgroup v1 cpu cgroup with a quota of one CPU, where this process may create one."""
    mount = Path("/sys/fs/cgroup/cpu")
    if not (mount / "cpu.cfs_quota_us").is_file() or not os.access(mount, os.W_OK):
        return None
    folder = mount / f"fastclr-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
        (folder / "cpu.cfs_quota_us").write_text("100000")
    except OSError:
        return None
    return folder


def test_a_real_quota_caps_the_threads_a_run_uses() -> None:
    """The real kernel files, not a layout written by the test: a process moved into a cgroup with a
    quota of one CPU reads 1.0, and its default thread count drops to 1 on any machine."""
    folder = _quota_cgroup()
    if folder is None:
        pytest.skip("no writable cgroup v1 cpu controller here (needs root)")
    code = ("import torch; from fastclr.cpus import cgroup_cpu_limit, set_threads; "
            "print(cgroup_cpu_limit(), set_threads(0))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                             preexec_fn=lambda: (folder / "cgroup.procs").write_text(str(os.getpid()))).stdout
    finally:
        folder.rmdir()
    assert out.split() == ["1.0", "1"]
