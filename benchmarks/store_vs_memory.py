"""Training pairs/s from a store (memory-mapped, rows read per batch) against the same images
held in memory (the built-in path: copied to the device once). Target: the store within 10%.

Both runs use the same config, seed and images; the order (memory first or store first)
alternates between repeats so that warm-up and thermal drift cancel. Also times the loader
alone (ImageSource.gather, batches/s) to show what the store path itself costs. The store is
written to --dir and read through the page cache: a store larger than RAM is instead bounded by
the disk (batch x image bytes per step).

    python benchmarks/store_vs_memory.py --data fashion-mnist --steps 60 --repeats 2
    python benchmarks/store_vs_memory.py --synthetic 20000 --size 96 --channels 3 --set model.encoder=resnet18
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastclr.data import Dataset, ImageSet, load_builtin, open_store
from fastclr.data.loader import BatchSampler, ImageSource
from fastclr.data.store import StoreWriter
from fastclr.ingest.builtin import write_builtin_store
from fastclr.presets import apply_preset
from fastclr.runs import read_metrics
from fastclr.runtime import select_device
from fastclr.pretraining.loop import pretrain
from harness import report


def synthetic_store(out: Path, n: int, size: int, channels: int) -> Dataset:
    """Random images (N, S, S, C) in memory, also written as an unlabeled store at `out`."""
    x = np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    w = StoreWriter(out, size, channels)
    for i in range(n):
        w.append(x[i], {"path": f"{i:07d}", "split": "unlabeled", "label": -1})
    w.commit([], {"synthetic": n}, [], "synthetic")
    return Dataset("synthetic", ImageSet(x, None), None, None, [])


def pairs_per_s(run_dir: Path) -> float:
    """Median pairs/s of the logged windows, the first (warm-up) window left out."""
    rates = [r["pairs_per_s"] for r in read_metrics(run_dir) if "pairs_per_s" in r]
    return statistics.median(rates[1:] or rates)


def gather_rate(images: np.ndarray, batch: int, device: torch.device, steps: int = 100) -> float:
    """Batches/s of ImageSource.gather over random batches."""
    src = ImageSource(images, device)
    sampler = BatchSampler(len(src), batch, 0, device)
    src.gather(sampler.indices(0))
    t = time.perf_counter()
    for s in range(steps):
        out = src.gather(sampler.indices(s))
    if device.type == "cuda":
        torch.cuda.synchronize()
    del out
    return steps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="fashion-mnist", help="a built-in dataset (written as a store for the comparison)")
    p.add_argument("--synthetic", type=int, default=0, help="use N random images instead of --data")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.encoder=resnet18")
    p.add_argument("--dir", help="where the store and runs go (default: a temporary directory, removed)")
    args = p.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fastclr-store-bench-"))
    try:
        if args.synthetic:
            memory = synthetic_store(base / "store", args.synthetic, args.size, args.channels)
            name = f"synthetic {args.synthetic}x{args.size}x{args.size}x{args.channels}"
        else:
            memory = load_builtin(args.data)
            shutil.rmtree(base / "store", ignore_errors=True)
            write_builtin_store(args.data, base / "store", log=lambda s: None)
            name = args.data
        store = open_store(base / "store")
        assert isinstance(store.pretrain.images, np.memmap)
        spe = len(memory.pretrain) // args.batch_size
        overrides: dict[str, Any] = {
            "data.name": args.data, "train.batch_size": args.batch_size, "train.device": args.device,
            "train.epochs": args.steps / spe, "train.log_every": 10, "eval.probe": False, "eval.monitor_every": 0,
        }
        overrides.update(dict(kv.split("=", 1) for kv in args.set))
        device = select_device(args.device)
        rates: dict[str, list[float]] = {"memory": [], "store": []}
        for r in range(args.repeats):
            order = [("memory", memory), ("store", store)]
            for kind, ds in order if r % 2 == 0 else order[::-1]:
                run = base / "runs" / f"{kind}-{r}"
                shutil.rmtree(run, ignore_errors=True)
                cfg = apply_preset(dict(overrides, **{"train.run_dir": str(run)}))
                pretrain(cfg, dataset=ds, progress=False, log=lambda s: None)
                rates[kind].append(pairs_per_s(run))
        mem, sto = statistics.median(rates["memory"]), statistics.median(rates["store"])
        report("store_vs_memory", {
            "data": name, "images": len(memory.pretrain), "batch_size": args.batch_size, "steps": args.steps,
            "device": str(device), "overrides": args.set,
            "memory_pairs_per_s": round(mem, 1), "store_pairs_per_s": round(sto, 1),
            "store_over_memory": round(sto / mem, 3), "runs": rates,
            "gather_batches_per_s": {"memory": round(gather_rate(memory.pretrain.images, args.batch_size, device), 1),
                                     "store": round(gather_rate(store.pretrain.images, args.batch_size, device), 1)},
        })
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
