"""BatchNorm statistics of clean images: does h improve when the encoder's running statistics are
recomputed on the un-augmented training images after pretraining?

Pretraining's BatchNorm layers keep running statistics of augmented views (crops, colour jitter,
solarisation, erasing), while every evaluation feeds clean images. Recomputing them on the clean
training images (no labels; a cumulative average over one pass, as "precise BN" of Wu and Johnson
2021, "Rethinking batch in BatchNorm") removes that mismatch. Measured on trained runs, for the
trained network and the same network untrained (each recalibrated alike), with `fastclr evaluate`'s
protocols (linear probe, weighted kNN k = 20 tau = 0.07, 10 labels per class over 3 subset seeds):

    python benchmarks/bn_recalibration.py runs/RUN [runs/RUN2 ...] --out bn-recalibration.jsonl
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from fastclr.data import load_data
from fastclr.evaluation.features import prepare_images
from fastclr.pretrained import load_run
from fastclr.runtime import Precision

from readout_point import measure_and_log, trained_and_untrained


@torch.no_grad()
def recalibrated(encoder: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int,
                 precision: Precision, batch_size: int = 1024) -> nn.Module:
    """A copy of `encoder` whose BatchNorm running statistics are the average over batches of
    clean `images` (uint8, N H W C) of the batch statistics; weights unchanged."""
    out = copy.deepcopy(encoder)
    norms = [m for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    out.train()
    for s in range(0, len(images), batch_size):
        x = prepare_images(images[s:s + batch_size], mean, std, size).contiguous(memory_format=torch.channels_last)
        with precision.autocast(x.device):
            out(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return out.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    for run_dir in a.run_dirs:
        run = load_run(run_dir, log=lambda s: None)
        ds = load_data(run.config.data)
        images = torch.from_numpy(ds.train.images)
        for which, encoder in trained_and_untrained(run).items():
            measure_and_log(a.out, "bn_recalibration", run_dir, run, ds, encoder, network=which, bn="as_trained")
            clean = recalibrated(encoder, images, run.mean, run.std, run.spec.image_size, run.precision)
            measure_and_log(a.out, "bn_recalibration", run_dir, run, ds, clean, network=which, bn="clean")


if __name__ == "__main__":
    main()
