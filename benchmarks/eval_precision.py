"""Does evaluating in bf16 cost accuracy? The same runs measured with `fastclr evaluate`'s
protocols (linear probe, weighted kNN k = 20 tau = 0.07, 10 labels per class over 3 subset seeds),
once with the precision `auto` resolves (bf16 on CPUs with native bf16: features computed under
bf16 autocast, the probe's standardised features stored in bf16) and once in fp32, for the trained
network and the same network untrained:

    python benchmarks/eval_precision.py runs/RUN [runs/RUN2 ...] --out eval-precision.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastclr.data import load_data
from fastclr.evaluation.reference import untrained_encoder
from fastclr.pretrained import load_run

from harness import describe
from readout_point import measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", type=Path, nargs="+")
    ap.add_argument("--precisions", default="auto,fp32")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    for run_dir in a.run_dirs:
        for asked in a.precisions.split(","):
            run = load_run(run_dir, precision=asked, log=lambda s: None)
            ds = load_data(run.config.data)
            networks = {"trained": run.encoder,
                        "untrained": untrained_encoder(run.spec, run.config.train.seed, torch.device("cpu"))}
            for which, encoder in networks.items():
                t0 = time.perf_counter()
                rec = {"benchmark": "eval_precision", "machine": describe(), "run": str(run_dir),
                       "seed": run.config.train.seed, "asked": asked, "precision": run.precision.name,
                       "network": which, **measure(encoder, run, ds), "seconds": round(time.perf_counter() - t0, 1)}
                print(json.dumps(rec), flush=True)
                with a.out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
