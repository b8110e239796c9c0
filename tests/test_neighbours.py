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
from fastclr.pretraining.queue import KeyNetwork, RowQueue
from fastclr.scaleout.distributed import DistContext, setup
from tiny import straight_and_resumed

CPU = torch.device("cpu")


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def loop_loss(z: torch.Tensor, support: torch.Tensor, t: float, extra: torch.Tensor | None = None) -> torch.Tensor:
    """The loss written out in float64, one anchor at a time: anchor i (view v of image b) is the
    support row nearest to z_i by cosine; its positive is the other view of image b; the candidates
    are every row but i itself, and any extra (queued) negatives q:
    l_i = -log( exp(n_i . z_pos / t) / (sum_{k != i} exp(n_i . z_k / t) + sum_q exp(n_i . q / t)) )."""
    zu, su = unit(z), unit(support)
    qu = unit(extra) if extra is not None else torch.zeros(0, z.shape[1], dtype=z.dtype)
    m = z.shape[0]
    b = m // 2
    terms = []
    for i in range(m):
        best = max(range(len(su)), key=lambda s: float(zu[i].detach() @ su[s]))
        n = su[best]  # a fixed row: no gradient reaches the support
        pos = (i + b) % m
        denominator = sum(torch.exp(n @ zu[k] / t) for k in range(m) if k != i)
        denominator = denominator + sum((torch.exp(n @ q / t) for q in qu), torch.zeros((), dtype=z.dtype))
        terms.append(-torch.log(torch.exp(n @ zu[pos] / t) / denominator))
    return torch.stack(terms).mean()


def test_the_nearest_neighbour_is_the_most_similar_support_row_by_cosine() -> None:
    support = torch.tensor([[10.0, 0.0], [0.0, 0.1], [1.0, 1.0]])
    z = torch.tensor([[3.0, 0.2], [0.0, 5.0], [2.0, 2.1], [-1.0, 0.0]], requires_grad=True)
    got = nearest_neighbours(z, support)
    # Cosine, not dot product: [0, 0.1] is nearest to [0, 5] although [10, 0] and [1, 1] are longer.
    want = unit(support[[0, 1, 2, 1]])  # [-1, 0]: cosines -1, 0, -0.71, so the orthogonal row
    torch.testing.assert_close(got, want)
    assert not got.requires_grad
    # float64 anchors against the float32 support the run holds: the search runs in float64
    assert nearest_neighbours(z.detach().double(), support).dtype == torch.float64
    torch.testing.assert_close(nearest_neighbours(z.detach().double(), support), want.double())


def test_the_loss_and_its_gradient_equal_a_float64_loop_over_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 4, dtype=torch.float64, generator=g, requires_grad=True)
    support = torch.randn(7, 4, dtype=torch.float64, generator=g)
    obj = Objective(TrainConfig(nn_support=7, temperature=0.3), None, CPU, None,
                    support=RowQueue(7, 4, CPU))
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


def test_with_a_queue_the_neighbours_are_scored_against_its_negatives_too() -> None:
    """--queue with --nn-support: the queued rows join the denominator of the neighbour, not of z."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 4, dtype=torch.float64, generator=g)
    support, queued = torch.randn(6, 4, dtype=torch.float64, generator=g), torch.randn(5, 4, dtype=torch.float64, generator=g)
    obj = Objective(TrainConfig(nn_support=6, queue=5, temperature=0.2), None, CPU, None,
                    queue=RowQueue(5, 4, CPU), support=RowQueue(6, 4, CPU))
    obj.support.rows, obj.support.filled = unit(support), 6
    obj.queue.rows, obj.queue.filled = unit(queued), 5
    loss, _ = obj.loss(z, obj.groups(torch.arange(4)), DistContext())
    torch.testing.assert_close(loss, loop_loss(z, support, 0.2, extra=queued), rtol=1e-12, atol=1e-12)


def test_the_support_takes_the_first_view_of_each_image_with_more_and_small_views() -> None:
    """With 3 views and 2 small views z has 5 B rows; the support takes rows [0, B), view 1."""
    obj = Objective(TrainConfig(nn_support=20, views=3, local_views=2), None, CPU, None, support=RowQueue(20, 3, CPU))
    z = torch.randn(5 * 4, 3, generator=torch.Generator().manual_seed(4))
    obj.loss(z, obj.groups(torch.arange(4)), DistContext())
    obj.after_update(torch.empty(0), None, DistContext())
    torch.testing.assert_close(obj.support.oldest_first(), unit(z[:4]))


def test_an_empty_support_gives_nt_xent_then_holds_the_first_views() -> None:
    """The first step (nothing held) is NT-Xent exactly; after the update the support holds that
    step's view-1 rows at unit length, oldest first, and the next step scores their neighbours."""
    g = torch.Generator().manual_seed(1)
    cfg = TrainConfig(nn_support=5)
    obj = Objective(cfg, None, CPU, None, support=RowQueue(5, 3, CPU))
    assert not is_plain(cfg)
    z = torch.randn(8, 3, generator=g)  # 4 images, 2 views
    loss, _ = obj.loss(z, obj.groups(torch.arange(4)), DistContext())
    torch.testing.assert_close(loss, nt_xent(z[:4], z[4:], cfg.temperature))
    obj.after_update(torch.empty(0), None, DistContext())
    torch.testing.assert_close(obj.support.oldest_first(), unit(z[:4]))
    z2 = torch.randn(8, 3, generator=g)
    loss2, _ = obj.loss(z2, obj.groups(torch.arange(4)), DistContext())
    torch.testing.assert_close(loss2, loop_loss(z2.double(), z[:4].double(), cfg.temperature).float())
    obj.after_update(torch.empty(0), None, DistContext())
    torch.testing.assert_close(obj.support.oldest_first(), unit(torch.cat([z[3:4], z2[:4]])))  # the last five


