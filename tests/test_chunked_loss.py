"""The row-block NT-Xent equals the plain one (values, gradients, metrics) without ever saving a
2N x 2N matrix for backward; the gathered form (a rank's anchors against every rank's candidates)
reduces to the plain loss with one rank and adds up to it over ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastclr.pretraining.chunked_loss import blockwise_nt_xent
from fastclr.pretraining.losses import contrastive_metrics, nt_xent, nt_xent_logits, positive_rank, rank_metrics


def pair(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64,
         device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(n, d, dtype=dtype, generator=g, device=device).requires_grad_(),
            torch.randn(n, d, dtype=dtype, generator=g, device=device).requires_grad_())


@pytest.mark.parametrize("n,block", [(7, 1), (7, 3), (7, 14), (7, 100), (16, 5), (7, 10**12)])
def test_row_blocks_give_the_plain_value_gradients_and_ranks(n: int, block: int, device: torch.device) -> None:
    z1, z2 = pair(n, 5, n * 10 + block, device=device)
    logits, target = nt_xent_logits(z1, z2, 0.3)
    plain = F.cross_entropy(logits, target)
    g_plain = torch.autograd.grad(plain, [z1, z2])
    ours, rank = blockwise_nt_xent(z1, z2, 0.3, block)
    g_ours = torch.autograd.grad(ours, [z1, z2])
    torch.testing.assert_close(ours, plain, rtol=1e-13, atol=1e-13)
    for a, b in zip(g_ours, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)
    assert torch.equal(rank, positive_rank(logits, target))
    m_ours, m_plain = rank_metrics(rank), contrastive_metrics(logits, target)
    assert all(torch.equal(m_ours[k], m_plain[k]) for k in m_plain)


def test_float32_under_autocast_matches_the_plain_loss(device: torch.device) -> None:
    layer = torch.nn.Linear(16, 8).to(device)
    x = torch.randn(64, 16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        z = layer(x)
        plain = nt_xent(*z.chunk(2), 0.1)
        ours, _ = blockwise_nt_xent(*z.chunk(2), 0.1, 9)
    assert ours.dtype == torch.float32
    g_plain = torch.autograd.grad(plain, layer.weight, retain_graph=True)[0]
    g_ours = torch.autograd.grad(ours, layer.weight)[0]
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_plain, rtol=1e-5, atol=1e-6)


def test_identical_embeddings_give_log_2n_minus_1(device: torch.device) -> None:
    z = torch.ones(5, 4, device=device)
    assert float(blockwise_nt_xent(z, z.clone(), 0.1, 3)[0]) == pytest.approx(torch.log(torch.tensor(9.0)).item(), abs=1e-6)


def gathered(world: int, b: int, d: int, device: torch.device = torch.device("cpu")
             ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Each rank's (z1, z2) as leaves, and the candidates [Z1_all; Z2_all] built from them."""
    parts = [pair(b, d, 100 + r, device=device) for r in range(world)]
    c1 = torch.cat([p[0] for p in parts])
    c2 = torch.cat([p[1] for p in parts])
    return parts, c1, c2


@pytest.mark.parametrize("block", [0, 2, 5])
def test_gathered_form_summed_over_ranks_is_the_global_loss(block: int, device: torch.device) -> None:
    """sum over ranks of (rank loss / W), each rank's anchors against all candidates (with their
    offset), has the value and the gradient of the loss of the concatenated global batch."""
    world, b = 3, 4
    parts, c1, c2 = gathered(world, b, 6, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for r, (z1, z2) in enumerate(parts):
        if block:
            loss, _ = blockwise_nt_xent(z1, z2, 0.2, block, (c1, c2), r * b)
        else:
            loss = F.cross_entropy(*nt_xent_logits(z1, z2, 0.2, (c1, c2), r * b))
        total = total + loss / world
    leaves = [t for p in parts for t in p]
    got = torch.autograd.grad(total, leaves)
    ref_parts = [(z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()) for z1, z2 in parts]
    ref = nt_xent(torch.cat([p[0] for p in ref_parts]), torch.cat([p[1] for p in ref_parts]), 0.2)
    want = torch.autograd.grad(ref, [t for p in ref_parts for t in p])
    torch.testing.assert_close(total, ref, rtol=1e-13, atol=1e-13)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-11, atol=1e-14)


def test_gathered_form_with_one_rank_is_the_plain_function(device: torch.device) -> None:
    z1, z2 = pair(6, 4, 7, torch.float32, device)
    plain = nt_xent_logits(z1, z2, 0.2)
    with_candidates = nt_xent_logits(z1, z2, 0.2, (z1, z2), 0)
    assert torch.equal(plain[0], with_candidates[0]) and torch.equal(plain[1], with_candidates[1])


def test_gathered_positive_and_self_columns(device: torch.device) -> None:
    """Rank 1 of 2 with 2 images each: its view-1 anchors are candidates 2, 3 (positives 6, 7)."""
    parts, c1, c2 = gathered(2, 2, 3, device)
    logits, target = nt_xent_logits(*parts[1], 0.5, (c1, c2), 2)
    assert target.tolist() == [6, 7, 2, 3]
    low = torch.finfo(logits.dtype).min
    assert [int(i) for i in (logits == low).nonzero()[:, 1]] == [2, 3, 6, 7]


def saved_numels(fn) -> list[int]:  # type: ignore[no-untyped-def]
    """Element counts of every tensor autograd saves for backward while `fn()` runs."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_backward_keeps_no_2n_by_2n_matrix(device: torch.device) -> None:
    # Counts what autograd saves (saved-tensor hooks), not process memory: the same on every device.
    n, d = 256, 16
    z1, z2 = pair(n, d, 1, torch.float32, device)
    plain = saved_numels(lambda: nt_xent(z1, z2, 0.2))
    ours = saved_numels(lambda: blockwise_nt_xent(z1, z2, 0.2, 32))
    assert max(plain) >= (2 * n) ** 2  # the plain loss keeps the full matrix (the control)
    assert max(ours) <= 2 * n * d  # the row-block loss keeps inputs and (2N,) statistics only
