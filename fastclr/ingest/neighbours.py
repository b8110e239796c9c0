"""`fastclr neighbours`: the store images nearest to a query image under a run's encoder.

The query is decoded by the same pipeline and options as the store's images, so a query that is
itself in the store finds itself first with similarity 1. Store features are cached in
RUN_DIR/features/, keyed by the store's store.json and the encoder's weights.
"""

from __future__ import annotations

import hashlib
import json
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from fastclr.streams import shown
from fastclr.files import WriteFailed, atomic_write, npy_writer
from fastclr.data.datasets import REGISTRY
from fastclr.data.store import Store, read_store
from fastclr.errors import FastclrError
from fastclr.evaluation.knn import cosine_topk
from fastclr.ingest.decode import process_file, store_decoding
from fastclr.ingest.embed import embed_images, match_channels, note_channels
from fastclr.ingest.walk import classify_file
from fastclr.pretrained import LoadedRun, note_prepared_again
from fastclr.runs import refuse_nameless, refuse_output, refuse_unwritable_file
from fastclr.evaluation.features import state_checksum

GRID_COLUMNS = 9
"""Tiles per row of the grid: the query and 8 neighbours fill the first row."""


def decode_query(path: Path, store: Store) -> np.ndarray:
    """The query image decoded as the store's images were: uint8 (S, S, C)."""
    if path.is_dir():
        raise FastclrError(f"--query {path} is a folder; give one image file (to embed a folder: `fastclr embed`)")
    if not path.is_file():
        what = "not a regular file (a pipe or device)" if path.exists() else "no such image file"
        raise FastclrError(f"--query {path}: {what}; give one image file")
    unusable = classify_file(path.name, path.stat().st_size)  # as prepare names them: not-an-image, zero-bytes
    if unusable is not None:
        raise FastclrError(f"--query {path} cannot be used: {unusable[0]} ({unusable[1]})")
    _, s, _, c = store.images.shape
    dec = store_decoding(store, s, c)
    o = process_file(path, path.name, dec)
    if o.image is None:
        raise FastclrError(f"--query {path} cannot be used: {o.reason} ({o.detail})")
    return match_channels(o.image[None], c)[0]


def store_features(run: LoadedRun, store: Store, device: torch.device, log: Callable[[str], None] = print) -> np.ndarray:
    """float32 (N, D) features of every store row, computed once per (store, encoder) and cached."""
    # Keyed on the store.json `read_store` read with these images (not the file now: a prepare finished
    # since would have the old images' features cached under the new store's key).
    key = hashlib.sha256(json.dumps(store.meta, sort_keys=True).encode() + state_checksum(run.encoder).encode()
                         + run.precision.name.encode()).hexdigest()[:16]
    cache = run.run_dir / "features" / f"{store.path.name}-{key}.npy"
    if cache.exists():
        try:
            feats = np.load(cache)
        except (OSError, ValueError) as e:  # damaged (written by an older version on a full disk): recompute
            log(f"note: ignoring the unreadable feature cache {cache} ({e}); recomputing it")
        else:
            if feats.shape == (len(store.images), run.spec.feature_dim) and np.isfinite(feats).all():
                return feats  # (a cache of NaN rows, written before they were refused, is recomputed: and refused)
    feats = embed_images(run, store.images, device)
    try:
        cache.parent.mkdir(exist_ok=True)
        atomic_write(cache, npy_writer(feats))
    except (OSError, WriteFailed) as e:  # the cache is optional: a folder or file it cannot have
        reason = e.reason if isinstance(e, WriteFailed) else e.strerror or str(e)
        log(f"note: store features not cached ({reason}); they are recomputed next time")
    return feats


GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff")
"""The image files a grid is written as (PIL picks the format from the name)."""
GRID_MARK = "fastclr neighbours grid"
"""Written into every grid (a PNG's Software text, a JPEG's or GIF's comment, a TIFF's description,
a WebP's XMP): an existing file is replaced only when it carries it, so a --grid naming a photo (one
of the store's own, say) is refused. (BMP, which holds no text, is no grid format.)"""


_DESCRIPTION = 270
"""TIFF's ImageDescription tag."""


