"""Asymmetric views as a recipe lever: the first view of every image is the weak one (no
solarisation, no erasing), the second carries both at twice the default probability, so each op
is applied as often over the batch as in the default. BYOL (Grill et al. 2020, table 6) gives its
two views different blur and solarisation probabilities; here the default's symmetric draws are
split between the views instead. Crop, flip, colour jitter and grayscale stay symmetric.

Trained and measured as `levers.py` does (the same `run`); the view parameters are drawn by the
product's `view_params` with the doubled probabilities, then the first views' solarisation and
erasing are switched off, so every other draw of a step is the default's.

    python benchmarks/asymmetric_lever.py --epochs 12 --out asymmetric-levers-12-epochs.jsonl
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

import fastclr.augment as augment_mod
from fastclr.augment import ViewParams
from fastclr.config import AugmentConfig
from fastclr.data import load_data
from fastclr.presets import apply_preset

from harness import record
from levers import run


def weak_first(draw: Callable[..., ViewParams]) -> Callable[..., ViewParams]:
    """`view_params` whose first views have no solarisation or erasing and whose second views have
    each at twice the recipe's probability (capped at 1)."""

    def view_params(shape: Any, cfg: AugmentConfig, generator: torch.Generator, device: torch.device,
                    global_batch: int | None = None, offset: int = 0, views: int = 2) -> ViewParams:
        doubled = replace(cfg, solarize_p=min(1.0, 2 * cfg.solarize_p), erase_p=min(1.0, 2 * cfg.erase_p))
        p = draw(shape, doubled, generator, device, global_batch, offset, views)
        first = (torch.arange(p.box.shape[0], device=device) < shape[0])  # rows [0, B): view 1 of each image
        p.solarize = p.solarize & ~first
        if p.erase is not None:
            p.erase = torch.where(first[:, None], torch.zeros_like(p.erase), p.erase)  # zero size: nothing erased
        return p

    return view_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=12.0)
    ap.add_argument("--budget", type=float, default=0.0)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="asymmetric-levers.jsonl")
    a = ap.parse_args()
    ds = load_data(apply_preset({}).data)
    original = augment_mod.view_params
    for seed in (int(s) for s in a.seeds.split(",")):
        augment_mod.view_params = weak_first(original)
        try:
            rec = run("asym-weak-first", "", a.budget, a.epochs, seed, ds, untrained=False)
        finally:
            augment_mod.view_params = original
        record(a.out, rec)


if __name__ == "__main__":
    main()
