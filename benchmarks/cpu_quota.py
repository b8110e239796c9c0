"""The training step under a cgroup CPU quota: PyTorch's own thread count against fastclr's.

PyTorch sizes its thread pool from the affinity mask; a container limited by a CPU quota
(`docker run --cpus Q`, a Kubernetes CPU limit) keeps the host's cores in its mask, so PyTorch runs
more threads than the quota's CPUs and the kernel throttles them together. fastclr caps its default
at the quota rounded up (fastclr.cpus). Each variant runs in a fresh process started inside a
cgroup with the quota, variants interleaved within each round; needs root and a cgroup v1 cpu
controller or a cgroup v2 hierarchy with the cpu controller enabled.

    python benchmarks/cpu_quota.py --quota 1 --variants torch,fastclr,4 --rounds 3
    # variants: torch (PyTorch's own count), fastclr (`set_threads(0)`), N (N threads, as PyTorch
    # would pick on an N-core host)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

from fastclr.cpu_memory import keep_freed_memory
from fastclr.cpus import cgroup_cpu_limit, set_threads
from fastclr.data import load_data
from fastclr.presets import apply_preset

from harness import describe, emit, real_step, record, run_child, timed

V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")


def make_cgroup(quota: float) -> Path:
    """A new cgroup allowing `quota` CPUs' worth of time per 100 ms period."""
    name = f"fastclr-bench-{uuid.uuid4().hex[:8]}"
    us = int(quota * 100_000)
    v1 = (V1 / "cpu.cfs_quota_us").is_file()
    folder = (V1 if v1 else V2) / name
    folder.mkdir()
    try:  # the kernel refuses a quota under 1 ms, and v2 without the cpu controller enabled
        if v1:
            (folder / "cpu.cfs_quota_us").write_text(str(us))
        else:
            (folder / "cpu.max").write_text(f"{us} 100000")
    except OSError:
        folder.rmdir()
        raise
    return folder


def child(variant: str, steps: int, warmup: int) -> dict[str, Any]:
    """Seconds per step of the default config's step at `variant`'s thread count, here."""
    keep_freed_memory()  # as pretrain runs by default (train.keep_memory)
    if variant == "fastclr":
        set_threads(0)
    elif variant != "torch":
        torch.set_num_threads(int(variant))
    cfg = apply_preset({})
    step = real_step(cfg, load_data(cfg.data), torch.device("cpu"), "auto")
    times = timed(step, warmup, steps, torch.device("cpu"))
    return {"variant": variant, "threads": torch.get_num_threads(), "quota_seen": cgroup_cpu_limit(),
            "step_ms": statistics.median(times) * 1e3, "pairs_per_s": cfg.train.batch_size / statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quota", type=float, default=1.0, help="CPUs' worth of time the cgroup allows")
    p.add_argument("--variants", default="torch,fastclr")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="cpu-quota.jsonl")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        emit(child(a.child, a.steps, a.warmup))
        return
    folder = make_cgroup(a.quota)
    try:
        results: dict[str, list[float]] = {}
        for r in range(a.rounds):
            for v in a.variants.split(","):
                rec = run_child(__file__, ["--child", v, "--steps", str(a.steps), "--warmup", str(a.warmup)],
                                cgroup=folder)
                record(a.out, {"benchmark": "cpu_quota", "round": r, "quota": a.quota, **rec})
                if "pairs_per_s" in rec:
                    results.setdefault(v, []).append(rec["pairs_per_s"])
    finally:
        os.rmdir(folder)
    record(a.out, {"benchmark": "cpu_quota", "command": " ".join([sys.executable, *sys.argv]), "machine": describe(),
                   "quota": a.quota, "median_pairs_per_s": {v: statistics.median(x) for v, x in results.items()},
                   "rounds": results})


if __name__ == "__main__":
    main()
