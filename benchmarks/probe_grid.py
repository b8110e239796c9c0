"""Is the linear probe's L2 grid wide enough for the compact h? The probe as `evaluate` runs it
against a grid two decades weaker and against longer L-BFGS fits, on a run's h and on the same
network untrained (`fastclr.evaluation.reference.untrained_encoder`, the run's seed).

The default grid (1e-4 ... 1e-1) was sized on the 12,544-d readout, where 1e-4 was never picked;
on the 512-d h it is picked often, at the grid's edge, so a weaker penalty might fit better.

    base      the probe as `evaluate` runs it (`fastclr.evaluation.probe.L2_GRID`, the penalty of the
              lowest held-out cross-entropy since 2026-12-07)
    accuracy  the default grid, the penalty of the highest held-out accuracy (before 2026-12-07)
    weaker    the grid extended to 1e-6 and 1e-5
    weaker_it the extended grid with selection fits of 150 and a final fit of up to 1000 L-BFGS
              iterations (instead of 50 and 300)
    base_it   the default grid with those iterations

    python benchmarks/probe_grid.py runs/RUN [runs/RUN ...] [--variants base,accuracy]
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path

import torch

from fastclr.config import DataConfig
from fastclr.data import load_data
from fastclr.evaluation.features import features_of
from fastclr.evaluation.probe import L2_GRID, linear_probe, probe_record
from fastclr.evaluation.reference import untrained_encoder
from fastclr.export import load_encoder
from fastclr.runtime import resolve_precision

from harness import report

WEAKER = (1e-6, 1e-5, *L2_GRID)
LONGER = {"select_iter": 150, "max_iter": 1000}
VARIANTS: dict[str, dict[str, object]] = {
    "base": {},
    "accuracy": {"select_by": "accuracy"},
    "weaker": {"l2_grid": WEAKER},
    "weaker_it": {"l2_grid": WEAKER, **LONGER},
    "base_it": LONGER,
}


def main() -> None:
    """One JSON line per run, network (trained or untrained) and variant."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="+", help="Fashion-MNIST runs with encoder.safetensors")
    p.add_argument("--variants", default=",".join(VARIANTS), help="which of " + ", ".join(VARIANTS) + ", comma-separated")
    a = p.parse_args()
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    ds = load_data(DataConfig(name="fashion-mnist"))
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    ytr, yte = torch.from_numpy(ds.train.labels), torch.from_numpy(ds.test.labels)
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    for run in a.run_dirs:
        with open(run / "config.toml", "rb") as f:
            seed = tomllib.load(f)["train"]["seed"]
        trained, spec = load_encoder(run / "encoder.safetensors")
        for which, enc in (("trained", trained), ("untrained", untrained_encoder(spec, seed, cpu))):
            xtr = features_of(enc, spec, ds.train.images, cpu, precision)
            xte = features_of(enc, spec, ds.test.images, cpu, precision)
            for name in a.variants.split(","):
                kw = VARIANTS[name]
                t0 = time.perf_counter()
                r = linear_probe(xtr, ytr, xte, yte, feature_dtype=precision.feature_dtype, **kw)  # type: ignore[arg-type]
                report("probe_grid", {"run": str(run), "seed": seed, "network": which, "variant": name,
                                      "accuracy": r.accuracy, "l2": r.l2, "val_accuracy": r.val_accuracy,
                                      "val_loss": r.val_loss, "l2_path": probe_record(r)["l2_path"],
                                      "train_accuracy": r.train_accuracy, "probe_s": round(time.perf_counter() - t0, 1),
                                      "precision": precision.name, "features": list(xtr.shape)})


if __name__ == "__main__":
    main()
