"""`fastclr embed`: encoder features h of every image of a source, as .npy plus a CSV index.

A source is a built-in dataset name (all its splits, or one), a store, or a plain folder (decoded
into a temporary store at the run's image size and channels, then removed). Rows keep the
source's order: a store's row order, or a built-in dataset's unlabeled, train, test order.
pandas and numpy read the output directly:
    features = np.load("emb.npy")            # float32 (N, D)
    index = pandas.read_csv("emb.csv")       # row, path, split, label, class
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastclr.files import atomic_write, atomic_write_all, npy_writer, through_link
from fastclr.data import refuse_ambiguous
from fastclr.data.datasets import REGISTRY, holds_dataset, load_builtin, recorded_root
from fastclr.data.store import SKIPPED, SKIPPED_COLUMNS, SPLITS, is_store, read_store, unfinished_store
from fastclr.augment import LUMA
from fastclr.errors import FastclrError
from fastclr.ingest.builtin import block_rows, builtin_blocks
from fastclr.ingest.decode import DecodeOptions, store_decoding
from fastclr.ingest.prepare import prepare_store
from fastclr.ingest.walk import IMAGE_EXTENSIONS, fastclr_folder
from fastclr.pretrained import LoadedRun, note_prepared_again
from fastclr.runs import refuse_nameless, refuse_output, refuse_uncreatable
from fastclr.evaluation.features import features_of, require_finite

INDEX_COLUMNS = ("row", "path", "split", "label", "class")
_LUMA = np.array(LUMA, np.float32)
_CHUNK = 4096


@dataclass
class Source:
    """Images to embed, as blocks of uint8 (n, S, S, C) arrays (memory-mapped for stores), with
    one index row per image."""

    blocks: list[np.ndarray]
    rows: list[dict[str, object]]
    skipped_csv: bytes | None = None
    """A folder's list of the files it could not use (None: nothing skipped, or not a folder)."""


def match_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (B, H, W, C) -> (B, H, W, channels): grayscale is repeated into RGB (as Pillow does),
    RGB becomes its luma."""
    c = x.shape[-1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=-1)
    if c == 3 and channels == 1:
        return np.rint(x.astype(np.float32) @ _LUMA)[..., None].clip(0, 255).astype(np.uint8)
    raise FastclrError(f"images have {c} channels and the encoder expects {channels}; "
                       f"prepare a store with --channels {channels}")


def holds_images(folder: Path) -> bool:
    """Whether a file of an image format is anywhere under `folder` (stops at the first): a folder of
    embeddings, or a run, named like a built-in dataset is not a folder of images."""
    for _, _, files in os.walk(folder):
        if any(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for name in files):
            return True
    return False


def _store_source(path: Path, split: str) -> Source:
    store = read_store(path)
    names = store.split_of_rows()
    rows: list[dict[str, object]] = [
        {"path": p, "split": s, "label": int(y), "class": store.classes[y] if y >= 0 else ""}
        for p, s, y in zip(store.paths, names, store.labels.tolist())
    ]
    if split == "all":
        return Source([store.images], rows)
    a, b = store.split_range(split)
    return Source([store.images[a:b]], rows[a:b])


@contextlib.contextmanager
def open_source(data: str, split: str, decode: Callable[[], DecodeOptions], workers: int = 0,
                root: str | None = None, log: Callable[[str], None] = print,
                skipped_list: Path | None = None) -> Iterator[Source]:
    """The images `data` names: a built-in dataset, a store, or a folder (decoded with `decode()` to
    a temporary store, removed afterwards; its list of skipped files comes with the source, and the
    log names `skipped_list` as the place the caller keeps it). `split` is all, unlabeled, train or test."""
    if split not in ("all", *SPLITS):
        raise FastclrError(f"--split must be all, {', '.join(SPLITS)}; got {split!r}")
    path = Path(data)
    refuse_ambiguous(data)
    if data in REGISTRY and path.is_dir() and not holds_dataset(data, path) and holds_images(path):
        raise FastclrError(f"--data {data} names the built-in dataset {data} and the folder ./{data} in this folder; "
                           f"give ./{data} for the folder's images, or rename the folder to use the built-in")
    if data in REGISTRY:
        ds = load_builtin(data, root)
        blocks = [(s, b) for s, b in builtin_blocks(ds) if split in ("all", s)]
        yield Source([b.images for _, b in blocks], block_rows(blocks, ds.classes))
    elif is_store(path) or unfinished_store(path):  # an unfinished one is refused as such, not walked as images
        yield _store_source(path, split)
    elif fastclr_folder(str(path)) == "run":  # its files came out as "no images (18 not-an-image)"
        raise FastclrError(f"--data {data} is a fastclr run, not images; give a store, a folder of images or a built-in "
                           "dataset (the data a run trained on is data.name in its config.toml)")
    elif path.is_dir():
        with tempfile.TemporaryDirectory(prefix="fastclr-embed-") as tmp:
            store = Path(tmp) / "store"
            said = lambda line: log(line.replace(f"store {store}:", f"{path} decoded:"))  # noqa: E731 (not a temp path)
            result = prepare_store(path, store, decode(), workers=workers, log=said, skipped_list=skipped_list,
                                   dedupe=False, stage="decode")  # one row per file, copies included
            source = _store_source(store, split)
            source.skipped_csv = (store / SKIPPED).read_bytes() if result.skipped else None
            try:
                yield source
            finally:  # the blocks map the temporary store, which Windows cannot delete while mapped
                source.blocks.clear()
    else:
        hint = ("; put it in a folder of its own to embed it, or give it to `fastclr neighbours --query`"
                if path.is_file() else "")
        raise FastclrError(f"--data {data}: not a built-in dataset ({', '.join(REGISTRY)}), a store or a folder of "
                           f"images{hint}")


def embed_images(run: LoadedRun, images: np.ndarray, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """float32 (N, D) features h of uint8 (N, S, S, C) images (read `_CHUNK` rows at a time, so a
    memory-mapped store never has to fit in memory), resized to the run's image size."""
    c = run.spec.in_channels
    out = [np.zeros((0, run.spec.feature_dim), np.float32)]
    for start in range(0, len(images), _CHUNK):
        x = match_channels(np.array(images[start : start + _CHUNK]), c)  # one read of the chunk, writable
        h = features_of(run.encoder, run.spec, x, device, run.precision, batch_size, run.config.train.channels_last)
        out.append(require_finite(h, "the encoder's features").numpy())  # never written, cached or ranked
    return np.concatenate(out)


