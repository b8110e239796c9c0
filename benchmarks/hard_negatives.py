"""`levers.py` with the hard-negative contrastive loss (Robinson et al. 2021, HCL) in place of NT-Xent:
a recipe lever measured, not a fastclr option (docs/benchmarks.md section 3).

HCL weighs each negative k of anchor i by exp(beta * s_ik / t), normalised to mean 1 over the
anchor's N = 2B - 2 negatives, so the negatives most similar to the anchor count most; with
tau_plus > 0 it also subtracts the expected share of same-class "negatives" (the debiased loss of
Chuang et al. 2020; tau_plus is the class prior, 0.1 for Fashion-MNIST's ten balanced classes):
    w_k = e^{beta s_ik / t},
    Ng = (N sum_k w_k e^{s_ik/t} / sum_k w_k - tau_plus N e^{s_ij/t}) / (1 - tau_plus)   (the paper's eq. 5),
    l_i = -log(e^{s_ij/t} / (e^{s_ij/t} + max(Ng, N e^{-1/t}))),
with the weighted sum in log space.
beta = 0 and tau_plus = 0 give NT-Xent exactly (checked before the runs). Everything else is
`levers.py` (same arguments); the plain single-process loss of the step is replaced for this
process only.

    python benchmarks/hard_negatives.py --beta 1 --tau-plus 0.1 --epochs 12 --no-untrained --out hcl.jsonl "hcl-b1-tp0.1:"
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import fastclr.pretraining.step as step
from fastclr.pretraining.losses import contrastive_metrics, nt_xent_logits
from fastclr.pretraining.step import Metrics
from fastclr.scaleout.distributed import DistContext

import levers


def hard_negative_loss(z: torch.Tensor, temperature: float, beta: float, tau_plus: float) -> tuple[torch.Tensor, Metrics]:
    """HCL of z (2B, D) = [view 1; view 2] on one process, and NT-Xent's contrastive metrics."""
    z1, z2 = z.chunk(2)
    logits, target = nt_xent_logits(z1, z2, temperature)  # the anchor's own column already masked
    positive = logits.gather(1, target[:, None]).squeeze(1)
    masked = (logits <= torch.finfo(logits.dtype).min).scatter(1, target[:, None], True)  # self and positive
    n = logits.shape[1] - 2

    def log_sum(scale: float) -> torch.Tensor:  # log sum_k e^{scale * l_k} over the negatives
        return torch.logsumexp(torch.where(masked, -math.inf, scale * logits), 1)

    # log of N sum_k w_k e^{l_k} / sum_k w_k with w_k = e^{beta l_k}: the importance-weighted sum of eq. (5)
    log_weighted = log_sum(1 + beta) - log_sum(beta) + math.log(n)
    ng = (log_weighted.exp() - tau_plus * n * positive.exp()) / (1 - tau_plus)
    ng = ng.clamp(min=n * math.exp(-1 / temperature))
    loss = (torch.logaddexp(positive, ng.log()) - positive).mean()
    return loss, contrastive_metrics(logits.detach(), target)


def check_reduces_to_nt_xent() -> None:
    """beta = tau_plus = 0 must be the product's NT-Xent to float rounding."""
    z = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    ours, _ = hard_negative_loss(z, 0.1, 0.0, 0.0)
    theirs, _ = step.contrastive_loss(z, 0.1, 0, DistContext())
    if not torch.allclose(ours, theirs, rtol=1e-5):
        raise SystemExit(f"hard_negative_loss at beta = tau_plus = 0 is {ours.item()}, NT-Xent {theirs.item()}")


def main() -> None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--tau-plus", type=float, default=0.0)
    a, rest = p.parse_known_args()
    check_reduces_to_nt_xent()

    def loss(z: torch.Tensor, temperature: float, block: int, ctx: DistContext) -> tuple[torch.Tensor, Metrics]:
        if block or ctx.active:
            raise SystemExit("hard_negatives.py measures the single-process plain loss only (no loss_block, no torchrun)")
        return hard_negative_loss(z, temperature, a.beta, a.tau_plus)

    step.contrastive_loss = loss
    sys.argv = [sys.argv[0], *rest]
    levers.main()


if __name__ == "__main__":
    main()
