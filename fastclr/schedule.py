"""Learning-rate schedule and batch-size scaling, as pure functions."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """The peak learning rate for a global batch size.

    linear: base_lr * B / 256 (Goyal et al. 2017; SimCLR uses 0.3 * B / 256 with LARS);
    sqrt: base_lr * sqrt(B) (SimCLR appendix B.1: 0.075 * sqrt(B), better for small B / long runs);
    none: base_lr.
    """
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr_scaling {rule!r}; choose linear, sqrt or none")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_ratio: float = 0.0) -> float:
    """Linear warmup from ~0 to `peak_lr` over `warmup_steps`, then cosine decay to
    `peak_lr * min_ratio` at `total_steps` (per step, as in SimCLR)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = peak_lr * min_ratio
    return floor + (peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
