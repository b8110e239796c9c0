"""The `evaluate` and `report` subcommands, registered on the main parser by `add_eval_commands`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from fastclr.errors import FastclrError
from fastclr.evaluation.options import EvaluateOptions
from fastclr.report.embedding_map import MAP_METHODS
from fastclr.runtime import PRECISIONS


def number_list(text: str, kind: type, flag: str) -> tuple[Any, ...]:
    """'10,20,50' -> (10, 20, 50) of `kind`; a one-line error naming the flag otherwise."""
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    example = ",".join(str(v) for v in getattr(EvaluateOptions(), flag[2:].replace("-", "_")))
    if not values:
        raise FastclrError(f"{flag} takes a comma-separated list of {kind.__name__}s, e.g. {flag} {example}; "
                           f"got {text!r}")
    return values  # repeats and ranges: EvaluateOptions.check


def options_from_args(args: argparse.Namespace) -> EvaluateOptions:
    """EvaluateOptions from the parsed flags (unset flags keep the defaults)."""
    from fastclr.evaluation.run import parse_protocols

    changes: dict[str, Any] = {}
    if args.protocols is not None:  # --protocols "" is a mistake, not the defaults
        changes["protocols"] = parse_protocols(args.protocols)
    for flag, kind in (("labels-per-class", int), ("seeds", int), ("supervised-seeds", int),
                       ("finetune-fractions", float), ("finetune-seeds", int)):
        text = getattr(args, flag.replace("-", "_"))
        if text is not None:
            changes[flag.replace("-", "_")] = number_list(text, kind, f"--{flag}")
    for name in ("knn_k", "knn_tau", "steps", "batch_size", "lr", "quality_images", "device", "precision", "threads"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if changes.get("knn_k", 1) < 1:  # the options' 0 (the run's own k) is not a value to type
        raise FastclrError(f"--knn-k must be at least 1, got {changes['knn_k']}")
    options = dataclasses.replace(EvaluateOptions(), **changes)
    options.check()
    return options


MEMORY_USERS = (("--batch-size", ("supervised", "finetune")), ("--quality-images", ("quality",)))
"""evaluate's flags that lower its memory, and the protocols whose memory each one sets. The others
(linear, knn, fewshot, pixels) share the features computed once for all of them: leaving one out frees
nothing."""


def memory_fix(protocols: str | None) -> str:
    """What `fastclr evaluate --protocols PROTOCOLS` (None: the defaults) can be given to need less
    memory: a smaller --batch-size where a protocol trains with it, a smaller --quality-images for the
    label-free measures, fewer protocols where it runs one of those beside others; "" when none
    applies (protocols that hold only the run's features, computed once for all of them)."""
    from fastclr.evaluation.run import parse_protocols

    try:
        names = EvaluateOptions().protocols if protocols is None else parse_protocols(protocols)
    except FastclrError:  # not reached: the command checks its protocols before it computes
        names = ()
    smaller = [flag for flag, users in MEMORY_USERS if any(p in names for p in users)]
    parts = [f"a smaller {' or '.join(smaller)}"] if smaller else []
    if smaller and len(names) > 1:
        parts.append("fewer --protocols")
    return f"give {', or '.join(parts)}" if parts else ""


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run the evaluation protocols on a run, print the table, save eval.json."""
    from fastclr.evaluation.run import evaluate
    from fastclr.evaluation.table import footer_line, format_table

    # The table before eval.json is written (a full disk then loses the file, not the results); the
    # line naming the file once it is there.
    out = evaluate(Path(args.run_dir), options_from_args(args), log=(lambda s: None) if args.quiet else print,
                   show=lambda out: print(format_table(out, footer=False), flush=True))
    print(f"\n{footer_line(out)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the run's self-contained report.html."""
    from fastclr.report.build import build_report

    path = build_report(Path(args.run_dir), out=Path(args.out) if args.out else None, device=args.device,
                        map_method=args.map, threads=args.threads, precision=args.precision)
    print(f"report: {path}")
    return 0


def add_eval_commands(sub: Any) -> None:
    """Register `fastclr evaluate` and `fastclr report` on the subparsers object `sub`."""
    d = EvaluateOptions()
    ev = sub.add_parser("evaluate",
                        help="linear probe, kNN, few labels, supervised baseline, fine-tuning, label-free measures")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--protocols", metavar="NAMES",
                    help=f"comma-separated, or all (default: {','.join(d.protocols)}; extra: pixels)")
    ev.add_argument("--labels-per-class", metavar="LIST",
                    help=f"few-label points (default: {','.join(map(str, d.labels_per_class))})")
    ev.add_argument("--seeds", metavar="LIST",
                    help=f"subset seeds of the few-label probe (default: {','.join(map(str, d.seeds))})")
    ev.add_argument("--supervised-seeds", metavar="LIST", help=f"subset seeds of the supervised baseline (default: "
                                               f"{','.join(map(str, d.supervised_seeds))})")
    ev.add_argument("--finetune-fractions", metavar="LIST", help=f"label fractions for fine-tuning (default: "
                                                 f"{','.join(map(str, d.finetune_fractions))})")
    ev.add_argument("--finetune-seeds", metavar="LIST",
                    help=f"subset seeds of fine-tuning (default: {','.join(map(str, d.finetune_seeds))})")
    ev.add_argument("--knn-k", type=int, metavar="N",
                    help="neighbours of the kNN protocol (default: the run's eval.knn_k)")
    ev.add_argument("--knn-tau", type=float, metavar="T",
                    help=f"temperature of the kNN protocol's vote weights exp(s / T) (default: {d.knn_tau})")
    ev.add_argument("--steps", type=int, metavar="N",
                    help=f"optimiser steps of each supervised / fine-tuning run (default: {d.steps})")
    ev.add_argument("--batch-size", type=int, metavar="N", help=f"batch of those runs (default: {d.batch_size})")
    ev.add_argument("--lr", type=float, metavar="X", help=f"peak AdamW learning rate of those runs (default: {d.lr})")
    ev.add_argument("--quality-images", type=int, metavar="N",
                    help=f"images for the label-free measures (default: {d.quality_images})")
    ev.add_argument("--device", metavar="NAME", help="auto, cpu, cuda, cuda:N (default: auto)")
    ev.add_argument("--precision", choices=PRECISIONS, help="auto (default: decided from this machine), bf16, fp16, fp32")
    ev.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: one per usable CPU, counting a cgroup CPU quota)")
    ev.add_argument("--quiet", action="store_true", help="print only the table")
    ev.set_defaults(func=cmd_evaluate)

    rp = sub.add_parser("report",
                        help="write RUN_DIR/report.html: curves, views, embeddings, numbers (one file, offline)")
    rp.add_argument("run_dir", metavar="RUN_DIR")
    rp.add_argument("--out", help="where to write the HTML (default: RUN_DIR/report.html)")
    rp.add_argument("--map", choices=MAP_METHODS, default=MAP_METHODS[0], help="2-D map of test embeddings (default: tsne)")
    rp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    rp.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="auto (default: decided from this machine), bf16, fp16, fp32")
    rp.add_argument("--threads", type=int, default=0, help="CPU threads (default: one per usable CPU, counting a cgroup CPU quota)")
    rp.set_defaults(func=cmd_report)
