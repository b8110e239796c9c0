"""What each max-pool's backward costs inside the real training step, timed without the profiler.

`profile_step.py --shapes` under the AVX2 cap (fp32) charges most of the step's zero fills to one
call: the gradient of the max-pool after the 7 x 7 conv (docs/benchmarks.md section 4). This times every max-pool's backward in the package's own step
(benchmarks/harness.real_step) between two tensor hooks, one on the pool's output gradient and one
on its input gradient, with no profiler attached; then the same zeroing alone on a buffer evicted
from the caches; and the page faults a step takes, which a fresh mmap per buffer would show.

    python benchmarks/pool_backward.py --keep-memory
    $CAP python benchmarks/pool_backward.py --keep-memory      # fp32 on the AVX2 class
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from fastclr.data import load_data
from fastclr.presets import apply_preset

from harness import add_keep_memory, keep_memory_if, real_step, report, timed


def time_pool_backwards(module: torch.nn.Module) -> dict[str, list[float]]:
    """Attach hooks to every nn.MaxPool2d in `module`; the returned dict fills with the seconds
    each pool's backward took, one entry per step, as the steps run."""
    seconds: dict[str, list[float]] = {}

    def attach(name: str, pool: torch.nn.Module) -> None:
        def forward_hook(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            started: list[float] = []
            out.register_hook(lambda g: started.append(time.perf_counter()))
            inputs[0].register_hook(lambda g: seconds.setdefault(name, []).append(time.perf_counter() - started[0]))

        pool.register_forward_hook(forward_hook)

    for name, m in module.named_modules():
        if isinstance(m, torch.nn.MaxPool2d):
            attach(name, m)
    return seconds


def cold_zero_seconds(shape: tuple[int, ...], dtype: torch.dtype, repeats: int = 11) -> float:
    """Median seconds of zero_() on a channels_last buffer of `shape` after 256 MB of other
    writes, so that the buffer is not in any cache, as in the step."""
    x = torch.empty(shape, dtype=dtype).to(memory_format=torch.channels_last)
    evict = torch.empty(64 * 2**20)
    times = []
    for _ in range(repeats):
        evict.add_(1.0)
        start = time.perf_counter()
        x.zero_()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """One JSON line: each pool's backward (median ms), the step, faults a step, cold zeroing."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    add_keep_memory(p)
    a = p.parse_args()
    keep_memory_if(a.keep_memory)
    cfg = apply_preset({"data.name": "fashion-mnist", "train.device": "cpu"})
    step = real_step(cfg, load_data(cfg.data), torch.device("cpu"), a.precision)
    seconds = time_pool_backwards(step.train_step.net)
    for i in range(a.warmup):
        step(i)
    before = resource.getrusage(resource.RUSAGE_SELF)  # page faults of the timed steps only
    elapsed = sum(timed(lambda i: step(a.warmup + i), 0, a.steps, torch.device("cpu")))
    after = resource.getrusage(resource.RUSAGE_SELF)
    pools = {name: round(statistics.median(s[a.warmup:]) * 1e3, 2) for name, s in seconds.items()}
    dtype = torch.bfloat16 if step.train_step.precision.name == "bf16" else torch.float32
    report("pool_backward", {
        "precision": step.train_step.precision.name, "steps": a.steps, "keep_memory": a.keep_memory,
        "pool_backward_ms": pools, "step_ms": round(elapsed / a.steps * 1e3, 1),
        "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / a.steps,
        "system_ms_per_step": round((after.ru_stime - before.ru_stime) / a.steps * 1e3, 2),
        "cold_zero_ms": {str(s): round(cold_zero_seconds(s, dtype) * 1e3, 2)
                         for s in ((512, 256, 7, 7), (512, 32, 14, 14))}})


if __name__ == "__main__":
    main()
