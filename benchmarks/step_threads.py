"""How the training step's threads fare beside other busy work: the default Fashion-MNIST step
(benchmarks/harness.real_step, the precision `auto` chooses) on this machine's default thread count
and on 1 thread, alone and beside one process spinning on a CPU (`yes`, standing for a user's other
work), and with OpenMP's passive wait (`OMP_WAIT_POLICY=PASSIVE`: a thread waiting at a barrier
sleeps instead of spinning, which libgomp reads once at start). Each pass is a fresh process (the
wait policy cannot change inside one); the passes are interleaved, round after round.

    python benchmarks/step_threads.py --rounds 3 --steps 20 --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ARMS = ("default", "passive", "1-thread")


def child(steps: int, warmup: int) -> None:
    """One pass: the median ms of `steps` steps after `warmup`, as one JSON line on stdout."""
    import torch

    from fastclr.cpu_memory import keep_freed_memory
    from fastclr.data import load_data
    from fastclr.presets import apply_preset
    from fastclr.runtime import select_device

    from harness import real_step, timed

    keep_freed_memory()  # as `pretrain` does
    cfg = apply_preset({"data.name": "fashion-mnist"})
    device = select_device("cpu")
    step = real_step(cfg, load_data(cfg.data), device, cfg.train.precision)
    secs = timed(step, warmup, steps, device)
    print(json.dumps({"threads": torch.get_num_threads(), "ms_per_step": round(1000 * statistics.median(secs), 1),
                      "ms_spread": [round(1000 * min(secs), 1), round(1000 * max(secs), 1)]}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.steps, a.warmup)
        return
    from fastclr.cpus import default_threads, usable_cpus

    from fewshot_threads import busy
    from harness import describe, record

    full = default_threads(usable_cpus())
    here = Path(__file__).resolve().parent
    for r in range(a.rounds):
        for beside in (False, True):
            for arm in ARMS:
                env = dict(os.environ, OMP_NUM_THREADS=str(1 if arm == "1-thread" else full))
                if arm == "passive":
                    env["OMP_WAIT_POLICY"] = "PASSIVE"
                with busy(beside):
                    out = subprocess.run([sys.executable, str(here / "step_threads.py"), "--child", "--out", a.out,
                                          "--steps", str(a.steps), "--warmup", str(a.warmup)], env=env, cwd=here,
                                         capture_output=True, text=True, check=True)
                record(a.out, {"machine": describe(), "round": r, "busy_beside": beside, "arm": arm,
                               **json.loads(out.stdout.strip().splitlines()[-1])})


if __name__ == "__main__":
    main()
