"""`fastclr prepare`: a folder of images -> a store, decoding in parallel, incrementally.

Order of work: walk the folder (walk.py) -> lay out labels and splits -> match files against the
previous store -> decode the rest in worker processes (decode.py) -> append rows in store order
(data/store.py) -> commit. Rows are written in store order whatever order the workers finish in,
so a store is a pure function of the folder and the options.

Incremental re-runs: when the previous store at --out was made with the same pixel options, a
file whose (path, size, mtime) is unchanged is taken from it without being read (the cheap check
rsync and make rely on; --rehash turns it off); any other file is read and hashed, and decoded
only if no row of the previous store has the same SHA-256. Renamed or copied files are therefore
not decoded again, and the verdicts on broken files are kept too. Deleted files drop out.
"""

from __future__ import annotations

import collections
import signal
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastclr.data.store import (MANIFEST, MANIFEST_COLUMNS, META, SKIPPED, SKIPPED_COLUMNS, SPLITS, Store, StoreClaim,
                                StoreWriter, is_store, read_csv, read_store)
from fastclr.errors import FastclrError
from fastclr.signals import STOP_SIGNALS, Deferred, deferred_signals, die_with_parent
from fastclr.files import is_write_error, not_a_folder, write_failure_reason, write_way_out
from fastclr.ingest.decode import (PIPELINE_VERSION, TRANSIENT, DecodeOptions, Outcome, as_stored, decode_peak_bytes,
                                   pixels_that_fit, process_file)
from fastclr.ingest.walk import FileEntry, Skip, Walk, walk_folder
from fastclr.cpus import usable_cpus
from fastclr.runtime import available_memory
from fastclr.progress import Progress, counted

HOLDOUT = 10
"""One labelled image in HOLDOUT (chosen by a hash of its path) is in the probe's test split."""
PIXEL_OPTIONS = ("size", "fit", "channels", "max_pixels", "pipeline")
"""Options that change the stored pixels or skip verdicts; a change means decoding everything."""
_CHUNK = 8


@dataclass
class Layout:
    """Classes, and for every candidate file (in walk order) its split and label."""

    classes: list[str]
    split: dict[str, str]
    label: dict[str, int]


def holdout(rel: str) -> bool:
    """Whether a labelled image is in the test split: a hash of its path, so the split of an
    image never changes when the folder grows."""
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % HOLDOUT == 0


def layout(rels: Iterable[str], labels: str = "auto") -> Layout:
    """Labels from top-level subfolders (sorted names -> 0, 1, ...) when there are at least two;
    images at the top level, or in a folder without two classes, are unlabeled (-1)."""
    rels = list(rels)
    tops = sorted({r.split("/", 1)[0] for r in rels if "/" in r})
    classes = tops if labels == "auto" and len(tops) >= 2 else []
    index = {c: i for i, c in enumerate(classes)}
    split, label = {}, {}
    for r in rels:
        top = r.split("/", 1)[0] if "/" in r else None
        if top in index:
            label[r] = index[top]
            split[r] = "test" if holdout(r) else "train"
        else:
            label[r], split[r] = -1, "unlabeled"
    return Layout(classes, split, label)


def layout_notes(root: Path, lay: Layout, rels: list[str], labels: str) -> list[str]:
    """Notes on layouts whose labels are likely not what the user meant, taken as documented: one
    folder wrapping class folders (`data/train/cat`: no classes, the labels lost), and split
    folders of loose images (`train/x.jpg`, `test/y.jpg`: "train" and "test" as the classes)."""
    if labels != "auto":
        return []
    tops = sorted({r.split("/", 1)[0] for r in rels if "/" in r})
    if not lay.classes and len(tops) == 1 and all("/" in r for r in rels):
        inner = sorted({r.split("/", 2)[1] for r in rels if r.count("/") >= 2})
        if len(inner) >= 2:
            return [f"note: the images are all under {tops[0]}/, so none has a class (the classes are the top-level "
                    f"folders, two or more); to label them by its subfolders ({', '.join(inner[:3])}"
                    f"{', ...' if len(inner) > 3 else ''}), give {root / tops[0]}"]
    if lay.classes and all(c.lower() in SPLIT_NAMES for c in lay.classes):
        return [f"note: the classes are {', '.join(lay.classes)}, names of a dataset's splits; if they are splits "
                f"of unlabelled images, prepare again with --labels none"]
    return []


SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "dev", "test", "testing", "unlabeled",
                         "unlabelled", "unlabeled_images"})
"""Folder names that stand for a dataset's split, not a class of images."""
HELD_OUT = frozenset({"val", "valid", "validation", "dev", "test", "testing"})
"""The splits among them kept for measuring, not for training on."""


def refuse_split_folders(root: Path, classes: list[str], rels: list[str]) -> None:
    """A one-line error when the top-level folders taken as classes are a dataset's splits, each
    holding class folders (`train/cat`, `val/cat`): as classes they became "train" and "val", the
    real classes were lost and the given split was ignored, and every figure measured that."""
    if not classes or not all(c.lower() in SPLIT_NAMES for c in classes):
        return
    nested = sorted({r.split("/", 2)[0] for r in rels if r.count("/") >= 2})
    if not nested:
        return
    # The example is the training split: the first in sorted order was often `test`, the one not to train on.
    split = min(nested, key=lambda n: (n.lower() not in ("train", "training"), n.lower() in HELD_OUT, n))
    inner = sorted({r.split("/", 2)[1] for r in rels if r.startswith(split + "/") and r.count("/") >= 2})
    raise FastclrError(f"the folders in {root} ({', '.join(classes)}) are splits, each with its own subfolders "
                       f"({', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''} in {split}), not classes; give "
                       f"one split, e.g. `fastclr prepare {root / split}`, whose subfolders are the classes, "
                       "or --labels none to take every image unlabelled")


def folders_without_images(root: Path, files: Iterable[FileEntry], exclude: Path) -> list[str]:
    """The top-level subfolders of `root` (not hidden, not `exclude` or a folder holding it) in
    which the walk found no image, sorted."""
    tops = {f.rel.split("/", 1)[0] for f in files if "/" in f.rel}
    out = exclude.resolve()
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in tops
                  and d.resolve() != out and d.resolve() not in out.parents)


@dataclass
class Previous:
    """What the previous store at --out offers for reuse."""

    store: Store
    by_path: dict[str, dict[str, str]] = field(default_factory=dict)
    """path -> manifest row, or skipped row for files that were read and found unusable."""
    by_hash: dict[str, dict[str, str]] = field(default_factory=dict)


def refuse_another_source(out: Path, source: str, log: Callable[[str], None]) -> None:
    """Refuse to replace the store at `out` of another source: a folder that is still there, or a
    built-in dataset (`source`: a folder's absolute path, or a built-in dataset's name). A mistyped
    folder, --out or --builtin replaced the store, and its hours of decoding, without a word. A
    store whose folder is gone (moved or renamed) is updated from another folder, and said so."""
    try:
        old = json.loads((out / META).read_text(encoding="utf-8")).get("source") if is_store(out) else None
    except (OSError, ValueError, AttributeError):
        return  # a damaged store.json: `load_previous` says why it is not reused
    if not isinstance(old, str) or not old or old == source:
        return
    folders = os.path.isabs(old), os.path.isabs(source)
    if all(folders) and (not Path(old).is_dir() or os.path.samefile(old, source)):  # the same folder by another path is the same
        if not Path(old).is_dir():
            log(f"note: {out} was prepared from {old}, which is gone; updating it from {source}")
        return
    def named(s: str) -> str:
        return s if os.path.isabs(s) else f"the built-in {s}"
    raise FastclrError(f"{out} holds the store of {named(old)}, not of {named(source)}: give another --out, or "
                       f"remove {out} first to replace it")


