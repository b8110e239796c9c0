"""The trainable pair (f, g), built once per run: the encoder (by name, or the user's module), its
spec, and the projection head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fastclr.config import Config
from fastclr.data import Dataset
from fastclr.models import (EncoderSpec, ProjectionHead, build_encoder, feature_dim, resolve_encoder, resolve_width,
                            use_cifar_stem)
from fastclr.runtime import to_channels_last

if TYPE_CHECKING:
    from fastclr.pretraining.objective import LearnedTemperature


@dataclass
class Model:
    """Encoder f, head g, and the spec that rebuilds and feeds f."""

    encoder: nn.Module
    head: nn.Module
    spec: EncoderSpec
    temperature: LearnedTemperature | None = None
    """The learned temperature with --learn-temperature."""


def channel_stats(images: np.ndarray, limit: int = 20000, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (float32 (C,)) of uint8 (N, H, W, C) images scaled to [0, 1],
    from an evenly spaced subset of at most `limit` images (exact for N <= limit).

    Sums are accumulated chunk by chunk in float64, so a memory-mapped store larger than RAM
    is read a few hundred rows at a time."""
    idx = np.arange(0, len(images), max(1, len(images) // limit))
    c = images.shape[-1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(idx), chunk):
        x = np.asarray(images[idx[start : start + chunk]], dtype=np.float64).reshape(-1, c) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += x.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0)).clip(1e-3)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def named_encoder(cfg: Config, image_shape: tuple[int, int, int], device_type: str) -> tuple[nn.Module, str, str]:
    """The encoder `cfg` names for images of (H, W, C), with its resolved name and stem setting, at
    the width it gives or (`auto`) the one `resolve_width` chooses for `device_type`; built on the
    current default device (the meta device gives names and shapes for nothing)."""
    h, _, c = image_shape
    size = cfg.augment.crop_size or h
    name = resolve_encoder(cfg.model.encoder, size)
    width = resolve_width(cfg.model.width, name, device_type)
    encoder = build_encoder(name, c, size, width, cfg.model.cifar_stem, cfg.model.cnn_stages)
    stem = ("on" if use_cifar_stem(cfg.model.cifar_stem, size) else "off") if name.startswith("resnet") else "n/a"
    return encoder, name, stem


def build_model(cfg: Config, dataset: Dataset, device: torch.device, encoder: nn.Module | None = None) -> Model:
    """Build (or adopt a user's) encoder and the projection head for `dataset`. The encoder is the
    first module drawn from torch's generator, so `torch.manual_seed(s)` before this call fixes
    its initial weights (the untrained reference of evaluation rebuilds them this way)."""
    h, _, c = dataset.image_shape
    size = cfg.augment.crop_size or h
    mean, std = channel_stats(dataset.pretrain.images)
    if encoder is None:
        encoder, name, stem = named_encoder(cfg, dataset.image_shape, device.type)
    else:
        name, stem = "custom", "n/a"
    encoder = encoder.to(device)
    dim = feature_dim(encoder, c, size)
    head = ProjectionHead(dim, cfg.model.head_hidden or dim, cfg.model.proj_dim, cfg.model.head_layers, cfg.model.head_bn)
    head = head.to(device)
    if cfg.train.channels_last:
        encoder = to_channels_last(encoder)
    width = resolve_width(cfg.model.width, name, device.type)
    spec = EncoderSpec(encoder=name, in_channels=c, image_size=size, width=width, cifar_stem=stem, feature_dim=dim,
                       mean=tuple(mean.tolist()), std=tuple(std.tolist()), stages=cfg.model.cnn_stages if name == "cnn" else "")
    return Model(encoder, head, spec)
