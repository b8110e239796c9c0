"""Data-parallel scaling: images/s per process with 1 against N processes (torchrun, DDP,
negatives gathered, global BatchNorm), each process embedding the same --per-process batch
(weak scaling: N processes train a global batch N times larger). Ideal scaling keeps images/s
per process constant; the loss of it is the cost of the collectives (gather of z, global-BN
all-reduces, DDP's gradient all-reduce) and, on a CPU, of the processes sharing cores.

Training runs `pretrain` on random images (nothing to download) under
`python -m torch.distributed.run --nproc_per_node=N`; the rate is the median logged pairs/s
after the first window, times 2 views.

    python benchmarks/scaling.py --procs 1 2 --threads-per-process 1                # CPU
    python benchmarks/scaling.py --procs 1 2 4 8 --device cuda --encoder resnet18 --size 32 --channels 3 --per-process 256
    python benchmarks/scaling.py --procs 1 2 --steps 8 --per-process 16 --width 0.25  # a quick check
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from harness import report


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

SCRIPT = str(Path(__file__).resolve())


def worker(a: argparse.Namespace) -> None:
    """One rank of the run (started by torchrun)."""
    from fastclr.presets import config_for
    from fastclr.data import Dataset, ImageSet
    from fastclr.pretraining.loop import pretrain

    n_proc = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = a.per_process * n_proc
    x = np.random.default_rng(0).integers(0, 256, (global_batch * a.steps, a.size, a.size, a.channels), dtype=np.uint8)
    ds = Dataset("synthetic", ImageSet(x, None), None, None, [])
    cfg = config_for(None, {
        "data.name": "synthetic", "model.encoder": a.encoder, "model.width": a.width, "train.batch_size": global_batch,
        "train.epochs": 1.0, "train.device": a.device, "train.threads": a.threads_per_process,
        "train.precision": a.precision, "train.log_every": max(1, a.steps // 4), "train.checkpoint_every": 10**9,
        "train.run_dir": a.run_dir, "eval.probe": False, "eval.monitor_every": 0, "augment.blur_p": 0.0,
    })
    pretrain(cfg, dataset=ds, progress=False, log=lambda s: None)


def run(n: int, a: argparse.Namespace, root: Path) -> dict[str, float | str]:
    """Train with n processes; the measured rates."""
    run_dir = root / f"procs{n}"
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port", str(free_port()),
            SCRIPT, "--worker", "--run-dir", str(run_dir), "--per-process", str(a.per_process), "--steps",
            str(a.steps), "--encoder", a.encoder, "--width", str(a.width), "--size", str(a.size), "--channels",
            str(a.channels), "--device", a.device, "--precision", a.precision, "--threads-per-process",
            str(a.threads_per_process)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, a.threads_per_process)))
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=a.timeout)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    from fastclr.runs import read_metrics

    rates = [rec["pairs_per_s"] for rec in read_metrics(run_dir) if "pairs_per_s" in rec]
    images_per_s = 2 * statistics.median(rates[1:] or rates)
    return {"images_per_s": round(images_per_s, 1), "images_per_s_per_process": round(images_per_s / n, 1)}


def main() -> None:
    """One JSON line per process count, with the efficiency against one process."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--per-process", type=int, default=256, help="images per process per step")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--encoder", default="cnn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--threads-per-process", type=int, default=1, help="CPU threads of each process")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for n in a.procs:
            res = run(n, a, Path(tmp))
            per = res.get("images_per_s_per_process")
            base = per if n == 1 and isinstance(per, float) else base
            eff = {"efficiency": round(per / base, 3)} if isinstance(per, float) and base else {}
            report("scaling", {"processes": n, "per_process_batch": a.per_process, "global_batch": n * a.per_process,
                               "encoder": a.encoder, "width": a.width, "size": a.size, "device": a.device,
                               "precision": a.precision, "threads_per_process": a.threads_per_process, **res, **eff})


if __name__ == "__main__":
    main()