def output_paths(out: Path) -> tuple[Path, Path]:
    """FILE.npy and FILE.csv for `--out FILE[.npy|.csv]` (where the file named or FILE.npy is a link, at its target),
    refused before any work where they cannot be written (their folder is made with them: a refused
    command leaves nothing). A folder's skipped files go to FILE.skipped.csv."""
    refuse_nameless(out)
    if out.suffix in (".npy", ".csv"):  # `--out latest.csv`, a link to an index: the pair goes where it leads
        out = through_link(out)
    npy = out.with_suffix(".npy") if out.suffix in (".npy", ".csv") else out.with_name(out.name + ".npy")
    npy = through_link(npy)  # a link is written through, as `export --out`: its target's name names the pair
    index = npy.with_suffix(".csv")
    for path in (npy, index):
        refuse_output(path)
        if path.is_dir():  # found only when written: the .npy was in place, its index not
            raise FastclrError(f"--out {out} would write {path}, which is a folder; choose another --out")
    for path, header in ((index, INDEX_COLUMNS), (npy.with_suffix(".skipped.csv"), SKIPPED_COLUMNS)):
        if path.is_file() and _first_line(path) != ",".join(header):  # `--out data` beside the user's data.csv
            raise FastclrError(f"--out {out} would replace {path}, which is not an embedding's file; choose another "
                               "--out")
    if npy.is_file() and not index.is_file():  # an embedding's pair is written whole or not at all
        raise FastclrError(f"--out {out} would replace {npy}, which has no index {index.name} beside "
                           "it (a user's array, or an embedding whose index is gone); choose another --out, or remove "
                           "it to replace it")
    refuse_uncreatable(npy.parent)
    return npy, index