def _marked(fmt: str) -> dict[str, object]:
    """The `Image.save` arguments that write GRID_MARK in `fmt`, where the format holds text."""
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", GRID_MARK)
        return {"pnginfo": info}
    if fmt == "TIFF":
        return {"tiffinfo": {_DESCRIPTION: GRID_MARK}}
    if fmt == "WEBP":
        return {"xmp": GRID_MARK.encode()}
    return {"comment": GRID_MARK} if fmt in ("JPEG", "GIF") else {}


def is_grid(path: Path) -> bool:
    """Whether the image file at `path` is a grid `neighbours` wrote."""
    try:
        with Image.open(path) as im:
            texts = [im.info.get("Software"), im.info.get("comment"), im.info.get("xmp"),
                     getattr(im, "tag_v2", {}).get(_DESCRIPTION)]
            return GRID_MARK in [t.decode(errors="replace") if isinstance(t, bytes) else t for t in texts]
    except Exception:  # not an image Pillow reads: not one of ours
        return False


def grid_image(tiles: list[np.ndarray], gap: int = 2, columns: int = GRID_COLUMNS) -> Image.Image:
    """uint8 (S, S, C) tiles in rows of `columns`, `gap` white pixels apart, as an RGB image."""
    s = tiles[0].shape[0]
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * s + (cols - 1) * gap, rows * s + (rows - 1) * gap), (255, 255, 255))
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid.paste(Image.fromarray(np.repeat(t, 3, -1) if t.shape[-1] == 1 else t, "RGB"), (c * (s + gap), r * (s + gap)))
    return grid


def neighbours(run: LoadedRun, store_path: Path, query: Path, k: int, device: torch.device, grid: Path | None = None,
               log: Callable[[str], None] = print) -> list[tuple[str, float]]:
    """The `k` store images nearest to `query`: (path, cosine similarity), best first; printed, and
    saved as an image grid (query first) when `grid` is given."""
    if k < 1:
        raise FastclrError(f"-k must be at least 1, got {k}")
    if grid is not None:  # before the search: a name PIL cannot write, or the query itself, failed after it
        refuse_nameless(grid, "--grid", example="grid.png")
        refuse_output(grid, "--grid", kind="the grid", suffixes=GRID_SUFFIXES, inputs=(query,))
        refuse_unwritable_file(grid, "--grid")  # its folder made only when it is written: a refused search leaves nothing
        if grid.is_file() and not is_grid(grid):
            raise FastclrError(f"--grid {grid} is there and is not a grid fastclr wrote (a photo of the store's, say, or "
                               "a grid written before grids were marked); choose another --grid, or remove the file to "
                               "replace it")
    if str(store_path) in REGISTRY and not store_path.exists():
        raise FastclrError(f"--data {store_path} is a built-in dataset; neighbours searches a store: write one with "
                           f"`fastclr prepare --builtin {store_path} --out STORE`, then --data STORE")
    store = read_store(store_path)
    note_prepared_again(run, store_path, log)
    note_channels(int(store.images.shape[-1]), run.spec.in_channels, log)  # the query's and the store's alike
    image = decode_query(query, store)
    feats = store_features(run, store, device, log)
    q = embed_images(run, image[None], device)[0]
    sims, rows = cosine_topk(torch.from_numpy(feats), torch.from_numpy(q)[None], k)
    idx = rows[0]
    found = [(store.paths[i], float(s)) for i, s in zip(idx.tolist(), sims[0].tolist())]
    log(f"nearest to {shown(str(query))} in {shown(str(store.path))} ({len(store.paths)} images):")
    for rank, (p, s) in enumerate(found, 1):
        log(f"{rank:3d}  {s:.4f}  {shown(p)}")
    if grid is not None:
        g = grid_image([image, *(np.asarray(store.images[i]) for i in idx.tolist())])
        encoded = io.BytesIO()
        try:
            fmt = Image.registered_extensions()[grid.suffix.lower()]
            g.save(encoded, format=fmt, **_marked(fmt))
        except (OSError, ValueError, KeyError) as e:
            raise FastclrError(f"--grid {grid}: cannot write the image ({e})") from None
        grid.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(grid, lambda f: f.write(encoded.getvalue()))  # a failed write keeps the grid that was there
        log(f"grid saved to {shown(str(grid))} (query first, then neighbours left to right)")
    return found
