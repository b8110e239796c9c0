"""Where the time of the training step goes: by phase and by operator, profiling the package's
own step (benchmarks/harness.real_step), whose phases are marked with torch.profiler ranges
(fastclr.views, .forward, .loss, .backward, .optimizer).

    python benchmarks/profile_step.py                  # the default Fashion-MNIST step
    python benchmarks/profile_step.py --precision fp32 --steps 10
    python benchmarks/profile_step.py --keep-memory     # with pretrain's allocator setting
    python benchmarks/profile_step.py --shapes          # operators split by their input shapes
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from fastclr.data import load_data
from fastclr.presets import apply_preset
from fastclr.runtime import select_device

from harness import add_keep_memory, at_least, keep_memory_if, real_step, report

PHASES = ("fastclr.views", "fastclr.forward", "fastclr.loss", "fastclr.backward", "fastclr.optimizer")


def main() -> None:
    """One JSON line with milliseconds per phase per step, one with the top operators."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=at_least(1), default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--shapes", action="store_true", help="split each operator by its input shapes")
    add_keep_memory(p, "; without it every step pays the kernel's page faults on its large buffers, "
                       "which `pretrain` does not")
    a = p.parse_args()
    keep_memory_if(a.keep_memory)
    cfg = apply_preset({"data.name": a.data, "train.device": a.device})
    device = select_device(cfg.train.device)
    step = real_step(cfg, load_data(cfg.data), device, a.precision)
    for i in range(a.warmup):
        step(i)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=a.shapes) as prof:
        for i in range(a.warmup, a.warmup + a.steps):
            step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    events = prof.key_averages(group_by_input_shape=a.shapes)
    on_device = device.type == "cuda"

    def ms(e: object) -> float:  # per step; device time on CUDA, wall time of the range on CPU
        total = getattr(e, "device_time_total" if on_device else "cpu_time_total")
        return round(total / 1000 / a.steps, 2)

    phases = {e.key.removeprefix("fastclr."): ms(e) for e in events if e.key in PHASES}
    total = sum(phases.values())
    report("profile_step", {"data": a.data, "precision": step.train_step.precision.name, "device": str(device),
                            "batch": cfg.train.batch_size, "threads": torch.get_num_threads(), "ms": phases,
                            "total_ms": round(total, 1), "share": {k: round(v / total, 3) for k, v in phases.items()}})
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    ops = sorted((e for e in events if not e.key.startswith("fastclr.")), key=lambda e: getattr(e, key), reverse=True)
    rows = [{"op": e.key, "self_ms_per_step": round(getattr(e, key) / 1000 / a.steps, 2),
             "calls_per_step": e.count // a.steps, **({"shapes": e.input_shapes} if a.shapes else {})}
            for e in ops[:a.top]]
    report("profile_step_ops", {"sort": key, "top": rows})


if __name__ == "__main__":
    main()
