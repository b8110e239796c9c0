"""Measure recipe levers for the Fashion-MNIST CPU run: each experiment is a set of config
overrides (plus, optionally, a SmallCNN stage spec), trained for a fixed wall-clock budget, then
linear-probed. Appends one JSON line per experiment to --out.

    python benchmarks/levers.py --budget 5 --out levers.jsonl \
        "base:" "t0.1:train.temperature=0.1" "wide:stages=64|128|512"
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from typing import Any

import torch

from fastclr.models.cnn import SmallCNN
from fastclr.presets import apply_preset
from fastclr.train import pretrain


def run(name: str, spec: str, budget: float, epochs: float, seed: int) -> dict[str, Any]:
    """Train one configuration and return its measured outcome."""
    overrides: dict[str, Any] = {"eval.monitor_every": 0, "train.seed": seed, "train.run_dir": f"runs/levers/{name}-s{seed}"}
    if budget > 0:
        overrides["train.time_budget"] = budget
    else:
        overrides["train.epochs"] = epochs
    s2d = True
    # Items split at commas that start a new key=, so a stage spec may hold commas (32|64,64|flat0).
    for item in filter(None, re.split(r",(?=[\w.]+=)", spec)):
        k, _, v = item.partition("=")
        if k == "stages":  # the CLI's --cnn-stages: built by pretrain itself, so the draws equal the CLI's
            overrides["model.cnn_stages"] = v
        elif k == "s2d":
            s2d = v == "1"
        else:
            overrides[k] = v
    cfg = apply_preset(overrides)
    encoder = None
    if not s2d:  # not a config option: a custom encoder module (drawn before pretrain seeds)
        encoder = SmallCNN(1, cfg.model.width, cfg.model.cnn_stages, space_to_depth=False)
    t0 = time.perf_counter()
    res = pretrain(cfg, encoder=encoder, progress=False, log=lambda s: None)
    return {"name": name, "spec": spec, "seed": seed, "budget_min": budget, "steps": res.steps,
            "train_s": round(res.train_seconds, 1), "total_s": round(time.perf_counter() - t0, 1),
            "probe_acc": res.probe_accuracy, "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


def main() -> None:
    """Run the experiments named on the command line, one after the other."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("experiments", nargs="+", help="name:key=value,key=value (config keys, or stages=/s2d=)")
    p.add_argument("--budget", type=float, default=5.0, help="minutes of training per experiment (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default="levers.jsonl")
    a = p.parse_args()
    for exp in a.experiments:
        name, _, spec = exp.partition(":")
        for seed in (int(s) for s in a.seeds.split(",")):
            rec = run(name, spec, a.budget, a.epochs, seed)
            print(json.dumps(rec), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
