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

from fastclr.config import DataConfig
from fastclr.data import load_data
from fastclr.export import load_encoder
from fastclr.probe import extract_features, linear_probe

from machine import report


def main() -> None:
    """One JSON line per feature dtype."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", default="fashion-mnist")
    a = p.parse_args()
    ds = load_data(DataConfig(name=a.data))
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    enc, info = load_encoder(a.run_dir / "encoder.safetensors")
    enc.eval()
    mean, std = torch.tensor(info["mean"]), torch.tensor(info["std"])
    kw = dict(precision="bf16", size=0, channels_last=True)
    ftr = extract_features(enc, ds.train.images, mean, std, torch.device("cpu"), **kw)
    fte = extract_features(enc, ds.test.images, mean, std, torch.device("cpu"), **kw)
    for dtype in (torch.float32, torch.bfloat16):
        t0 = time.perf_counter()
        r = linear_probe(ftr, torch.from_numpy(ds.train.labels), fte, torch.from_numpy(ds.test.labels), feature_dtype=dtype)
        report("probe_dtype", {"run": str(a.run_dir), "feature_dtype": str(dtype), "accuracy": r.accuracy, "l2": r.l2,
                               "probe_s": round(time.perf_counter() - t0, 1), "features": list(ftr.shape)})


if __name__ == "__main__":
    main()
