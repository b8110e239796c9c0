"""NT-Xent is checked against a literal float64 transcription of the paper's formula."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fastclr.pretraining.chunked_loss import blockwise_nt_xent
from fastclr.pretraining.losses import contrastive_metrics, nt_xent, nt_xent_logits, positive_rank


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """l(i,j) = -log( exp(sim(z_i,z_j)/t) / sum_{k != i} exp(sim(z_i,z_k)/t) ), mean over 2N anchors,
    with explicit loops over i and k, in float64."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2

    def sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b) / (a.norm() * b.norm())

    total = torch.zeros((), dtype=torch.float64)
    for i in range(n2):
        j = (i + n) % n2
        denom = torch.zeros((), dtype=torch.float64)
        for k in range(n2):
            if k != i:
                denom = denom + torch.exp(sim(z[i], z[k]) / t)
        total = total - torch.log(torch.exp(sim(z[i], z[j]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (5, 8, 0.1), (7, 4, 1.0)])
def test_value_and_gradients_match_literal_formula(n: int, d: int, t: float, device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(n * 100 + d)
    a = torch.randn(n, d, dtype=torch.float64, generator=g, device=device, requires_grad=True)
    b = torch.randn(n, d, dtype=torch.float64, generator=g, device=device, requires_grad=True)
    ours = nt_xent(a, b, t)
    ga, gb = torch.autograd.grad(ours, [a, b])
    # The literal formula is the float64 oracle on the CPU, fed the same numbers.
    a_ref, b_ref = a.detach().cpu().requires_grad_(), b.detach().cpu().requires_grad_()
    ref = reference_nt_xent(a_ref, b_ref, t)
    ra, rb = torch.autograd.grad(ref, [a_ref, b_ref])
    assert ours.dtype == torch.float64 and ours.device.type == device.type
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga.cpu(), ra, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb.cpu(), rb, rtol=1e-10, atol=1e-12)


def test_float32_input_matches_reference(device: torch.device) -> None:
    a, b = torch.randn(16, 32, device=device), torch.randn(16, 32, device=device)
    assert nt_xent(a, b, 0.2).dtype == torch.float32
    assert abs(float(nt_xent(a, b, 0.2)) - float(reference_nt_xent(a.cpu(), b.cpu(), 0.2))) < 1e-5


@pytest.mark.parametrize("n", [1, 4, 33])
def test_identical_embeddings_give_log_2n_minus_1(n: int, device: torch.device) -> None:
    z = torch.ones(n, 16, device=device)
    assert float(nt_xent(z, z.clone(), 0.1)) == pytest.approx(math.log(2 * n - 1), abs=1e-6)


def test_symmetric_in_the_two_views(device: torch.device) -> None:
    a, b = torch.randn(9, 5, device=device), torch.randn(9, 5, device=device)
    torch.testing.assert_close(nt_xent(a, b, 0.3), nt_xent(b, a, 0.3))


def test_invariant_to_scale_of_projections(device: torch.device) -> None:
    a, b = torch.randn(6, 5, device=device), torch.randn(6, 5, device=device)
    torch.testing.assert_close(nt_xent(a, b, 0.3), nt_xent(3.0 * a, 0.5 * b, 0.3))


def test_finite_under_bf16_autocast_at_low_temperature(device: torch.device) -> None:
    torch.manual_seed(1)
    layer = torch.nn.Linear(64, 32).to(device)
    x = torch.randn(128, 64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        z = layer(x)
        assert z.dtype == torch.bfloat16
        loss = nt_xent(*z.chunk(2), 0.05)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # The loss of the bf16 projections themselves is computed in float32 (the logits are not
    # bf16, whose 8 bits would move it by tenths at t = 0.05): the float64 formula on the same z.
    ref = reference_nt_xent(*z.detach().double().chunk(2), 0.05)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_diagonal_is_masked_with_a_finite_value(device: torch.device) -> None:
    logits, target = nt_xent_logits(torch.randn(4, 3, device=device), torch.randn(4, 3, device=device), 0.01)
    assert logits.device.type == device.type and target.device.type == device.type
    assert torch.isfinite(logits).all()
    assert (logits.diagonal() == torch.finfo(torch.float32).min).all()
    assert target.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]


@pytest.mark.parametrize("t", [0.0, -0.1, 1e-40, float("nan")])
def test_a_temperature_below_the_configs_least_is_refused(device: torch.device, t: float) -> None:
    """1e-40 made every logit infinite; the config refused it, the public loss did not."""
    z = torch.randn(2, 2, device=device)
    with pytest.raises(ValueError, match=re.escape(f"temperature must be >= 1e-06, got {t}")):
        nt_xent(z, z, t)
    with pytest.raises(ValueError, match=re.escape(f"temperature must be >= 1e-06, got {t}")):
        blockwise_nt_xent(z, z, t, 1)
    assert torch.isfinite(nt_xent(z, z.flip(0), 1e-6))


@pytest.mark.parametrize("n1,n2", [(4, 3), (0, 0)])
def test_views_of_other_counts_or_none_are_refused_naming_the_shapes(n1: int, n2: int) -> None:
    """Unequal halves gave a torch size error (the blockwise form a number), an empty batch NaN."""
    z = torch.randn(8, 5)
    with pytest.raises(ValueError, match=re.escape(f"got ({n1}, 5) and ({n2}, 5)")):
        nt_xent(z[:n1], z[4:4 + n2], 0.1)
    with pytest.raises(ValueError, match=re.escape(f"got ({n1}, 5) and ({n2}, 5)")):
        blockwise_nt_xent(z[:n1], z[4:4 + n2], 0.1, 2)



@pytest.mark.parametrize("g1,g2,offset", [(6, 5, 0), (6, 6, 3), (6, 6, -1)])
def test_gathered_candidates_that_cannot_hold_the_anchors_are_refused(g1: int, g2: int, offset: int) -> None:
    """Unequal gathered halves, or anchors past their end, gave a loss over the wrong rows without a word."""
    z, c = torch.randn(4, 5), torch.randn(6, 5)
    for loss in (lambda *a: nt_xent_logits(*a[:3], candidates=a[3], offset=a[4]),
                 lambda *a: blockwise_nt_xent(*a[:3], 2, candidates=a[3], offset=a[4])):
        with pytest.raises(ValueError, match=re.escape(f"got ({g1}, 5) and ({g2}, 5), offset {offset}")):
            loss(z, z, 0.1, (c[:g1], torch.randn(g2, 5)), offset)
    nt_xent_logits(z, z, 0.1, candidates=(c, c), offset=2)  # rows 2-5 of 6: they fit


def test_rank_and_accuracy_against_brute_force(device: torch.device) -> None:
    torch.manual_seed(3)
    logits, target = nt_xent_logits(torch.randn(10, 4, device=device), torch.randn(10, 4, device=device), 0.5)
    ranks = positive_rank(logits, target)
    for i in range(20):
        others = [float(logits[i, k]) for k in range(20) if k != i]
        pos = float(logits[i, target[i]])
        negatives = [float(logits[i, k]) for k in range(20) if k not in (i, int(target[i]))]
        assert int(ranks[i]) == 1 + sum(o >= pos for o in negatives) and len(others) == 19
    m = contrastive_metrics(logits, target)
    assert float(m["top1"]) == pytest.approx(float((ranks == 1).float().mean()))
    assert float(m["top5"]) == pytest.approx(float((ranks <= 5).float().mean()))
    assert float(m["mean_rank"]) == pytest.approx(float(ranks.float().mean()))


def test_a_collapsed_encoder_finds_no_positive() -> None:
    """Every cosine equal: each positive ties with all 2N - 2 negatives and ranks last (2N - 1), so
    top-1 is 0; ties counted for the positive made it 1.0, a perfect score for a failed run. The
    plain, row-blocked and multi-positive paths agree, and a queue's rows rank above it as well."""
    from fastclr.pretraining.chunked_loss import blockwise_nt_xent
    from fastclr.pretraining.multi_positive import multi_positive_loss, view_groups

    n = 8
    z = torch.ones(2 * n, 4)
    logits, target = nt_xent_logits(z[:n], z[n:], 0.1)
    assert positive_rank(logits, target).tolist() == [2 * n - 1] * (2 * n)
    m = contrastive_metrics(logits, target)
    assert (float(m["top1"]), float(m["top5"]), float(m["mean_rank"])) == (0.0, 0.0, 2 * n - 1)
    _, blocked = blockwise_nt_xent(z[:n], z[n:], 0.1, 3)
    assert blocked.tolist() == [2 * n - 1] * (2 * n)
    _, multi = multi_positive_loss(z, view_groups(n, 2, z.device), 0.1)
    assert (float(multi["top1"]), float(multi["mean_rank"])) == (0.0, 2 * n - 1)
    _, queued = multi_positive_loss(z, view_groups(n, 2, z.device), 0.1, extra=torch.ones(5, 4))
    assert (float(queued["top5"]), float(queued["mean_rank"])) == (0.0, 2 * n - 1 + 5)  # a queue's ties too


def test_perfect_pairs_rank_first(device: torch.device) -> None:
    e = torch.eye(6, device=device)
    m = contrastive_metrics(*nt_xent_logits(e, e.clone(), 0.1))
    assert float(m["top1"]) == 1.0 and float(m["mean_rank"]) == 1.0


def test_the_training_step_pairs_each_image_with_its_other_view(device: torch.device) -> None:
    """The step `pretrain` runs (one process, NT-Xent): z of [view 1 of every image; view 2 of
    every image], row i paired with row i + B; its loss and every gradient equal the float64
    formula's on the same network's z."""
    from fastclr.models import ProjectionHead, SmallCNN
    from fastclr.pretraining.step import SimCLRNet, backward_step
    from fastclr.scaleout.distributed import DistContext

    torch.manual_seed(0)
    enc = SmallCNN(1, 0.125, "32|64")
    net = SimCLRNet(enc, ProjectionHead(enc.feature_dim, 16, 8)).double().to(device)
    views = torch.randn(12, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    loss, _ = backward_step(net, views, 0.3, None, 0, DistContext())
    got = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    z = net(views)
    want = reference_nt_xent(z[:6], z[6:], 0.3)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert got.keys() == {n for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)
