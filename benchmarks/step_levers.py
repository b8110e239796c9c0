"""The engineering levers of the CPU training step, each switched off alone, side by side in one run.

Every variant is the default Fashion-MNIST step (the package's own, benchmarks/harness.real_step:
two views on the device, encoder + head, fp32 NT-Xent, backward, optimiser) with one thing changed:

    base          bf16 autocast, channels_last, space-to-depth stem, HWC flatten, fused AdamW
    fp32          no autocast
    nchw          channels_last off
    no-s2d        a 3x3 conv on the 28 x 28 input instead of the 2x2 space-to-depth stem
    chw-flatten   the usual (C, H, W) flatten of the channels_last map (nn.Flatten)
    foreach-adamw AdamW's foreach kernels instead of the fused one
    pooled-3x3    another network, not a lever of the default: `32|64|128`, convs down to a 3 x 3 map
                  and average pooling (instead of the learned linear pooling)
    pool-relu-ref the 32|256|fc512 encoder (the default of 2026-12-03, BatchNorm before the pools)
    pool-relu     that encoder with each ReLU that a max-pool follows moved after the pool (max and ReLU
                  commute, so h and every gradient are the same, checked before timing); the ReLUs then
                  see 4x (14 x 14 -> 7 x 7) and 5.4x (7 x 7 -> 3 x 3) fewer values. Timed against
                  pool-relu-ref (REFERENCE), not base: the default pools before BatchNorm and ReLU both.
    untrimmed     each convolution that a 2x2 max-pool follows directly computes its whole map, the last
                  row and column of the 7 x 7 map too, which that pool never reads (models.cnn.FloorPooledConv)
    compile       torch.compile of encoder + head and of the views' rendering (the loss stays eager)
    1-thread      torch.set_num_threads(1)
    blur          Gaussian blur on (p 0.5, sigma 0.1-2, the paper's ImageNet setting; off in the preset)
    batch-N       N pairs per step (128, 256, 512; the default is 256): a recipe
                  lever, compare pairs/s, not ms/step

    python benchmarks/step_levers.py                   # all variants, 20 timed steps each
    python benchmarks/step_levers.py --only base compile --steps 10
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

from fastclr.data import load_data
from fastclr.models import CNN_STAGES
from fastclr.models.cnn import FlattenHWC, SmallCNN, trim_pooled
from fastclr.presets import apply_preset
from fastclr.runtime import select_device

from harness import add_keep_memory, keep_memory_if, real_step, report, timed

VARIANTS = ("base", "fp32", "nchw", "no-s2d", "chw-flatten", "foreach-adamw", "pooled-3x3", "pool-relu-ref", "pool-relu",
            "untrimmed", "compile", "1-thread", "blur", "batch-128", "batch-256", "batch-512")
REFERENCE = {"pool-relu": "pool-relu-ref"}
"""Levers of another encoder than the default, timed against that encoder unchanged (`32|256|fc512`,
the default of 2026-12-03, is no longer `base`): run the reference first in the same --only."""


def encoder_for(variant: str) -> nn.Module | None:
    """The encoder of a variant, or None for the default one."""
    if variant == "no-s2d":
        return SmallCNN(1, stages=CNN_STAGES, space_to_depth=False)
    if variant == "pooled-3x3":
        return SmallCNN(1, stages="32|64|128")
    if variant == "chw-flatten":
        enc = SmallCNN(1)
        for name, m in enc.pool.named_children():
            if isinstance(m, FlattenHWC):
                enc.pool._modules[name] = nn.Flatten(1)
        return enc
    if variant == "pool-relu":
        return pool_then_relu(SmallCNN(1, stages="32|256|fc512"))  # the default's order before it pooled first
    if variant == "pool-relu-ref":
        return SmallCNN(1, stages="32|256|fc512")
    if variant == "untrimmed":
        return trim_pooled(SmallCNN(1), on=False)
    return None


def pool_then_relu(enc: SmallCNN) -> SmallCNN:
    """The 32|256|fc512 encoder with its two ReLUs that precede a max-pool moved after it, checked equal
    (h and every parameter's gradient, fp32) to the encoder it was made from."""
    reference = copy.deepcopy(enc)
    f = enc.features  # 0 space-to-depth, 1 conv, 2 BN, 3 ReLU, 4 max-pool, 5 conv, 6 BN, 7 ReLU
    if not (isinstance(f[3], nn.ReLU) and isinstance(f[4], nn.MaxPool2d) and isinstance(f[7], nn.ReLU)):
        raise SystemExit("pool-relu expects the 32|256|fc512 encoder")
    f[3], f[4], f[7] = f[4], f[3], nn.Identity()
    readout_pool = enc.pool[0]
    readout_pool.pool = nn.Sequential(readout_pool.pool, nn.ReLU(inplace=True))
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    h_ref, h = reference(x), enc(x)
    for out in (h_ref, h):
        out.square().sum().backward()
    same_h = torch.equal(h_ref, h)
    same_grads = all(torch.equal(p.grad, q.grad) for p, q in zip(reference.parameters(), enc.parameters()))
    if not (same_h and same_grads):
        raise SystemExit("pool-relu changed the function: not timed")
    enc.zero_grad(set_to_none=True)
    return enc


def main() -> None:
    """One JSON line per variant (ms/step, pairs/s, ratio to base measured in this run)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--only", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    add_keep_memory(p)
    a = p.parse_args()
    keep_memory_if(a.keep_memory)
    threads = torch.get_num_threads()
    times: dict[str, float] = {}
    for variant in a.only:
        overrides = {"data.name": "fashion-mnist", "train.channels_last": variant != "nchw"}
        if variant == "blur":
            overrides["augment.blur_p"] = 0.5
        if variant.startswith("batch-"):
            overrides["train.batch_size"] = int(variant.removeprefix("batch-"))
        cfg = apply_preset(overrides)
        device = select_device("cpu")
        dataset = load_data(cfg.data)
        torch.set_num_threads(1 if variant == "1-thread" else threads)
        step = real_step(cfg, dataset, device, "fp32" if variant == "fp32" else cfg.train.precision,
                         encoder=encoder_for(variant), fused=variant != "foreach-adamw", compiled=variant == "compile")
        secs = timed(step, a.warmup + (5 if variant == "compile" else 0), a.steps, device)
        ms = times[variant] = 1000 * statistics.median(secs)
        against = REFERENCE.get(variant, "base")
        report("step_levers", {"variant": variant, "keep_memory": a.keep_memory, "threads": torch.get_num_threads(), "batch": cfg.train.batch_size,
                               "ms_per_step": round(ms, 1), "pairs_per_s": round(cfg.train.batch_size / ms * 1000),
                               "against": against,
                               "time_vs_base": round(ms / times[against], 2) if against in times else None})
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
