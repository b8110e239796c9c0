"""Linear-probe accuracy of the default recipe at fixed wall-clock budgets of pretraining.

Each budget is one `fastclr pretrain` run with `--time-budget B` (the cosine schedule fitted to B
minutes of training) and otherwise the defaults; the probe (frozen h, all training labels,
accuracy on the test split) is computed after the clock stops, as the issue asks.

    python benchmarks/time_to_accuracy.py                      # budgets 2, 5, 10 minutes, seed 0
    python benchmarks/time_to_accuracy.py --budgets 9.5 --seeds 0,1,2   # stability of the default
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness import report

from fastclr.presets import apply_preset
from fastclr.pretraining.loop import pretrain


def main() -> None:
    """One JSON line per (budget, seed): steps, epochs, training seconds, probe accuracy."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--budgets", default="2,5,10", help="minutes of pretraining, comma-separated")
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default="runs/time-to-accuracy")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    a = p.parse_args()
    accs: dict[float, list[float]] = {}
    for budget in (float(b) for b in a.budgets.split(",")):
        for seed in (int(s) for s in a.seeds.split(",")):
            run = Path(a.out) / f"b{budget:g}-s{seed}"
            overrides = {"data.name": a.data, "train.time_budget": budget, "train.seed": seed,
                         "train.run_dir": str(run), **dict(kv.split("=", 1) for kv in a.set)}
            t0 = time.perf_counter()
            res = pretrain(apply_preset(overrides), progress=False, log=lambda s: None)
            probe = json.loads((run / "probe.json").read_text())
            accs.setdefault(budget, []).append(probe["accuracy"])
            report("time_to_accuracy", {"data": a.data, "budget_min": budget, "seed": seed, "steps": res.steps,
                                        "train_s": round(res.train_seconds, 1), "probe_s": round(probe["probe_seconds"], 1),
                                        "wall_s": round(time.perf_counter() - t0, 1), "probe_accuracy": probe["accuracy"],
                                        "run_dir": str(run)})
    for budget, values in accs.items():
        if len(values) > 1:
            report("time_to_accuracy", {"budget_min": budget, "seeds": len(values), "min": min(values),
                                        "max": max(values), "spread_points": 100 * (max(values) - min(values))})


if __name__ == "__main__":
    main()
