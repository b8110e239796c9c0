"""What a run optimises, beyond plain two-view NT-Xent: K views per image (--views), small views
(multi-crop, --local-views), supervised contrastive positives from the labels of pretraining
images (--supcon), a learned temperature (--learn-temperature), a queue of negatives (--queue),
nearest-neighbour positives (--nn-support).
The plain objective (two views, no labels, a fixed temperature) is not routed through here at
all: it keeps the NT-Xent step of step.py, row blocks and gradient caching included.
"""

from __future__ import annotations

from typing import Any

import math

import numpy as np
import torch
from torch import nn

from fastclr.config import LEARNED_TEMPERATURE_RANGE, TrainConfig
from fastclr.pretraining.multi_positive import Metrics, label_groups, multi_positive_loss
from fastclr.pretraining.neighbours import nearest_neighbours
from fastclr.pretraining.queue import KeyNetwork, RowQueue
from fastclr.pretraining.views import Views
from fastclr.scaleout.distributed import DistContext, all_gather, gather_with_grad



class LearnedTemperature(nn.Module):
    """t = exp(log_t), trained with the model (log-parameterised: steps are relative, t stays > 0).
    One 1-D parameter, so the optimiser never decays it. Kept in LEARNED_TEMPERATURE_RANGE by clipping the
    parameter after each update (`keep_in_range`), as CLIP clips its logit scale: a clamp inside
    the forward pass has zero gradient outside the range, where t would stay for good."""

    def __init__(self, initial: float) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.tensor([math.log(initial)]))
        self.keep_in_range()

    def forward(self) -> torch.Tensor:
        return self.log_t.exp()[0]

    @torch.no_grad()
    def keep_in_range(self) -> None:
        """Clip log_t to LEARNED_TEMPERATURE_RANGE (after every optimiser step)."""
        low, high = (math.log(v) for v in LEARNED_TEMPERATURE_RANGE)
        self.log_t.clamp_(low, high)


def objective_options(t: TrainConfig) -> list[str]:
    """The flags of the options set in `t` that route a run through `Objective`, in --help order."""
    return [flag for flag, on in (("--views", t.views != 2), ("--local-views", t.local_views > 0),
                                  ("--supcon", t.supcon), ("--learn-temperature", t.learn_temperature),
                                  ("--queue", t.queue > 0), ("--nn-support", t.nn_support > 0)) if on]


def is_plain(t: TrainConfig) -> bool:
    """Two views, no labels, a fixed temperature, no queue, no neighbours: the NT-Xent step of step.py."""
    return not objective_options(t)


