"""Where h is read: after the readout's final ReLU (the default), before it (BatchNorm's output), or
after the projection head's first layer (SimCLRv2's middle of the head).

The default readout ends Linear -> BatchNorm -> ReLU, and h is the ReLU's output, as in the
paper's ResNets (pooled after the last ReLU). The ReLU zeroes about half of each unit's values and
with them the sign of the evidence; a linear probe on the BatchNorm output sees it. The head is
trained on the ReLU's output either way: this changes only what evaluation reads, so it is measured
on trained runs, for the trained network and the same network untrained (for `head1`, a head
freshly initialised under the run's seed), with the protocols of
`fastclr evaluate` (linear probe, weighted kNN k = 20 tau = 0.07, 10 labels per class over 3
subset seeds):

    python benchmarks/readout_point.py runs/RUN [runs/RUN2 ...] [--points after_relu,before_relu,head1] --out readout-point.jsonl
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastclr.data import load_data
from fastclr.evaluation.features import extract_features
from fastclr.evaluation.fewshot import fewshot_fit
from fastclr.evaluation.knn import knn_accuracy
from fastclr.evaluation.probe import linear_probe
from fastclr.evaluation.reference import untrained_encoder
from fastclr.evaluation.subsets import stratified_subset
from fastclr.models.head import ProjectionHead
from fastclr.pretrained import load_run, trained_head
from fastclr.semisup.network import neck_of

from harness import describe, record


def before_last_relu(encoder: nn.Module) -> nn.Module:
    """A copy of `encoder` whose last ReLU is the identity (h = the readout's BatchNorm output)."""
    out = copy.deepcopy(encoder)
    last = [name for name, m in out.named_modules() if isinstance(m, nn.ReLU)][-1]
    parent, _, child = last.rpartition(".")
    setattr(out.get_submodule(parent) if parent else out, child, nn.Identity())
    return out


def measure(encoder: nn.Module, run: Any, ds: Any) -> dict[str, float]:
    """`evaluate`'s linear probe, kNN and 10-label figures of one network's h."""
    device = torch.device("cpu")
    xtr, xte = (extract_features(encoder, images, run.mean, run.std, device, precision=run.precision,
                                 size=run.spec.image_size).float() for images in (ds.train.images, ds.test.images))
    ytr, yte = torch.from_numpy(ds.train.labels), torch.from_numpy(ds.test.labels)
    few = [100 * fewshot_fit(xtr[idx], ytr[idx], xte, yte, seed).accuracy
           for seed in range(3) for idx in [torch.from_numpy(stratified_subset(ds.train.labels, 10, seed))]]
    return {"linear": round(100 * linear_probe(xtr, ytr, xte, yte, feature_dtype=run.precision.feature_dtype).accuracy, 2),
            "knn": round(100 * knn_accuracy(xtr, ytr, xte, yte, 20, 0.07, run.precision), 2),
            "few10": round(float(np.mean(few)), 2)}


def trained_and_untrained(run: Any) -> dict[str, nn.Module]:
    """The run's encoder and the same architecture at its initial weights (`evaluate`'s reference)."""
    return {"trained": run.encoder,
            "untrained": untrained_encoder(run.spec, run.config.train.seed, torch.device("cpu"))}


def measure_and_log(out: Path, benchmark: str, run_dir: Path, run: Any, ds: Any, net: nn.Module,
                    **fields: Any) -> dict[str, Any]:
    """`measure` one network of a run, timed; print the record and append it to `out` as a JSON line."""
    t0 = time.perf_counter()
    rec = {"benchmark": benchmark, "machine": describe(), "run": str(run_dir), "seed": run.config.train.seed,
           **fields, **measure(net.eval(), run, ds), "seconds": round(time.perf_counter() - t0, 1)}
    record(out, rec)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--points", default="after_relu,before_relu,head1")
    a = ap.parse_args()
    unknown = set(a.points.split(",")) - {"after_relu", "before_relu", "head1"}
    if unknown:  # a misspelt point measured nothing, and said nothing
        ap.error(f"--points {','.join(sorted(unknown))}: not a readout point; choose from after_relu, before_relu, head1")
    for run_dir in a.run_dirs:
        run = load_run(run_dir, log=lambda s: None)
        ds = load_data(run.config.data)
        networks = trained_and_untrained(run)
        m = run.config.model
        torch.manual_seed(run.config.train.seed)
        heads = {"trained": trained_head(run, torch.device("cpu")),
                 "untrained": ProjectionHead(run.spec.feature_dim, m.head_hidden or run.spec.feature_dim, m.proj_dim,
                                             m.head_layers, m.head_bn).eval()}
        for which, encoder in networks.items():
            head = heads[which]
            assert head is not None, f"{run_dir} has no checkpoint with its projection head"
            nets = {"after_relu": encoder, "before_relu": before_last_relu(encoder),
                    "head1": nn.Sequential(encoder, neck_of(head, 1))}
            for point, net in nets.items():
                if point not in a.points.split(","):
                    continue
                measure_and_log(a.out, "readout_point", run_dir, run, ds, net, network=which, h=point)


if __name__ == "__main__":
    main()
