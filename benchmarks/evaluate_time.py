"""Time `fastclr evaluate` (and `fastclr report`) on a run: the issue's budget is the default
evaluation of the default Fashion-MNIST run in at most 10 minutes on 2 CPU cores.

    python benchmarks/evaluate_time.py RUN_DIR                 # the default protocols and budgets
    python benchmarks/evaluate_time.py RUN_DIR --tiny          # a seconds-long check of this script
    python benchmarks/evaluate_time.py RUN_DIR --report        # also time `fastclr report`

Prints one JSON line (see benchmarks/machine.py) with the seconds of every protocol, the total,
the headline numbers, and the 10-minute verdict. The run's eval.json is overwritten, as
`fastclr evaluate` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import report  # noqa: E402

from fastclr.evaluation.options import EvaluateOptions  # noqa: E402
from fastclr.evaluation.run import evaluate  # noqa: E402

BUDGET_SECONDS = 600
# A quick pass to check this script, not to measure the defaults: every protocol but the
# all-label linear probe, whose cost (L-BFGS on every training feature) no option shrinks.
TINY = dict(protocols=("knn", "fewshot", "supervised", "finetune", "quality"), labels_per_class=(10,), seeds=(0,),
            supervised_seeds=(0,), finetune_fractions=(0.01,), steps=5, quality_images=256)


def main() -> None:
    """Parse, evaluate, print the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--tiny", action="store_true", help="tiny budgets: checks the script in seconds")
    ap.add_argument("--report", action="store_true", help="also time `fastclr report`")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    opts = EvaluateOptions(device=args.device, threads=args.threads)
    if args.tiny:
        opts = dataclasses.replace(opts, **TINY)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    out = evaluate(Path(args.run_dir), opts, log=lambda s: print(s, file=sys.stderr))
    total = time.perf_counter() - t0
    p = out["protocols"]
    fields = {
        "run_dir": args.run_dir, "tiny": args.tiny, "threads": out["environment"]["threads"],
        "device": out["environment"]["device"],
        "seconds": {k: round(v, 1) for k, v in out["seconds"].items()}, "total_seconds": round(total, 1),
        "within_10_minutes": total <= BUDGET_SECONDS,
        "linear": p.get("linear", {}).get("accuracy"), "knn": p.get("knn", {}).get("accuracy"),
        "fewshot": {e["labels_per_class"]: round(e["mean"], 4) for e in p.get("fewshot", {}).get("curve", [])},
        "supervised": {e["labels_per_class"]: round(e["mean"], 4) for e in p.get("supervised", {}).get("curve", [])},
        "finetune": {e["fraction"]: round(e["mean"], 4) for e in p.get("finetune", {}).get("fractions", [])},
    }
    if args.report:
        from fastclr.report.build import build_report

        t1 = time.perf_counter()
        build_report(Path(args.run_dir), device=args.device, threads=args.threads)
        fields["report_seconds"] = round(time.perf_counter() - t1, 1)
    report("evaluate_time", fields)


if __name__ == "__main__":
    main()
