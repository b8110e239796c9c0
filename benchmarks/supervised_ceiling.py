"""What every label gives the run's encoder architecture in about the pretraining's wall time: the
supervised reference for the linear-probe target.

The run's encoder at random initialisation plus a linear head, trained end to end on all labelled
training images with `fastclr evaluate`'s from-scratch recipe (AdamW, warm-up then cosine, 2 px
shifts, the run's flips) for --steps steps; then its test accuracy, and the linear probe on its
frozen h, measured exactly as on a SimCLR encoder (`linear_probe`, the same features path). A
linear probe on self-supervised h rarely exceeds what the same network reaches with every label
(Chen et al. 2020, Table 6: SimCLR matched supervised ResNet-50 only with a 4x wider network), so
this bounds what the probe target asks.

    python benchmarks/supervised_ceiling.py runs/RUN --steps 14000 --out ceiling.jsonl
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from harness import describe, record

from fastclr.data import load_data
from fastclr.evaluation.classifier import fit_and_test
from fastclr.evaluation.features import extract_features
from fastclr.evaluation.options import EvaluateOptions
from fastclr.evaluation.probe import linear_probe
from fastclr.evaluation.run import labelled_splits
from fastclr.evaluation.supervised import scratch_network
from fastclr.pretrained import load_run


def main() -> None:
    """One JSON line: steps, seconds, end-to-end test accuracy, linear probe on the trained h."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a pretraining run: its encoder architecture, input statistics, data")
    ap.add_argument("--steps", type=int, default=14000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    run = load_run(a.run_dir, log=lambda s: None)
    device = torch.device("cpu")
    o = EvaluateOptions(steps=a.steps)
    recipe = o.recipe(run.config.augment.flip_p)  # evaluate's from-scratch recipe, run for --steps
    ds = load_data(run.config.data)
    setup = labelled_splits(run, ds, device, recipe, "")
    encoder, head = scratch_network(run.spec, setup, a.seed)  # as `evaluate`'s supervised baseline builds it
    t0 = time.perf_counter()
    result = fit_and_test(encoder, head, setup, np.arange(len(setup.train_labels)), a.seed)
    train_s = time.perf_counter() - t0

    def h(images: np.ndarray) -> torch.Tensor:
        return extract_features(encoder, images, run.mean, run.std, device, precision=run.precision,
                                size=run.spec.image_size)

    probe = linear_probe(h(setup.train_images), torch.from_numpy(setup.train_labels), h(setup.test_images),
                         torch.from_numpy(setup.test_labels), feature_dtype=run.precision.feature_dtype)
    record(a.out, {"benchmark": "supervised_ceiling", "machine": describe(), "run": str(a.run_dir),
                    "encoder": run.config.model.cnn_stages, "precision": run.precision.name, "steps": a.steps,
                    "epochs": round(a.steps * o.batch_size / len(setup.train_labels), 1),
                    "train_s": round(train_s, 1), "end_to_end": round(100 * result["accuracy"], 2),
                    "linear_probe_on_h": round(100 * probe.accuracy, 2), "probe_l2": probe.l2})


if __name__ == "__main__":
    main()
