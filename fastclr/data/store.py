"""A prepared store: the user's images as one memory-mapped uint8 array, plus a manifest.

    STORE/images.u8     raw uint8 rows in C order, shape (N, S, S, C) given in store.json
    STORE/manifest.csv  one line per row, in row order: index, path, split, label, class, bytes,
                        mtime_ns, sha256, width, height, mode (the file's displayed size and mode)
    STORE/skipped.csv   path, reason, detail, bytes, mtime_ns, sha256 for every entry not used
    STORE/store.json    format, shape, classes, split sizes, options, skip totals, source folder,
                        content (a sha256 of the shape, classes, each row's path, split, label
                        and class, and every pixel: what runs compare, not the path).
                        Written last, atomically: a directory is a complete store iff it exists.

Rows are grouped by split, "unlabeled" (label -1) then "train" then "test", each sorted by path,
so every split is a contiguous slice of the memory map: training and the probe read it from disk
batch by batch and a store larger than RAM works. Pretraining uses unlabeled + train; the linear
probe fits on train and reports on test, as with the built-in datasets.

numpy reads a store without fastclr:
    meta = json.load(open("STORE/store.json"))
    images = np.memmap("STORE/images.u8", np.uint8, "r", shape=tuple(meta["shape"]))
    index = pandas.read_csv("STORE/manifest.csv")
"""

from __future__ import annotations

import collections
import contextlib
import csv
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastclr.files import atomic_write, fsync_path
from fastclr.data.datasets import Dataset, ImageSet
from fastclr.errors import FastclrError
from fastclr.locks import LOCK_FILE, RunLock, locked_by_another
from fastclr.version import __version__

IMAGES, MANIFEST, SKIPPED, META = "images.u8", "manifest.csv", "skipped.csv", "store.json"
CONTENT_COLUMNS = ("path", "split", "label", "class")
"""What a row is besides its pixels: with the shape, the classes and every pixel, store.json's
"content" (the same images under the same names and labels give the same value, whenever,
wherever and with whatever options produced those bytes)."""
MANIFEST_COLUMNS = ("index", "path", "split", "label", "class", "bytes", "mtime_ns", "sha256", "width", "height", "mode")
SKIPPED_COLUMNS = ("path", "reason", "detail", "bytes", "mtime_ns", "sha256")
SPLITS = ("unlabeled", "train", "test")
FORMAT, VERSION = "fastclr-store", 1
_PARTIAL = ".partial"
_OWN_NAMES = {IMAGES, MANIFEST, SKIPPED, META, "." + IMAGES + _PARTIAL, "." + MANIFEST + _PARTIAL,
              "." + SKIPPED + _PARTIAL, "." + IMAGES + ".promote", LOCK_FILE}


@dataclass
class Store:
    """An opened store: images stay on disk (np.memmap); the manifest columns are in memory."""

    path: Path
    images: np.ndarray
    """uint8 (N, S, S, C), an np.memmap."""
    paths: list[str]
    labels: np.ndarray
    """int64 (N,); -1 for unlabeled rows."""
    split_sizes: dict[str, int]
    classes: list[str]
    meta: dict[str, Any]

    def split_range(self, split: str) -> tuple[int, int]:
        """[start, stop) of the rows of `split`."""
        start = 0
        for s in SPLITS:
            if s == split:
                return start, start + self.split_sizes.get(s, 0)
            start += self.split_sizes.get(s, 0)
        raise ValueError(split)

    def split_of_rows(self) -> list[str]:
        """The split name of every row, in row order."""
        return [s for s in SPLITS for _ in range(self.split_sizes.get(s, 0))]


def is_store(path: Path) -> bool:
    """Whether `path` is a complete store directory: its store.json and images.u8 (a store.json
    alone may be anyone's, as in a folder of a shop's photos)."""
    return (path / META).is_file() and (path / IMAGES).is_file()


def unfinished_store(path: Path) -> bool:
    """Whether `path` is a store a prepare has not completed (interrupted, or still running): its
    images or their partial file, and no store.json."""
    return not (path / META).is_file() and ((path / IMAGES).is_file() or (path / ("." + IMAGES + _PARTIAL)).is_file())


