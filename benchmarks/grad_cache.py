"""Gradient caching: peak memory and time of one training step (forward, backward, SGD update)
at a global batch of 4096 in chunks, against plain steps at growing batches. The claim under
test: with GradCache the step's memory is that of one chunk (plus z and the views), whatever the
batch; a plain step's grows with the batch until it no longer fits.

Each configuration runs in a fresh subprocess (harness.run_child). Plain batches are tried in
increasing order and stop after the first that exceeds --budget-gib; the last line names the
largest plain batch within the budget.

    python benchmarks/grad_cache.py                                   # cnn, 28 px, on CPU
    python benchmarks/grad_cache.py --budget-gib 2 --chunks 128 256 512
    python benchmarks/grad_cache.py --encoder resnet18 --size 32 --channels 3 --device cuda --precision bf16
    python benchmarks/grad_cache.py --plain 64 128 --batch 256 --chunks 32 --width 0.25 --repeats 1   # quick check
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from harness import report
from fastclr.cpus import set_threads
from fastclr.runtime import select_device
from harness import emit, measure, run_child

SCRIPT = str(Path(__file__).resolve())


def child(batch: int, chunk: int, a: argparse.Namespace, device: torch.device) -> None:
    """Measure one configuration in this (fresh) process and print its JSON line."""
    from fastclr.scaleout.distributed import DistContext
    from fastclr.models import ProjectionHead, build_encoder, feature_dim
    from fastclr.pretraining.optim import build_optimizer
    from fastclr.pretraining.step import SimCLRNet, backward_step
    from fastclr.runtime import resolve_precision

    torch.manual_seed(0)
    enc = build_encoder(a.encoder, a.channels, a.size, a.width).to(device)
    dim = feature_dim(enc, a.channels, a.size)
    net = SimCLRNet(enc, ProjectionHead(dim, dim, 128).to(device))
    opt = build_optimizer("sgd", [net], 0.1, 1e-6)
    amp = resolve_precision(a.precision, device).dtype
    views = torch.randn(2 * batch, a.channels, a.size, a.size, device=device)  # augmented once, outside the step

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        backward_step(net, views, 0.2, amp, a.loss_block, DistContext(), chunk)
        opt.step()

    emit(measure(step, device, a.repeats))


def main() -> None:
    """Plain batches up to the budget, then the big batch by chunks; one JSON line each."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="cnn")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--precision", default="fp32", help="bf16, fp16 (CUDA) or fp32")
    p.add_argument("--batch", type=int, default=4096, help="the global batch trained by chunks")
    p.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512], help="GradCache chunk sizes (images)")
    p.add_argument("--plain", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="plain batches tried")
    p.add_argument("--budget-gib", type=float, default=4.0, help="the memory a step may use")
    p.add_argument("--loss-block", type=int, default=1024, help="row-block NT-Xent for both (0: plain loss)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    p.add_argument("--child", nargs=2, type=int, metavar=("BATCH", "CHUNK"), help=argparse.SUPPRESS)
    a = p.parse_args()
    set_threads(a.threads)
    device = select_device(a.device)
    if a.child:
        child(a.child[0], a.child[1], a, device)
        return
    common = ["--encoder", a.encoder, "--size", str(a.size), "--channels", str(a.channels), "--width", str(a.width),
              "--precision", a.precision, "--loss-block", str(a.loss_block), "--device", str(device),
              "--threads", str(a.threads), "--repeats", str(a.repeats)]
    setup = {"encoder": a.encoder, "size": a.size, "channels": a.channels, "width": a.width, "precision": a.precision,
             "loss_block": a.loss_block, "device": str(device), "threads": torch.get_num_threads(),
             "budget_gib": a.budget_gib}
    largest = 0
    for b in sorted(a.plain):
        res: dict[str, Any] = run_child(SCRIPT, ["--child", str(b), "0", *common], a.timeout)
        fits = "peak_gib" in res and res["peak_gib"] <= a.budget_gib
        largest = b if fits else largest
        report("grad_cache", {"mode": "plain", "batch": b, "chunk": 0, **setup, **res, "fits": fits,
                              **_rate(res, b)})
        if not fits:
            break
    for c in a.chunks:
        res = run_child(SCRIPT, ["--child", str(a.batch), str(c), *common], a.timeout)
        fits = "peak_gib" in res and res["peak_gib"] <= a.budget_gib
        report("grad_cache", {"mode": "grad_cache", "batch": a.batch, "chunk": c, **setup, **res, "fits": fits,
                              **_rate(res, a.batch)})
    report("grad_cache", {"summary": f"largest plain batch within {a.budget_gib:g} GiB: {largest or 'none tried fits'}",
                          "largest_plain_batch": largest, **setup})


def _rate(res: dict[str, Any], batch: int) -> dict[str, float]:
    return {"images_per_s": round(2 * batch / res["seconds"], 1)} if "seconds" in res else {}


if __name__ == "__main__":
    main()
