"""fastclr.cpu_memory: with freed memory kept, re-allocating a large tensor maps no fresh pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastclr.cpu_memory import keep_freed_memory

# Allocate and touch 64 MiB twice; print the minor page faults of the second round. Run in a fresh
# process because mallopt is process-wide and the test process's heap state is unknown.
SCRIPT = """
import resource, sys, torch
from fastclr.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def touch():
    t = torch.empty(16 * 2**20, dtype=torch.float32)
    t.fill_(1.0)
    del t
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

PAGES_64MIB = 64 * 2**20 // 4096


def second_round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_kept_memory_is_reused_without_page_faults() -> None:
    # glibc's default: the 64 MiB block is mmapped and unmapped, so every page faults again.
    assert second_round_faults("default") >= 0.9 * PAGES_64MIB
    # Kept: the second allocation reuses the freed heap block, already mapped.
    assert second_round_faults("keep") < 0.02 * PAGES_64MIB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_reports_it_applied_on_glibc() -> None:
    assert keep_freed_memory() is True
