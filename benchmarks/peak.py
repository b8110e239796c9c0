"""Peak memory of one piece of work, measured where nothing else has touched memory yet.

On CPU the measure is the process's peak resident set (ru_maxrss) above a baseline taken after
imports and inputs, in a fresh subprocess per configuration: ru_maxrss never goes down, so two
configurations in one process would hide each other. On CUDA it is
torch.cuda.max_memory_allocated above the memory allocated before the work.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def prepare(threads: int, device: str) -> torch.device:
    """Apply the thread count (0: PyTorch's choice) and resolve the device (auto: CUDA if present)."""
    from fastclr.runtime import select_device

    if threads:
        torch.set_num_threads(threads)
    return select_device(device)


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(work: Callable[[], object], device: torch.device, repeats: int) -> dict[str, float]:
    """Run `work` `repeats` times; the peak memory it added (bytes) and the median seconds per run.

    On CUDA one unmeasured run first takes the one-off allocations (cuBLAS workspace, caching
    allocator pools). On CPU there is none: ru_maxrss never decreases, so the baseline must precede
    every run; the first run's extra time is left out by taking the median (use repeats >= 3)."""
    if device.type == "cuda":
        work()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = max_rss_bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss_bytes()
    return {"peak_bytes": peak - base, "peak_gib": round((peak - base) / 2**30, 4),
            "seconds": sorted(times)[len(times) // 2]}


def run_child(script: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run `python script args` and return the JSON object on its last stdout line, or the reason
    it gave none (killed for memory, timed out)."""
    try:
        r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        why = "killed (out of memory?)" if r.returncode in (-9, 137) else f"exit {r.returncode}"
        return {"error": why, "stderr": r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else []}
    return json.loads(lines[-1])


def emit(result: dict[str, Any]) -> None:
    """A child's answer to `run_child`: one JSON line."""
    print(json.dumps(result), flush=True)
