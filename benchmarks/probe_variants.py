"""Variants of the linear probe on one trained Fashion-MNIST encoder: accuracy and seconds each.

The features are extracted once (bf16, as `pretrain` does); every variant then runs
`fastclr.evaluation.probe.linear_probe` on them or on a variant of them:

    base        the probe as `pretrain` runs it
    fine        L2 grid with half-decade steps (1e-4, 3e-4, ..., 1e-1) instead of decades
    prerelu     h taken before the encoder's last ReLU (the BatchNorm output)
    flipavg     h averaged over the image and its mirror image, train and test (test-time
                augmentation: reported, not used for any headline figure)
    iters:S/M   selection fits of S L-BFGS iterations, final fit of at most M
    fullgrid    every L2 of the grid fitted (no stop at the first fall of held-out accuracy)
    flipfinal   L2 selected as in base, then the final fit on the training images plus their mirror
                images (2N rows, the paper's flip augmentation of the probe's training data)

    python benchmarks/probe_variants.py runs/levers/w256-s0 --stages "32|256|flat0" base iters:50/150
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from fastclr.config import DataConfig
from fastclr.data import load_data
from fastclr.models.cnn import SmallCNN
from fastclr.evaluation.probe import fit_logistic_regression, linear_probe
from fastclr.evaluation.features import extract_features
from fastclr.runtime import Precision

from harness import report

FINE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def main() -> None:
    """One JSON line per variant."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run with encoder.safetensors (a SmallCNN)")
    p.add_argument("variants", nargs="+")
    p.add_argument("--stages", default="32|256|flat0", help="the SmallCNN stage spec the run trained")
    a = p.parse_args()
    ds = load_data(DataConfig(name="fashion-mnist"))
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    path = a.run_dir / "encoder.safetensors"
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {})["fastclr"])
    enc = SmallCNN(1, 1.0, a.stages)
    enc.load_state_dict(load_file(str(path)))
    mean, std = torch.tensor(info["mean"]), torch.tensor(info["std"])
    ytr, yte = torch.from_numpy(ds.train.labels), torch.from_numpy(ds.test.labels)
    cpu = torch.device("cpu")

    def features(encoder: nn.Module, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        tr, te = ds.train.images, ds.test.images
        if flip:  # (N, H, W, C): mirror the W axis
            tr, te = np.ascontiguousarray(tr[:, :, ::-1]), np.ascontiguousarray(te[:, :, ::-1])
        return (extract_features(encoder, tr, mean, std, cpu, precision=Precision("bf16", "benchmark")),
                extract_features(encoder, te, mean, std, cpu, precision=Precision("bf16", "benchmark")))

    ftr, fte = features(enc)
    for variant in a.variants:
        xtr, xte, kw = ftr, fte, {}
        if variant == "fine":
            kw = {"l2_grid": FINE_GRID}
        elif variant == "prerelu":
            relu = enc.features[-1]
            enc.features[-1] = nn.Identity()
            xtr, xte = features(enc)
            enc.features[-1] = relu
        elif variant == "flipavg":
            mtr, mte = features(enc, flip=True)
            xtr, xte = (ftr + mtr) / 2, (fte + mte) / 2
        elif variant.startswith("iters:"):
            s, m = variant[6:].split("/")
            kw = {"select_iter": int(s), "max_iter": int(m)}
        elif variant == "fullgrid":
            kw = {"stop_early": False}
        elif variant != "base" and variant != "flipfinal":
            raise SystemExit(f"unknown variant {variant!r}")
        t0 = time.perf_counter()
        r = linear_probe(xtr, ytr, xte, yte, feature_dtype=torch.bfloat16, **kw)  # type: ignore[arg-type]
        if variant == "flipfinal":
            mtr, _ = features(enc, flip=True)
            both = torch.cat([xtr.bfloat16(), mtr.bfloat16()])  # bf16 rows: 2 x 60000 x 12544 in fp32 is 6 GB
            m = fit_logistic_regression(both, torch.cat([ytr, ytr]), 10, r.l2, feature_dtype=torch.bfloat16)
            r = type(r)(m.accuracy(xte, yte), r.l2, r.val_accuracy, m.accuracy(xtr, ytr))
        report("probe_variants", {"run": str(a.run_dir), "variant": variant, "accuracy": r.accuracy, "l2": r.l2,
                                  "val_accuracy": r.val_accuracy, "train_accuracy": r.train_accuracy,
                                  "probe_s": round(time.perf_counter() - t0, 1), "features": list(xtr.shape)})


if __name__ == "__main__":
    main()
