"""Keep freed memory in the process on Linux/glibc, so a CPU training step stops paying page faults.

glibc serves every allocation above its mmap threshold (128 KiB, raised dynamically up to 32 MiB)
with a fresh mmap and returns it with munmap on free. A training step allocates and frees the
same large activation and gradient buffers every step (the default Fashion-MNIST step: maps of
512 x 2 x 14 x 14 x 256 bf16 = 51 MiB), so each step the kernel zero-fills those pages again:
system time that no profiler of PyTorch operators shows. Turning mmap off for malloc and raising
the trim threshold lets the heap keep and reuse them. Measured effect: benchmarks/allocator.py,
docs/benchmarks.md section 3.

The cost is that freed memory is not given back to the OS while the process runs (peak resident
memory stays resident: ~80 MiB more on the default step), which is what a training process
wants. It is process-wide, so `pretrain` applies it only under `train.keep_memory` (default true;
a caller embedding `pretrain` in a longer-lived process can turn it off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no mmap per allocation, no heap trimming).

    Returns True if applied; False where there is no glibc (macOS, Windows, musl), which is
    harmless: those allocators have their own caching."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
