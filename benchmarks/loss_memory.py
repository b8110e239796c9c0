"""Plain against memory-efficient (row-block) NT-Xent: time and peak memory of forward + backward
for N images (a 2N x 2N similarity matrix), d = 128. Target: at N = 16384 the row-block loss
uses at most 1/8 of the plain loss's peak memory.

Each (loss, N) runs in a fresh subprocess (harness.run_child); the plain loss is skipped where its
estimated need (about ten 2N x 2N float32 matrices alive in backward) exceeds --max-gib, and
reported with that estimate (extrapolated from the largest plain run measured, as (2N)^2), against
which the row-block loss's ratio is then given with "plain_estimated": true.

    python benchmarks/loss_memory.py                          # N = 1k..32k on CPU (or CUDA when present)
    python benchmarks/loss_memory.py --sizes 256 512 --repeats 1 --device cpu   # a quick check
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness import report
from fastclr.cpus import set_threads
from fastclr.runtime import select_device
from harness import emit, measure, run_child

SCRIPT = str(Path(__file__).resolve())
PLAIN_BYTES_PER_CELL = 42.0
"""Peak bytes per cell of the 2N x 2N matrix for the plain loss, measured on CPU at N = 1024
(about ten float32 matrices alive in backward); used to skip sizes that cannot fit, until a
measured size gives this machine's own figure."""


def child(kind: str, n: int, dim: int, block: int, device: torch.device, repeats: int) -> None:
    """Measure one configuration in this (fresh) process and print its JSON line."""
    from fastclr.pretraining.chunked_loss import blockwise_nt_xent
    from fastclr.pretraining.losses import nt_xent

    g = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(n, dim, device=device, generator=g).requires_grad_()
    z2 = torch.randn(n, dim, device=device, generator=g).requires_grad_()

    def work() -> None:
        loss = nt_xent(z1, z2, 0.1) if kind == "plain" else blockwise_nt_xent(z1, z2, 0.1, block)[0]
        loss.backward()
        z1.grad = z2.grad = None

    emit(measure(work, device, repeats))


def main() -> None:
    """Sweep N for both losses and print one JSON line per measurement."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                   help="N, images per batch (the matrix is 2N x 2N)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=1024, help="anchor rows per block of the memory-efficient loss")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's choice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gib", type=float, default=16.0, help="skip the plain loss where it would need more")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    set_threads(a.threads)
    device = select_device(a.device)
    if a.child:
        child(a.child[0], int(a.child[1]), a.dim, a.block, device, a.repeats)
        return
    common = ["--dim", str(a.dim), "--block", str(a.block), "--device", str(device), "--threads", str(a.threads),
              "--repeats", str(a.repeats)]
    per_cell = 0.0  # plain loss: peak bytes per cell of the 2N x 2N matrix, from the largest N measured
    for n in a.sizes:
        cells = (2 * n) ** 2
        plain_peak = None
        for kind in ("plain", "blockwise"):
            need = (per_cell or PLAIN_BYTES_PER_CELL) * cells / 2**30
            if kind == "plain" and need > a.max_gib:
                res: dict = {"skipped": f"needs ~{need:.0f} GiB > --max-gib {a.max_gib:g}"}
                plain_peak, estimated = need * 2**30, True
            else:
                res = run_child(SCRIPT, ["--child", kind, str(n), *common], a.timeout)
                if kind == "plain" and "peak_bytes" in res:
                    plain_peak, estimated, per_cell = res["peak_bytes"], False, res["peak_bytes"] / cells
            extra = {}
            if kind == "blockwise" and plain_peak and "peak_bytes" in res:
                extra = {"memory_vs_plain": round(res["peak_bytes"] / plain_peak, 4), "plain_estimated": estimated}
            report("loss_memory", {"loss": kind, "n": n, "dim": a.dim, "block": a.block if kind == "blockwise" else 0,
                                   "device": str(device), "threads": torch.get_num_threads(), **res, **extra})


if __name__ == "__main__":
    main()
