"""The `prepare`, `embed` and `neighbours` subcommands."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fastclr.errors import FastclrError
from fastclr.ingest.decode import DEFAULT_MAX_PIXELS, DecodeOptions

if TYPE_CHECKING:
    import torch

    from fastclr.pretrained import LoadedRun


def cmd_prepare(args: argparse.Namespace) -> int:
    """Decode a folder (or write a built-in dataset) into a store."""
    if args.builtin:
        from fastclr.ingest.builtin import write_builtin_store

        if args.folder or args.size:
            raise FastclrError("give either FOLDER --size S or --builtin NAME (built-in images keep their own size)")
        _refuse_given(args, FOLDER_ONLY, f"decoding a FOLDER; --builtin {args.builtin} writes the dataset's own "
                      "images as they are:")
        write_builtin_store(args.builtin, Path(args.out), args.data_root, not args.no_download)
        return 0
    from fastclr.ingest.prepare import prepare_store

    if not args.folder or args.size is None:  # --size 0 is a size, refused below with the valid range
        raise FastclrError("prepare needs a FOLDER and --size S (or --builtin NAME), "
                           "e.g. `fastclr prepare photos --size 96 --out photos.store`")
    _refuse_given(args, BUILTIN_ONLY, "--builtin NAME, not to a FOLDER:")
    opts = DecodeOptions(args.size, args.fit, args.channels, args.max_pixels)
    prepare_store(args.folder, args.out, opts, workers=args.workers, labels=args.labels, rehash=args.rehash,
                  progress=not args.quiet)
    return 0


FOLDER_ONLY = {"fit": "crop", "channels": "auto", "workers": 0, "max_pixels": DEFAULT_MAX_PIXELS, "labels": "auto",
               "rehash": False}
"""The options of decoding a folder, with their defaults: a built-in dataset's images are stored as they are."""
BUILTIN_ONLY = {"data_root": None, "no_download": False}
"""The options of finding a built-in dataset, with their defaults."""


def _refuse_given(args: argparse.Namespace, options: Mapping[str, object], applies_to: str) -> None:
    """One line naming the flags of `options` given other values than their defaults, as typed
    (--max-pixels): they apply to `applies_to`, not to what this command does."""
    given = [f"--{name.replace('_', '-')}" for name, default in options.items() if getattr(args, name) != default]
    if given:
        one = len(given) == 1
        raise FastclrError(f"{' and '.join(given)} {'applies' if one else 'apply'} to {applies_to} drop "
                           f"{'it' if one else 'them'}")


def _load(run_dir: str, device_name: str, precision: str, command: str) -> tuple[LoadedRun, torch.device]:
    from fastclr.cpus import set_threads
    from fastclr.pretrained import load_run
    from fastclr.runtime import select_device

    set_threads(0)  # one thread per usable CPU at most: PyTorch's own count ignores a cgroup CPU quota
    device = select_device(device_name)
    return load_run(run_dir, device, precision, command=command), device


def cmd_embed(args: argparse.Namespace) -> int:
    """Write encoder features of every image of a source."""
    from fastclr.ingest.embed import embed

    if args.workers < 0:  # checked for a store too, whose rows need no decoding: the same flag, the same rule
        raise FastclrError(f"--workers must be 0 (as many as fit, up to 8) or more, got {args.workers}")
    if args.out.endswith(("/", os.sep)) and Path(args.out).name:  # Path drops the slash: `--out feats/` wrote feats.npy beside the folder
        raise FastclrError(f"--out {args.out} names a folder; give a file name, e.g. --out {Path(args.out) / 'feats'}")
    run, device = _load(args.run_dir, args.device, args.precision, "embed")
    embed(run, args.data, Path(args.out), device, args.split, args.batch_size, args.workers)
    return 0


def cmd_neighbours(args: argparse.Namespace) -> int:
    """Print (and draw) the store images nearest to a query image."""
    from fastclr.data import refuse_ambiguous
    from fastclr.ingest.neighbours import neighbours

    refuse_ambiguous(args.data)  # before Path(): "./mnist" is the store, and Path makes it "mnist"
    run, device = _load(args.run_dir, args.device, args.precision, "search with")
    neighbours(run, Path(args.data), Path(args.query), args.k, device, Path(args.grid) if args.grid is not None else None)
    return 0


def add_ingest_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register prepare, embed and neighbours on the CLI's subparsers."""
    p = sub.add_parser("prepare", help="decode a folder of images into a store (memory-mapped, with a manifest)")
    p.add_argument("folder", nargs="?", help="folder of images; subfolders are classes when there are two or more")
    p.add_argument("--out", required=True, help="the store directory to create or update")
    p.add_argument("--size", type=int, help="side of the stored square images in pixels (a FOLDER needs it; --builtin keeps "
                   "its dataset's own side)")
    p.add_argument("--fit", default=FOLDER_ONLY["fit"], choices=["crop", "pad"],
                   help="crop: short side to S, centre crop; pad: long side to S, black borders (default crop)")
    p.add_argument("--channels", default=FOLDER_ONLY["channels"], choices=["auto", "1", "3"],
                   help="auto: 1 if every image is grayscale (a palette of greys is), else 3 (default auto)")
    p.add_argument("--workers", type=int, default=FOLDER_ONLY["workers"], help="decoding processes (default: min(CPUs, 8))")
    p.add_argument("--max-pixels", type=int, default=FOLDER_ONLY["max_pixels"],
                   help="larger images are skipped (default %(default)s, Pillow's own limit)")
    p.add_argument("--labels", default=FOLDER_ONLY["labels"], choices=["auto", "none"],
                   help="auto: top-level subfolders are classes; none: every image unlabeled")
    p.add_argument("--rehash", action="store_true", help="hash every file, even those whose size and mtime are unchanged "
                   "(contents changed under a kept time: tar --mtime, cp -p, touch -r)")
    p.add_argument("--builtin", metavar="NAME", help="write a built-in dataset (e.g. fashion-mnist) as a store instead")
    p.add_argument("--data-root", help="with --builtin: directory searched first for its files")
    p.add_argument("--no-download", action="store_true", help="with --builtin: never download")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_prepare)

    e = sub.add_parser("embed", help="write encoder features h of every image: FILE.npy plus FILE.csv index")
    e.add_argument("run_dir")
    e.add_argument("--data", required=True, help="a built-in dataset name, a store, or a folder of images")
    e.add_argument("--out", required=True, help="FILE.npy; the index is written beside it as FILE.csv")
    e.add_argument("--split", default="all", choices=["all", "unlabeled", "train", "test"],
                   help="rows to embed (default all, in the source's order; the index has a split column)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    e.add_argument("--batch-size", type=int, default=256, help="images per encoder pass (default 256)")
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 where this machine has native bf16, else fp32")
    e.add_argument("--workers", type=int, default=0, help="decoding processes for a folder (default: min(CPUs, 8))")
    e.set_defaults(func=cmd_embed)

    n = sub.add_parser("neighbours", aliases=["neighbors"], help="print the store images nearest to a query image")
    n.add_argument("run_dir")
    n.add_argument("--data", required=True, help="a store")
    n.add_argument("--query", required=True, help="an image file")
    n.add_argument("-k", type=int, default=8, help="how many neighbours (default 8)")
    n.add_argument("--grid", help="also save the query and its neighbours as an image grid (e.g. grid.png)")
    n.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    n.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 where this machine has native bf16, else fp32")
    n.set_defaults(func=cmd_neighbours)