ROWS = torch.randn(2, 16, 5, generator=torch.Generator().manual_seed(2))  # two steps of 8 images x 2 views


def rank_steps(rank: int, world: int) -> dict[str, Any]:
    """Two steps of this rank's share of 8 images (view 1 rows, then view 2): loss and support."""
    ctx = setup(CPU, 30.0)
    obj = Objective(TrainConfig(nn_support=12), None, CPU, None, support=RowQueue(12, 5, CPU))
    b = 8 // world
    rows = torch.cat([torch.arange(rank * b, (rank + 1) * b) + v * 8 for v in range(2)])
    losses = []
    for step in range(2):
        loss, _ = obj.loss(ROWS[step][rows], obj.groups(torch.arange(rank * b, (rank + 1) * b)), ctx)
        losses.append(loss.detach())
        obj.after_update(torch.empty(0), None, ctx)
    return {"losses": torch.stack(losses), "support": obj.support.oldest_first()}


def test_two_ranks_hold_the_support_of_one_process_and_score_the_same_neighbours(tmp_path: Path) -> None:
    ranks = run_ranks(rank_steps, 2, tmp_path, timeout=120)
    obj = Objective(TrainConfig(nn_support=12), None, CPU, None, support=RowQueue(12, 5, CPU))
    losses = []
    for step in range(2):
        loss, _ = obj.loss(ROWS[step], obj.groups(torch.arange(8)), DistContext())
        losses.append(loss)
        obj.after_update(torch.empty(0), None, DistContext())
    for got in ranks:
        torch.testing.assert_close(got["support"], obj.support.oldest_first())  # rank order = image order
    # Each rank's loss is the mean over its own anchors; equal shares, so their mean is the whole batch's.
    mean_of_ranks = (ranks[0]["losses"] + ranks[1]["losses"]) / 2
    torch.testing.assert_close(mean_of_ranks, torch.stack(losses), rtol=0, atol=1e-5)


def test_stop_and_resume_with_a_support_set_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """50 rows: a support not restored at step 5 would end at pointer (7 x 16) % 50 = 12, not 42."""
    a, b = straight_and_resumed(tmp_path, train__nn_support=50, train__precision="fp32", train__device="cpu")
    assert a["step"] == b["step"] == 12
    assert a["support"]["filled"] == 50 and a["support"]["pointer"] == b["support"]["pointer"] == (12 * 16) % 50
    assert torch.equal(a["support"]["rows"], b["support"]["rows"])
    for part in ("encoder", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert not math.isnan(float(a["support"]["rows"].sum()))


def test_a_run_resumed_with_the_support_or_queue_newly_on_or_resized_starts_them_empty() -> None:
    """A checkpoint without them (or of another size) leaves the support and queue empty and makes
    the key network an exact copy of the resumed online network, instead of failing to load."""
    online = torch.nn.Linear(3, 4)
    keys = KeyNetwork(online, 0.9)
    with torch.no_grad():
        online.weight.add_(1.0)  # the resumed weights, loaded after the key network was built
    obj = Objective(TrainConfig(nn_support=8, queue=6), None, CPU, None, keys=keys, queue=RowQueue(6, 4, CPU),
                    support=RowQueue(8, 4, CPU))
    obj.load_state_dict({"encoder": {}})  # a checkpoint of a run without either
    assert obj.support.filled == 0 and obj.queue.filled == 0
    assert torch.equal(keys.net.weight, online.weight)
    other = RowQueue(5, 4, CPU)
    other.enqueue(torch.randn(5, 4))
    obj.load_state_dict({"support": other.state_dict()})  # saved with S = 5, resumed with S = 8
    assert obj.support.filled == 0
    same = RowQueue(8, 4, CPU)
    same.enqueue(torch.randn(3, 4))
    obj.load_state_dict({"support": same.state_dict()})
    assert obj.support.filled == 3 and torch.equal(obj.support.rows, same.rows)
