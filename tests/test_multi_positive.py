"""The multi-positive loss against literal float64 transcriptions (a loop over anchors, positives
and candidates), values and gradients, and against NT-Xent where the two must coincide."""

from __future__ import annotations

import math

import pytest
import torch

from fastclr.pretraining.losses import contrastive_metrics, nt_xent, nt_xent_logits
from fastclr.pretraining.multi_positive import label_groups, multi_positive_loss, view_groups


def reference(z: torch.Tensor, groups: list[int], t: float, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Khosla et al. 2020 eq. 2 (L_out), averaged over anchors with a positive, in float64 loops:
    for anchor i, P(i) = rows of its group but i, A(i) = all rows but i, then the extra rows."""
    m = z.shape[0]
    unit = [z[i] / z[i].norm() for i in range(m)]
    others = [] if extra is None else [e / e.norm() for e in extra]
    total, anchors = torch.zeros((), dtype=torch.float64), 0
    for i in range(m):
        positives = [p for p in range(m) if p != i and groups[p] == groups[i]]
        if not positives:
            continue
        denominator = sum(torch.exp(unit[i] @ unit[a] / t) for a in range(m) if a != i)
        denominator = denominator + sum((torch.exp(unit[i] @ e / t) for e in others), torch.zeros((), dtype=torch.float64))
        total = total - sum(torch.log(torch.exp(unit[i] @ unit[p] / t) / denominator) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def reference_metrics(z: torch.Tensor, groups: list[int], extra: torch.Tensor | None = None) -> dict[str, float]:
    """Rank of each anchor's best positive among its non-positives, by explicit comparison."""
    m = z.shape[0]
    c = torch.cat([z, extra]) if extra is not None else z
    sims = [[float(z[i] @ c[k] / (z[i].norm() * c[k].norm())) for k in range(len(c))] for i in range(m)]
    ranks = []
    for i in range(m):
        pos = [k for k in range(m) if k != i and groups[k] == groups[i]]
        if not pos:
            continue
        best = max(sims[i][k] for k in pos)
        ranks.append(1 + sum(1 for k in range(len(c)) if k != i and k not in pos and sims[i][k] > best))
    return {"top1": sum(r <= 1 for r in ranks) / len(ranks), "top5": sum(r <= 5 for r in ranks) / len(ranks),
            "mean_rank": sum(ranks) / len(ranks)}


CASES = {
    "three views": ([0, 1, 2, 3] * 3, 0),
    "supcon, some unlabelled": ([0, 0, 1, -1, 2, -2, 1, 0] * 2, 0),
    "every image its own group, extra negatives": ([0, 1, 2, 3, 4] * 2, 7),
    "a group of one (no positive) is left out": ([0, 1, 1, 5, 0, 2], 0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("t", [0.07, 0.5])
def test_values_gradients_and_metrics_equal_the_float64_transcription(case: str, t: float) -> None:
    groups, n_extra = CASES[case]
    g = torch.Generator().manual_seed(len(groups) * 31 + n_extra)
    z = torch.randn(len(groups), 6, generator=g, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(n_extra, 6, generator=g, dtype=torch.float64, requires_grad=True) if n_extra else None
    loss, metrics = multi_positive_loss(z, torch.tensor(groups), t, extra)
    ref = reference(z, groups, t, extra)
    assert loss.dtype == torch.float64 and torch.allclose(loss, ref, rtol=1e-12, atol=1e-12)
    inputs = [z] + ([extra] if extra is not None else [])
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(ref, inputs)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    expected = reference_metrics(z.detach(), groups, extra.detach() if extra is not None else None)
    for k, v in expected.items():
        assert float(metrics[k]) == pytest.approx(v, abs=1e-6), k  # metrics are float32, as in training


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_z_gives_the_float32_loss_of_those_values(case: str, dtype: torch.dtype) -> None:
    """z as autocast hands it over (bf16 on GPUs and CPUs with AMX, fp16 on older GPUs), a queue's
    negatives too: the loss is float32 and equals the float64 transcription on the same rounded
    values at t = 0.07 (logits up to 14), and its gradient that transcription's gradient, rounded."""
    groups, n_extra = CASES[case]
    g = torch.Generator().manual_seed(len(groups) * 7 + n_extra)
    z = (3 * torch.randn(len(groups), 6, generator=g)).to(dtype).requires_grad_()
    extra = (3 * torch.randn(n_extra, 6, generator=g)).to(dtype) if n_extra else None
    loss, _ = multi_positive_loss(z, torch.tensor(groups), 0.07, extra)
    z64 = z.detach().double().requires_grad_()
    ref = reference(z64, groups, 0.07, extra.double() if extra is not None else None)
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(float(ref), rel=1e-5)
    (got,) = torch.autograd.grad(loss, z)
    (want,) = torch.autograd.grad(ref, z64)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_two_views_one_image_per_group_is_exactly_nt_xent() -> None:
    """Values, gradients and metrics of K = 2, float32 as in training."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2 * 16, 12, generator=g, requires_grad=True)
    loss, metrics = multi_positive_loss(z, view_groups(16, 2, z.device), 0.1)
    z1, z2 = z.chunk(2)
    plain = nt_xent(z1, z2, 0.1)
    assert torch.allclose(loss, plain, rtol=1e-6, atol=1e-6)
    (a,) = torch.autograd.grad(loss, z)
    (b,) = torch.autograd.grad(plain, z)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    logits, target = nt_xent_logits(z1.detach(), z2.detach(), 0.1)
    for k, v in contrastive_metrics(logits, target).items():
        assert float(metrics[k]) == pytest.approx(float(v), abs=1e-6), k


def test_supcon_with_every_image_its_own_class_is_nt_xent() -> None:
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2 * 10, 8, generator=g, dtype=torch.float64)
    ids = torch.arange(10)
    supcon, _ = multi_positive_loss(z, label_groups(ids, ids, 2), 0.2)  # class i for image i
    assert torch.allclose(supcon, nt_xent(*z.chunk(2), 0.2), rtol=1e-12)


def test_supcon_with_all_labels_has_every_same_class_view_as_positive() -> None:
    """A closed case: 2 images of class 0, 2 views each, orthogonal-ish vectors: the positives of an
    anchor are the other 3 rows of its class, nothing else."""
    labels = torch.tensor([0, 0, 1])
    groups = label_groups(labels, torch.arange(3), 2)
    assert groups.tolist() == [0, 0, 1, 0, 0, 1]
    z = torch.eye(6, dtype=torch.float64)  # all cosines 0: every log-probability is -log 5
    loss, metrics = multi_positive_loss(z, groups, 1.0)
    assert float(loss) == pytest.approx(math.log(5), rel=1e-12)
    unlabelled = label_groups(torch.tensor([0, -1, -1]), torch.tensor([10, 11, 12]), 2)
    assert unlabelled.tolist() == [0, -12, -13, 0, -12, -13]  # never a class, never each other's


def test_view_groups_put_the_k_views_of_an_image_in_one_group() -> None:
    assert view_groups(3, 4, torch.device("cpu"), offset=6).tolist() == [6, 7, 8] * 4


def test_anchors_without_a_positive_are_left_out_of_the_loss_and_the_metrics() -> None:
    """Means over the anchors that have a positive, exact fractions: 3 of 5 anchors have one (the
    two singletons are left out), all ranked first; with none at all the loss is 0 with no gradient."""
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z[3:] = z[:2]  # rows 0, 3 and 1, 4 are the same images' views: each the other's nearest
    z.requires_grad_(True)
    groups = torch.tensor([0, 1, 7, 0, 1])
    loss, metrics = multi_positive_loss(z, groups, 0.5)
    pos = [(0, 3), (1, 4), (3, 0), (4, 1)]
    u = torch.nn.functional.normalize(z.detach(), dim=1)
    want = sum(-(u[i] @ u[j] / 0.5 - torch.logsumexp(torch.stack([u[i] @ u[k] / 0.5 for k in range(5) if k != i]), 0))
               for i, j in pos) / 4
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-12)
    assert {k: float(v) for k, v in metrics.items()} == {"top1": 1.0, "top5": 1.0, "mean_rank": 1.0}
    none, _ = multi_positive_loss(z, torch.arange(5), 0.5)
    (grad,) = torch.autograd.grad(none, z)
    assert float(none.detach()) == 0.0 and not grad.any()
