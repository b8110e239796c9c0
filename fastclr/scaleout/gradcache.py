"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the contrastive loss of a whole batch with the activation memory of one chunk.

The loss couples every pair of the batch, so it cannot be split; the encoder can. Three passes:
1. embed the batch chunk by chunk without a graph, keeping only z (2B, D);
2. compute the loss on all of z (with the gather of negatives under DDP) and back-propagate it
   to dL/dz alone;
3. re-run each chunk with a graph and back-propagate dL/dz[chunk] through it; parameter
   gradients accumulate over chunks into exactly the full-batch gradient.
Gradient accumulation, by contrast, would split the loss itself and see only a chunk's negatives.

Caveats, handled here and stated for users:
- BatchNorm in train mode normalises each chunk with that chunk's statistics, in both passes, so
  the step equals a full-batch step only for batch-independent encoders (no BatchNorm, or
  BatchNorm in eval mode); with BatchNorm it is "ghost BatchNorm" with chunk-sized ghost batches.
  Both passes of a chunk see the same tensors with the same statistics, so they give the same z.
- BatchNorm running statistics would be updated twice per chunk (once per pass): the buffers are
  snapshotted before the graph-free pass and restored after it, so they move once.
- Both passes run through the same `forward` (same autocast, same memory format); views are
  augmented once by the caller and reused.
- Random layers (dropout, stochastic depth: a custom encoder's) draw in both passes: each chunk's
  second pass replays the random state its first pass started from (as GradCache's RandContext),
  so it draws the same masks and dL/dz flows through the function the loss was computed from.
  Without the replay the parameter gradients of a one-chunk step with dropout 0.5 differed from
  the plain step's by up to 3.7 (tests/test_gradcache.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch
from torch import nn

from fastclr.determinism import generator_states, replaying

T = TypeVar("T")


def chunk_rows(batch: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) image ranges of at most `chunk` images covering `batch` images."""
    return [(s, min(s + chunk, batch)) for s in range(0, batch, chunk)]


def grad_cache_backward(
    forward: Callable[[torch.Tensor], torch.Tensor],
    views: torch.Tensor,
    chunk: int,
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, T]],
    module: nn.Module,
    no_sync: Callable[[], AbstractContextManager[object]] = nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
) -> tuple[torch.Tensor, T]:
    """Back-propagate `loss_fn(forward(views))` into the parameters' .grad, `chunk` images at a time.

    views: (2B, C, S, S) laid out [view 1 of B images; view 2 of the same B]; each chunk holds
    both views of its images, so a chunk sees what the full batch would show BatchNorm, scaled down.
    forward: views (2c, ...) -> z (2c, D). loss_fn: z (2B, D) -> (scalar loss, anything).
    module: whose buffers (BatchNorm running statistics) must move once per step, not twice.
    no_sync: a context manager that defers DDP's gradient all-reduce; used for all chunks but
    the last, so gradients are reduced once, after the last chunk has added its share.
    scale: applied to the loss before its backward (dynamic loss scaling under fp16); the
    chunks' backward then carries the scaled dL/dz.
    Returns the detached loss and what `loss_fn` returned besides it.
    """
    b = views.shape[0] // 2
    ranges = chunk_rows(b, chunk)

    def take(s: int, e: int) -> torch.Tensor:  # both views of images [s, e): (2c, C, S, S)
        return torch.cat([views[s:e], views[b + s : b + e]])

    saved = [buf.detach().clone() for buf in module.buffers()]
    states: list[dict[str, torch.Tensor]] = []
    zs: list[torch.Tensor] = []
    with torch.no_grad():
        for s, e in ranges:  # each z (2c, D); activations freed chunk by chunk
            states.append(generator_states(views.device))
            zs.append(forward(take(s, e)))
    with torch.no_grad():
        for buf, old in zip(module.buffers(), saved):
            buf.copy_(old)
    z = torch.cat([z[: e - s] for z, (s, e) in zip(zs, ranges)] + [z[e - s :] for z, (s, e) in zip(zs, ranges)])
    z = z.detach().requires_grad_()  # (2B, D) in the layout of `views`
    loss, extra = loss_fn(z)
    scale(loss).backward()
    grad = z.grad
    assert grad is not None
    for i, (s, e) in enumerate(ranges):
        with no_sync() if i < len(ranges) - 1 else nullcontext(), replaying(states[i], views.device):
            zc = forward(take(s, e))  # (2c, D), now with a graph: the same input and draws as in the first pass
            zc.backward(torch.cat([grad[s:e], grad[b + s : b + e]]))
    return loss.detach(), extra
