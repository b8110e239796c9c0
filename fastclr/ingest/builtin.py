"""Built-in datasets as stores, and as the same (split, images) blocks a store is made of."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastclr.data.datasets import Dataset, ImageSet, load_builtin
from fastclr.data.store import StoreWriter
from fastclr.ingest.prepare import refuse_another_source


def builtin_blocks(ds: Dataset) -> list[tuple[str, ImageSet]]:
    """A dataset's images as (split, images) blocks in store order: unlabeled, train, test.

    The built-in readers put images used only for pretraining (STL-10's unlabeled part) first in
    `pretrain`, followed by the train split; that prefix is the unlabeled block.
    """
    if ds.train is None:
        return [("unlabeled", ds.pretrain)]
    blocks = []
    extra = len(ds.pretrain) - len(ds.train) if ds.pretrain is not ds.train else 0
    if extra > 0:
        blocks.append(("unlabeled", ImageSet(ds.pretrain.images[:extra], None)))
    blocks.append(("train", ds.train))
    if ds.test is not None:
        blocks.append(("test", ds.test))
    return blocks


def block_rows(blocks: list[tuple[str, ImageSet]], classes: list[str]) -> list[dict[str, object]]:
    """Index rows (path `split/000123`, split, label, class) of the images in `blocks`, in order."""
    rows: list[dict[str, object]] = []
    for split, s in blocks:
        for i in range(len(s)):
            label = int(s.labels[i]) if s.labels is not None else -1
            rows.append({"path": f"{split}/{i:06d}", "split": split, "label": label,
                         "class": classes[label] if 0 <= label < len(classes) else ""})
    return rows


def write_builtin_store(name: str, out: Path, root: str | None = None, download: bool = True,
                        log: Callable[[str], None] = print) -> Path:
    """Write built-in dataset `name` as a store at its native size (splits kept as they are)."""
    refuse_another_source(out, name, log)  # before any download or decoding
    ds = load_builtin(name, root, download)
    h, w, c = ds.image_shape
    blocks = builtin_blocks(ds)
    writer = StoreWriter(out, h, c, log)
    try:
        rows = iter(block_rows(blocks, ds.classes))
        for _, s in blocks:
            for image in s.images:
                writer.append(image, dict(next(rows), width=w, height=h, mode="L" if c == 1 else "RGB"))
        writer.commit(ds.classes, {"builtin": name, "size": h, "channels": str(c)}, [], name)
    except BaseException:
        writer.abort()
        raise
    log(f"store {out}: {writer.n} images of {name} ({', '.join(f'{n} {s}' for s, n in writer.split_sizes.items() if n)})")
    return out
