"""A container's memory limit, read from the cgroup files: the room it leaves is what fastclr's
memory checks compare against (MemAvailable there is the host's), so a run that would be killed
for memory stops first with one line."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import fastclr.runtime as runtime
from fastclr.cgroups import MEMORY, smallest_limit

GIB = 2**30


def _v2(root: Path, path: str, folders: dict[str, tuple[str, int, int]]) -> Path:
    """cgroup v2 folders: name -> (memory.max, memory.current, inactive_file in memory.stat)."""
    for name, (limit, current, inactive) in folders.items():
        f = root / name
        f.mkdir(parents=True, exist_ok=True)
        (f / "memory.max").write_text(f"{limit}\n")
        (f / "memory.current").write_text(f"{current}\n")
        (f / "memory.stat").write_text(f"anon {current - inactive}\nactive_file 0\ninactive_file {inactive}\n")
    (root / "self").write_text(f"0::{path}\n")
    return root / "self"


def test_v2_room_is_the_limit_less_what_cannot_be_dropped(tmp_path: Path) -> None:
    """4 GiB limit, 3 GiB charged of which 1 GiB is inactive page cache: 2 GiB of room."""
    me = _v2(tmp_path, "/pod/app", {"pod/app": (str(4 * GIB), 3 * GIB, GIB), "pod": ("max", 3 * GIB, GIB)})
    assert smallest_limit(MEMORY, tmp_path, me) == 2 * GIB


def test_v2_the_tightest_ancestor_applies_and_none_is_no_limit(tmp_path: Path) -> None:
    me = _v2(tmp_path, "/pod/app", {"pod/app": ("max", GIB, 0), "pod": (str(3 * GIB), 2 * GIB, 0)})
    assert smallest_limit(MEMORY, tmp_path, me) == GIB  # the pod's 3 GiB, 2 GiB used by all its members
    me = _v2(tmp_path, "/pod/app", {"pod/app": ("max", GIB, 0), "pod": ("max", 2 * GIB, 0)})
    assert smallest_limit(MEMORY, tmp_path, me) is None


def test_v1_room_and_the_unlimited_value(tmp_path: Path) -> None:
    f = tmp_path / "memory" / "docker" / "abc"
    f.mkdir(parents=True)
    (f / "memory.limit_in_bytes").write_text(f"{2 * GIB}\n")
    (f / "memory.usage_in_bytes").write_text(f"{GIB}\n")
    (f / "memory.stat").write_text(f"cache {GIB // 2}\ntotal_inactive_file {GIB // 4}\n")
    me = tmp_path / "self"
    me.write_text("6:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert smallest_limit(MEMORY, tmp_path, me) == 2 * GIB - (GIB - GIB // 4)
    (f / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # what v1 shows for "no limit"
    assert smallest_limit(MEMORY, tmp_path, me) is None


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
    mount = Path("/sys/fs/cgroup/memory")
    if not (mount / "memory.limit_in_bytes").is_file() or not os.access(mount, os.W_OK):
        pytest.skip("no writable cgroup v1 memory controller here (needs root)")
    folder = mount / f"fastclr-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(2 * GIB))
    except OSError:
        pytest.skip("cannot create a memory cgroup here")
    code = ("from fastclr.errors import FastclrError; from fastclr.runtime import available_memory, require_memory\n"
            "print(available_memory())\n"
            "try:\n    require_memory(3 * 2**30, 'the features', 'use fewer images')\n"
            "except FastclrError as e:\n    print(e)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                             preexec_fn=lambda: (folder / "cgroup.procs").write_text(str(os.getpid()))).stdout
    finally:
        folder.rmdir()
    room, message = out.splitlines()
    assert 0 < int(room) <= 2 * GIB
    assert message.startswith("the features needs about 3.0 GiB but ") and message.endswith("; use fewer images")
