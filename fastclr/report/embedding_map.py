"""2-D maps of features for the report: PCA, and exact t-SNE in torch for a thousand points.

t-SNE follows van der Maaten & Hinton 2008 (perplexity-calibrated Gaussian affinities,
Student-t similarities in 2-D, early exaggeration 12, momentum 0.5 then 0.8, the reference
implementation's adaptive gains), initialised from PCA and with learning rate N / 12, the two
choices that make it reproducible and keep global structure (Kobak & Berens 2019; Belkina et al.
2019). Exact t-SNE is O(N^2) per iteration: meant for ~1,000 points, not the whole test set.
"""

from __future__ import annotations

import math

import torch

MAP_METHODS = ("tsne", "pca")
"""How the report's 2-D map of the test embeddings is drawn (`--map`)."""


def pca(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Projection of the centred rows of x (N, D) on their top `dims` principal axes: (N, dims),
    zeros where fewer rows or columns than `dims` have fewer axes."""
    xc = x.double() - x.double().mean(0)
    _, _, v = torch.linalg.svd(xc, full_matrices=False)
    out = xc @ v[:dims].T
    return torch.cat([out, out.new_zeros(len(out), dims - out.shape[1])], 1)


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j||^2 for all pairs: (N, N), exactly 0 on the diagonal."""
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0)
    return d.fill_diagonal_(0)


def affinities(d2: torch.Tensor, perplexity: float, steps: int = 64) -> torch.Tensor:
    """Row-conditional Gaussian affinities p(j|i) (N, N) whose entropy is log(perplexity) in every row.

    The precision of each row is found by bisection on its logarithm, all rows at once.
    """
    n = d2.shape[0]
    target = math.log(perplexity)
    lo = torch.full((n, 1), -30.0, dtype=d2.dtype)
    hi = torch.full((n, 1), 30.0, dtype=d2.dtype)
    eye = torch.eye(n, dtype=torch.bool)
    for _ in range(steps):
        mid = (lo + hi) / 2
        beta = torch.exp(mid)
        logits = (-d2 * beta).masked_fill(eye, -math.inf)
        p = torch.softmax(logits, 1)
        entropy = -torch.special.xlogy(p, p).sum(1, keepdim=True)  # 0 log 0 = 0
        too_flat = entropy > target  # precision too low: raise it
        lo = torch.where(too_flat, mid, lo)
        hi = torch.where(too_flat, hi, mid)
    return p


def tsne(x: torch.Tensor, perplexity: float = 30.0, iters: int = 600, seed: int = 0) -> torch.Tensor:
    """A 2-D t-SNE map (N, 2) of the rows of x (N, D), deterministic for a seed."""
    n = x.shape[0]
    if n < 2:
        return torch.zeros(n, 2)
    x = pca(x, min(50, x.shape[1], n)).float()  # the usual 50-d PCA first: denoises and speeds up distances
    d2 = squared_distances(x)
    if not (d2 > 0).any():  # every row the same (a collapsed encoder, identical images): one spot, honestly
        return torch.zeros(n, 2)
    d2 = d2 / d2[d2 > 0].median()  # scale-free: the bisection range holds whatever the feature scale
    p = affinities(d2, min(perplexity, (n - 1) / 3))
    p = ((p + p.T) / (2 * n)).clamp(min=1e-12)
    y = pca(x, 2).float()
    y = y / y[:, 0].std() * 1e-4 if n > 2 else y
    g = torch.Generator().manual_seed(seed)
    y = y + 1e-6 * torch.randn(y.shape, generator=g, dtype=y.dtype)  # breaks ties between identical points
    lr = max(n / 12.0, 50.0)
    gains = torch.ones_like(y)
    update = torch.zeros_like(y)
    early = min(250, iters // 3)
    for it in range(iters):
        exaggeration, momentum = (12.0, 0.5) if it < early else (1.0, 0.8)
        num = 1.0 / (1.0 + squared_distances(y))  # (N, N) Student-t kernel
        num.fill_diagonal_(0)
        q = (num / num.sum()).clamp(min=1e-12)
        w = (exaggeration * p - q) * num  # (N, N)
        grad = 4 * (w.sum(1, keepdim=True) * y - w @ y)  # (N, 2)
        same_sign = (grad > 0) == (update > 0)
        gains = torch.where(same_sign, gains * 0.8, gains + 0.2).clamp(min=0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
        y = y - y.mean(0)
    return y.float()
