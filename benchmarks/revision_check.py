"""Is a code change behaviour-neutral? Train the same config for a fixed number of steps and print
the SHA-256 of the trained encoder and head, the loss at every log step, and the median step time:
run it once with each revision on the path, interleaved, and compare.

It imports `pretrain` from where each revision keeps it (fastclr.pretraining since 0.2,
fastclr.train before), so the same file measures both:

    PYTHONPATH=/path/to/old/checkout python benchmarks/revision_check.py --steps 300
    PYTHONPATH=. python benchmarks/revision_check.py --steps 300
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fastclr


def pretrain_fn() -> Any:
    try:
        from fastclr.pretraining import pretrain
    except ImportError:  # revisions before the pretraining package
        from fastclr.train import pretrain  # type: ignore[no-redef]
    return pretrain


def resolve(overrides: dict[str, Any]) -> Any:
    try:
        from fastclr.presets import config_for

        return config_for(None, overrides)
    except ImportError:
        from fastclr.presets import apply_preset

        return apply_preset(overrides)


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    """One JSON line: revision, digests, losses, step times."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    a = p.parse_args()
    if a.steps < 7:  # the median is of the steps after the first five
        p.error(f"--steps {a.steps}: give 7 or more")
    pretrain = pretrain_fn()
    with tempfile.TemporaryDirectory() as tmp:
        overrides: dict[str, Any] = {"train.time_budget": 0.0, "train.log_every": 25, "train.seed": 0,
                                     "train.run_dir": str(Path(tmp) / "run"), "eval.probe": False,
                                     "eval.monitor_every": 0, "train.precision": "bf16",
                                     **dict(kv.split("=", 1) for kv in a.set)}
        cfg = resolve(overrides)
        steps_per_epoch = 60000 // cfg.train.batch_size
        cfg = resolve({**overrides, "train.epochs": a.steps / steps_per_epoch})
        marks: list[float] = []

        def stop(step: int) -> bool:
            marks.append(time.perf_counter())
            return False

        res = pretrain(cfg, progress=False, log=lambda s: None, stop=stop)
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        step_s = [b - a_ for a_, b in zip(marks[5:], marks[6:])]
        print(json.dumps({
            "fastclr": fastclr.__file__, "steps": res.steps, "encoder_sha": digest(res.model.encoder.state_dict()),
            "head_sha": digest(res.model.head.state_dict()), "losses": [round(m["loss"], 6) for m in metrics if "loss" in m],
            "ms_per_step_median": round(1000 * statistics.median(step_s), 1), "python": sys.version.split()[0],
        }), flush=True)


if __name__ == "__main__":
    main()
