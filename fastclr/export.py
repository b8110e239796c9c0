"""The encoder f alone, exported as safetensors (no pickle: loading it cannot run code).

Metadata (strings) records how to rebuild the module: encoder name, input channels and size,
width, stem, feature dimension, the input standardisation and the library version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fastclr.checkpoint import atomic_write
from fastclr.errors import FastclrError
from fastclr.models import EncoderSpec, encoder_from_spec
from fastclr.version import __version__

ENCODER_FILE = "encoder.safetensors"


def save_encoder(path: Path, encoder: nn.Module, spec: EncoderSpec) -> Path:
    """Write the encoder's state and its spec (as JSON metadata) to `path`."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    meta = {"fastclr": json.dumps(dict(spec.to_dict(), fastclr_version=__version__))}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    atomic_write(path, lambda f: f.write(tmp.read_bytes()))
    tmp.unlink()
    return path


def load_encoder(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, EncoderSpec]:
    """Rebuild an exported encoder and return it with its metadata."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise FastclrError(f"{path} is not a readable safetensors encoder ({e}); export it again") from None
    if "fastclr" not in meta:
        raise FastclrError(f"{path} carries no fastclr metadata; it was not exported by fastclr")
    info = json.loads(meta["fastclr"])
    spec = EncoderSpec.from_dict(info)
    encoder = encoder_from_spec(spec)
    try:
        encoder.load_state_dict(state)
    except RuntimeError:
        raise FastclrError(
            f"{path} does not match the {spec.encoder} architecture of this fastclr version "
            f"(exported by {info.get('fastclr_version', '?')}); re-export it with that version"
        ) from None
    return encoder.to(device), spec
