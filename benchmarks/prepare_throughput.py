"""`fastclr prepare` throughput: images/s decoding a generated folder of JPEGs.

Generates --images photo-like JPEGs of mixed sizes (smooth gradients, shapes and mild noise, so
they compress and decode like photos, not like white noise) in --classes subfolders, then times
a full prepare with --workers processes, and a re-run on the unchanged folder (the incremental
path: stat only, nothing read). Prints one JSON line with the command and the machine.

    python benchmarks/prepare_throughput.py --images 3000 --workers 2 --size 96
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastclr.ingest import DecodeOptions, prepare_store
from harness import report

SIZES = ((640, 480), (480, 640), (1024, 768), (800, 800), (1280, 960), (320, 240))


def photo_like(rng: np.random.Generator, w: int, h: int, noise: np.ndarray) -> Image.Image:
    """A smooth colour gradient with a few filled shapes and noise (`noise`, shared per size to keep
    generation cheap; the gradient and shapes make every image different)."""
    t = (np.linspace(0, rng.uniform(0.2, 1), w)[None, :] + np.linspace(0, rng.uniform(0.2, 1), h)[:, None])[..., None] / 2
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    im = Image.fromarray((c0 * (1 - t) + c1 * t + noise).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.uniform(0, w * 0.8)), int(rng.uniform(0, h * 0.8))
        box = (x0, y0, x0 + int(rng.uniform(20, w / 3)), y0 + int(rng.uniform(20, h / 3)))
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im


def generate(folder: Path, n: int, classes: int, seed: int = 0) -> int:
    """Write n JPEGs (quality 90) into folder/class_k/; returns the total bytes written."""
    rng = np.random.default_rng(seed)
    noise = {(w, h): rng.normal(0, 6, (h, w, 3)).astype(np.float32) for w, h in SIZES}
    total = 0
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = folder / f"class_{i % classes}" / f"img_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo_like(rng, w, h, noise[(w, h)]).save(path, quality=90)
        total += path.stat().st_size
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--dir", help="where to generate the folder and store (default: a temporary directory); "
                   "a folder already generated there with as many images is reused")
    p.add_argument("--keep", action="store_true", help="keep the generated folder and store")
    args = p.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fastclr-prepare-bench-"))
    folder, store = base / "images", base / "store"
    try:
        t0 = time.perf_counter()
        existing = sorted(folder.rglob("*.jpg")) if folder.is_dir() else []
        if len(existing) == args.images:
            nbytes = sum(f.stat().st_size for f in existing)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            nbytes = generate(folder, args.images, args.classes)
        gen_s = time.perf_counter() - t0
        shutil.rmtree(store, ignore_errors=True)
        opts = DecodeOptions(args.size)
        full = prepare_store(folder, store, opts, workers=args.workers, progress=False, log=lambda s: None)
        rerun = prepare_store(folder, store, opts, workers=args.workers, progress=False, log=lambda s: None)
        assert full.images == args.images and rerun.decoded == []
        report("prepare_throughput", {
            "pillow": Image.__version__, "images": args.images, "workers": args.workers, "size": args.size,
            "folder_mb": round(nbytes / 2**20, 1), "generate_s": round(gen_s, 1), "prepare_s": round(full.seconds, 2),
            "images_per_s": round(args.images / full.seconds, 1), "rerun_unchanged_s": round(rerun.seconds, 2),
            "rerun_files_per_s": round(args.images / rerun.seconds, 1),
        })
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
