"""Memory-efficient NT-Xent: the same loss and gradients without keeping the 2N x 2N matrix.

The plain loss (`losses.nt_xent_logits` + cross-entropy) keeps several (2N, 2N) float32 tensors
alive for the backward pass (logits, mask, softmax): at N = 16384 images each is 4 GiB. Here the
forward pass walks over blocks of anchor rows, keeps only each row's logsumexp (2N floats), and
the backward pass recomputes each block's logits to form softmax minus one-hot. Peak extra memory
is one (block, 2G) tile. The cost is one more (block x D) @ (D x 2G) matmul per block in backward,
the same trade-off as FlashAttention's recomputation (Dao et al. 2022).

The rank of each anchor's positive (for top-1/top-5/mean-rank metrics) is counted in the same
forward blocks, so metrics need no second pass either.
"""

from __future__ import annotations

from typing import Any

import torch

from fastclr.pretraining.losses import check_loss_inputs, pair_indices, unit_rows


class _BlockwiseNTXent(torch.autograd.Function):
    """mean_i [ logsumexp_{k != self(i)} (a_i . c_k / t) - a_i . c_pos(i) / t ] over anchor rows i."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: torch.Tensor, c: torch.Tensor, positive: torch.Tensor, own: torch.Tensor, temperature: float,
        block: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = a.shape[0]
        lse = torch.empty(m, dtype=a.dtype, device=a.device)  # (M,)
        pos = torch.empty(m, dtype=a.dtype, device=a.device)  # (M,)
        rank = torch.empty(m, dtype=torch.long, device=a.device)  # (M,)
        low = torch.finfo(a.dtype).min
        for s in range(0, m, block):
            e = min(s + block, m)
            logits = _block_logits(a[s:e], c, own[s:e], temperature, low)  # (blk, K)
            p = logits.gather(1, positive[s:e, None])  # (blk, 1)
            lse[s:e] = torch.logsumexp(logits, dim=1)
            pos[s:e] = p[:, 0]
            rank[s:e] = (logits >= p).sum(dim=1)  # ties against the positive, as positive_rank
            del logits
        ctx.save_for_backward(a, c, positive, own, lse)
        ctx.temperature, ctx.block = temperature, block
        ctx.mark_non_differentiable(rank)
        return (lse - pos).mean(), rank

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_rank: Any) -> tuple[Any, ...]:  # type: ignore[override]
        a, c, positive, own, lse = ctx.saved_tensors
        t, block = ctx.temperature, ctx.block
        m = a.shape[0]
        low = torch.finfo(a.dtype).min
        scale = grad_loss / m  # d loss / d logit_ik = (softmax_ik - onehot_ik) / M
        grad_a = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        grad_c = torch.zeros_like(c) if ctx.needs_input_grad[1] else None
        rows = torch.arange(min(block, m), device=a.device)  # --loss-block above the rows: arange(10**12) was 7.3 TiB
        for s in range(0, m, block):
            e = min(s + block, m)
            logits = _block_logits(a[s:e], c, own[s:e], t, low)  # (blk, K)
            d = torch.exp(logits - lse[s:e, None])  # softmax; the masked self column is exactly 0
            d[rows[: e - s], positive[s:e]] -= 1
            d *= scale / t  # (blk, K): d loss / d (a_i . c_k)
            if grad_a is not None:
                grad_a[s:e] = d @ c
            if grad_c is not None:
                grad_c.addmm_(d.T, a[s:e])
            del logits, d
        return grad_a, grad_c, None, None, None, None


def _block_logits(a: torch.Tensor, c: torch.Tensor, own: torch.Tensor, temperature: float, low: float) -> torch.Tensor:
    """a (blk, D) against c (K, D) over t, each row's own column set to `low`: (blk, K)."""
    logits = a @ c.T / temperature
    logits[torch.arange(a.shape[0], device=a.device), own] = low
    return logits


def blockwise_nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    block: int,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of anchors [z1; z2] (B, D) each against `candidates` (gathered [Z1; Z2], or the
    anchors themselves when None), in row blocks of `block`; same arguments, value and gradients
    as `cross_entropy(*nt_xent_logits(...))`.

    Returns the loss (float32 scalar; float64 for float64 input) and the 1-based rank of each
    anchor's positive (int64 (2B,)), for `losses.rank_metrics`.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    check_loss_inputs(z1, z2, temperature, candidates, offset)
    b = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a = unit_rows(torch.cat([z1, z2]))  # (2B, D)
        # The same tensor as anchors and candidates: autograd adds the gradients of both roles.
        c = a if candidates is None else unit_rows(torch.cat(candidates))  # (2G, D)
        positive, own = pair_indices(b, c.shape[0] // 2, offset, z1.device)
        loss, rank = _BlockwiseNTXent.apply(a, c, positive, own, temperature, block)
    return loss, rank
