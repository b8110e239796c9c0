"""glibc malloc's defaults against keeping freed memory (fastclr.cpu_memory), on the default CPU step.

Each variant runs in a fresh process (the allocator's state is per process), alternated over
--rounds so that a slow stretch of a shared machine hits both: the default Fashion-MNIST training step
(benchmarks/harness.real_step), --warmup untimed steps, then --steps timed ones.
Per step it reports the median wall time, and from getrusage the user and system CPU seconds and
the minor page faults (pages the kernel had to map and zero-fill), so the mechanism is visible.

    python benchmarks/allocator.py                 # 2 rounds of glibc / keep, 20 steps each
    python benchmarks/allocator.py --rounds 3 --steps 30
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from harness import report, run_child

VARIANTS = ("glibc", "keep")


def child(variant: str, warmup: int, steps: int) -> None:
    """Run the step under `variant` and print one JSON line of per-step figures."""
    import torch

    from fastclr.cpu_memory import keep_freed_memory
    from fastclr.data import load_data
    from fastclr.presets import apply_preset
    from fastclr.runtime import select_device

    from harness import real_step

    applied = keep_freed_memory() if variant == "keep" else False
    cfg = apply_preset({"data.name": "fashion-mnist"})
    device = select_device("cpu")
    step = real_step(cfg, load_data(cfg.data), device, cfg.train.precision)
    for i in range(warmup):
        step(i)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    secs = []
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        step(i)
        secs.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"variant": variant, "applied": applied, "threads": torch.get_num_threads(),
                      "batch": cfg.train.batch_size, "ms_per_step": round(1000 * statistics.median(secs), 1),
                      "user_ms_per_step": round(1000 * (r1.ru_utime - r0.ru_utime) / steps, 1),
                      "sys_ms_per_step": round(1000 * (r1.ru_stime - r0.ru_stime) / steps, 1),
                      "minor_faults_per_step": round((r1.ru_minflt - r0.ru_minflt) / steps),
                      "max_rss_mib": round(r1.ru_maxrss / 1024)}))


def main() -> None:
    """Alternate the variants in child processes; one JSON line each, then the ratio of medians."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.warmup, a.steps)
        return
    ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        for v in VARIANTS:
            rec = run_child(__file__, ["--child", v, "--steps", str(a.steps), "--warmup", str(a.warmup)])
            ms[v].append(rec["ms_per_step"])
            report("allocator", {"round": r, **rec})
    g, k = statistics.median(ms["glibc"]), statistics.median(ms["keep"])
    report("allocator_summary", {"glibc_ms": g, "keep_ms": k, "glibc_over_keep": round(g / k, 3)})


if __name__ == "__main__":
    main()
