"""Memory and time of loading STL-10 (`load_builtin("stl10")`): 100,000 unlabelled, 5,000 train
and 8,000 test images of 96 x 96 x 3, 3.0 GB as uint8, what `pretrain --data stl10` holds. Each
load runs in a fresh process; with `--processes N`, N at once (the ranks of a node), each reading
every pretraining pixel as an epoch does, then reporting, once all have: seconds to load (torch's
import included) and to load and read every pixel once (a mapped file pages in only then), peak resident
memory (ru_maxrss), and from /proc/self/smaps_rollup its proportional share of what it maps (Pss:
pages shared by N processes count 1/N in each) and its anonymous memory (its own copy). With several
`--repos` (checkouts of fastclr, e.g. a git worktree of an earlier commit) their loads alternate,
`--rounds` times. Without `--root` a folder of the real files' sizes and formats is written first
(random pixels, 3.1 GB on disk). Prints one JSON line per process.

    python benchmarks/stl10_load_memory.py --root /tmp/stl --repos . /tmp/before --rounds 2 --processes 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from harness import report

_LOAD = """
import json, resource, sys, time
from pathlib import Path
t = time.perf_counter()
from fastclr.data import load_builtin
ds = load_builtin("stl10", sys.argv[1], download=False)
seconds = time.perf_counter() - t
total = sum(int(ds.pretrain.images[i:i + 4096].sum(dtype="uint64")) for i in range(0, len(ds.pretrain), 4096))
read_seconds = time.perf_counter() - t  # and every pixel read once: a mapped file is paged in here, not above
sync, me, n = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(sync / me).touch()
deadline = time.monotonic() + 600
while len(list(sync.iterdir())) < n:  # every process holds its pages when the shares are read
    if time.monotonic() > deadline:
        sys.exit("the other loads did not finish in 10 minutes")
    time.sleep(0.05)
rollup = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
kib = {k: int(v.split()[0]) for k, v in rollup.items()}
print(json.dumps({"seconds": seconds, "read_seconds": read_seconds, "pretrain_images": len(ds.pretrain),
                  "pixel_sum": total,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "pss_kib": kib["Pss"], "anonymous_kib": kib["Anonymous"]}))
time.sleep(0.5)  # the others read their shares while this one still maps the file
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
    p.add_argument("--processes", type=int, default=1, help="loads at once, as the ranks of a node")
    args = p.parse_args()
    root = args.root or Path("stl10-synthetic")
    if not (root / "stl10_binary" / "unlabeled_X.bin").exists():
        write_stl10(root)
    for r in range(args.rounds):
        for repo in args.repos:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            with tempfile.TemporaryDirectory() as sync:
                procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(root), sync, str(i), str(args.processes)],
                                          stdout=subprocess.PIPE, text=True, cwd=repo,
                                          env={"PYTHONPATH": str(repo.resolve()), "PATH": ""})
                         for i in range(args.processes)]
                outs = [proc.communicate()[0] for proc in procs]
            for i, (proc, out) in enumerate(zip(procs, outs)):
                if proc.returncode:
                    raise SystemExit(f"the load in {repo} failed (exit {proc.returncode})")
                report("stl10_load_memory", {"round": r, "repo": str(repo), "commit": commit, "process": i,
                                             "processes": args.processes, **json.loads(out.splitlines()[-1])})


if __name__ == "__main__":
    main()
