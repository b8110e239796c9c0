"""Random rotation as a recipe lever: each view, after its crop, is rotated by an angle drawn
uniformly from [-D, D] degrees with probability p (bilinear, the corners filled with 0, the
background of Fashion-MNIST and MNIST), as torchvision's RandomRotation would; not a SimCLR
augmentation (Chen et al. 2020 list crop, flip, colour, blur), but a natural invariance for
centred garments and digits. Trained and measured as `levers.py` does (the same `run`), with the
product's crop-resize-flip wrapped for the run; the angles come from their own generator seeded
with the run's seed, drawn once per step, so every other draw of the run is the default's.

    python benchmarks/rotation_lever.py --epochs 12 --degrees 15 --p 1.0 --out rotation-levers.jsonl
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastclr.augment as augment_mod
from fastclr.data import load_data
from fastclr.presets import apply_preset

from harness import record
from levers import run


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) rotated by `degrees` (B,) about the centre (positive: clockwise as displayed, rows
    going down); what comes from outside the image is 0."""
    a = degrees * (math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    # affine_grid maps output to input coordinates: the inverse rotation (by -a) of the output grid.
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotating(crop: Callable[..., torch.Tensor], max_degrees: float, p: float, seed: int) -> Callable[..., torch.Tensor]:
    """`crop` followed by a random rotation of each view."""
    g = torch.Generator().manual_seed(10_007 + seed)

    def crop_then_rotate(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
        out = crop(x, box, flip, size)
        n = out.shape[0]
        angle = (2 * torch.rand(n, generator=g) - 1) * max_degrees * (torch.rand(n, generator=g) < p)
        return rotate(out, angle.to(out.device))

    return crop_then_rotate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=12.0)
    ap.add_argument("--budget", type=float, default=0.0)
    ap.add_argument("--degrees", type=float, default=15.0)
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="rotation-levers.jsonl")
    a = ap.parse_args()
    ds = load_data(apply_preset({}).data)
    original = augment_mod.crop_resize_flip
    for seed in (int(s) for s in a.seeds.split(",")):
        augment_mod.crop_resize_flip = rotating(original, a.degrees, a.p, seed)
        try:
            rec = run(f"rot{a.degrees:g}p{a.p:g}", "", a.budget, a.epochs, seed, ds, untrained=False)
        finally:
            augment_mod.crop_resize_flip = original
        rec.update(rotate_degrees=a.degrees, rotate_p=a.p)
        record(a.out, rec)


if __name__ == "__main__":
    main()
