"""fastclr.cpu_memory: with freed memory kept, a large block malloc-ed again maps no fresh pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastclr.cpu_memory import keep_freed_memory

# malloc and touch 64 MiB twice (through libc itself, so the test sees the allocator alone); print the
# minor page faults of the second round. A fresh process: mallopt is process-wide and the test
# process's heap state is unknown. Not through torch: torch allocates with posix_memalign, whose
# request is a little larger than the block it freed, so whether a second tensor fits in the first
# one's place depends on what small allocations landed behind it (it did not in about one process in
# four); a training loop's steady state is measured instead by benchmarks/allocator.py (~19k faults
# per step -> ~200).
SCRIPT = """
import ctypes, resource, sys
ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, whatever the host's THP setting
from fastclr.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def touch():
    p = libc.malloc(64 * 2**20)
    ctypes.memset(p, 1, 64 * 2**20)
    libc.free(p)
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
