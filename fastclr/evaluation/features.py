"""Frozen features h: the one way stored images (and augmented views) become h for evaluation.

The encoder runs in eval mode (BatchNorm uses its running statistics and does not move) under
the command's resolved precision, and is restored to its mode afterwards; a checksum of its
state taken before and compared after proves that nothing changed. Every consumer (the kNN
monitor and the probe of pretraining, `evaluate`, `report`, `embed`, `neighbours`) calls
`features_of` with a run's spec, so they all see the same h for the same image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from fastclr.augment import normalize, resample_matrix, to_float, two_views
from fastclr.config import AugmentConfig
from fastclr.data.loader import ImageSource
from fastclr.models import CNN_STAGES, EncoderSpec, feature_dim
from fastclr.models.modes import in_eval_mode
from fastclr.runtime import FP32, Precision, require_memory
from fastclr.errors import FastclrError


def state_checksum(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of `module` (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def prepare_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, H, W, C) -> standardised float (B, C, S, S), resized (whole image) when S != H."""
    x = to_float(images)
    b, _, h, w = x.shape
    if size != h or size != w:
        no = torch.zeros(b, dtype=torch.bool, device=x.device)
        zero = torch.zeros(b, device=x.device)  # made on the device: a host tensor's copy waits for a GPU
        ry = resample_matrix(zero, torch.full((b,), float(h), device=x.device), h, size, no)
        rx = resample_matrix(zero, torch.full((b,), float(w), device=x.device), w, size, no)
        x = ry[:, None] @ x @ rx[:, None].transpose(-1, -2)
    return normalize(x, mean, std)


@torch.no_grad()
def frozen_h(encoder: nn.Module, batches: Iterable[torch.Tensor], precision: Precision,
             channels_last: bool = True) -> torch.Tensor:
    """h of standardised input batches (B, C, S, S) on the encoder's device, in order: float32
    (N, D) on the CPU. Eval mode and autocast inside; the encoder's state is checked unchanged."""
    before = state_checksum(encoder)
    out = []
    with in_eval_mode(encoder):
        for x in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision.autocast(x.device):
                out.append(encoder(x).float().cpu())
    assert state_checksum(encoder) == before, "feature extraction changed the encoder's state"
    return torch.cat(out)


def extract_features(
    encoder: nn.Module,
    images: np.ndarray | ImageSource,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch_size: int = 1024,
    precision: Precision = FP32,
    size: int = 0,
    channels_last: bool = True,
) -> torch.Tensor:
    """h of every stored uint8 image (N, H, W, C), in order: float32 (N, D) on the CPU, standardised
    with `mean`/`std`, resized to `size` (0: the stored side), computed under `precision`."""
    source = images if isinstance(images, ImageSource) else ImageSource(images, device)
    side = size or source.shape[1]
    if mean.numel() != source.shape[3] or std.numel() != source.shape[3]:
        raise FastclrError(f"the images have {source.shape[3]} channels and the mean and std {mean.numel()} and "
                           f"{std.numel()}: give the images in the encoder's channels (the run's in_channels)")
    if batch_size < 1:
        raise FastclrError(f"batch_size must be at least 1, got {batch_size}")
    if not len(source):  # no batch to stack: h of no image, in the encoder's width
        return torch.empty(0, feature_dim(encoder, source.shape[3], side))
    mean, std = mean.to(device), std.to(device)

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(source), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(source)), device=device)
            yield prepare_images(source.gather(idx), mean, std, side)

    return frozen_h(encoder, batches(), precision, channels_last)


def features_of(encoder: nn.Module, spec: EncoderSpec, images: np.ndarray | ImageSource, device: torch.device,
                precision: Precision, batch_size: int = 1024, channels_last: bool = True) -> torch.Tensor:
    """h of stored images under a run's settings: its standardisation and input size (`spec`).
    Refuses, in one line, features that would not fit in memory with the probe's standardised copy."""
    require_memory(3 * len(images) * spec.feature_dim * 4, f"h of {len(images)} images ({spec.feature_dim}-d, "
                   "with the probe's copies)", f"use a compact readout (the default --cnn-stages {CNN_STAGES}) or a "
                   "machine with more memory")
    return extract_features(encoder, images, spec.mean_tensor(), spec.std_tensor(), device, batch_size, precision,
                            spec.image_size, channels_last)


def encode(encoder: nn.Module, x: torch.Tensor, precision: Precision, batch_size: int = 512,
           channels_last: bool = True) -> torch.Tensor:
    """h of standardised inputs x (B, C, S, S) on the encoder's device: float32 (B, D) on the CPU."""
    return frozen_h(encoder, (x[s:s + batch_size] for s in range(0, x.shape[0], batch_size)), precision,
                    channels_last)


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


DAMAGED = "the encoder's weights are damaged or its training diverged; use another run or an earlier checkpoint's export"
"""Why a trained encoder's features are not finite, and what to do."""


def class_labels(x: torch.Tensor, y: torch.Tensor, what: str) -> torch.Tensor:
    """`y` as int64 class indices for the (N, D) features `x`, or one line where they do not pair up
    (torch failed deep inside, or an IndexError, on labels of another length, float labels or
    features of another shape); int32 or uint8 labels are taken as they are meant."""
    if x.dim() != 2:
        raise FastclrError(f"{what} features have shape {tuple(x.shape)}; give them as (N, D)")
    if y.dim() != 1 or len(y) != len(x):
        raise FastclrError(f"{what} labels have shape {tuple(y.shape)} for {len(x)} rows of features; give one class "
                           "index a row, (N,)")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise FastclrError(f"{what} labels are {str(y.dtype).removeprefix('torch.')}; give integer class indices")
    if len(y) and int(y.min()) < 0:
        raise FastclrError(f"{what} labels hold {int(y.min())}; class indices start at 0 (drop unlabelled rows, -1)")
    return y.long()


def require_finite(h: torch.Tensor, what: str, why: str = DAMAGED) -> torch.Tensor:
    """`h`, or one line when it holds NaN or infinite values: every protocol on it would report
    chance-level garbage (argmax of NaN is class 0) or fail deep in an optimiser. `why`: the cause
    and the way out, said after the count."""
    if not bool(torch.isfinite(h).all()):
        bad = int((~torch.isfinite(h)).any(dim=-1).sum()) if h.dim() > 1 else 1
        raise FastclrError(f"{what} hold NaN or infinite values ({bad} of {len(h)} rows): {why}")
    return h
