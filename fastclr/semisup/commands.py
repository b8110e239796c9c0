"""The `finetune` and `distill` subcommands, registered on the main parser by `add_semisup_commands`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fastclr.errors import FastclrError
from fastclr.runtime import PRECISIONS


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a run on a labelled subset; print the test accuracy and where the classifier went."""
    from fastclr.semisup.pipeline import FinetuneOptions, finetune_run

    if args.labels_per_class is not None and args.labels_per_class < 1:  # 0 is "not given" below
        raise FastclrError(f"--labels-per-class must be at least 1, got {args.labels_per_class}")
    if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
        raise FastclrError(f"--label-fraction must be above 0 and at most 1, got {args.label_fraction:g}")
    o = FinetuneOptions(labels_per_class=args.labels_per_class or 0, label_fraction=args.label_fraction or 0.0,
                        seed=args.seed, from_head_layer=args.from_head_layer, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, baseline=args.baseline, device=args.device,
                        precision=args.precision, threads=args.threads)
    r = finetune_run(Path(args.run_dir), o, out=args.out, log=(lambda s: None) if args.quiet else print)
    base = f"; the same network from scratch on these labels {r['baseline_accuracy'] * 100:.2f}%" if o.baseline else ""
    print(f"fine-tuned on {r['labels']} labels: test accuracy {r['accuracy'] * 100:.2f}% (linear probe on these "
          f"labels {r['linear_accuracy'] * 100:.2f}%{base}); written to {r['out']}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil a fine-tuned classifier into a student; print both test accuracies."""
    from fastclr.semisup.pipeline import DistillOptions, distill_run

    o = DistillOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
                       label_weight=args.label_weight, student_width=args.student_width,
                       student_init=args.student_init, teacher_views=args.teacher_views, shift_fraction=args.shift,
                       seed=args.seed, device=args.device, precision=args.precision,
                       threads=args.threads)
    r = distill_run(Path(args.teacher_dir), o, out=args.out, log=(lambda s: None) if args.quiet else print)
    print(f"distilled student: test accuracy {r['accuracy'] * 100:.2f}% (teacher {r['teacher_accuracy'] * 100:.2f}%); "
          f"written to {r['out']}")
    return 0


def _machine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (default: decided from this machine), bf16, fp16, fp32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: one per usable CPU, counting a cgroup CPU quota)")
    p.add_argument("--quiet", action="store_true", help="print only the result line")


def add_semisup_commands(sub: Any) -> None:
    """Register `fastclr finetune` and `fastclr distill` on the subparsers object `sub`."""
    from fastclr.semisup.pipeline import DistillOptions, FinetuneOptions

    f, d = FinetuneOptions(), DistillOptions()
    ft = sub.add_parser("finetune", help="fine-tune a run on a few labels (SimCLR and SimCLRv2)")
    ft.add_argument("run_dir", metavar="RUN_DIR")
    which = ft.add_mutually_exclusive_group(required=True)
    which.add_argument("--labels-per-class", type=int, metavar="N", help="N labelled images of every class")
    which.add_argument("--label-fraction", type=float, metavar="F", help="a class-balanced fraction, e.g. 0.01 for 1%%")
    ft.add_argument("--seed", type=int, default=f.seed, help="picks the labelled subset and the training draws "
                                                             f"(default: {f.seed})")
    ft.add_argument("--from-head-layer", type=int, default=f.from_head_layer, metavar="L",
                    help=f"projection-head layers kept under the classifier: 0 = from h, 1 = SimCLRv2's "
                         f"(default: {f.from_head_layer})")
    ft.add_argument("--steps", type=int, default=f.steps, help=f"optimiser steps (default: {f.steps})")
    ft.add_argument("--batch-size", type=int, default=f.batch_size, help=f"(default: {f.batch_size})")
    ft.add_argument("--lr", type=float, default=f.lr, help=f"peak AdamW learning rate (default: {f.lr})")
    ft.add_argument("--baseline", action="store_true",
                    help="also train the same network from scratch on the same labels")
    ft.add_argument("--out", help="output directory (default: RUN_DIR/finetune/N-per-class-seedS-headL)")
    _machine_flags(ft)
    ft.set_defaults(func=cmd_finetune)

    ds = sub.add_parser("distill", aliases=["distil"], help="distil a `fastclr finetune` classifier into a student using every "
                                        "unlabelled image (SimCLRv2)")
    ds.add_argument("teacher_dir", metavar="TEACHER_DIR", help="a directory `fastclr finetune` wrote")
    ds.add_argument("--steps", type=int, default=d.steps, help=f"student steps (default: {d.steps})")
    ds.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default: {d.batch_size})")
    ds.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default: {d.lr})")
    ds.add_argument("--temperature", type=float, default=d.temperature,
                    help=f"of the teacher's and student's distributions (default: {d.temperature:g})")
    ds.add_argument("--label-weight", type=float, default=d.label_weight,
                    help=f"weight of the labelled images' cross-entropy, 0 = distillation alone (default: {d.label_weight:g})")
    ds.add_argument("--student-width", type=float, default=d.student_width,
                    help="channel multiplier of the student itself (not a fraction of the teacher's: 0.5 of a run at 0.25 "
                         "is twice its width); 0 = the teacher's (default: 0)")
    ds.add_argument("--student-init", default=d.student_init, choices=("auto", "pretrained", "random"),
                    help="the run's SimCLR encoder or random weights; auto: pretrained at the run's width (default)")
    ds.add_argument("--teacher-views", default=d.teacher_views, choices=("same", "clean"),
                    help="the teacher labels the student's augmented images (same) or the clean ones, once "
                         f"(default: {d.teacher_views})")
    ds.add_argument("--shift", type=float, default=d.shift_fraction, metavar="F",
                    help=f"largest random shift of the student's images, a fraction of the side (default: {d.shift_fraction})")
    ds.add_argument("--seed", type=int, default=d.seed, help="training draws (default: the teacher's seed)")
    ds.add_argument("--out", help="output directory (default: RUN_DIR/distill/<teacher's name>)")
    _machine_flags(ds)
    ds.set_defaults(func=cmd_distill)