def _first_line(path: Path) -> str:
    """The first line of a text file, '' where it cannot be read as one."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.readline(4096).rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return ""


def write_embeddings(out: Path, features: np.ndarray, rows: list[dict[str, object]],
                     skipped_csv: bytes | None = None) -> tuple[Path, Path]:
    """Write FILE.npy (features), FILE.csv (index) and a folder's FILE.skipped.csv, all complete or
    none (the old ones kept). Without skipped files, a FILE.skipped.csv left by an earlier
    embedding into FILE is removed once the new pair is in place: it no longer describes them."""
    npy, index = output_paths(out)
    npy.parent.mkdir(parents=True, exist_ok=True)
    listed = npy.with_suffix(".skipped.csv")
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(INDEX_COLUMNS)
    for i, r in enumerate(rows):
        w.writerow([i, *(r[k] for k in INDEX_COLUMNS[1:])])
    files = [(npy, npy_writer(features.astype(np.float32, copy=False))),
             (index, lambda f: f.write(text.getvalue().encode()))]
    if skipped_csv is not None:
        files.append((listed, lambda f: f.write(skipped_csv)))
    atomic_write_all(files)
    if skipped_csv is None:
        listed.unlink(missing_ok=True)
    return npy, index


def folder_decoding(run: LoadedRun, log: Callable[[str], None] = print) -> DecodeOptions:
    """How a folder is decoded for `run`: as the images it trained on were stored (fit, pixel
    limit, side) and in the encoder's channels; `embed_images` then resizes them to the encoder's
    input as evaluation does (a run with --crop-size trains at another size than it stores). A run
    on a built-in dataset gets `prepare`'s defaults at that dataset's side; one whose store is gone,
    at the encoder's."""
    c, name = run.spec.in_channels, run.config.data.name
    if name in REGISTRY:
        return DecodeOptions(REGISTRY[name].side, channels=str(c))
    if not is_store(Path(name)):
        log(f"note: the run's store {name} is not there; decoding the folder as `fastclr prepare` does by default "
            "(--fit crop)")
        return DecodeOptions(run.spec.image_size, channels=str(c))
    store = read_store(Path(name))
    note_prepared_again(run, Path(name), log, folder=True)
    return store_decoding(store, int(store.images.shape[1]), c)


def note_channels(have: int, c: int, log: Callable[[str], None]) -> None:
    """Says how images of `have` channels are fed to an encoder of `c` (`embed_images` converts them)."""
    if have != c:
        log(f"note: the images have {have} channel(s), the encoder {c}: "
            + ("repeating the gray channel" if have == 1 else "using the luma of the RGB images"))


def _embed_source(run: LoadedRun, src: Source, data: str, split: str, device: torch.device, batch_size: int,
                  log: Callable[[str], None]) -> np.ndarray:
    """float32 (N, D) features h of every image of `src`, in its order."""
    c = run.spec.in_channels
    if not src.rows:
        raise FastclrError(f"--split {split}: {data} has no images there; choose another --split (all, "
                           f"{', '.join(SPLITS)})")
    note_channels(src.blocks[0].shape[-1] if src.blocks else c, c, log)
    feats = [embed_images(run, b, device, batch_size) for b in src.blocks]
    return np.concatenate(feats) if feats else np.zeros((0, run.spec.feature_dim), np.float32)


def embed(run: LoadedRun, data: str, out: Path, device: torch.device, split: str = "all", batch_size: int = 256,
          workers: int = 0, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Features of every image of `data` under the run's encoder, written as `out` (.npy + .csv).
    A folder's unusable files are listed in FILE.skipped.csv, written with the pair (alone when the
    embedding then fails and no earlier pair is at FILE: the log has named it); a list left by an
    earlier embedding into the same FILE is removed when nothing is skipped now."""
    if batch_size < 1:
        raise FastclrError(f"--batch-size must be at least 1, got {batch_size}")
    npy, _ = output_paths(out)
    skipped = npy.with_suffix(".skipped.csv")
    root = recorded_root(run.config.data.name, run.config.data.root, str(run.run_dir), log)
    with open_source(data, split, lambda: folder_decoding(run, log), workers, root or None, log,
                     skipped_list=skipped) as src:
        try:
            features = _embed_source(run, src, data, split, device, batch_size, log)
            paths = write_embeddings(out, features, src.rows, src.skipped_csv)
        except BaseException:
            if src.skipped_csv is not None and not npy.exists():  # the log named the list: kept though embedding failed
                skipped.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(skipped, lambda f: f.write(src.skipped_csv or b""))
            elif src.skipped_csv is not None:  # an earlier embedding's pair and list stay together, as they were
                log(f"note: {skipped} was not written: the embedding already in {npy} is kept as it was"
                    + (", with its own list" if skipped.exists() else ""))
            raise
    log(f"{len(src.rows)} embeddings of dimension {features.shape[1]} written to {paths[0]} (index: {paths[1]})")
    return paths

