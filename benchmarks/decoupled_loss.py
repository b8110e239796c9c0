"""`levers.py` with the decoupled contrastive loss (Yeh et al. 2022, DCL) in place of NT-Xent: a
recipe lever measured, not a fastclr option (it did not win; docs/benchmarks.md section 3).

DCL drops the positive from NT-Xent's denominator: l_i = -s_ij / t + log sum_{k != i, j} exp(s_ik / t),
which its authors found to help most at small batches. Everything else is `levers.py` (same
arguments); the plain single-process loss of the step is replaced for this process only.

    python benchmarks/decoupled_loss.py --epochs 12 --no-untrained --out dcl.jsonl "dcl:" "dcl-t0.2:train.temperature=0.2"
"""

from __future__ import annotations

import torch

import fastclr.pretraining.step as step
from fastclr.pretraining.losses import contrastive_metrics, nt_xent_logits
from fastclr.pretraining.step import Metrics
from fastclr.scaleout.distributed import DistContext

import levers


def decoupled_loss(z: torch.Tensor, temperature: float, block: int, ctx: DistContext) -> tuple[torch.Tensor, Metrics]:
    """DCL of z (2B, D) = [view 1; view 2] on one process, and NT-Xent's contrastive metrics."""
    if block or ctx.active:
        raise SystemExit("decoupled_loss.py measures the single-process plain loss only (no loss_block, no torchrun)")
    z1, z2 = z.chunk(2)
    logits, target = nt_xent_logits(z1, z2, temperature)  # the anchor's own column already masked
    positive = logits.gather(1, target[:, None]).squeeze(1)
    negatives = logits.scatter(1, target[:, None], torch.finfo(logits.dtype).min)
    return (negatives.logsumexp(1) - positive).mean(), contrastive_metrics(logits.detach(), target)


if __name__ == "__main__":
    step.contrastive_loss = decoupled_loss
    levers.main()
