"""Running Python code in a real cgroup v1 child with a limit set, where this machine allows it
(root, a writable hierarchy): the kernel's own files, not a layout a test wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest


def run_in_cgroup(controller: str, limit_file: str, value: str, code: str) -> str:
    """stdout of `python -c code` started inside a new cgroup of /sys/fs/cgroup/CONTROLLER whose
    `limit_file` holds `value`; the cgroup is removed after. Skips the test where none can be made."""
    mount = Path("/sys/fs/cgroup") / controller
    if not (mount / limit_file).is_file() or not os.access(mount, os.W_OK):
        pytest.skip(f"no writable cgroup v1 {controller} controller here (needs root)")
    folder = mount / f"fastclr-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
    except OSError:
        pytest.skip(f"cannot create a {controller} cgroup here")
    try:
        try:
            (folder / limit_file).write_text(value)
        except OSError:
            pytest.skip(f"cannot set {limit_file} here")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                              preexec_fn=lambda: (folder / "cgroup.procs").write_text(str(os.getpid()))).stdout
    finally:
        folder.rmdir()
