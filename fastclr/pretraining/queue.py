"""A queue of negatives for small batches (--queue Q): the projections of the last Q views, made by a
momentum-updated copy of encoder and head (He et al. 2020, MoCo), join every anchor's denominator.

Why a momentum copy: the queue's rows come from many past steps; embedded by the online network
they would be inconsistent with each other (each from older weights). The key network follows the
online one slowly, theta_k <- m theta_k + (1 - m) theta_q after every update (MoCo's m = 0.999 for
ImageNet; 0.99 here by default for runs of thousands, not hundreds of thousands, of steps), so
the queued keys drift slowly. The in-batch loss is unchanged; the queue only adds negatives.

The queue is a ring buffer filled oldest-first; until it is full only its filled rows are used.
Under several processes every rank enqueues every rank's keys in rank order, so all queues agree.
Its rows, pointer and fill, and the key network's weights are part of the checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class RowQueue:
    """The last `size` rows enqueued (float32, unit length): a ring buffer, read oldest first with
    `oldest_first()` (the queue's negatives) or in storage order with `held()` (the support set of
    nearest-neighbour positives, fastclr.pretraining.neighbours, whose search ignores order)."""

    def __init__(self, size: int, dim: int, device: torch.device) -> None:
        self.rows = torch.zeros(size, dim, device=device)
        self.pointer = 0  # where the next row goes
        self.filled = 0

    def oldest_first(self) -> torch.Tensor | None:
        """The queued rows, oldest first (None while empty)."""
        if self.filled == 0:
            return None
        if self.filled < len(self.rows):
            return self.rows[: self.filled]
        return torch.cat([self.rows[self.pointer:], self.rows[: self.pointer]])

    def held(self) -> torch.Tensor | None:
        """The queued rows in storage order, without a copy (None while empty)."""
        return self.rows[: self.filled] if self.filled else None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Append rows (N, D), dropping the oldest beyond the queue's size."""
        size = len(self.rows)
        keys = torch.nn.functional.normalize(keys.detach().float(), dim=1)[-size:]
        n = keys.shape[0]
        first = min(n, size - self.pointer)
        self.rows[self.pointer:self.pointer + first] = keys[:first]
        self.rows[: n - first] = keys[first:]
        self.pointer = (self.pointer + n) % size
        self.filled = min(size, self.filled + n)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.cpu(), "pointer": self.pointer, "filled": self.filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pointer, filled, size = int(state["pointer"]), int(state["filled"]), len(self.rows)
        if not (0 <= pointer < size and 0 <= filled <= size):  # only an edited checkpoint holds such
            raise ValueError(f"a queue of {size} rows at row {pointer} with {filled} filled")
        self.rows.copy_(state["rows"])
        self.pointer, self.filled = pointer, filled


class KeyNetwork:
    """The momentum copy of encoder and head that embeds the queue's keys (never trained by gradients)."""

    def __init__(self, online: nn.Module, momentum: float) -> None:
        self.online, self.momentum = online, momentum
        self.net = copy.deepcopy(online).requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for parameters; buffers (BatchNorm statistics) copied."""
        for k, q in zip(self.net.parameters(), self.online.parameters()):
            k.mul_(self.momentum).add_(q.detach(), alpha=1 - self.momentum)
        for mine, theirs in zip(self.net.buffers(), self.online.buffers()):
            mine.copy_(theirs)

    @torch.no_grad()
    def copy_online(self) -> None:
        """Start again as an exact copy of the online network (a run resumed with the queue newly on)."""
        self.net.load_state_dict(self.online.state_dict())

    @torch.no_grad()
    def keys(self, views: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
        """z of the views from the key network, in training mode (BatchNorm on the batch, as MoCo)."""
        with torch.autocast(views.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            return self.net(views).float()

    def state_dict(self) -> dict[str, Any]:
        return self.net.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state)
