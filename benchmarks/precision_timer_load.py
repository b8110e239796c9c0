"""The matmul timing behind precision `auto` (where CPU flags cannot settle it) and the explicit
bf16 warning, on a quiet CPU and on one shared with another busy process: on all threads (the
timing before 2026-12-05) against one thread (`fastclr.runtime.precision_timer`).

The load is a second process multiplying fp32 matrices on as many threads as this one uses, as
a user's other work would (another `fastclr evaluate` took the two-thread fp32 timing from 1.3 to
12-16 ms on the EPYC Zen 4; a one-thread load left it at 1.3 ms). Each state alternates the two timings `--rounds` times; each line gives the fp32 and
bf16 best times, their ratio and the choice `auto` would make from them (bf16 only if 10% faster).

    env ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/precision_timer_load.py
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import torch

from fastclr.runtime import matmul_seconds

from harness import report


def _busy(stop: float, threads: int) -> None:
    torch.set_num_threads(threads)
    a = torch.randn(512, 512)
    while time.time() < stop:
        a @ a


def main() -> None:
    """One JSON line per state (quiet, loaded), round and timing (all threads, one thread)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--load-threads", type=int, default=0, help="threads of the load (0: as many as this process uses)")
    a = p.parse_args()
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    load_threads = a.load_threads or threads
    for state in ("quiet", "loaded", "quiet"):
        load = None
        if state == "loaded":
            load = multiprocessing.get_context("spawn").Process(target=_busy, args=(time.time() + 600, load_threads), daemon=True)
            load.start()
            time.sleep(3.0)  # the load's interpreter and torch are up
        for r in range(a.rounds):
            for timing, n in (("all threads", threads), ("one thread", 1)):
                fp32 = matmul_seconds(torch.float32, cpu, threads=n)
                bf16 = matmul_seconds(torch.bfloat16, cpu, threads=n)
                report("precision_timer_load", {"state": state, "load_threads": load_threads, "round": r, "timing": timing, "threads": n,
                                                "fp32_ms": round(fp32 * 1e3, 2), "bf16_ms": round(bf16 * 1e3, 2),
                                                "bf16_over_fp32": round(bf16 / fp32, 2),
                                                "auto": "bf16" if bf16 < 0.9 * fp32 else "fp32"})
        if load is not None:
            load.terminate()
            load.join()


if __name__ == "__main__":
    main()
