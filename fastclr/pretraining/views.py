"""The views of each step's images, bound once to everything that does not change per step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import record_function

from fastclr.augment import local_config, render_views, two_views
from fastclr.config import AugmentConfig

Views = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""One step's views: (KB, C, S, S), or with multi-crop that and the small views (LB, C, s, s)."""


def augment_seed(seed: int, step: int) -> int:
    """Seed of step `step`'s augmentation generator: the views are a pure function of (seed, step)."""
    return (seed * 2_654_435_761 + step * 40_503 + 1) % (2**63 - 1)


class ViewMaker:
    """`views(images, step)` -> float32 (KB, C, S, S) (K = `views`, 2 unless --views), standardised:
    this process's share of step `step`'s views, the same whatever the number of processes (see
    `two_views`). With `local_views` L > 0 (multi-crop) it returns those and (LB, C, s, s) small
    views, drawn after them from the same generator: the K views are the same with or without them."""

    def __init__(self, cfg: AugmentConfig, mean: torch.Tensor, std: torch.Tensor, device: torch.device, *, seed: int,
                 channels_last: bool, global_batch: int, rank: int = 0, world_size: int = 1,
                 render: Callable[..., torch.Tensor] = render_views, views: int = 2, local_views: int = 0) -> None:
        self.cfg, self.seed, self.channels_last, self.render, self.views = cfg, seed, channels_last, render, views
        self.local_views = local_views
        self.local_cfg: AugmentConfig | None = None  # the small views' recipe, set by the first batch's image side
        self.mean, self.std = mean.to(device), std.to(device)
        self.generator = torch.Generator(device=device)
        # One process draws just its 2B views; several draw the global batch's and keep their rows.
        per_rank = global_batch // world_size
        self.global_batch = global_batch if world_size > 1 else None
        self.offset = rank * per_rank

    def __call__(self, images: torch.Tensor, step: int) -> Views:
        """Views of uint8 (B, H, W, C) images on the generator's device."""
        self.generator.manual_seed(augment_seed(self.seed, step))
        with record_function("fastclr.views"):
            views = two_views(images, self.cfg, self.generator, self.mean, self.std, self.channels_last,
                              self.global_batch, self.offset, self.render, self.views)
            if not self.local_views:
                return views
            if self.local_cfg is None:
                self.local_cfg = local_config(self.cfg, images.shape[1])
            small = two_views(images, self.local_cfg, self.generator, self.mean, self.std,
                              self.channels_last, self.global_batch, self.offset, self.render, self.local_views)
            return views, small
