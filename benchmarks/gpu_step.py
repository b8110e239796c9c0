"""The SimCLR training step on one GPU: ResNet-18 with the CIFAR stem at 32 px, batch 512 pairs.

The step is `fastclr pretrain`'s: gather a batch of uint8 images resident on the GPU (indices drawn there),
draw the augmentation parameters there, render both views, encoder + head on the 2B views,
NT-Xent in fp32, backward, gradient norm, fused AdamW, contrastive metrics kept on the device.
The timed steps run under torch's sync debug mode "error": a step that waited for the host would
fail the benchmark instead of being timed.

Every lever is a variant, each measured in its own process (so a compile cache or allocator
state of one does not help the next), all in one run:

    fp32-eager        fp32, NCHW, eager: the baseline, what a plain PyTorch port gets
    bf16              + bf16 autocast (loss still fp32)
    bf16-cl           + channels_last
    bf16-cl-loss16    the loss in bf16 too (to price "the loss in fp32")
    compile           + torch.compile of encoder, head, loss and backward
    compile-aug       + torch.compile of the augmentation's pixel work (one fused resampling
                        for crop, flip and resize is already the eager design; colour ops fuse)
    cudagraphs        compile-aug with mode="reduce-overhead" (CUDA graphs)
    autotune          compile-aug with mode="max-autotune-no-cudagraphs"
    compile-aug-b1024 compile-aug at batch 1024 pairs
    cudagraphs-b1024  cudagraphs at batch 1024 pairs
    fastclr           the package's own TrainStep and ViewMaker (benchmarks/harness.py real_step), as
                        `fastclr pretrain --data cifar10` runs them on CUDA (--compile auto): model
                        and the views' pixel work compiled, loss and metrics eager; the other
                        variants are this step re-assembled with one lever changed

Images/s counts augmented images through forward and backward (2 per pair). The data are random
uint8 images of CIFAR's shape (50000 x 32 x 32 x 3): the step's cost does not depend on pixel values.

    python benchmarks/gpu_step.py                       # every variant, then the profile
    python benchmarks/gpu_step.py --only fp32-eager compile-aug --no-profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastclr.augment import render_views, view_params
from fastclr.data import Dataset, ImageSet
from fastclr.data.loader import BatchSampler, ImageSource
from fastclr.pretraining.losses import contrastive_metrics, nt_xent_logits, pair_indices
from fastclr.pretraining.optim import build_optimizer
from fastclr.presets import apply_preset, config_for
from fastclr.pretraining.step import SimCLRNet
from fastclr.runtime import resolve_precision
from fastclr.pretraining.model import build_model
from fastclr.pretraining.views import augment_seed

from harness import RealStep, emit, real_step, report, run_child


@dataclass(frozen=True)
class Variant:
    """One combination of levers."""

    precision: str = "bf16"
    channels_last: bool = True
    loss_bf16: bool = False
    compile_mode: str = ""
    """"" eager; else a torch.compile mode for encoder + head + loss + backward."""
    compile_aug: bool = False
    compile_loss: bool = True
    """False: only encoder + head are compiled (their backward with them); loss and metrics eager."""
    batch: int = 512


VARIANTS: dict[str, Variant] = {
    "fp32-eager": Variant(precision="fp32", channels_last=False),
    "bf16": Variant(channels_last=False),
    "bf16-cl": Variant(),
    "bf16-cl-loss16": Variant(loss_bf16=True),
    "compile": Variant(compile_mode="default"),
    "compile-aug": Variant(compile_mode="default", compile_aug=True),
    "cudagraphs": Variant(compile_mode="reduce-overhead", compile_aug=True),
    "autotune": Variant(compile_mode="max-autotune-no-cudagraphs", compile_aug=True),
    "compile-aug-b1024": Variant(compile_mode="default", compile_aug=True, batch=1024),
    "cudagraphs-b1024": Variant(compile_mode="reduce-overhead", compile_aug=True, batch=1024),
    "fastclr": Variant(compile_mode="default", compile_aug=True, compile_loss=False),
}

PHASES = ("augment", "forward", "loss", "backward", "optimizer")


def synthetic_cifar(n: int = 50000, seed: int = 0) -> Dataset:
    """Random uint8 images of CIFAR-10's shape."""
    x = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return Dataset("cifar10-shaped", ImageSet(x, None), None, None, [])


