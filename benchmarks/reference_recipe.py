"""The usual PyTorch SimCLR recipe, rebuilt from what installs here, as the baseline to beat.

Per-image PIL transforms in a `Dataset.__getitem__` (RandomResizedCrop, horizontal flip, colour
jitter with probability 0.8, ToTensor, Normalize: the torchvision pipeline of the SimCLR
tutorials, written with PIL because torchvision has no CPU build here), two views per image,
a `DataLoader` with 2 worker processes, and an fp32 model. Same encoder, head, loss, optimiser
and batch as fastclr's step, so the ratio isolates the data path and the arithmetic precision.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, Dataset

from fastclr.config import AugmentConfig


class PILTwoViews(Dataset):
    """Two independently augmented views of image i, each a float tensor (C, S, S)."""

    def __init__(self, images: np.ndarray, cfg: AugmentConfig, mean: float, std: float):
        self.images, self.cfg, self.mean, self.std = images, cfg, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def _crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        # torchvision.transforms.RandomResizedCrop.get_params, transcribed
        area = w * h
        for _ in range(10):
            target = area * random.uniform(self.cfg.scale_min, self.cfg.scale_max)
            ratio = math.exp(random.uniform(math.log(self.cfg.ratio_min), math.log(self.cfg.ratio_max)))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = random.randint(0, w - cw), random.randint(0, h - ch)
                return x, y, x + cw, y + ch
        return 0, 0, w, h

    def _view(self, img: Image.Image) -> torch.Tensor:
        c = self.cfg
        size = img.size[0]
        img = img.resize((size, size), Image.BILINEAR, box=self._crop_box(*img.size))
        if random.random() < c.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if random.random() < c.jitter_p:
            img = ImageEnhance.Brightness(img).enhance(random.uniform(max(0, 1 - c.brightness), 1 + c.brightness))
            img = ImageEnhance.Contrast(img).enhance(random.uniform(max(0, 1 - c.contrast), 1 + c.contrast))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return (x - self.mean) / self.std

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        arr = self.images[i]
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        return self._view(img), self._view(img)


def batches(images: np.ndarray, cfg: AugmentConfig, batch_size: int, workers: int = 2, seed: int = 0
            ) -> Iterator[torch.Tensor]:
    """Endless (2B, C, S, S) batches of view pairs from a shuffling DataLoader with `workers`."""
    mean, std = float(images.mean() / 255), float(images.std() / 255)
    loader = DataLoader(PILTwoViews(images, cfg, mean, std), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=lambda w: random.seed(seed * 100 + w))
    while True:
        for v1, v2 in loader:
            yield torch.cat([v1, v2])
