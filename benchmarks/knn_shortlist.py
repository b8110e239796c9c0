"""kNN on one trained Fashion-MNIST encoder's features: exact fp32 similarities against the bf16
shortlist re-scored in fp32 (`fastclr.evaluation.knn.knn_predict(shortlist=...)`): seconds, accuracy, and
the fraction of the 10k test predictions equal to the exact ones.

    python benchmarks/knn_shortlist.py runs/fashion-mnist-...     # a run with encoder.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from fastclr.evaluation.knn import knn_predict

from harness import report
from run_features import run_features


def main() -> None:
    """One JSON line per shortlist setting (0 = exact)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--shortlists", default="0,2,4")
    a = p.parse_args()
    ftr, ytr, fte, yte = run_features(a.run_dir)
    exact = None
    for sl in (int(s) for s in a.shortlists.split(",")):
        t0 = time.perf_counter()
        pred = knn_predict(ftr, ytr, fte, 20, 0.07, 10, shortlist=sl)
        secs = time.perf_counter() - t0
        exact = pred if sl == 0 else exact
        report("knn_shortlist", {"run": str(a.run_dir), "shortlist": sl, "features": list(ftr.shape), "knn_s": round(secs, 1),
                                 "accuracy": float((pred == yte).float().mean()),
                                 "same_as_exact": None if exact is None else float((pred == exact).float().mean())})


if __name__ == "__main__":
    main()
