"""Peak resident memory and time of loading STL-10 (`load_builtin("stl10")`): 100,000 unlabelled,
5,000 train and 8,000 test images of 96 x 96 x 3, 3.0 GB as uint8, what `pretrain --data stl10`
holds in memory. Each load runs in a fresh process whose peak (ru_maxrss) is reported; with
several `--repos` (checkouts of fastclr, e.g. a git worktree of an earlier commit) their loads
alternate, `--rounds` times. Without `--root` a folder of the real files' sizes and formats is
written first (random pixels, 3.1 GB on disk). Prints one JSON line per load.

    python benchmarks/stl10_load_memory.py --root /tmp/stl --repos . /tmp/before --rounds 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from harness import report

_LOAD = """
import json, resource, sys, time
t = time.perf_counter()
from fastclr.data import load_builtin
ds = load_builtin("stl10", sys.argv[1], download=False)
print(json.dumps({"seconds": time.perf_counter() - t, "pretrain_images": len(ds.pretrain),
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_stl10(root: Path) -> None:
    """STL-10's binary files at their published sizes, random pixels and labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("unlabeled", 100_000), ("train", 5_000), ("test", 8_000)):
        with (folder / f"{name}_X.bin").open("wb") as f:
            for start in range(0, n, 1000):
                f.write(rng.integers(0, 256, (min(1000, n - start), 3, 96, 96), dtype=np.uint8).tobytes())
    for name, n in (("train", 5_000), ("test", 8_000)):
        rng.integers(1, 11, n, dtype=np.uint8).tofile(folder / f"{name}_y.bin")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, help="a folder holding stl10_binary/ (written when it has none)")
    p.add_argument("--repos", nargs="+", type=Path, default=[Path(__file__).resolve().parents[1]])
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    root = args.root or Path("stl10-synthetic")
    if not (root / "stl10_binary" / "unlabeled_X.bin").exists():
        write_stl10(root)
    for r in range(args.rounds):
        for repo in args.repos:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            out = subprocess.run([sys.executable, "-c", _LOAD, str(root)], capture_output=True, text=True,
                                 cwd=repo, check=True, env={"PYTHONPATH": str(repo.resolve()), "PATH": ""})
            report("stl10_load_memory", {"round": r, "repo": str(repo), "commit": commit,
                                         **json.loads(out.stdout.splitlines()[-1])})


if __name__ == "__main__":
    main()