def bf16_loss(z: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent logits computed in bf16 (what fastclr does NOT do), for the loss-precision lever."""
    z1, z2 = z.chunk(2)
    a = F.normalize(torch.cat([z1, z2]), dim=1).bfloat16()
    n = z1.shape[0]
    positive, own = pair_indices(n, n, 0, z.device)
    logits = (a @ a.T).float() / t
    logits = logits.masked_fill(torch.arange(2 * n, device=z.device)[None, :] == own[:, None], torch.finfo(torch.float32).min)
    return logits, positive


class Step:
    """The training step of one variant, split in phases so that they can be timed on the GPU."""

    def __init__(self, v: Variant, dataset: Dataset, device: torch.device):
        cfg = apply_preset({"data.name": "cifar10", "model.encoder": "resnet18", "train.batch_size": v.batch,
                            "train.precision": v.precision, "train.channels_last": v.channels_last})
        torch.manual_seed(0)
        model = build_model(cfg, dataset, device)
        self.cfg, self.v, self.device = cfg, v, device
        self.enc, self.head = model.encoder, model.head
        self.net: torch.nn.Module = SimCLRNet(self.enc, self.head)
        self.mean = model.spec.mean_tensor(device)
        self.std = model.spec.std_tensor(device)
        self.source = ImageSource(dataset.pretrain.images, device)
        self.sampler = BatchSampler(len(self.source), v.batch, 0, device)
        self.opt = build_optimizer(cfg.optim.optimizer, [self.enc, self.head], cfg.optim.lr, cfg.optim.weight_decay)
        self.params = [p for m in (self.enc, self.head) for p in m.parameters()]
        self.gen = torch.Generator(device=device)
        self.amp = resolve_precision(v.precision, device).dtype
        self.render = torch.compile(render_views) if v.compile_aug else render_views
        self.fwd_bwd = self.forward_backward
        if v.compile_mode and v.compile_loss:
            self.fwd_bwd = torch.compile(self.forward_backward, mode=v.compile_mode)
        elif v.compile_mode:
            self.net = torch.compile(self.net, mode=v.compile_mode)
        self.metrics: dict[str, torch.Tensor] = {}

    def views(self, i: int) -> torch.Tensor:
        self.gen.manual_seed(augment_seed(0, i))
        images = self.source.gather(self.sampler.indices(i))
        p = view_params(images.shape, self.cfg.augment, self.gen, self.device)
        return self.render(images, p, self.cfg.augment, self.mean, self.std, self.v.channels_last)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            return self.net(x)

    def loss(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.v.loss_bf16:
            logits, target = bf16_loss(z, self.cfg.train.temperature)
        else:
            logits, target = nt_xent_logits(*z.chunk(2), self.cfg.train.temperature)
        return F.cross_entropy(logits, target), logits, target

    def forward_backward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, logits, target = self.loss(self.embed(x))
        loss.backward()
        return loss.detach(), logits.detach(), target

    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.opt.step()
        # clone: under CUDA graphs `loss` is a static buffer the next replay overwrites
        self.metrics = {"loss": loss.clone(), "grad_norm": norm, **contrastive_metrics(logits, target)}

    def __call__(self, i: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.update(*self.fwd_bwd(self.views(i)))

    def phases(self, i: int, marks: list[torch.cuda.Event]) -> None:
        """The eager step with an event recorded after each phase (no host wait in between)."""
        self.opt.zero_grad(set_to_none=True)
        marks[0].record()
        x = self.views(i)
        marks[1].record()
        z = self.embed(x)
        marks[2].record()
        loss, logits, target = self.loss(z)
        marks[3].record()
        loss.backward()
        marks[4].record()
        self.update(loss.detach(), logits.detach(), target)
        marks[5].record()

    def flops(self) -> float:
        """FLOPs of forward + backward of encoder, head and loss for one batch (FlopCounterMode)."""
        x = self.views(0)
        self.opt.zero_grad(set_to_none=True)
        net, self.net = self.net, SimCLRNet(self.enc, self.head)  # count on the eager modules
        try:
            with FlopCounterMode(display=False) as counter:
                self.forward_backward(x)
        finally:
            self.net = net
        self.opt.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


def matmul_peak_bf16(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 dense matmul rate, TFLOP/s: median of `reps` n^3 products on random data."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def time_steps(step: Callable[[int], None], start: int, steps: int, repeats: int) -> list[float]:
    """Seconds per step, one figure per repeat of `steps` back-to-back steps timed with CUDA events;
    the steps run under sync debug mode "error", so none of them waited for the host."""
    out = []
    i = start
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            s.record()
            for _ in range(steps):
                step(i)
                i += 1
            e.record()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        e.synchronize()
        out.append(s.elapsed_time(e) / 1e3 / steps)
    return out


def run_variant(name: str, a: argparse.Namespace) -> dict[str, object]:
    """Measure one variant in this process."""
    device = torch.device("cuda")
    v = VARIANTS[name]
    step: Step | RealStep
    if name == "fastclr":  # the package's own step, built as `fastclr pretrain --data cifar10` builds it
        cfg = config_for("cifar10", {"model.encoder": "resnet18", "train.batch_size": v.batch})
        flops = real_step(cfg, synthetic_cifar(), device, "auto").flops()  # counted eager: the same FLOPs
        step = real_step(cfg, synthetic_cifar(), device, "auto", compiled=True)
    else:
        step = Step(v, synthetic_cifar(), device)
        flops = step.flops()
    warmup = a.warmup * (3 if v.compile_mode else 1)
    for i in range(warmup):
        step(i)
    torch.cuda.reset_peak_memory_stats()  # the timed steps' peak, not the FLOP count's eager pass or the warm-up's
    times = time_steps(step, warmup, a.steps, a.repeats)
    sec = statistics.median(times)
    loss = step.last.loss if isinstance(step, RealStep) and step.last is not None else step.metrics["loss"]
    finite = bool(torch.isfinite(loss))
    # fastclr's step resolves its precision on the GPU (`auto`): recorded as resolved, not as declared
    resolved = {"precision": step.train_step.precision.name} if isinstance(step, RealStep) else {}
    return {"variant": name, **v.__dict__, **resolved, "step_ms": sec * 1e3, "step_ms_repeats": [round(t * 1e3, 3) for t in times],
            "images_per_s": 2 * v.batch / sec, "pairs_per_s": v.batch / sec, "step_gflop": flops / 1e9,
            "achieved_tflops": flops / sec / 1e12, "loss_finite": finite,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def profile(name: str, a: argparse.Namespace) -> dict[str, object]:
    """Where one eager step's GPU time goes: by phase (CUDA events), and by kernel category
    (torch.profiler). Phases are read from events recorded between phases on the one stream, so
    they are device time per phase, including any gap where the GPU waited for launches."""
    device = torch.device("cuda")
    v = VARIANTS[name]
    step = Step(v, synthetic_cifar(), device)
    for i in range(a.warmup * (3 if v.compile_mode else 1)):
        step(i)
    sums: dict[str, float] = {}
    n = 20
    if not v.compile_mode:  # a compiled step is one graph: no phase boundaries to mark
        sums = dict.fromkeys(PHASES, 0.0)
        steps = [[torch.cuda.Event(enable_timing=True) for _ in range(6)] for _ in range(n)]
        for i, marks in enumerate(steps):  # back to back, no host wait: the GPU's queue stays full
            step.phases(a.warmup + i, marks)
        torch.cuda.synchronize()
        for marks in steps:
            for k, (m0, m1) in zip(PHASES, zip(marks, marks[1:])):
                sums[k] += m0.elapsed_time(m1) / n
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(5):
            step(100 + i)
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        t = float(getattr(ev, "self_device_time_total", 0.0) or getattr(ev, "self_cuda_time_total", 0.0))
        if t > 0:
            kernels[ev.key] = kernels.get(ev.key, 0.0) + t / 5 / 1e3  # ms per step
    cats: dict[str, float] = {}
    for k, t in kernels.items():
        c = kernel_category(k)
        cats[c] = cats.get(c, 0.0) + t
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {"variant": name, "phase_ms": {k: round(x, 3) for k, x in sums.items()},
            "phase_step_ms": round(sum(sums.values()), 3), "kernel_ms_per_step": round(sum(kernels.values()), 3),
            "kernel_ms_by_category": {k: round(x, 3) for k, x in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[k[:90], round(t, 3)] for k, t in top]}


def kernel_category(name: str) -> str:
    """A coarse class of a CUDA kernel from its name."""
    n = name.lower()
    if any(s in n for s in ("conv", "dgrad", "wgrad", "fprop", "implicit_gemm")):
        return "convolution (cuDNN)"
    if any(s in n for s in ("gemm", "cutlass", "matmul", "bmm", "nvjet", "cublas", "xmma")):
        return "matmul (cuBLAS)"
    if "batch_norm" in n or "bn_" in n or "welford" in n:
        return "batchnorm"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    if "reduce" in n or "norm" in n or "sum" in n:
        return "reductions"
    if "triton" in n:
        return "fused (triton)"
    if any(s in n for s in ("copy", "memcpy", "memset", "fill", "cat")):
        return "copies / fills"
    return "elementwise / other"


def main() -> None:
    """Peak, then one JSON line per variant (each its own process), the ratios, then the profile."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--timeout", type=int, default=300, help="seconds allowed to one variant's process")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--profile", nargs="*", default=["bf16-cl", "compile-aug"], choices=list(VARIANTS),
                   help="variants whose step is profiled (phases are timed on the eager ones only)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--profile-one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        emit(run_variant(a.one, a))
        return
    if a.profile_one:
        emit(profile(a.profile_one, a))
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_step.py needs a CUDA GPU")
    peak = matmul_peak_bf16(torch.device("cuda"))
    report("gpu_step", {"what": "bf16 matmul peak, 8192^3, median of 20", "tflops": round(peak, 1)})
    results: dict[str, dict[str, object]] = {}
    jobs = [("--one", n) for n in a.only] + ([] if a.no_profile else [("--profile-one", n) for n in a.profile])
    for flag, name in jobs:
        rec = run_child(__file__, [flag, name, "--steps", str(a.steps), "--repeats", str(a.repeats), "--warmup",
                                   str(a.warmup)], a.timeout, env=dict(os.environ))
        if "error" in rec:
            report("gpu_step", {"variant": name, **rec})
            continue
        if flag == "--one":
            rec["share_of_bf16_peak"] = rec["achieved_tflops"] / peak
            results[name] = rec
        report("gpu_step" if flag == "--one" else "gpu_step_profile", rec)
    if "fp32-eager" in results:
        base = results["fp32-eager"]["images_per_s"]
        report("gpu_step", {"what": "images/s over fp32-eager, same run",
                            **{k: round(r["images_per_s"] / base, 2) for k, r in results.items()}})  # type: ignore[operator]


if __name__ == "__main__":
    main()
