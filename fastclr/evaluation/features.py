"""Encoder features of tensors that are not stored images: augmented views, for the label-free
measures and the report. Stored images go through `fastclr.probe.extract_features` instead."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fastclr.augment import normalize, two_views
from fastclr.config import AugmentConfig
from fastclr.runtime import Precision


@torch.no_grad()
def encode(encoder: nn.Module, x: torch.Tensor, precision: Precision, batch_size: int = 512,
           channels_last: bool = True) -> torch.Tensor:
    """h of standardised inputs x (B, C, S, S) on the encoder's device: float32 (B, D) on the CPU.

    The encoder runs in eval mode (BatchNorm uses its running statistics) and is restored after.
    """
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with precision.autocast(x.device):
                out.append(encoder(xb).float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def view_pairs(
    images: np.ndarray, cfg: AugmentConfig, seed: int, mean: torch.Tensor, std: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views of each of B stored images, exactly as pretraining draws them.

    Returns (views in [0, 1] for display, the same views standardised for the encoder), both
    (2B, C, S, S) on `device`; rows [0, B) are first views, rows [B, 2B) second views.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    raw = two_views(torch.from_numpy(np.ascontiguousarray(images)).to(device), cfg, g)
    return raw, normalize(raw, mean.to(device), std.to(device))


def evenly_spaced(n: int, limit: int) -> np.ndarray:
    """min(n, limit) indices spread evenly over range(n): a fixed, label-free sample."""
    return np.linspace(0, n - 1, min(n, limit)).astype(np.int64)
