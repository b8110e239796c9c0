"""Writing the safetensors format straight from the tensors' memory.

The format (github.com/huggingface/safetensors): an 8-byte little-endian length N, N bytes of JSON
naming each tensor's dtype, shape and byte range in the data that follows (and a "__metadata__"
object of strings), the JSON padded with spaces so the data starts 8-byte aligned, then the tensors'
bytes back to back, every byte belonging to one tensor. `safetensors.torch.save` builds the whole
file in memory (a copy of every tensor, then of the file): twice a model's size at its peak, and
short of that memory it ended in a Rust panic or abort, not a MemoryError the command can name.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from typing import IO

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, read in place (a copy would double its memory)."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """The SHA-256 an export records of its weights (`weights_sha256`): over the names in sorted
    order, each name, dtype and shape, then the tensor's bytes. Its own fixed form, so that an
    export written now stays checkable whatever the checkpoints' content hash becomes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(raw_bytes(t))
    return h.hexdigest()


def safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Callable[[IO[bytes]], None]:
    """A writer of `tensors` and `metadata` as a safetensors file, for `atomic_write`. Tensors are
    laid out by element size, largest first, then by name, so that each starts aligned to its
    element size after the 8-byte aligned header (no gap may lie between them)."""
    if sys.byteorder != "little":  # the format's bytes are little-endian; tensors are written as they are held
        raise NotImplementedError("writing safetensors on a big-endian machine")
    held = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    order = sorted(held, key=lambda k: (-held[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        t = held[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)

    def write(f: IO[bytes]) -> None:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            t = held[name]
            if t.numel():
                f.write(raw_bytes(t))

    return write
