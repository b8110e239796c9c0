"""Training an encoder and a linear head end to end on labelled images: the loop shared by the
supervised baseline (encoder from scratch) and fine-tuning (encoder from the run).

Both use the same optimiser, schedule, batch and number of steps, so at equal labels the
comparison is at equal compute. Augmentation is the standard supervised one for small images:
a random shift with zero padding and a horizontal flip with the run's probability (mnist turns
flips off) (He et al. 2016: 4 px padding at 32 px); its size is chosen per protocol from
measurements (see `EvaluateOptions`). Not SimCLR's fine-tuning crop-and-resize: on
Fashion-MNIST, 1% labels, crops of area [0.5, 1] resized back took fine-tuning from the probe's
79.3% to 76.1%: zoomed training views do not match the full-size test images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastclr.augment import normalize
from fastclr.errors import FastclrError
from fastclr.data.loader import BatchSampler, ImageSource
from fastclr.pretraining.optim import build_optimizer
from fastclr.evaluation.features import extract_features, prepare_images
from fastclr.pretraining.schedule import lr_at
from fastclr.runtime import Precision


@dataclass
class TrainRecipe:
    """How a classifier is trained; the defaults live in `EvaluateOptions`."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    shift_fraction: float
    """Largest random shift, as a fraction of the image side (rounded to whole pixels)."""
    flip_p: float


def shift_and_flip(x: torch.Tensor, max_shift: int, flip_p: float, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels per axis (zero padding), then a horizontal
    flip with probability `flip_p`, each image its own draw: (B, C, H, W) -> (B, C, H, W)."""
    b, _, h, w = x.shape
    if max_shift > 0:
        xp = F.pad(x, (max_shift,) * 4)  # (B, C, H + 2m, W + 2m)
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=g, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        x = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=g, device=x.device) < flip_p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@dataclass
class LabelledSetup:
    """Everything a labelled protocol needs besides the encoder: the labelled splits, the run's
    input standardisation and encoder input side, the recipe, and where and how to compute."""

    train_images: np.ndarray  # uint8 (N, H, W, C)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    size: int
    device: torch.device
    precision: Precision
    recipe: TrainRecipe


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x, logits, b) -> scalar loss: the standardised, augmented batch (B, C, S, S), the classifier's
logits (B, K) and the batch's positions in the trained images `idx` (B,)."""


def labelled_objective(labels: np.ndarray, device: torch.device) -> Objective:
    """Cross-entropy with `labels` (those of the trained images, in their order)."""
    y = torch.from_numpy(np.ascontiguousarray(labels)).to(device)
    return lambda x, logits, b: F.cross_entropy(logits.float(), y[b])


def train_classifier(encoder: nn.Module, head: nn.Module, setup: LabelledSetup, idx: np.ndarray, seed: int,
                     frozen_bn: bool = False, objective: Objective | None = None) -> float:
    """Train encoder and head in place on the training images `idx` for `recipe.steps` steps;
    returns the mean loss of the last 10% of steps (a sanity figure).

    The loss is cross-entropy with the labels of `idx`, or `objective` when given (then no label
    is read here: distillation trains on images whose labels it must not see).
    AdamW with BatchNorm and biases undecayed, linear warmup then cosine decay to 0, per step.
    `frozen_bn` keeps the encoder's BatchNorm layers in eval mode (running statistics used and
    left as they are; their affine parameters still train).
    """
    s, r = setup, setup.recipe
    dev = s.device
    scaler = torch.amp.GradScaler(dev.type, enabled=s.precision.loss_scaling)  # fp16 only
    torch.manual_seed(seed)
    # Every image (distillation's pool): the array itself, a memory map of a large store read a batch
    # at a time, not a copy of it in memory.
    everything = len(idx) == len(s.train_images) and bool((np.asarray(idx) == np.arange(len(idx))).all())
    source = ImageSource(s.train_images if everything else s.train_images[idx], dev)
    loss_of = objective or labelled_objective(s.train_labels[idx], dev)
    sampler = BatchSampler(len(source), min(r.batch_size, len(source)), seed, dev)
    opt = build_optimizer("adamw", [encoder, head], r.lr, r.weight_decay)
    warmup = int(r.warmup_fraction * r.steps)
    max_shift = int(round(r.shift_fraction * s.size))
    mean, std = s.mean.to(dev), s.std.to(dev)
    zero, one = torch.zeros_like(mean), torch.ones_like(std)
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    encoder.train()
    head.train()
    if frozen_bn:
        for m in encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    tail: list[torch.Tensor] = []
    diverged = torch.zeros((), dtype=torch.bool, device=dev)  # on the device: the step never waits for it
    for step in range(r.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, r.steps, warmup, r.lr)
        b = sampler.indices(step)
        x = prepare_images(source.gather(b), zero, one, s.size)  # (B, C, S, S) in [0, 1]: pads are black
        x = normalize(shift_and_flip(x, max_shift, r.flip_p, g), mean, std)
        x = x.contiguous(memory_format=torch.channels_last)
        with s.precision.autocast(dev):
            logits = head(encoder(x))
        loss = loss_of(x, logits, b)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        diverged |= ~torch.isfinite(loss.detach())
        if step >= r.steps - max(1, r.steps // 10):
            tail.append(loss.detach())
    encoder.eval()
    head.eval()
    if bool(diverged):
        raise FastclrError(f"training the classifier diverged: its loss became NaN or infinite at a learning rate of "
                           f"{r.lr:g}; lower --lr")
    return float(torch.stack(tail).mean())


@torch.no_grad()
def classifier_accuracy(encoder: nn.Module, head: nn.Module, setup: LabelledSetup) -> float:
    """Test accuracy of head(encoder(x)) on the un-augmented test images, encoder in eval mode."""
    s = setup
    h = extract_features(encoder, s.test_images, s.mean, s.std, s.device, precision=s.precision, size=s.size)
    w = next(head.parameters())
    pred = head(h.to(w.device, w.dtype)).argmax(1).cpu()
    return float((pred == torch.from_numpy(np.asarray(s.test_labels))).float().mean())


def fit_and_test(encoder: nn.Module, head: nn.Module, setup: LabelledSetup, idx: np.ndarray, seed: int,
                 frozen_bn: bool = False) -> dict[str, float]:
    """Train encoder + head on the training images `idx`, then their test accuracy."""
    loss = train_classifier(encoder, head, setup, idx, seed, frozen_bn)
    return {"accuracy": classifier_accuracy(encoder, head, setup), "final_loss": loss}
