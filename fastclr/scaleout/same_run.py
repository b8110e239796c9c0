"""Every rank of a run must train the same run: the same settings, the same data, the same
checkpoint. Each rank reads its own command line, files and run directory, and a node that sees
other ones (a node-local store or --config at the same path, a store prepared again on one node, a
run directory not shared) trained on without a word, or waited for the collective timeout and then
blamed a lost peer. One gather of small digests at the start names the difference instead."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from fastclr import config as config_mod
from fastclr.config import Config
from fastclr.data import Dataset
from fastclr.errors import FastclrError
from fastclr.models.foreign import file_sha256
from fastclr.scaleout.distributed import DistContext, gather_objects

LOCAL_KEYS = frozenset({"data.name", "data.root", "data.download", "model.init", "train.device", "train.threads",
                        "train.keep_memory", "train.compile", "train.deterministic", "train.check_sync",
                        "train.run_dir", "train.trackers", "train.dist_timeout"})
"""Settings a node may give its own way: where its copy of the data or of the --init weights is
(compared by content instead), how its process computes (device, threads, memory, compilation,
determinism, the sync check), where the run is written (rank 0 chooses), the trackers (rank 0
reports) and the collective timeout. Not the memory layout (DistributedDataParallel compares the
parameters' strides), nor the logging and checkpoint intervals (the ranks agree on a stop there)."""

DIGEST_ROWS = 4096
"""Images hashed at a time for the digest of a built-in dataset (whose every pixel is hashed)."""


def data_digest(dataset: Dataset) -> str:
    """A digest of `dataset` that another copy of the same data gives wherever it is stored: the
    sizes, classes and every label, and a store's content identity (a hash of its pixels made when
    it was written), or for a built-in dataset, which has none, every pixel of its pretraining and
    test images (64 sampled images let a node's copy with 5,000 images changed train without a word;
    MNIST's 55 MB hash in about 0.1 s, STL-10's 3.2 GB in seconds, once a run)."""
    images, labels = dataset.pretrain.images, dataset.pretrain.labels
    sizes = [len(split) if split is not None else -1 for split in (dataset.train, dataset.test)]
    h = hashlib.sha256(json.dumps([dataset.content, list(images.shape), sizes, dataset.classes]).encode())
    if not dataset.content:
        test = dataset.test.images if dataset.test is not None else images[:0]
        for block in (images, test):
            for start in range(0, len(block), DIGEST_ROWS):
                h.update(np.ascontiguousarray(block[start : start + DIGEST_ROWS]).data)
    if labels is not None:
        h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def check_same_run(cfg: Config, dataset: Dataset, checkpoint_sha256: str, ctx: DistContext) -> None:
    """Raise the same one-line FastclrError on every rank when any rank's settings (but LOCAL_KEYS),
    data, --init file (a new run's: a resumed one never reads it) or resumed checkpoint
    (`checkpoint_sha256`, "" for a new run) differ from rank 0's."""
    if not ctx.active:
        return
    settings = {k: v for k, v in config_mod.to_flat(cfg).items() if k not in LOCAL_KEYS}
    init = Path(cfg.model.init) if cfg.model.init and not checkpoint_sha256 else None
    every = gather_objects({"settings": settings, "data": data_digest(dataset), "size": len(dataset.pretrain),
                            "checkpoint": checkpoint_sha256,
                            "init": file_sha256(init) if init is not None and init.is_file() else ""}, ctx)
    first = every[0]
    for rank, mine in enumerate(every[1:], start=1):
        why = _differences(first, mine, rank)
        if why:
            raise FastclrError(f"the ranks were not given the same run: {why}; every rank must run the same command on "
                               "the same data (a store every node sees, or identical copies) and the same run directory")


def _differences(first: dict[str, Any], mine: dict[str, Any], rank: int) -> str:
    """What rank `rank` was given otherwise than rank 0, in a few words ("" when nothing)."""
    keys = [k for k in first["settings"] if first["settings"][k] != mine["settings"].get(k)]
    if keys:
        # data.preset differs where --data names another dataset (a node-local setting, compared by content)
        shown = ", ".join(f"{'--data' if k == 'data.preset' else config_mod.flag_of(k)} {mine['settings'].get(k)!r} "
                          f"(rank 0: {first['settings'][k]!r})" for k in keys[:3])
        return f"rank {rank} has {shown}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
    if first["data"] != mine["data"]:
        sizes = (f"{mine['size']:,} images to rank 0's {first['size']:,}" if mine["size"] != first["size"]
                 else "other images or labels")
        return f"rank {rank}'s data differs from rank 0's ({sizes})"
    if first["init"] != mine["init"]:
        return f"rank {rank}'s --init file holds other weights than rank 0's (or is not there)"
    if first["checkpoint"] != mine["checkpoint"]:
        return (f"rank {rank} read another checkpoint's content than rank 0 at the same step (a run directory that "
                "is not the same on every node)")
    return ""
