"""Where the time of one training step goes: phases of the default step, then the top operators.

Phases are timed back to back with a device synchronisation at each boundary (on CPU the ops are
synchronous anyway): gather + two views, forward of encoder and head (autocast), NT-Xent (fp32),
backward, gradient norm + optimiser step. Then torch.profiler's operator table for the same step
by self time, so the next bottleneck has a name.

    python benchmarks/profile_step.py                   # default fashion-mnist step, bf16
    python benchmarks/profile_step.py --precision fp32 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastclr.data import load_data
from fastclr.losses import nt_xent_logits
from fastclr.presets import apply_preset
from fastclr.runtime import resolve_precision, select_device

from machine import report
from throughput import step_parts

PHASES = ("augment", "forward", "loss", "backward", "optimizer")


def main() -> None:
    """One JSON line with the median milliseconds per phase, one with the top operators."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    cfg = apply_preset({"data.name": a.data, "train.precision": a.precision, "train.device": a.device})
    device = select_device(cfg.train.device)
    dataset = load_data(cfg.data)
    parts = step_parts(cfg, dataset, device)
    enc, head, opt, params = parts.encoder, parts.head, parts.optimizer, parts.params
    amp = resolve_precision(cfg.train.precision, device).dtype

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(i: int, times: dict[str, list[float]] | None) -> None:
        marks = [time.perf_counter()]

        def mark() -> None:
            sync()
            marks.append(time.perf_counter())

        v = parts.views(i)
        mark()
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            z = head(enc(v))
        mark()
        logits, target = nt_xent_logits(*z.float().chunk(2), cfg.train.temperature)
        loss = torch.nn.functional.cross_entropy(logits, target)
        mark()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None])
        opt.step()
        mark()
        if times is not None:
            for name, t0, t1 in zip(PHASES, marks, marks[1:]):
                times[name].append(t1 - t0)

    for i in range(5):
        step(i, None)
    times: dict[str, list[float]] = {k: [] for k in PHASES}
    for i in range(a.steps):
        step(5 + i, times)
    ms = {k: round(1000 * statistics.median(v), 1) for k, v in times.items()}
    total = sum(ms.values())
    report("profile_step", {"data": a.data, "precision": a.precision, "device": str(device),
                            "batch": cfg.train.batch_size, "threads": torch.get_num_threads(), "ms": ms,
                            "total_ms": round(total, 1), "share": {k: round(v / total, 3) for k, v in ms.items()}})
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(3):
            step(100 + i, None)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key.replace("_total", "") + "_total", 0), reverse=True)
    rows = [{"op": e.key, "self_ms_per_step": round(getattr(e, key) / 1000 / 3, 2), "calls_per_step": e.count // 3}
            for e in events[:a.top]]
    report("profile_step_ops", {"sort": key, "top": rows})


if __name__ == "__main__":
    main()
