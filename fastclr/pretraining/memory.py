"""A lower bound of the host memory one training step holds, checked before the run starts.

On a CPU a batch too large for the memory a container is given grew the process until the
kernel killed it (exit 137, no word); the allocator's own refusal, which the command names, comes
only under `ulimit -v`. The bound counts what must be there at the step's peak and nothing more,
so no run that fits is refused: at the end of the forward pass, the weights and the optimiser's
state (the gradients of the step before are freed by then, and those earlier chunks leave with
gradient caching are left out: the weights check counts them); the
output of every convolution and linear layer of the encoder for every view (each is kept for the
backward pass: the BatchNorm or activation after it reads it); and the NT-Xent logits with their
log-softmax (2 x rows x columns in fp32; one row block's tile with --loss-block). With gradient
caching the logits and a chunk's activations are never held together: the larger of the two.
Left out: BatchNorm and activation outputs, pooling indices, the padded input a trimmed convolution
(`models.cnn.FloorPooledConv`) keeps for its backward pass, the views, the head, allocator slack.
A resumed run's checkpoint, already in memory, is counted as held (its moments become the
optimiser's own).
"""

from __future__ import annotations

import torch
from torch import nn

from fastclr.config import Config
from fastclr.models.modes import in_eval_mode
from fastclr.runtime import Precision

OPTIMISER_COPIES = {"adamw": 2, "lars": 1, "sgd": 1}
"""Tensors of the weights' size each optimiser keeps: AdamW's two moments, the momentum buffer."""


def kept_per_image(encoder: nn.Module, in_channels: int, side: int) -> int:
    """Numbers the encoder's convolutions and linear layers output for one image of `side` pixels,
    counted on the meta device (`encoder` built there: no memory, no arithmetic)."""
    total = 0

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel()

    hooks = [m.register_forward_hook(count) for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad(), in_eval_mode(encoder):  # (BatchNorm refuses one image in training mode)
            encoder(torch.empty(1, in_channels, side, side, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total


def step_parts(cfg: Config, params: int, per_image: int, world_size: int, precision: Precision,
               per_small: int = 0) -> tuple[int, int, int]:
    """(weights and optimiser state, activations, logits) of one step on one process, in bytes;
    `per_small`: what one of multi-crop's small views keeps (`kept_per_image` at its side), whose rows
    join the logits as the others' (--local-views counted none: a run the bound would have refused
    started, wrote its directory and ran out of memory)."""
    t = cfg.train
    local = t.batch_size // world_size
    views = t.views + t.local_views
    rows, columns = views * local, views * t.batch_size + t.queue
    held = min(local, t.grad_cache_chunk) if t.grad_cache_chunk else local  # images whose activations are held
    activation = 2 if precision.dtype is not None else 4  # autocast's bf16 or fp16 outputs, else fp32
    weights = params * 4 * (1 + OPTIMISER_COPIES.get(cfg.optim.optimizer, 0))
    logits = (min(t.loss_block, rows) if t.loss_block else 2 * rows) * columns * 4
    return weights, held * (t.views * per_image + t.local_views * per_small) * activation, logits


def step_bytes(cfg: Config, params: int, per_image: int, world_size: int, precision: Precision,
               per_small: int = 0) -> int:
    """The lower bound of one step's memory on one process (see the module's docstring)."""
    return _total(cfg, *step_parts(cfg, params, per_image, world_size, precision, per_small))


def _total(cfg: Config, weights: int, activations: int, logits: int) -> int:
    return weights + (max(activations, logits) if cfg.train.grad_cache_chunk else activations + logits)


def require_step_memory(cfg: Config, encoder: nn.Module, image_shape: tuple[int, int, int],
                        world_size: int, precision: Precision, device: torch.device, held: int = 0) -> None:
    """One line before the run when the bound, less the `held` bytes already in memory that the run
    takes over (a resumed checkpoint's), exceeds the host's available memory (a CPU run's; a GPU's
    own out-of-memory error is named by the command). `encoder`: the run's, on the meta device."""
    from fastclr.runtime import require_memory

    if device.type != "cpu":
        return
    h, _, c = image_shape
    side = cfg.augment.crop_size or h
    params = sum(p.numel() for p in encoder.parameters())
    small = cfg.augment.local_size or max(1, side // 2)  # as the views are drawn (augment.local_views)
    per_small = kept_per_image(encoder, c, small) if cfg.train.local_views else 0
    weights, activations, logits = step_parts(cfg, params, kept_per_image(encoder, c, side), world_size, precision,
                                              per_small)
    smalls = f" and {cfg.train.local_views} of {small} px" if cfg.train.local_views else ""
    require_memory(_total(cfg, weights, activations, logits) - held,
                   f"a step of batch {cfg.train.batch_size} ({cfg.train.views} views of {side} px{smalls}, "
                   f"{precision.name})",
                   f"{_smaller(cfg, activations >= logits, world_size)}, or run where there is more memory")


def _smaller(cfg: Config, activations_first: bool, world_size: int) -> str:
    """The settings that shrink the larger part: the batch always; where the plain two-view loss
    is trained (the memory savers compute only it), gradient caching for the activations and the
    blockwise loss for the logits."""
    from fastclr.pretraining.objective import is_plain

    t = cfg.train
    chunk = t.batch_size // world_size // 4  # a chunk under the rank's batch: one at or above it saves nothing
    if is_plain(t) and activations_first and not t.grad_cache_chunk and chunk >= 1:
        return f"give a smaller --batch-size, or --grad-cache-chunk {chunk} (the encoder {chunk} images at a time)"
    if is_plain(t) and not activations_first and not t.loss_block:
        return "give a smaller --batch-size, or --loss-block 1024 (the loss a block of rows at a time)"
    return "give a smaller --batch-size"


def tensor_bytes(obj: object) -> int:
    """Bytes of every tensor in a nested dict or list (a checkpoint's state)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
