"""Linear probe on fp32 against bf16 features of one trained encoder: accuracy and seconds.

The L-BFGS passes of the probe are memory-bound on the (N, D) feature matrix; storing it in bf16
halves the bytes read per pass. Same features, same L2 path, same seed: only the dtype differs.

    python benchmarks/probe_dtype.py runs/fashion-mnist-...      # a run with encoder.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastclr.evaluation.probe import linear_probe

from harness import report
from run_features import run_features


def main() -> None:
    """One JSON line per feature dtype."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", default="fashion-mnist")
    a = p.parse_args()
    ftr, ytr, fte, yte = run_features(a.run_dir, a.data)
    for dtype in (torch.float32, torch.bfloat16):
        t0 = time.perf_counter()
        r = linear_probe(ftr, ytr, fte, yte, feature_dtype=dtype)
        report("probe_dtype", {"run": str(a.run_dir), "feature_dtype": str(dtype), "accuracy": r.accuracy, "l2": r.l2,
                               "probe_s": round(time.perf_counter() - t0, 1), "features": list(ftr.shape)})


if __name__ == "__main__":
    main()
