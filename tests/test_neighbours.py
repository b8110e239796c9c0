"""--nn-support S (NNCLR): the neighbour each anchor is scored as, the loss and its gradient against a
float64 loop over the formula, what the support holds, two ranks against one process, exact resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dist_helpers import run_ranks

from fastclr.config import TrainConfig
from fastclr.pretraining.losses import nt_xent
from fastclr.pretraining.neighbours import nearest_neighbours
from fastclr.pretraining.objective import Objective, is_plain
from fastclr.pretraining.queue import NegativeQueue
from fastclr.scaleout.distributed import DistContext, setup
from tiny import straight_and_resumed

CPU = torch.device("cpu")


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def loop_loss(z: torch.Tensor, support: torch.Tensor, t: float) -> torch.Tensor:
    """The loss written out in float64, one anchor at a time: anchor i (view v of image b) is the
    support row nearest to z_i by cosine; its positive is the other view of image b; the candidates
    are every row but i itself:  l_i = -log( exp(n_i . z_pos / t) / sum_{k != i} exp(n_i . z_k / t) )."""
    zu, su = unit(z), unit(support)
    m = z.shape[0]
    b = m // 2
    terms = []
    for i in range(m):
        best = max(range(len(su)), key=lambda s: float(zu[i].detach() @ su[s]))
        n = su[best]  # a fixed row: no gradient reaches the support
        pos = (i + b) % m
        denominator = sum(torch.exp(n @ zu[k] / t) for k in range(m) if k != i)
        terms.append(-torch.log(torch.exp(n @ zu[pos] / t) / denominator))
    return torch.stack(terms).mean()


def test_the_nearest_neighbour_is_the_most_similar_support_row_by_cosine() -> None:
    support = torch.tensor([[10.0, 0.0], [0.0, 0.1], [1.0, 1.0]])
    z = torch.tensor([[3.0, 0.2], [0.0, 5.0], [2.0, 2.1], [-1.0, 0.0]])
    got = nearest_neighbours(z, support)
    # Cosine, not dot product: [0, 0.1] is nearest to [0, 5] although [10, 0] and [1, 1] are longer.
    want = unit(support[[0, 1, 2, 1]])  # [-1, 0]: cosines -1, 0, -0.71, so the orthogonal row
    torch.testing.assert_close(got, want)
    assert not got.requires_grad


def test_the_loss_and_its_gradient_equal_a_float64_loop_over_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 4, dtype=torch.float64, generator=g, requires_grad=True)
    support = torch.randn(7, 4, dtype=torch.float64, generator=g)
    obj = Objective(TrainConfig(nn_support=7, temperature=0.3), None, CPU, None,
                    support=NegativeQueue(7, 4, CPU))
    obj.support.rows, obj.support.filled = unit(support), 7  # float64 here; enqueue would round to float32
    loss, _ = obj.loss(z, obj.groups(torch.arange(5)), DistContext())
    (grad,) = torch.autograd.grad(loss, z)
    z_ref = z.detach().clone().requires_grad_(True)
    want = loop_loss(z_ref, support, 0.3)
    (want_grad,) = torch.autograd.grad(want, z_ref)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    # The neighbours really replace the anchors: the plain NT-Xent of the same z differs.
    assert abs(float(loss.detach()) - float(nt_xent(z.detach()[:5], z.detach()[5:], 0.3))) > 1e-3


def test_an_empty_support_gives_nt_xent_then_holds_the_first_views() -> None:
    """The first step (nothing held) is NT-Xent exactly; after the update the support holds that
    step's view-1 rows at unit length, oldest first, and the next step scores their neighbours."""
    g = torch.Generator().manual_seed(1)
    obj = Objective(TrainConfig(nn_support=5), None, CPU, None, support=NegativeQueue(5, 3, CPU))
    assert not is_plain(TrainConfig(nn_support=5))
    z = torch.randn(8, 3, generator=g)  # 4 images, 2 views
    loss, _ = obj.loss(z, obj.groups(torch.arange(4)), DistContext())
    torch.testing.assert_close(loss, nt_xent(z[:4], z[4:], 0.1))
    obj.after_update(torch.empty(0), None, DistContext())
    torch.testing.assert_close(obj.support.negatives(), unit(z[:4]))
    z2 = torch.randn(8, 3, generator=g)
    obj.loss(z2, obj.groups(torch.arange(4)), DistContext())
    obj.after_update(torch.empty(0), None, DistContext())
    torch.testing.assert_close(obj.support.negatives(), unit(torch.cat([z[3:4], z2[:4]])))  # the last five


ROWS = torch.randn(2, 16, 5, generator=torch.Generator().manual_seed(2))  # two steps of 8 images x 2 views


def rank_steps(rank: int, world: int) -> dict[str, Any]:
    """Two steps of this rank's share of 8 images (view 1 rows, then view 2): loss and support."""
    ctx = setup(CPU, 30.0)
    obj = Objective(TrainConfig(nn_support=12), None, CPU, None, support=NegativeQueue(12, 5, CPU))
    b = 8 // world
    rows = torch.cat([torch.arange(rank * b, (rank + 1) * b) + v * 8 for v in range(2)])
    losses = []
    for step in range(2):
        loss, _ = obj.loss(ROWS[step][rows], obj.groups(torch.arange(rank * b, (rank + 1) * b)), ctx)
        losses.append(loss.detach())
        obj.after_update(torch.empty(0), None, ctx)
    return {"losses": torch.stack(losses), "support": obj.support.negatives()}


def test_two_ranks_hold_the_support_of_one_process_and_score_the_same_neighbours(tmp_path: Path) -> None:
    ranks = run_ranks(rank_steps, 2, tmp_path, timeout=120)
    obj = Objective(TrainConfig(nn_support=12), None, CPU, None, support=NegativeQueue(12, 5, CPU))
    losses = []
    for step in range(2):
        loss, _ = obj.loss(ROWS[step], obj.groups(torch.arange(8)), DistContext())
        losses.append(loss)
        obj.after_update(torch.empty(0), None, DistContext())
    for got in ranks:
        torch.testing.assert_close(got["support"], obj.support.negatives())  # rank order = image order
    # Each rank's loss is the mean over its own anchors; equal shares, so their mean is the whole batch's.
    mean_of_ranks = (ranks[0]["losses"] + ranks[1]["losses"]) / 2
    torch.testing.assert_close(mean_of_ranks, torch.stack(losses), rtol=0, atol=1e-5)


def test_stop_and_resume_with_a_support_set_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    a, b = straight_and_resumed(tmp_path, train__nn_support=40, train__precision="fp32", train__device="cpu")
    assert a["step"] == b["step"] == 12
    assert a["support"]["filled"] == 40 and a["support"]["pointer"] == b["support"]["pointer"] == (12 * 16) % 40
    assert torch.equal(a["support"]["rows"], b["support"]["rows"])
    for part in ("encoder", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert not math.isnan(float(a["support"]["rows"].sum()))
