"""Recipe levers for the Fashion-MNIST CPU run, each measured for what it gives the encoder.

Each experiment is a set of config overrides, trained through `fastclr.pretrain` itself (the
CLI's draws; kNN monitor off) for a wall-clock budget or a fixed number of epochs, then measured
on frozen h exactly as `fastclr evaluate` does: the linear probe, weighted kNN (k 20, tau 0.07),
the 10-labels-per-class probe (3 subset seeds) and the same three for the same network at its
initial weights, with the lift (trained minus untrained). Appends one JSON line per experiment.

Fixed epochs compare recipes at equal steps whatever the machine is doing; convert to equal wall
time with the step times measured side by side (benchmarks/step_levers.py).

    python benchmarks/levers.py --budget 9.5 --out levers.jsonl "base:" "t0.2:train.temperature=0.2"
    python benchmarks/levers.py --epochs 6 "gap:model.cnn_stages=32|128|256" --seeds 0,1,2
    python benchmarks/levers.py --budget 9.5 "base:" "v24:augment.crop_size=24" --eval-sizes 28
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from fastclr.data import Dataset, load_data
from fastclr.evaluation.fewshot import fewshot_fit
from fastclr.evaluation.reference import untrained_encoder
from fastclr.evaluation.subsets import stratified_subset
from fastclr.evaluation.knn import knn_accuracy
from fastclr.presets import apply_preset
from fastclr.evaluation.probe import linear_probe
from fastclr.evaluation.features import extract_features
from fastclr.runtime import Precision
from fastclr.pretraining.loop import pretrain

from harness import describe, record


def quality(encoder: torch.nn.Module, ds: Dataset, mean: torch.Tensor, std: torch.Tensor, size: int,
            precision: Precision) -> dict[str, float]:
    """Linear probe, kNN and 10-labels-per-class accuracy (%) of frozen h, as `fastclr evaluate`."""
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    cpu = torch.device("cpu")
    ftr = extract_features(encoder, ds.train.images, mean, std, cpu, precision=precision, size=size)
    fte = extract_features(encoder, ds.test.images, mean, std, cpu, precision=precision, size=size)
    ytr, yte = torch.from_numpy(ds.train.labels), torch.from_numpy(ds.test.labels)
    linear = linear_probe(ftr, ytr, fte, yte, feature_dtype=precision.feature_dtype).accuracy
    knn = knn_accuracy(ftr, ytr, fte, yte, k=20, tau=0.07, precision=precision)
    few = []
    for seed in (0, 1, 2):
        idx = torch.from_numpy(stratified_subset(ds.train.labels, 10, seed))
        few.append(fewshot_fit(ftr[idx], ytr[idx], fte, yte, seed).accuracy)
    return {"linear": round(100 * linear, 2), "knn": round(100 * knn, 2), "few10": round(100 * float(np.mean(few)), 2)}


def spec_items(spec: str) -> list[tuple[str, str]]:
    """The (key, value) items of an experiment's spec "key=value,key=value", split at the commas
    that start a new key=, so a stage spec may hold commas (stages=32|64,64|flat0)."""
    return [(k, v) for k, _, v in (item.partition("=") for item in filter(None, re.split(r",(?=[\w.]+=)", spec)))]


def run(name: str, spec: str, budget: float, epochs: float, seed: int, ds: Dataset, untrained: bool,
        eval_sizes: tuple[int, ...] = ()) -> dict[str, Any]:
    """Train one configuration and return its measured outcome; `eval_sizes` measure the trained
    (and untrained) network again on whole images resized to each of those sides instead of the
    views' (a network trained on small views read at full size: Touvron et al. 2019, FixRes)."""
    overrides: dict[str, Any] = {"eval.monitor_every": 0, "eval.probe": False, "train.seed": seed,
                                 "train.run_dir": f"runs/levers/{name}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"}
    if budget > 0:
        overrides["train.time_budget"] = budget
    else:
        overrides["train.epochs"] = epochs
    for k, v in spec_items(spec):
        overrides["model.cnn_stages" if k == "stages" else k] = v
    cfg = apply_preset(overrides)
    t0 = time.perf_counter()
    res = pretrain(cfg, dataset=ds, progress=False, log=lambda s: None)
    assert res.model is not None
    enc_spec = res.model.spec
    mean, std = enc_spec.mean_tensor(), enc_spec.std_tensor()
    precision = res.precision or Precision("fp32", "not resolved")
    rec: dict[str, Any] = {"name": name, "spec": spec, "seed": seed, "budget_min": budget,
                           "epochs": None if budget else epochs,  # a budget's epochs are what it trained: steps
                           "steps": res.steps, "train_s": round(res.train_seconds, 1), "h_dim": enc_spec.feature_dim,
                           "precision": precision.name,
                           **quality(res.model.encoder, ds, mean, std, enc_spec.image_size, precision)}
    if untrained:
        ref = quality(untrained_encoder(enc_spec, seed, torch.device("cpu")), ds, mean, std, enc_spec.image_size,
                      precision)
        rec.update({f"untrained_{k}": v for k, v in ref.items()})
        rec["lift"] = round(rec["linear"] - ref["linear"], 2)
    for side in eval_sizes:
        at = quality(res.model.encoder, ds, mean, std, side, precision)
        if untrained:
            ref_at = quality(untrained_encoder(enc_spec, seed, torch.device("cpu")), ds, mean, std, side, precision)
            at.update({f"untrained_{k}": v for k, v in ref_at.items()}, lift=round(at["linear"] - ref_at["linear"], 2))
        rec[f"at{side}px"] = at
    rec.update(total_s=round(time.perf_counter() - t0, 1), threads=torch.get_num_threads(), machine=describe())
    return rec


Arm = Callable[[str], tuple[str, Callable[[], AbstractContextManager[object]], dict[str, Any]]]
"""What a benchmark wrapping this one makes of an experiment's spec: the spec to train, the context
to train it in, and fields for its record (temperature_schedule.py)."""


def main(arm: Arm | None = None, doc: str | None = __doc__) -> None:
    """Run the experiments named on the command line, one after the other (each through `arm`)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="+", help="name:key=value,key=value (config keys; stages= for the cnn shape)")
    p.add_argument("--budget", type=float, default=0.0, help="minutes of pretraining per experiment (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=6.0)
    p.add_argument("--seeds", default="0")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained reference (saves its probe)")
    p.add_argument("--eval-sizes", default="", help="also measure on whole images resized to these sides, e.g. 28")
    p.add_argument("--out", default="levers.jsonl")
    a = p.parse_args()
    ds = load_data(apply_preset({"data.name": a.data}).data)
    for exp in a.experiments:
        name, _, spec = exp.partition(":")
        spec, within, extra = arm(spec) if arm is not None else (spec, nullcontext, {})
        spec = f"data.name={a.data}," + spec if a.data != "fashion-mnist" else spec
        for seed in (int(s) for s in a.seeds.split(",")):
            with within():
                rec = run(name, spec, a.budget, a.epochs, seed, ds, not a.no_untrained,
                          tuple(int(v) for v in a.eval_sizes.split(",") if v))
            record(a.out, {**rec, **extra})


if __name__ == "__main__":
    main()
