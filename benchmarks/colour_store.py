"""A 32 px, 3-channel store made from Fashion-MNIST (or MNIST): the ResNet path with the CIFAR stem
exercised for accuracy on a CPU, with data that exists here (CIFAR-10 cannot be downloaded offline).

Every image is resized 28 -> 32 px (bilinear, the whole image) and coloured with its own random
colour transform: the gray value g in [0, 1] becomes (1 - g) * background + g * foreground, two
RGB colours drawn per image (foreground brighter than the background on average, so the item stays
visible), then a random per-channel gain in [0.8, 1.2]. Colour then carries no class information
and the encoder must see through it, as SimCLR's colour jitter teaches. Labels and splits are the
dataset's own; the draws are fixed by --seed.

    python benchmarks/colour_store.py --out stores/fashion32c
    fastclr pretrain --data stores/fashion32c          # resnet18 with the CIFAR stem at 32 px
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastclr.data import load_builtin
from fastclr.data.store import StoreWriter
from fastclr.ingest.builtin import block_rows, builtin_blocks


def colourise(gray: np.ndarray, rng: np.random.Generator, size: int = 32, chunk: int = 4096) -> np.ndarray:
    """uint8 (N, H, W, 1) -> uint8 (N, size, size, 3), each image its own random colours."""
    out = np.empty((len(gray), size, size, 3), np.uint8)
    for s in range(0, len(gray), chunk):
        g = torch.from_numpy(gray[s:s + chunk, ..., 0]).float()[:, None] / 255  # (B, 1, H, W)
        g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        b = len(g)
        bg = torch.from_numpy(rng.uniform(0.0, 0.6, (b, 3, 1, 1))).float()
        fg = torch.from_numpy(rng.uniform(0.4, 1.0, (b, 3, 1, 1))).float()
        gain = torch.from_numpy(rng.uniform(0.8, 1.2, (b, 3, 1, 1))).float()
        rgb = ((1 - g) * bg + g * fg) * gain  # (B, 3, S, S)
        out[s:s + chunk] = (rgb.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return out


def main() -> None:
    """Write the coloured store and print where it is."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    ds = load_builtin(a.source)
    rng = np.random.default_rng(a.seed)
    writer = StoreWriter(Path(a.out), a.size, 3)
    try:
        blocks = builtin_blocks(ds)
        rows = iter(block_rows(blocks, ds.classes))
        for _, block in blocks:
            for image in colourise(block.images, rng, a.size):
                writer.append(image, dict(next(rows), width=a.size, height=a.size, mode="RGB"))
        writer.commit(ds.classes, {"builtin": f"{a.source}, coloured at {a.size} px (benchmarks/colour_store.py, "
                                              f"seed {a.seed})", "size": a.size, "channels": "3"}, [], a.source)
    except BaseException:
        writer.abort()
        raise
    print(f"store {a.out}: {writer.n} images, {a.size} px RGB, from {a.source}")


if __name__ == "__main__":
    main()
