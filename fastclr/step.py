"""One training step's forward and backward: views -> z -> NT-Xent (negatives from every rank) ->
gradients in .grad, plainly or by gradient caching."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from fastclr.chunked_loss import blockwise_nt_xent
from fastclr.distributed import DistContext, gather_with_grad
from fastclr.gradcache import grad_cache_backward
from fastclr.losses import contrastive_metrics, nt_xent_logits, rank_metrics

Metrics = dict[str, torch.Tensor]


class SimCLRNet(nn.Module):
    """Encoder f then head g as one module, the unit DistributedDataParallel wraps."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """views (2B, C, S, S) -> z (2B, proj_dim)."""
        return self.head(self.encoder(views))


def embed(net: nn.Module, views: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """z of a batch of views under the run's autocast setting: (2B, proj_dim)."""
    with torch.autocast(views.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
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


def forward_loss(net: nn.Module, views: torch.Tensor, temperature: float, amp: torch.dtype | None, block: int,
                 ctx: DistContext) -> tuple[torch.Tensor, Metrics]:
    """Both views through f and g as one batch (so BatchNorm sees all 2B), then the loss."""
    return contrastive_loss(embed(net, views, amp), temperature, block, ctx)


def backward_step(
    net: nn.Module,
    views: torch.Tensor,
    temperature: float,
    amp: torch.dtype | None,
    block: int,
    ctx: DistContext,
    chunk: int = 0,
    loss_fn: Callable[..., tuple[torch.Tensor, Metrics]] = forward_loss,
    no_sync: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> tuple[torch.Tensor, Metrics]:
    """Forward and backward of one step; gradients land in .grad (averaged over ranks by DDP).

    chunk > 0: gradient caching with `chunk` images per encoder pass (see gradcache.py).
    loss_fn: `forward_loss` or a compiled version of it (plain path only).
    Returns the detached loss of this rank's anchors and the metrics.
    """
    if chunk <= 0:
        loss, metrics = loss_fn(net, views, temperature, amp, block, ctx)
        loss.backward()
        return loss.detach(), metrics
    return grad_cache_backward(lambda x: embed(net, x, amp), views, chunk,
                               lambda z: contrastive_loss(z, temperature, block, ctx), net, no_sync)
