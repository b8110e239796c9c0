"""How many threads the few-label probe's fits should use: its sweep on a run's h, on 1 thread and on
this machine's default, alone and beside one busy process (`yes`, standing for a user's other work),
interleaved in one process (the thread count set per pass, so `fewshot_fit`'s own choice is bypassed).

    python benchmarks/fewshot_threads.py runs/RUN --per-class 10,100,200,500 --seeds 0-4 --rounds 2 --out FILE
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

import fastclr.evaluation.fewshot as fewshot
from fastclr.cpus import default_threads, usable_cpus

from fewshot_variants import network_features, seeds_of
from harness import describe, record


@contextlib.contextmanager
def busy(on: bool) -> Iterator[None]:
    """One process spinning on a CPU beside the timed work, or nothing."""
    proc = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if on else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--per-class", default="10,100,200,500")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ytr, _, yte, nets = network_features(a.run_dir, ["trained"])
    _, xtr, xte = next(nets)
    classes = [str(c) for c in range(int(ytr.max()) + 1)]
    full = default_threads(usable_cpus())
    for r in range(a.rounds):
        for n in (int(v) for v in a.per_class.split(",")):
            for beside in (False, True):
                for threads in (full, 1):
                    torch.set_num_threads(threads)
                    with busy(beside), mock.patch.object(fewshot, "ONE_THREAD_UP_TO", -1):
                        t = time.perf_counter()
                        curve = fewshot.fewshot_probe(xtr, ytr, xte, yte.numpy(), (n,), tuple(seeds_of(a.seeds)), classes)
                        seconds = time.perf_counter() - t
                    record(a.out, {"machine": describe(), "round": r, "labels_per_class": n, "busy_beside": beside,
                                   "threads": threads, "seconds": round(seconds, 3), "mean": curve[0]["mean"]})


if __name__ == "__main__":
    main()