def store_holding(path: Path) -> Path | None:
    """The store `path` is, or lies inside (resolved), else None."""
    resolved = path.resolve()
    return next((folder for folder in (resolved, *resolved.parents) if is_store(folder)), None)


def read_csv(path: Path, columns: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The rows of a store CSV file as dicts (empty list when the file is missing); one line when it
    is not UTF-8 text or lacks one of `columns`. A byte-order mark (a spreadsheet's "CSV UTF-8")
    is read past: the header's first name is the column's, not "\ufeffpath"."""
    if not path.exists():
        return []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise FastclrError(f"{path} is not a CSV file fastclr can read ({type(e).__name__}: {e}); it was saved "
                           "by another program: run `fastclr prepare` again") from None
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise FastclrError(f"{path} has no {', '.join(missing)} column{'s' * (len(missing) > 1)}; it was edited or "
                           "saved by another program: run `fastclr prepare` again")
    return rows


READ_TRIES = 5
"""Reads of a store that a prepare replaced while they ran, before giving up (each after a pause)."""


def read_store(path: str | Path) -> Store:
    """Open a store; one-line errors for a path that is not one or is inconsistent. A prepare updating
    it removes store.json, renames the new images.u8 and manifest.csv in, then writes store.json: a
    read between those steps paired the old store.json's shape and rows with the new pixels and
    trained on them (exit 0). So store.json is read again once everything is open, and the read is
    made again while it changed."""
    p = Path(path)
    for tries_left in reversed(range(READ_TRIES)):
        before = _meta_bytes(p)
        try:
            store = _read_store_once(p)
        except (FastclrError, ValueError, OSError):
            # The store as it is on disk, not one changing under the read (a store.json missing while a
            # prepare holds the store: its swap, or its first writing, which the last try names).
            changing = _meta_bytes(p) != before or (before is None and bool(locked_by_another(p)))
            if not changing or not tries_left:
                raise
        else:
            if _meta_bytes(p) == before:
                return store
        if tries_left:
            time.sleep(0.5)
    owner = locked_by_another(p)
    raise FastclrError(f"{p} changed while it was read, {READ_TRIES} times" + (f" (it is being written by {owner})"
                       if owner else "") + "; run the command again once the prepare updating it is done")


def _meta_bytes(p: Path) -> bytes | None:
    try:
        return (p / META).read_bytes()
    except OSError:
        return None


def _read_store_once(p: Path) -> Store:
    if not p.is_dir():
        if p.exists():  # `--out` onto the file would not work: a store is a folder
            raise FastclrError(f"{p} is a file, not a store directory; give the folder `fastclr prepare` wrote")
        raise FastclrError(f"{p} does not exist; give a store, or make one with `fastclr prepare FOLDER --size S --out {p}`")
    if not is_store(p):
        partial = (p / ("." + IMAGES + _PARTIAL)).exists() or (p / IMAGES).exists()
        if (p / META).is_file() and not partial:
            raise FastclrError(f"{p} holds a {META} but no {IMAGES}: it is not a fastclr store; make one with "
                               f"`fastclr prepare FOLDER --size S --out STORE` and give that")
        if partial:
            owner = locked_by_another(p)
            if owner:
                raise FastclrError(f"{p} is being written by {owner} (a prepare running now); wait for it to finish")
            raise FastclrError(f"{p} is an incomplete store (an interrupted prepare): it has no {META}; run the same "
                               f"`fastclr prepare FOLDER --size S --out {p}` again")
        whole = p.resolve()  # `.` and `/` have no name to suggest a store's from (a traceback)
        store = whole.with_name(whole.name + ".store") if whole.name else Path("images.store")
        raise FastclrError(f"{p} is not a fastclr store (it has no {META}); if it holds your images, make one with "
                           f"`fastclr prepare {p} --size S --out {store}` and give that")
    try:
        meta = json.loads((p / META).read_text(encoding="utf-8"))
        shape = tuple(int(s) for s in meta["shape"])
        splits = {s: int(meta["splits"].get(s, 0)) for s in SPLITS}
        classes = [str(c) for c in meta.get("classes", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FastclrError(f"{p / META} is damaged ({type(e).__name__}: {e}); run `fastclr prepare` again") from None
    if len(shape) != 4 or min(shape) < 1 or shape[1] != shape[2] or shape[3] not in (1, 3):
        raise FastclrError(f"{p / META} gives shape {list(shape)}, not [N, S, S, 1 or 3]; run `fastclr prepare` again")
    if min(splits.values()) < 0 or sum(splits.values()) != shape[0]:
        raise FastclrError(f"{p / META} splits {splits} do not add up to its {shape[0]} images; "
                           "run `fastclr prepare` again")
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise FastclrError(f"{p} is a {meta.get('format')} v{meta.get('version')} store; "
                           f"this fastclr reads {FORMAT} v{VERSION}")
    expected = int(np.prod(shape))
    actual = (p / IMAGES).stat().st_size if (p / IMAGES).exists() else -1
    if actual != expected:
        raise FastclrError(f"{p / IMAGES} holds {actual} bytes, {shape} needs {expected}; run `fastclr prepare` again")
    rows = read_csv(p / MANIFEST, ("index", "path", "split", "label"))
    if len(rows) != shape[0]:
        raise FastclrError(f"{p / MANIFEST} lists {len(rows)} images, the store holds {shape[0]}; "
                           "run `fastclr prepare` again")
    _check_order(p / MANIFEST, rows, splits)
    images = np.memmap(p / IMAGES, np.uint8, "r", shape=shape)
    labels = _labels(p / MANIFEST, rows, len(classes))
    return Store(p, images, [r["path"] for r in rows], labels, splits, classes, meta)


def _check_order(manifest: Path, rows: list[dict[str, str]], splits: dict[str, int]) -> None:
    """Row i of the manifest describes image i, and the splits follow each other as store.json
    counts them: a manifest sorted or edited otherwise would put labels on other images."""
    want = [s for s in SPLITS for _ in range(splits[s])]
    for i, (row, split) in enumerate(zip(rows, want)):
        if row.get("index") != str(i) or row.get("split") != split:
            raise FastclrError(f"{manifest} row {i + 1} is {row.get('path')!r} with index {row.get('index')!r} and "
                               f"split {row.get('split')!r}, where image {i} of the {split} split belongs: the "
                               "manifest was reordered or edited; run `fastclr prepare` again")


def _labels(manifest: Path, rows: list[dict[str, str]], n_classes: int) -> np.ndarray:
    """int64 labels of the manifest's rows (-1: unlabelled), each an integer below the class count."""
    try:
        labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as e:
        raise FastclrError(f"{manifest} has a label that is not an integer ({e}); run `fastclr prepare` again") from None
    bad = int(((labels < -1) | (labels >= n_classes)).sum())
    if bad:
        raise FastclrError(f"{manifest}: {bad} labels are outside -1..{n_classes - 1} (the store names {n_classes} "
                           "classes); run `fastclr prepare` again")
    return labels


def store_dataset(store: Store) -> Dataset:
    """The store as a Dataset: pretrain on unlabeled + train rows, probe on train -> test."""
    u0, u1 = store.split_range("unlabeled")
    t0, t1 = store.split_range("train")
    v0, v1 = store.split_range("test")
    x = store.images
    # A tiny labelled store can hash every row into the test split; then pretrain on all rows.
    # Labelled rows keep their labels (--supcon's positives), unlabelled ones -1: the train split's
    # labels are the test's too where every row was hashed there, so those stay unread (None).
    pretrain = ImageSet(x[u0:t1], store.labels[u0:t1]) if t1 > u0 else ImageSet(x, None)
    train = test = None
    if t1 > t0 and v1 > v0:
        train = ImageSet(x[t0:t1], store.labels[t0:t1])
        test = ImageSet(x[v0:v1], store.labels[v0:v1])
    unlabelled = u1 - u0 if train is not None and u1 == t0 else 0  # rows [u0, u1), then the train rows
    return Dataset(str(store.path), pretrain, train, test, store.classes, origin=str(store.path), unlabelled=unlabelled,
                   content=str(store.meta.get("content", "")))


def open_store(path: str | Path) -> Dataset:
    """A store directory as a Dataset whose images are memory-mapped (see `store_dataset`)."""
    return store_dataset(read_store(path))


def check_output_dir(out: Path) -> None:
    """Refuse to write a store into a directory that holds anything but a store, under a name no
    run can record (config.toml is UTF-8), or through a symbolic link to nothing."""
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise FastclrError(f"--out {str(out)!r} is not valid UTF-8: a run's config.toml could not name the store; "
                           "choose an --out whose name is") from None
    if out.is_symlink() and not out.exists():
        raise FastclrError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist (or loops); "
                           "remove the link, or choose another --out")
    if out.exists() and not out.is_dir():
        raise FastclrError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir():
        names = os.listdir(out)
        foreign = sorted(n for n in names if n not in _OWN_NAMES and not n.startswith(f".{META}."))
        if foreign:
            raise FastclrError(f"{out} exists and is not a fastclr store (it holds {foreign[0]!r}); choose a new --out")
        # A store's own names are its only where its store.json is (or, for a store cut short before its
        # commit, its images): a user's store.json or manifest.csv under those names was replaced
        if META in names and not _own_meta(out / META) or \
                IMAGES not in names and META not in names and ({MANIFEST, SKIPPED} & set(names)):
            shown = META if META in names else sorted({MANIFEST, SKIPPED} & set(names))[0]
            raise FastclrError(f"{out} exists and is not a fastclr store (its {shown} is not a store's); choose a new "
                               "--out")


def _own_meta(path: Path) -> bool:
    """Whether `path` is a store.json a store wrote (its "format")."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


class StoreClaim:
    """A store's directory, made if need be, locked for one writer (`RunLock`): two prepares into one
    --out truncated each other's partial files, and one could commit the other's rows."""

    def __init__(self, out: Path, log: Callable[[str], None] = print):
        check_output_dir(out)
        self.out, self.created = out, not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = RunLock(out, log, what="this store", way_out="wait for it to finish, or choose another --out")
        except BaseException:
            self._remove_created()
            raise

    def release(self, remove_created: bool = False) -> None:
        """Give the directory up; with `remove_created`, remove it too when this claim made it and
        nothing else is in it (a failed or aborted first prepare leaves no folder behind)."""
        self.lock.release()
        if remove_created:
            self._remove_created()

    def _remove_created(self) -> None:
        if self.created:
            try:
                self.out.rmdir()
            except OSError:  # something else was put in it meanwhile: left
                pass


class StoreWriter:
    """Writes the rows of a new store beside any old one, then swaps it in with `commit`.

    Until `commit`, only hidden `.partial` files are written, so an interrupted prepare leaves the
    old store (or no store) as it was. With channels None ("auto") rows are written with one
    channel until the first colour image arrives; the rows written so far are then expanded to
    three once, which costs nothing for all-grayscale folders.
    """

    def __init__(self, out: Path, size: int, channels: int | None, log: Callable[[str], None] = print,
                 claim: StoreClaim | None = None):
        """`claim`: the directory's, taken earlier by the caller (`prepare` before it walks a folder);
        the writer gives it up when it commits or aborts, or fails here."""
        self.claim = claim if claim is not None else StoreClaim(out, log)
        self.out = out
        try:
            self._open(out, size, channels)
        except BaseException:
            with contextlib.suppress(OSError):  # the error to tell is the one that stopped the opening
                self.abort()
            raise

    def _open(self, out: Path, size: int, channels: int | None) -> None:
        self.out, self.size = out, size
        self.auto = channels is None
        self.channels = channels or 1
        self.n = 0
        self.split_sizes = {s: 0 for s in SPLITS}
        self.class_rows: collections.Counter[tuple[str, int]] = collections.Counter()
        """Rows written by (split, label)."""
        self._images_path = out / ("." + IMAGES + _PARTIAL)
        self._manifest_path = out / ("." + MANIFEST + _PARTIAL)
        self._images = open(self._images_path, "wb")
        self._manifest_file = open(self._manifest_path, "w", newline="", encoding="utf-8")
        self._manifest = csv.writer(self._manifest_file)
        self._manifest.writerow(MANIFEST_COLUMNS)
        self._last_split = 0
        self._rows = hashlib.sha256()
        self._pixels = hashlib.sha256()
        """Of the bytes of images.u8 as they stand (a promotion to colour hashes them again)."""

    def append(self, image: np.ndarray, row: dict[str, Any]) -> None:
        """Add one uint8 (S, S, 1 or 3) image with its manifest fields (all but `index`)."""
        rank = SPLITS.index(row["split"])
        assert rank >= self._last_split, "rows must come grouped by split: unlabeled, train, test"
        self._last_split = rank
        c = image.shape[-1]
        if c == 3 and self.channels == 1:
            assert self.auto, "a colour image in a 1-channel store; decode converts it first"
            self._promote()
        if c == 1 and self.channels == 3:
            image = np.repeat(image, 3, axis=-1)  # exactly Pillow's L -> RGB
        assert image.shape == (self.size, self.size, self.channels) and image.dtype == np.uint8, image.shape
        pixels = np.ascontiguousarray(image).tobytes()
        self._images.write(pixels)
        self._pixels.update(pixels)
        self._manifest.writerow([self.n, *(row.get(k, "") for k in MANIFEST_COLUMNS[1:])])
        self._rows.update(json.dumps([str(row.get(k, "")) for k in CONTENT_COLUMNS]).encode() + b"\n")
        self.split_sizes[row["split"]] += 1
        self.class_rows[row["split"], int(row.get("label", -1))] += 1
        self.n += 1

    def _promote(self) -> None:
        self._images.close()
        tmp = self.out / ("." + IMAGES + ".promote")
        self._pixels = hashlib.sha256()
        with open(tmp, "wb") as f:
            if self.n:
                old = np.memmap(self._images_path, np.uint8, "r", shape=(self.n, self.size, self.size, 1))
                for i in range(0, self.n, 4096):
                    block = np.repeat(old[i : i + 4096], 3, axis=-1).tobytes()
                    f.write(block)
                    self._pixels.update(block)
                del old
        os.replace(tmp, self._images_path)
        self._images = open(self._images_path, "ab")
        self.channels = 3

    def commit(self, classes: Sequence[str], options: dict[str, Any], skipped: Sequence[Any], source: str) -> Path:
        """Write skipped.csv and store.json and swap the new files in; returns the store path."""
        if self.n == 0:
            raise FastclrError("a store needs at least one image")
        self._images.close()
        self._manifest_file.close()
        skipped_path = self.out / ("." + SKIPPED + _PARTIAL)
        with open(skipped_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(SKIPPED_COLUMNS)
            for s in skipped:
                w.writerow([s.rel, s.reason, s.detail, "" if s.size < 0 else s.size,
                            "" if s.mtime_ns < 0 else s.mtime_ns, s.sha256])
        totals: dict[str, int] = {}
        for s in skipped:
            totals[s.reason] = totals.get(s.reason, 0) + 1
        shape = [self.n, self.size, self.size, self.channels]
        content = hashlib.sha256(json.dumps([shape, list(classes)]).encode())
        content.update(self._rows.digest())
        content.update(self._pixels.digest())  # the pixels themselves: options giving the same bytes agree
        meta = {"format": FORMAT, "version": VERSION, "shape": shape,
                "classes": list(classes), "splits": self.split_sizes, "options": options, "skipped": totals,
                "source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fastclr_version": __version__,
                "content": content.hexdigest()}
        for p in (self._images_path, self._manifest_path, skipped_path):
            fsync_path(p)
        # The old store stops being complete before any of its files is replaced.
        (self.out / META).unlink(missing_ok=True)
        os.replace(self._images_path, self.out / IMAGES)
        os.replace(self._manifest_path, self.out / MANIFEST)
        os.replace(skipped_path, self.out / SKIPPED)
        atomic_write(self.out / META, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
        self.claim.release()
        return self.out

    def abort(self) -> None:
        """Remove the partial files (and the store directory if this writer created it)."""
        for f in (getattr(self, "_images", None), getattr(self, "_manifest_file", None)):  # (none when opening failed)
            try:
                if f is not None:
                    f.close()
            except OSError:  # the buffered tail could not be written either (a full disk): it is deleted next
                pass
        try:
            for name in _OWN_NAMES - {IMAGES, MANIFEST, SKIPPED, META, LOCK_FILE}:
                (self.out / name).unlink(missing_ok=True)
        finally:  # whatever could not be removed, the store is given up
            self.claim.release(remove_created=True)
