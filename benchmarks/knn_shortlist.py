"""kNN on one trained Fashion-MNIST encoder's features: exact fp32 similarities against the bf16
shortlist re-scored in fp32 (`fastclr.evaluation.knn.knn_predict(shortlist=..., precision=bf16)`, as
evaluation runs it where bf16 is native): seconds, accuracy, and the fraction of the 10k test
predictions equal to the exact ones. Each setting is timed `--rounds` times, alternating.

    python benchmarks/knn_shortlist.py runs/fashion-mnist-...     # a run with encoder.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from fastclr.evaluation.knn import knn_predict
from fastclr.runtime import Precision, bf16_native_on

from harness import report
from run_features import run_features


def main() -> None:
    """One JSON line per shortlist setting (0 = exact)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--shortlists", default="0,2,4")
    p.add_argument("--rounds", type=int, default=1)
    a = p.parse_args()
    ftr, ytr, fte, yte = run_features(a.run_dir)
    exact = knn_predict(ftr, ytr, fte, 20, 0.07, 10, shortlist=0)
    bf16 = Precision("bf16", "the shortlist's")  # taken only where bf16 is native (cosine_topk)
    for rnd in range(1, a.rounds + 1):
        for sl in (int(s) for s in a.shortlists.split(",")):
            t0 = time.perf_counter()
            pred = knn_predict(ftr, ytr, fte, 20, 0.07, 10, shortlist=sl, precision=bf16)
            secs = time.perf_counter() - t0
            report("knn_shortlist", {"run": str(a.run_dir), "round": rnd, "shortlist": sl, "features": list(ftr.shape),
                                     "bf16_native": bf16_native_on("cpu"), "knn_s": round(secs, 2),
                                     "accuracy": float((pred == yte).float().mean()),
                                     "same_as_exact": float((pred == exact).float().mean())})


if __name__ == "__main__":
    main()
