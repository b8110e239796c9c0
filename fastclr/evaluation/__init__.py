"""Measuring what an encoder learned: `fastclr evaluate` and its protocols.

    evaluate(run_dir, EvaluateOptions(...))   every protocol on a run; writes RUN_DIR/eval.json
    stratified_subset                         the fixed, stratified label subsets they share
    alignment, uniformity, effective_rank     label-free quality of features
"""

from fastclr.evaluation.options import EvaluateOptions
from fastclr.evaluation.quality import alignment, effective_rank, uniformity
from fastclr.evaluation.run import evaluate
from fastclr.evaluation.subsets import stratified_subset

__all__ = ["EvaluateOptions", "alignment", "effective_rank", "evaluate", "stratified_subset",
           "uniformity"]
