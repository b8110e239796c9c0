"""SimCLRv2's semi-supervised pipeline measured: fine-tuning, distillation and the supervised baseline
on the same labels, per label fraction and subset seed, one pretrained run.

For each (fraction, seed): `finetune_run` from h and from each asked head layer (with the
from-scratch baseline on the same subset once), then `distill_run` from the teacher named by
--teacher-layer with the distillation options given (several variants may be listed). Everything
runs in this one process, one piece after another; each result is one JSON line (with the
machine), appended to --out.

    python benchmarks/semisup.py runs/RUN --fractions 0.01,0.1 --seeds 0,1,2 --head-layers 0,1 \
        --teacher-layer 0 --distill default --out docs/results/2026-12-epyc/semisup.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from harness import describe, record

from fastclr.semisup.pipeline import DistillOptions, FinetuneOptions, distill_run, finetune_run

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "random-init": {"student_init": "random"},
    "labels-0.5": {"label_weight": 0.5},
    "t2": {"temperature": 2.0},
    "half-width": {"student_width": 0.5},
    "steps-4000": {"steps": 4000},
    "same": {"teacher_views": "same"},
    "clean-shift4": {"shift_fraction": 0.15},
}
"""Distillation variants by name: DistillOptions fields changed from the defaults."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--fractions", default="0.01,0.1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--head-layers", default="0,1", help="fine-tune from each of these head layers")
    ap.add_argument("--finetune-steps", type=int, default=FinetuneOptions().steps,
                    help="fine-tuning steps (a compute-matched control for distillation: its steps)")
    ap.add_argument("--teacher-layer", type=int, default=0, help="the fine-tuned classifier distillation starts from")
    ap.add_argument("--distill", default="default", help=f"comma-separated variants: {', '.join(VARIANTS)}; none: skip")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    unknown = [n for n in a.distill.split(",") if n not in VARIANTS and a.distill != "none"]
    if unknown:  # before the fine-tuning's minutes, not a KeyError after them
        ap.error(f"--distill {','.join(unknown)}: not a variant; choose from {', '.join(VARIANTS)} (or none)")
    if a.distill != "none" and a.teacher_layer not in [int(v) for v in a.head_layers.split(",")]:
        ap.error(f"--teacher-layer {a.teacher_layer} is not among --head-layers {a.head_layers}: no classifier to "
                 "distil from; add it there, or --distill none")
    machine = describe()
    work = Path(tempfile.mkdtemp(prefix="semisup-"))

    def emit(fields: dict[str, Any]) -> None:
        record(a.out, {"benchmark": "semisup", "machine": machine, "run": str(a.run_dir), **fields})

    try:
        for fraction in (float(v) for v in a.fractions.split(",")):
            for seed in (int(v) for v in a.seeds.split(",")):
                teacher = None
                for i, layer in enumerate(int(v) for v in a.head_layers.split(",")):
                    out = work / f"ft-{fraction}-{seed}-{layer}"
                    r = finetune_run(a.run_dir, FinetuneOptions(label_fraction=fraction, seed=seed, from_head_layer=layer,
                                                                baseline=i == 0, steps=a.finetune_steps), out=out, log=lambda s: None)
                    emit({"step": "finetune", "fraction": fraction, "seed": seed, "from_head_layer": layer,
                          "labels": r["labels"], "steps": a.finetune_steps, "accuracy": r["accuracy"], "linear_accuracy": r["linear_accuracy"],
                          "baseline_accuracy": r.get("baseline_accuracy"), "seconds": r["seconds"],
                          "precision": r["environment"]["precision"]})
                    if layer == a.teacher_layer:
                        teacher = out
                if teacher is None or a.distill == "none":
                    continue
                for name in a.distill.split(","):
                    o = dataclasses.replace(DistillOptions(), **VARIANTS[name])
                    r = distill_run(teacher, o, out=work / f"d-{fraction}-{seed}-{name}", log=lambda s: None)
                    emit({"step": "distill", "variant": name, "fraction": fraction, "seed": seed,
                          "teacher_layer": a.teacher_layer, "accuracy": r["accuracy"],
                          "teacher_accuracy": r["teacher_accuracy"], "student_init": r["student_init"],
                          "options": r["options"], "seconds": r["seconds"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
