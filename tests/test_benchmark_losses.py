"""The decoupled contrastive loss measured as a recipe lever (benchmarks/decoupled_loss.py) is the
formula of Yeh et al. 2022: a float64 loop over anchors, positive left out of the denominator."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from conftest import REPO
from fastclr.pretraining.losses import nt_xent
from fastclr.scaleout.distributed import DistContext

sys.path.insert(0, str(REPO / "benchmarks"))
from decoupled_loss import decoupled_loss  # noqa: E402


def dcl_loop(z: torch.Tensor, t: float) -> float:
    """mean over the 2N anchors i of -s_ij / t + log sum_{k != i, j} exp(s_ik / t), in float64."""
    u = z.double() / z.double().norm(dim=1, keepdim=True)
    n2 = len(u)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sim = [float(u[i] @ u[k]) / t for k in range(n2)]
        total += -sim[j] + math.log(sum(math.exp(sim[k]) for k in range(n2) if k not in (i, j)))
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_decoupled_loss_is_the_formula(t: float) -> None:
    z = torch.randn(12, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss, _ = decoupled_loss(z, t, 0, DistContext())
    assert float(loss) == pytest.approx(dcl_loop(z, t), rel=1e-10)
    # It differs from NT-Xent by exactly the positive's share of the denominator: DCL < NT-Xent.
    assert float(loss) < float(nt_xent(*z.chunk(2), t))
