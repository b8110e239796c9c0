"""One training step: views -> z -> NT-Xent (negatives from every rank) -> gradients -> update.

Its phases are marked for torch.profiler (fastclr.forward, .loss, .backward, .optimizer; the
views are fastclr.views in `ViewMaker`), so benchmarks/profile_step.py profiles this very step.

`TrainStep` is built once per run, bound to the model, optimiser, precision and loss settings,
and called with each batch's views. Under fp16 it scales the loss dynamically
(`torch.amp.GradScaler`): a step whose gradients overflow is skipped (parameters and optimiser
state untouched), counted, and the scale halved; the scale is part of the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from fastclr.pretraining.chunked_loss import blockwise_nt_xent
from fastclr.scaleout.distributed import DistContext, gather_with_grad
from fastclr.scaleout.gradcache import grad_cache_backward
from fastclr.pretraining.losses import contrastive_metrics, nt_xent_logits, rank_metrics
from fastclr.pretraining.objective import Objective
from fastclr.pretraining.views import Views
from fastclr.runtime import Precision

Metrics = dict[str, torch.Tensor]


class SimCLRNet(nn.Module):
    """Encoder f then head g as one module, the unit DistributedDataParallel wraps."""

    def __init__(self, encoder: nn.Module, head: nn.Module, temperature: nn.Module | None = None):
        super().__init__()
        self.encoder, self.head = encoder, head
        if temperature is not None:  # a learned temperature: inside, so DDP averages its gradient too
            self.temperature = temperature

    def forward(self, views: Views) -> torch.Tensor:
        """views (2B, C, S, S) -> z (2B, proj_dim); with multi-crop's small views (LB, C, s, s) too,
        z of both stacked (2B + LB rows). Each size goes through the encoder on its own (its
        BatchNorm statistics are its own, as in SwAV's multi-crop, Caron et al. 2020) and the head
        once over all h, inside one forward, so DistributedDataParallel sees one pass."""
        if isinstance(views, torch.Tensor):
            return self.head(self.encoder(views))
        return self.head(torch.cat([self.encoder(v) for v in views]))


def project(net: nn.Module, views: Views, amp: torch.dtype | None) -> torch.Tensor:
    """z of a batch of views under the run's autocast dtype: (2B, proj_dim), (2B + LB) with small views."""
    device = (views if isinstance(views, torch.Tensor) else views[0]).device
    with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        return net(views)


def contrastive_loss(z: torch.Tensor, temperature: float, block: int, ctx: DistContext) -> tuple[torch.Tensor, Metrics]:
    """NT-Xent (fp32) of this rank's z (2B, D) = [view 1; view 2] against the views of the global
    batch, and the contrastive metrics. block > 0: the memory-efficient row-block loss."""
    z1, z2 = z.chunk(2)  # (B, D) each
    candidates, offset = None, 0
    if ctx.active:
        b, d = z1.shape
        every = gather_with_grad(z, ctx).view(ctx.world_size, 2, b, d)  # rank, view, image, dim
        candidates = (every[:, 0].reshape(-1, d), every[:, 1].reshape(-1, d))  # (G, D) each, rank 0 first
        offset = ctx.rank * b
    if block:
        loss, rank = blockwise_nt_xent(z1, z2, temperature, block, candidates, offset)
        return loss, rank_metrics(rank)
    logits, target = nt_xent_logits(z1, z2, temperature, candidates, offset)
    loss = torch.nn.functional.cross_entropy(logits, target)
    return loss, contrastive_metrics(logits.detach(), target)


def backward_step(
    net: nn.Module,
    views: Views,
    temperature: float,
    amp: torch.dtype | None,
    block: int,
    ctx: DistContext,
    chunk: int = 0,
    no_sync: Callable[[], AbstractContextManager[object]] = nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    objective: Objective | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Forward and backward of one step; gradients (of `scale(loss)`) land in .grad, averaged over
    ranks by DDP. chunk > 0: gradient caching with `chunk` images per encoder pass (gradcache.py).
    objective: K views, supervised contrastive or a learned temperature (objective.py), with the
    views' `groups`; None: NT-Xent. Returns the detached, unscaled loss of this rank's anchors and
    the metrics."""
    def loss_of(z: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        if objective is not None and groups is not None:
            return objective.loss(z, groups, ctx)
        return contrastive_loss(z, temperature, block, ctx)

    if chunk <= 0:
        with record_function("fastclr.forward"):
            z = project(net, views, amp)
        with record_function("fastclr.loss"):
            loss, metrics = loss_of(z)
        with record_function("fastclr.backward"):
            scale(loss).backward()
        return loss.detach(), metrics
    assert isinstance(views, torch.Tensor), "gradient caching takes two-view NT-Xent only (setup refuses the rest)"
    return grad_cache_backward(lambda x: project(net, x, amp), views, chunk, loss_of, net, no_sync, scale)


@dataclass
class StepResult:
    """What one step leaves on the device (nothing here waits for it)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    """Norm of the unscaled gradient; non-finite when the step overflowed."""
    skipped: torch.Tensor
    """1.0 when loss scaling skipped the update (fp16 overflow), else 0.0."""
    metrics: Metrics


class TrainStep:
    """The optimisation step of a run, bound to everything that does not change from step to step."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision, device: torch.device, *,
                 temperature: float, loss_block: int = 0, grad_cache_chunk: int = 0,
                 ctx: DistContext = DistContext(),
                 no_sync: Callable[[], AbstractContextManager[object]] = nullcontext,
                 objective: Objective | None = None) -> None:
        self.net, self.optimizer, self.precision, self.ctx, self.objective = net, optimizer, precision, ctx, objective
        self.temperature, self.loss_block, self.grad_cache_chunk, self.no_sync = (
            temperature, loss_block, grad_cache_chunk, no_sync)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # Disabled for bf16 and fp32: then scale() is the identity and step() is optimizer.step().
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.loss_scaling)

    def __call__(self, views: Views, groups: torch.Tensor | None = None) -> StepResult:
        """Forward, backward and update on one batch of views (2B, C, S, S; KB with --views K; and
        the small views with --local-views), and
        their group ids under an objective other than NT-Xent."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = backward_step(self.net, views, self.temperature, self.precision.dtype, self.loss_block, self.ctx,
                                      self.grad_cache_chunk, self.no_sync, self.scaler.scale, self.objective, groups)
        with record_function("fastclr.optimizer"):
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            self.scaler.step(self.optimizer)
            self.scaler.update()
        skipped = (~torch.isfinite(grad_norm)).float() if self.scaler.is_enabled() else torch.zeros((), device=loss.device)
        if self.objective is not None:
            # A step loss scaling skipped moves nothing: not the key network, queue or support set.
            # Reading the flag waits for the device (fp16 with an objective only; GradScaler's fused
            # AdamW step does not wait, and the queue's pointer lives on the host).
            self.objective.after_update(views, self.precision.dtype, self.ctx,
                                        skipped=self.scaler.is_enabled() and bool(skipped))
        return StepResult(loss, grad_norm, skipped, metrics)

    def loss_scale(self) -> float:
        """The current loss scale (1.0 without loss scaling); reading it waits for the device."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict[str, float | int]:
        """The loss scaler's state, for the checkpoint (empty without loss scaling)."""
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore the loss scaler's state from a checkpoint."""
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)