class Objective:
    """The loss of one step for views (K * B rows: view 1 of every image, then view 2, ...) with
    their images' dataset indices (and labels, for --supcon), under one or several processes."""

    def __init__(self, cfg: TrainConfig, labels: np.ndarray | None, device: torch.device,
                 learned: LearnedTemperature | None, keys: KeyNetwork | None = None, queue: RowQueue | None = None,
                 support: RowQueue | None = None) -> None:
        # Rows of z: view 1 of every image, ..., view K, then the small views 1..L (multi-crop).
        self.views = cfg.views + cfg.local_views
        self.full_views = cfg.views
        self.supcon, self.temperature, self.learned = cfg.supcon, cfg.temperature, learned
        self.keys, self.queue, self.support = keys, queue, support
        self.first_views: torch.Tensor | None = None  # this step's view-1 rows, for the support after the update
        self.labels = None
        if cfg.supcon:
            self.labels = torch.from_numpy(np.asarray(labels if labels is not None else [], dtype=np.int64)).to(device)

    def groups(self, indices: torch.Tensor) -> torch.Tensor:
        """Group ids of the (K + L) * B views of the images at dataset `indices` (B,): the image (its
        K views and L small views are positives of each other), or with --supcon its class when it
        has a label."""
        if self.labels is None or len(self.labels) == 0:
            return indices.long().repeat(self.views)
        return label_groups(self.labels[indices], indices, self.views)

    def loss(self, z: torch.Tensor, groups: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, Metrics]:
        """The multi-positive loss of this rank's rows against every rank's (negatives and positives
        gathered with their gradient, as for NT-Xent), and the metrics (+ the temperature). With a
        support set each anchor is scored as its nearest neighbour there (once it holds any rows)."""
        t: float | torch.Tensor = self.learned() if self.learned is not None else self.temperature
        candidates = candidate_groups = None
        offset = 0
        if ctx.active:
            candidates, offset = gather_with_grad(z, ctx), ctx.rank * z.shape[0]
            candidate_groups = all_gather(groups, ctx)
        extra = self.queue.oldest_first() if self.queue is not None else None
        anchors = None
        if self.support is not None:
            held = self.support.held()
            anchors = nearest_neighbours(z, held) if held is not None else None
            # Kept for after_update, which TrainStep calls once the step's update is made.
            self.first_views = z[: z.shape[0] // self.views].detach()
        loss, metrics = multi_positive_loss(z, groups, t, extra=extra, candidates=candidates,
                                            candidate_groups=candidate_groups, offset=offset, anchors=anchors)
        if isinstance(t, torch.Tensor):
            metrics["temperature"] = t.detach()
        return loss, metrics

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold of the objective: the queue and its key network, the support set
        (nothing without them)."""
        state: dict[str, Any] = {}
        if self.keys is not None and self.queue is not None:
            state |= {"queue": self.queue.state_dict(), "key_network": self.keys.state_dict()}
        if self.support is not None:
            state["support"] = self.support.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`, from a checkpoint's whole state. A run resumed with a queue or a
        support set newly on (or resized, --allow-config-change) starts them empty, and its key
        network as a copy of the resumed online network."""
        if self.keys is not None and self.queue is not None:
            if _fits(state.get("queue"), self.queue) and "key_network" in state:
                self.queue.load_state_dict(state["queue"])
                self.keys.load_state_dict(state["key_network"])
            else:
                self.keys.copy_online()
        if self.support is not None and _fits(state.get("support"), self.support):
            self.support.load_state_dict(state["support"])

    def after_update(self, views: Views, amp: torch.dtype | None, ctx: DistContext, skipped: bool = False) -> None:
        """With a queue: move the key network towards the online one, then enqueue the keys of this
        step's full-size views from every rank, in the global batch's view-major order (every rank's
        queue stays the same, and the same as one process's). With a
        support set: add this step's first views from every rank, in rank order. A learned
        temperature is clipped back into its range. After a `skipped` update (fp16 overflow) none
        of this happens, as if the step had not been taken (the same on every rank: the gradients
        it was decided on are all-reduced)."""
        if skipped:
            self.first_views = None
            return
        if self.learned is not None:
            self.learned.keep_in_range()
        if self.support is not None and self.first_views is not None:
            self.support.enqueue(all_gather(self.first_views, ctx))
            self.first_views = None
        if self.keys is None or self.queue is None:
            return
        self.keys.update()
        full = views if isinstance(views, torch.Tensor) else views[0]
        self.queue.enqueue(view_major(all_gather(self.keys.keys(full, amp), ctx), self.full_views, ctx.world_size))


def view_major(rows: torch.Tensor, views: int, world: int) -> torch.Tensor:
    """Rows gathered rank by rank (each rank's view 1, then its view 2, ...) put in the order one
    process holds them: view 1 of every image in the global batch, then view 2, ... A queue that
    drops the oldest rows mid-step then drops the same views on 1 or N processes."""
    if world == 1:
        return rows
    return rows.view(world, views, -1, rows.shape[-1]).transpose(0, 1).reshape(-1, rows.shape[-1])


def _fits(saved: dict[str, Any] | None, queue: RowQueue) -> bool:
    """Whether a checkpoint's queue state can be loaded into `queue` (present, same shape)."""
    return saved is not None and tuple(saved["rows"].shape) == tuple(queue.rows.shape)
