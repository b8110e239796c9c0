"""Does evaluating in bf16 cost accuracy? The same runs measured with `fastclr evaluate`'s
protocols (linear probe, weighted kNN k = 20 tau = 0.07, 10 labels per class over 3 subset seeds),
once with the precision `auto` resolves (bf16 on CPUs with native bf16: features computed under
bf16 autocast, the probe's standardised features stored in bf16) and once in fp32, for the trained
network and the same network untrained:

    python benchmarks/eval_precision.py runs/RUN [runs/RUN2 ...] --out eval-precision.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path


from fastclr.data import load_data
from fastclr.pretrained import load_run

from readout_point import measure_and_log, trained_and_untrained


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
            for which, encoder in trained_and_untrained(run).items():
                measure_and_log(a.out, "eval_precision", run_dir, run, ds, encoder, asked=asked,
                                precision=run.precision.name, network=which)


if __name__ == "__main__":
    main()
