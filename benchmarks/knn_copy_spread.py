"""How far apart one (q, D) x (D, N) product puts bitwise-identical bank rows, the tolerance behind
`fastclr.evaluation.knn.cosine_topk`'s re-ranking of near ties.

A bank of unit rows (ReLU'd Gaussian, like h after the readout's ReLU) in which each of 64 base
rows repeats at every 64th position, for several bank sizes and query counts (a single query is a
matrix-vector product, whose tail block differs); the spread is the largest difference between
the product's values for copies of one row, in units of float32's eps.

    python benchmarks/knn_copy_spread.py --out knn-copy-spread.jsonl
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from harness import describe, record


def spread(d: int, n: int, queries: int, g: torch.Generator) -> float:
    """Largest product difference between copies of one row, for one bank and query set."""
    base = F.normalize(torch.randn(64, d, generator=g).relu_(), dim=1)
    bank = base.repeat(n // 64 + 1, 1)[:n]
    q = F.normalize(torch.randn(queries, d, generator=g).relu_(), dim=1)
    sim = q @ bank.T
    worst = 0.0
    for b in range(64):
        v = sim[:, b::64]
        worst = max(worst, float((v.max(1).values - v.min(1).values).max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="16,128,512,2048,12544")
    p.add_argument("--out", default="knn-copy-spread.jsonl")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    eps = torch.finfo(torch.float32).eps
    for d in (int(x) for x in args.dims.split(",")):
        worst = max(spread(d, n, queries, g) for n in (130, 1001, 4099) for queries in (1, 7, 256))
        record(args.out, {"dim": d, "max_spread": worst, "max_spread_eps": round(worst / eps, 2),
                          "threads": torch.get_num_threads(), "machine": describe()})


if __name__ == "__main__":
    main()