def load_previous(out: Path, options: dict[str, Any], log: Callable[[str], None]) -> Previous | None:
    """The previous store at `out` if its pixel options equal `options`, else None."""
    if not is_store(out):
        return None
    try:
        store = read_store(out)
    except FastclrError as e:
        log(f"previous store not reusable ({e}); decoding every file")
        return None
    old = store.meta.get("options", {})
    # Pipeline 2 changed only 16-bit grey-with-alpha PNGs, which pipeline 1 recorded as RGBA: those rows
    # are decoded again, not the whole store.
    migrated = old.get("pipeline") == 1 and options.get("pipeline") == 2
    changed = [k for k in PIXEL_OPTIONS if old.get(k) != options.get(k) and not (k == "pipeline" and migrated)]
    if changed:
        log(f"options changed ({', '.join(f'{k} {old.get(k)} -> {options.get(k)}' for k in changed)}); decoding every file")
        return None
    try:
        verdicts, manifest = read_csv(out / SKIPPED, SKIPPED_COLUMNS), read_csv(out / MANIFEST, MANIFEST_COLUMNS)
    except FastclrError as e:  # a skipped.csv saved back by a spreadsheet, say
        log(f"previous store not reusable ({e}); decoding every file")
        return None
    prev = Previous(store)
    # Verdicts on files that were read (they carry a hash) are reused; walk-level ones are redone.
    for row in [r for r in verdicts if r["sha256"]] + manifest:
        if migrated and row.get("mode") == "RGBA" and row["path"].lower().endswith(".png"):
            continue
        prev.by_path[row["path"]] = row
        prev.by_hash[row["sha256"]] = row
    return prev


def default_workers() -> int:
    """min(usable CPUs (affinity and cgroup quota), 8): decoding scales with cores, and 8 already saturates most disks."""
    return min(usable_cpus(), 8)


def workers_that_fit(requested: int, max_pixels: int, available: int | None) -> int:
    """At most `requested` decoding processes, and no more than can each decode an image of
    `max_pixels` pixels at once within `available` bytes. Raises if not even one can."""
    if available is None:
        return requested
    fit = available // decode_peak_bytes(max_pixels)
    if fit < 1:
        smaller = pixels_that_fit(available // 2)
        fix = f"lower --max-pixels (e.g. --max-pixels {smaller})" if smaller else "free memory first"
        raise FastclrError(f"decoding one image of {max_pixels} pixels may need "
                           f"{decode_peak_bytes(max_pixels) / 2**30:.2f} GiB and {available / 2**30:.2f} GiB of "
                           f"memory is available; {fix}")
    return min(requested, fit)


# Worker-process state, set once per worker by `_init` (the set of known hashes can be large).
_W: dict[str, Any] = {}


def _init(root: Path, opts: DecodeOptions, known: frozenset[str], parent: int | None = None) -> None:
    """A decoding process's start (the pool's initializer; never this process's own decoding)."""
    _W.update(root=root, opts=opts, known=known)
    # Ctrl-C reaches the whole process group: the parent stops the work; a decoder interrupted
    # inside a put on the result queue left its lock held and the parent's shutdown waiting forever.
    # So does a SIGTERM to the group (systemd, Slurm, `kill -- -PGID`): a decoder it killed in the
    # middle of sending its results left the parent reading half a message forever (the parent now
    # unwinds on SIGTERM and waits for its pool), and the unwinding handler it would inherit raised
    # inside the put. The parent stops them; they die with it where it is killed outright.
    # A closed terminal's SIGHUP reaches the group alike.
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    kill = getattr(signal, "SIGKILL", None)  # POSIX only: Windows has none
    if parent is not None and kill is not None:
        die_with_parent(parent, kill)


def _work(rels: list[str]) -> list[Outcome]:
    return [process_file(_W["root"] / r, r, _W["opts"], _W["known"]) for r in rels]


def _spawn_hint(method: str) -> str:
    """Where decoders are spawned (macOS, Windows) from a script: each runs the script again, and one
    without a main guard calls fastclr again in every decoder, which ends them all (the store is then
    held by the parent), told as a crash at the first file."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if method != "spawn" or not script or Path(script).name in ("__main__.py", "fastclr", "fastclr.exe"):
        return ""
    return (f"; or, if {Path(script).name} calls fastclr at its top level, put that under `if __name__ == "
            "\"__main__\":` (each decoding process runs the script again on this system)")


def decode_all(root: Path, rels: list[str], opts: DecodeOptions, known: frozenset[str], workers: int) -> Iterator[Outcome]:
    """Outcomes of `rels` in the order given, decoded by `workers` processes (1: in this one).

    At most 4 chunks per worker are in flight, so memory stays bounded when writing is slower
    than decoding."""
    chunks = [rels[i : i + _CHUNK] for i in range(0, len(rels), _CHUNK)]
    if workers <= 1 or len(chunks) <= 1:  # in this process, whose Ctrl-C must still stop it
        _W.update(root=root, opts=opts, known=known)
        for c in chunks:
            yield from _work(c)
        return
    if sys.platform == "win32":  # ProcessPoolExecutor refuses more than 61 processes there
        workers = min(workers, 61)
    # fork: workers start in milliseconds and inherit the hash set; they never touch torch.
    method = "fork" if sys.platform == "linux" else "spawn"
    # A stop signal acts between chunks, never inside the pool's own bookkeeping (`deferred_signals`).
    with deferred_signals() as deferred, ProcessPoolExecutor(workers, multiprocessing.get_context(method),
                                                             initializer=_init,
                                                             initargs=(root, opts, known, os.getpid())) as pool:
        pending: collections.deque[tuple[list[str], Future[list[Outcome]]]] = collections.deque()
        it = iter(chunks)
        try:
            for c in it:
                pending.append((c, pool.submit(_work, c)))
                if len(pending) >= 4 * workers:
                    break
            while pending:
                chunk, future = pending.popleft()
                try:
                    done = _result(future, deferred)
                except BrokenProcessPool:
                    # A decoder that crashes the process (or the OOM killer) cannot be caught per file.
                    raise FastclrError(f"a decoding process died (out of memory, or a crashing decoder) at or "
                                       f"after {chunk[0]}; run again with --workers 1 to find the file, then move "
                                       f"it away{_spawn_hint(method)}") from None
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(_work, nxt)))
                yield from done
        finally:
            for _, f in pending:
                f.cancel()


def _result(future: Future[list[Outcome]], deferred: Deferred) -> list[Outcome]:
    """`future`'s outcomes, a stop signal acted on within half a second while they are awaited."""
    while True:
        deferred.run_pending()
        try:
            return future.result(timeout=0.5)
        except TimeoutError:
            continue


@dataclass
class PrepareResult:
    """What `prepare_store` did."""

    store: Path
    images: int
    skipped: list[Skip]
    decoded: list[str]
    """Relative paths decoded by this run (the others came from the previous store)."""
    reused: int
    seconds: float
    skipped_list: Path | None = None
    """Where the skipped files are listed: the store's skipped.csv, or the copy the caller keeps."""


def check_options(opts: DecodeOptions, labels: str = "auto") -> None:
    """One-line errors for options that cannot work."""
    if opts.size < 8:
        raise FastclrError(f"--size must be at least 8 pixels, got {opts.size}")
    if opts.fit not in ("crop", "pad"):
        raise FastclrError(f"--fit must be crop or pad, got {opts.fit!r}")
    if opts.channels not in ("auto", "1", "3"):
        raise FastclrError(f"--channels must be auto, 1 or 3, got {opts.channels!r}")
    if opts.max_pixels < opts.size * opts.size:
        raise FastclrError(f"--size {opts.size} makes images of {opts.size * opts.size:,} pixels, more than --max-pixels "
                           f"{opts.max_pixels:,} (the largest image decoded); give a smaller --size, or a larger --max-pixels")
    if labels not in ("auto", "none"):
        raise FastclrError(f"--labels must be auto or none, got {labels!r}")


@dataclass
class _Plan:
    """What `prepare_store` found before decoding: the files, their labels and splits, the previous
    store's reusable rows, and how to decode the rest."""

    walk: Walk
    layout: Layout
    options: dict[str, Any]
    previous: Previous | None
    before: Before | None
    entries: list[FileEntry]
    to_read: list[str]
    decoders: int
    known: frozenset[str]


def _plan(root: Path, out: Path, opts: DecodeOptions, labels: str, workers: int, rehash: bool, dedupe: bool,
          log: Callable[[str], None]) -> _Plan:
    """Walk `root`, lay it out and weigh it against the store at `out` (see `prepare_store`)."""
    refuse_another_source(out, str(root.resolve()), log)
    walk = walk_folder(root, exclude=out)
    if not walk.files:
        raise FastclrError(f"no images in {root} ({_totals(walk.skipped) or 'it is empty'}); "
                           f"fastclr reads {', '.join(('jpg', 'png', 'webp', 'bmp', 'tiff', 'gif'))} and more")
    lay = layout((f.rel for f in walk.files), labels)
    if dedupe:  # a store to train and measure on (embed's rows only name each file's folder)
        refuse_split_folders(root, lay.classes, [f.rel for f in walk.files])
        for line in layout_notes(root, lay, [f.rel for f in walk.files], labels):
            log(line)
    bare = folders_without_images(root, walk.files, exclude=out)
    if bare:  # a class folder still to be filled disappears from the classes: say so
        log(f"note: no images in {', '.join(bare[:5])}{', ...' if len(bare) > 5 else ''}: "
            f"{'not a class' if len(bare) == 1 else 'not classes'}"
            f"{' (their files are in skipped.csv)' if any(k.rel.split('/', 1)[0] in bare for k in walk.skipped) else ''}")
    options = dict(asdict(opts), labels=labels, pipeline=PIPELINE_VERSION)
    before = store_before(out)
    prev = load_previous(out, options, log)
    entries = sorted(walk.files, key=lambda f: (SPLITS.index(lay.split[f.rel]), f.rel))
    to_read = [f.rel for f in entries if unchanged_row(prev, f, rehash) is None]
    asked, free = workers or default_workers(), available_memory()
    decoders = workers_that_fit(asked, opts.max_pixels, free) if to_read else asked
    if decoders < asked and free is not None:
        log(f"decoding with {decoders} processes, not {asked}: each may need "
            f"{decode_peak_bytes(opts.max_pixels) / 2**30:.1f} GiB for an image at --max-pixels {opts.max_pixels}, "
            f"and {free / 2**30:.1f} GiB is available")
    # --rehash reads every file again, and decodes again the ones an earlier run could not use.
    known = frozenset(h for h, r in prev.by_hash.items() if not (rehash and "reason" in r)) if prev else frozenset()
    return _Plan(walk, lay, options, prev, before, entries, to_read, decoders, known)


def unchanged_row(prev: Previous | None, f: FileEntry, rehash: bool) -> dict[str, str] | None:
    """The previous store's row (or verdict) of `f` when the file is as it was then (path, size
    and modification time; never with --rehash)."""
    row = prev.by_path.get(f.rel) if prev and not rehash else None
    return row if row and row["bytes"] == str(f.size) and row["mtime_ns"] == str(f.mtime_ns) else None


def prepare_store(
    folder: str | Path,
    out: str | Path,
    opts: DecodeOptions,
    *,
    workers: int = 0,
    labels: str = "auto",
    rehash: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    skipped_list: Path | None = None,
    dedupe: bool = True,
    stage: str = "prepare",
) -> PrepareResult:
    """Decode every image below `folder` into the store `out` (created, or updated in place),
    the skipped files listed in its skipped.csv. `skipped_list`: where the caller keeps a copy of
    that list (a temporary store's own goes with it), named in the summary instead. `dedupe`: a
    file with the bytes of one already stored is listed as a duplicate, not stored again (a store
    for training; `embed` of a folder keeps a row for every file). `stage` names the work on the
    progress line (`embed` of a folder decodes, it prepares nothing the user asked for)."""
    t_start = time.perf_counter()
    root, out = Path(folder), Path(out)
    check_options(opts, labels)
    if workers < 0:
        raise FastclrError(f"--workers must be 0 (as many as fit, up to 8) or more, got {workers}")
    if not root.is_dir():
        raise FastclrError(f"{root} {not_a_folder(root)}; give the folder that holds your images")
    claim = StoreClaim(out, log)  # before the walk: a second prepare into --out is refused before its minutes
    try:
        plan = _plan(root, out, opts, labels, workers, rehash, dedupe, log)
    except BaseException:
        claim.release(remove_created=True)
        raise
    walk, lay, options, prev, entries, before = (plan.walk, plan.layout, plan.options, plan.previous, plan.entries,
                                                 plan.before)
    to_read, decoders, known = plan.to_read, plan.decoders, plan.known
    del plan  # `prev` alone holds the previous store from here (dropped before the commit)

    def unchanged(f: FileEntry) -> dict[str, str] | None:
        return unchanged_row(prev, f, rehash)
    writer = StoreWriter(out, opts.size, None if opts.channels == "auto" else int(opts.channels), log, claim)
    bar = Progress(len(entries), enabled=progress, unit=stage, rate_of="files", tty_every=0.25)
    skipped, decoded, reused = list(walk.skipped), [], 0
    kept: dict[str, str] = {}  # sha256 -> the path in the store with those bytes
    kept_pixels: dict[str, str] = {}  # sha256 of the stored pixels -> the path in the store with them
    unlabelled_twin: list[str] = []  # labelled files whose bytes an unlabelled one (kept first) has
    try:
        outcomes = decode_all(root, to_read, opts, known, decoders)
        for i, f in enumerate(entries):
            # Either a previous row or verdict (by path and stat, or by hash), or a new outcome.
            old, o = unchanged(f), None
            if old is None:
                o = next(outcomes)
                if o.known and prev is not None:
                    old = prev.by_hash[o.sha256]
                elif o.sha256:
                    decoded.append(f.rel)  # read, hashed and new: the decoder ran on it
            fields = {"path": f.rel, "split": lay.split[f.rel], "label": lay.label[f.rel],
                      "class": lay.classes[lay.label[f.rel]] if lay.label[f.rel] >= 0 else "",
                      "bytes": f.size, "mtime_ns": f.mtime_ns}
            sha = old["sha256"] if old is not None else (o.sha256 if o is not None else "")
            usable = "reason" not in old if old is not None else o is not None and o.image is not None
            if dedupe and usable and sha in kept:
                # The same bytes twice (a copy, a link): one row, so that an image is never in both
                # train and test. Not cached by hash (the kept file has that hash): decided each run.
                skipped.append(Skip(f.rel, "duplicate", f"the same bytes as {kept[sha]}", f.size, f.mtime_ns))
                if lay.label[f.rel] >= 0 > lay.label[kept[sha]]:
                    unlabelled_twin.append(f.rel)
                bar.update(i + 1)
                continue
            pixels = (_old_row(prev, old) if "reason" not in old else None) if old is not None and prev is not None \
                else o.image if o is not None else None
            if dedupe and pixels is not None:
                # The same pixels from other bytes (re-saved, re-compressed, its metadata stripped): the
                # same image to train and measure on, which a split by path put in both train and test.
                seen = kept_pixels.setdefault(pixel_key(pixels), f.rel)
                if seen != f.rel:
                    skipped.append(Skip(f.rel, "duplicate", f"the same pixels as {seen} at {opts.size} px", f.size,
                                        f.mtime_ns))
                    if lay.label[f.rel] >= 0 > lay.label[seen]:
                        unlabelled_twin.append(f.rel)
                    bar.update(i + 1)
                    continue
            if old is not None and prev is not None:
                reused += 1
                if "reason" in old:
                    skipped.append(Skip(f.rel, old["reason"], old["detail"], f.size, f.mtime_ns, old["sha256"]))
                else:
                    same = {k: old[k] for k in ("sha256", "width", "height", "mode")}
                    assert pixels is not None  # (the previous store's row, read above)
                    writer.append(pixels, dict(fields, **same))
                    kept[sha] = f.rel
            elif o is not None and o.image is not None:
                writer.append(o.image, dict(fields, bytes=o.size, sha256=o.sha256, width=o.width, height=o.height,
                                            mode=o.mode))
                kept[sha] = f.rel
            elif o is not None:
                remembered = o.sha256 if o.reason not in TRANSIENT else ""  # retried by the next run
                skipped.append(Skip(f.rel, o.reason, o.detail, o.size, f.mtime_ns if remembered else -1, remembered))
            bar.update(i + 1)
        bar.close()
        if writer.n == 0:
            raise FastclrError(f"no usable images in {root}: all {len(skipped)} entries were skipped ({_totals(skipped)})")
        skipped.sort(key=lambda s: s.rel)
        changes = update_notes(before, kept, writer.channels)
        # The previous store maps the old images file (its last row read too), which Windows will not
        # let the commit replace.
        prev = pixels = None
        writer.commit(lay.classes, options, skipped, str(root.resolve()))
    except OSError as e:
        writer.abort()
        if not is_write_error(e):
            raise
        raise FastclrError(f"cannot write the store {out} ({write_failure_reason(e, out)}); its partial files were "
                           f"removed; {write_way_out(e, 'another --out')}, and run the command again") from None
    except BaseException:
        writer.abort()
        raise
    listed_in = skipped_list if skipped_list is not None and skipped else out / SKIPPED
    result = PrepareResult(out, writer.n, skipped, decoded, reused, time.perf_counter() - t_start, listed_in)
    log(summary(result, lay, writer.channels))
    for line in changes:
        log(line)
    if dedupe:
        for line in class_notes(lay.classes, writer.class_rows):
            log(line)
    if unlabelled_twin:  # unlabelled rows come first in a store, so the copy kept is the unlabelled one
        n = len(unlabelled_twin)
        log(f"note: {counted(n, 'labelled image')} ({', '.join(unlabelled_twin[:3])}{', ...' * (n > 3)}) had the "
            f"same bytes or pixels as an unlabelled file and {'were' if n > 1 else 'was'} kept unlabelled, without {'their' if n > 1 else 'its'} "
            "class (skipped.csv: duplicate); remove the unlabelled copies and prepare again to keep the labels")
    return result


@dataclass(frozen=True)
class Before:
    """The store at --out before an update, whatever its options: its channels and images."""

    channels: int
    images: dict[str, str]
    """path -> SHA-256 of the file, for every stored row."""


def store_before(out: Path) -> Before | None:
    """The store at `out` as `update_notes` compares with (None: no readable store there)."""
    if not is_store(out):
        return None
    try:
        store = read_store(out)
        rows = read_csv(out / MANIFEST, MANIFEST_COLUMNS)
    except FastclrError:
        return None
    return Before(int(store.images.shape[-1]), {r["path"]: r["sha256"] for r in rows})


def update_notes(before: Before | None, stored: dict[str, str], channels: int) -> list[str]:
    """Notes on what an update changed beyond new rows (`stored`: SHA-256 -> path of the files the new
    store holds): images of the store before whose path and bytes are in it no longer (deleted, not
    renamed or changed),
    and a channel count that changed (`--channels auto` with a colour image among grey ones, or the
    last one gone; a 16-bit grey-with-alpha PNG read as grey): runs trained on it before no longer fit."""
    if before is None:
        return []
    paths = set(stored.values())
    gone = sorted(p for p, sha in before.images.items() if sha not in stored and p not in paths)
    notes = []
    if gone:
        notes.append(f"note: {counted(len(gone), 'image')} of the previous store {'is' if len(gone) == 1 else 'are'} no "
                     f"longer in the folder ({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}): "
                     f"{'its row is' if len(gone) == 1 else 'their rows are'} not in the store")
    if before.channels != channels:
        notes.append(f"note: the store has {counted(channels, 'channel')} now, {before.channels} before: runs "
                     f"trained on it before no longer fit it; train again, or give --channels {before.channels} to "
                     f"keep {before.channels}")
    return notes


def class_notes(classes: list[str], rows: collections.Counter[tuple[str, int]]) -> list[str]:
    """Notes on the classes a probe cannot use: folders whose files were all skipped (the store
    names the class, with no row: a probe over the others reads as if they were all), and classes
    whose images all fell in the test split (never learnt, always wrong)."""
    none = [c for k, c in enumerate(classes) if not rows["train", k] and not rows["test", k]]
    untrained = [c for k, c in enumerate(classes) if not rows["train", k] and rows["test", k]]
    notes = []
    if none:
        notes.append(f"note: no image of {_listed(none)} could be stored (see skipped.csv): the store names "
                     f"{'that class' if len(none) == 1 else 'those classes'} without a row, so probes measure the other "
                     f"{len(classes) - len(none)}; add usable images to {'its folder' if len(none) == 1 else 'their folders'}"
                     f" or remove {'it' if len(none) == 1 else 'them'}, and prepare again")
    if untrained:
        notes.append(f"note: every image of {_listed(untrained)} is in the test split (1 labelled image in "
                     f"{HOLDOUT} is held out): a probe cannot learn {'that class' if len(untrained) == 1 else 'those classes'}"
                     f" and gets {'its' if len(untrained) == 1 else 'their'} test images wrong; add images to "
                     f"{'its folder' if len(untrained) == 1 else 'their folders'} and prepare again")
    return notes


def _listed(names: list[str]) -> str:
    return f"class {names[0]}" if len(names) == 1 else f"classes {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"


def pixel_key(pixels: np.ndarray) -> str:
    """The identity of a decoded image's pixels (S, S, C): an RGB image whose three channels are
    equal is its grey one (a grey file saved again as RGB stores the same row)."""
    if pixels.shape[-1] == 3 and (pixels[..., :1] == pixels).all():
        pixels = pixels[..., :1]
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def _old_row(prev: Previous, row: dict[str, str]) -> np.ndarray:
    """A previous store's row as its natural channel count (1 for a grayscale source file)."""
    return as_stored(np.asarray(prev.store.images[int(row["index"])]), row["mode"])


def _totals(skipped: list[Skip]) -> str:
    counts = collections.Counter(s.reason for s in skipped)
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def summary(result: PrepareResult, lay: Layout, channels: int) -> str:
    """The lines printed after a prepare: what is in the store and what was skipped."""
    kind = f"{len(lay.classes)} classes" if lay.classes else "unlabeled"
    lines = [f"store {result.store}: {counted(result.images, 'image')} ({kind}, {counted(channels, 'channel')}); "
             f"{len(result.decoded)} files decoded, {result.reused} reused, in {result.seconds:.1f} s"]
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)}: {_totals(result.skipped)} (listed in {result.skipped_list or result.store / SKIPPED})")
    else:
        lines.append("skipped 0")
    return "\n".join(lines)
