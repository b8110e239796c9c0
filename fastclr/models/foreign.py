"""Encoder weights in other libraries' names: torchvision's (and timm's, which uses the same) ResNet
state dicts, both ways, and reading a weights file to start a run from (`model.init`).

fastclr's ResNet is torchvision's architecture with other module names: `stem.0`/`stem.1` are
`conv1`/`bn1`, `stages.I.J` is `layer{I+1}.J`, a block's `shortcut` is `downsample`; the
Bottleneck strides in its 3x3 convolution as torchvision's ResNet-50 v1.5 does. The CIFAR stem
(3x3, stride 1, no max-pool) has a `conv1` of another shape, so files say which stem they hold.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastclr.errors import FastclrError, first_sentence
from fastclr.tensor_file import weights_sha256

_OURS = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)$")
_THEIRS = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")
_WRAPPERS = ("state_dict", "model", "model_state", "encoder", "backbone")
"""Keys under which training scripts commonly nest a state dict in a file."""
_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")
"""Prefixes DDP, torch.compile and common wrappers put before module names."""


def to_torchvision_key(key: str) -> str:
    """A fastclr ResNet key in torchvision's naming."""
    for ours, theirs in (("stem.0.", "conv1."), ("stem.1.", "bn1.")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    m = _OURS.match(key)
    if not m:
        raise ValueError(f"{key} is not a fastclr ResNet key")
    rest = m.group(3).replace("shortcut.", "downsample.", 1) if m.group(3).startswith("shortcut.") else m.group(3)
    return f"layer{int(m.group(1)) + 1}.{m.group(2)}.{rest}"


def from_torchvision_key(key: str) -> str | None:
    """The fastclr ResNet key of a torchvision/timm key; None for the classifier (`fc`)."""
    if key.startswith("fc."):
        return None
    for theirs, ours in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    m = _THEIRS.match(key)
    if not m:
        return key  # not a ResNet name: left as it is, and reported as unexpected if unknown
    rest = m.group(3).replace("downsample.", "shortcut.", 1) if m.group(3).startswith("downsample.") else m.group(3)
    return f"stages.{int(m.group(1)) - 1}.{m.group(2)}.{rest}"


def torchvision_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A fastclr ResNet's state in torchvision's names (no `fc`: there is no classifier)."""
    return {to_torchvision_key(k): v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}


@dataclass
class InitWeights:
    """A weights file read and mapped onto an encoder's names, before anything is written."""

    path: Path
    sha256: str
    naming: str
    """fastclr or torchvision/timm."""
    tensors: dict[str, torch.Tensor]
    skipped: list[str] = field(default_factory=list)
    """Keys of the file that have no place in the encoder (a classifier, a projection head)."""
    missing: list[str] = field(default_factory=list)
    """Keys of the encoder the file does not give (they keep their random initial values)."""

    def summary(self) -> str:
        """One line for the run's log."""
        parts = [f"init from {self.path} ({self.naming} names, sha256 {self.sha256[:12]}): "
                 f"loaded {len(self.tensors)} tensors"]
        parts.append(f"skipped {len(self.skipped)} ({_few(self.skipped)})" if self.skipped else "skipped none")
        parts.append(f"missing {len(self.missing)} ({_few(self.missing)})" if self.missing else "missing none")
        return ", ".join(parts)


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (a file of gigabytes is not held whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read(path: Path, data: bytes) -> dict[str, Any]:
    """The tensors of a weights file's bytes (read once by the caller, who also hashes them)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load

            try:
                return dict(load(data))
            except SafetensorError as e:
                raise ValueError(str(e)) from None
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if path.suffix == ".onnx":
            raise FastclrError(f"init weights {path} are an ONNX model, which is for running h, not for training on; "
                               "give the run's encoder.safetensors or a `fastclr export --format torchvision` file") from None
        raise FastclrError(f"init weights {path} hold objects other than tensors, refused unread: loading them "
                           f"could run code ({first_sentence(e, 120)}); save a plain state dict") from None
    # KeyError, IndexError: torch's legacy reader on a file that is no pickle at all (a text file, /etc/passwd)
    except (RuntimeError, ValueError, EOFError, OSError, KeyError, IndexError) as e:
        if path.suffix == ".pt2":
            raise FastclrError(f"init weights {path} are a torch.export program, which is for running h, not for "
                               "training on; give the run's encoder.safetensors or a `fastclr export --format "
                               "torchvision` file") from None
        raise FastclrError(f"init weights {path} cannot be read ({first_sentence(e)}); the file is "
                           "truncated or not a state dict, save it again") from None
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FastclrError(f"init weights {path} hold no state dict of tensors; save `model.state_dict()`")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def safetensors_metadata(path: Path) -> dict[str, Any]:
    """A safetensors file's metadata with fastclr's own record parsed under "fastclr" ({} for other
    files, or one unreadable or odd: read_init names what is wrong with the file)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, Any] = dict(f.metadata() or {})
        if "fastclr" in meta:
            meta["fastclr"] = json.loads(meta["fastclr"])
        return meta
    except (SafetensorError, OSError, ValueError):
        return {}


def recorded_width(path: Path) -> float | None:
    """The channel multiplier a fastclr export records in its metadata (either naming), else None:
    a torchvision or timm file, or a plain state dict, says nothing (and their ResNets have width 1)."""
    meta = safetensors_metadata(path)
    own = meta.get("fastclr")
    try:
        width = own.get("width") if isinstance(own, dict) else meta.get("width")
        return float(width) if width is not None else None
    except (TypeError, ValueError):
        return None


def _refuse_other_stages(path: Path, stages: str) -> None:
    """One line when `path` records a cnn of other stages than `stages`, the run's. An activation, a
    pool's place or the readout's kind has no tensor of its own: a SiLU network's weights fit the ReLU
    one's names and shapes, and the run would start from weights learned by another network."""
    from fastclr.models.cnn import parse_stages
    from fastclr.models.spec import EncoderSpec

    own = safetensors_metadata(path).get("fastclr")
    try:
        recorded = EncoderSpec.from_dict(own).stages if isinstance(own, dict) and own.get("encoder") == "cnn" else ""
        theirs = parse_stages(recorded) if recorded else None
    except (KeyError, TypeError, ValueError, OverflowError):
        return  # a record this version cannot read: the tensors' names and shapes are what is checked
    if theirs is not None and theirs != parse_stages(stages):
        raise FastclrError(f"init weights {path} are of the cnn {recorded!r}, and this run builds {stages!r}: the "
                           f"same tensors in another network; give --cnn-stages \"{recorded}\" to start from them")


def _strip(keys: list[str], wanted: set[str]) -> str:
    """The wrapper prefix that makes the most keys known names, or ''."""
    best, hits = "", sum(k in wanted for k in keys)
    for p in _PREFIXES:
        n = sum(k.startswith(p) and k[len(p):] in wanted for k in keys)
        if n > hits:
            best, hits = p, n
    return best


def read_init(path: Path, encoder: nn.Module, expect_sha256: str = "", stages: str = "") -> InitWeights:
    """Read `path` and map it onto `encoder`'s names (which may live on the meta device: only names
    and shapes are used). One-line errors for a missing, unreadable, code-carrying or mismatched
    file, for a shape that differs, naming the tensor, and, given the cnn `stages` the encoder was
    built from, for a fastclr export of a cnn of other stages."""
    if not path.is_file():
        raise FastclrError(f"init weights {path} not found; give a fastclr export or a torchvision/timm state dict")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if expect_sha256 and sha != expect_sha256.lower():
        raise FastclrError(f"init weights {path} have sha256 {sha}, not the {expect_sha256} asked for; "
                           "give the right file or drop --init-sha256")
    raw = _read(path, data)
    recorded = safetensors_metadata(path).get("fastclr")
    if isinstance(recorded, dict) and "weights_sha256" in recorded and weights_sha256(raw) != recorded["weights_sha256"]:
        raise FastclrError(f"init weights {path} are damaged: their weights differ from the checksum written with them; "
                           "export them again from their run")
    if stages:
        _refuse_other_stages(path, stages)
    target = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    names = list(raw)
    resnet = all(_is_resnet_key(k) for k in target)
    # Each naming with the wrapper prefix that fits it best; the one that places more tensors wins.
    native_prefix = _strip(names, set(target))
    native = sum(_unprefixed(k, native_prefix) in target for k in names)
    tv_prefix = _strip(names, {to_torchvision_key(k) for k in target}) if resnet else ""
    foreign = sum(from_torchvision_key(_unprefixed(k, tv_prefix)) in target for k in names) if resnet else 0
    if native == 0 and foreign == 0:
        raise FastclrError(f"init weights {path} share no tensor name with this encoder (first keys: "
                           f"{_few(names, 3)}); it is another architecture: pick the matching --encoder")
    use_tv = foreign > native
    prefix = tv_prefix if use_tv else native_prefix
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for k, v in raw.items():
        bare = _unprefixed(k, prefix)
        ours = from_torchvision_key(bare) if use_tv else bare
        if ours is None or ours not in target:
            skipped.append(k)
            continue
        if tuple(v.shape) != target[ours]:
            raise FastclrError(f"init weights {path}: tensor {k} has shape {tuple(v.shape)} but the encoder's {ours} "
                               f"is {target[ours]}{_shape_hint(tuple(v.shape), target[ours], ours)}; pick the matching "
                               "--encoder, --width or stem")
        tensors[ours] = v
    missing = [k for k in target if k not in tensors]
    # A file of another depth shares the first blocks' names and shapes: its extra blocks would be
    # dropped, or the encoder's would stay random, and the run would start from a mixture.
    extra = [k for k in skipped if _is_backbone(_unprefixed(k, prefix), use_tv)]
    absent = [k for k in missing if not k.endswith("num_batches_tracked")]
    if extra or absent:
        what = f"holds {len(extra)} tensors this encoder has no place for (first: {_few(extra, 2)})" if extra else \
            f"lacks {len(absent)} of this encoder's tensors (first: {_few(absent, 2)})"
        raise FastclrError(f"init weights {path} {what}: a network of another depth or shape; pick the matching "
                           "--encoder")
    return InitWeights(path, sha, "torchvision/timm" if use_tv else "fastclr", tensors, skipped, missing)


def _is_backbone(bare: str, torchvision: bool) -> bool:
    """Whether a file's tensor name belongs to an encoder's body (not a classifier or projection
    head a file may carry beside it)."""
    return bare.startswith(("layer", "conv1.", "bn1.") if torchvision else ("stem.", "stages.", "features.", "pool."))


def _shape_hint(got: tuple[int, ...], want: tuple[int, ...], name: str) -> str:
    """What a convolution's shape difference says: the stem's kernel (a CIFAR stem against a
    standard one), the input channels or the width; another kernel elsewhere is another network."""
    if len(got) != 4 or len(want) != 4:
        return ""
    if got[2:] != want[2:]:
        return (" (a CIFAR stem against a standard one? set --cifar-stem to match)" if name.startswith("stem.")
                else " (another kernel size: a network of another design)")
    if got[1] != want[1] and got[0] == want[0]:
        return " (images of another channel count)"
    return " (another --width)" if got[0] != want[0] else ""


def _unprefixed(key: str, prefix: str) -> str:
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def _is_resnet_key(key: str) -> bool:
    return key.startswith(("stem.", "stages."))


def apply_init(encoder: nn.Module, init: InitWeights) -> None:
    """Copy the mapped tensors into `encoder` (in place; dtypes converted to the encoder's)."""
    encoder.load_state_dict(init.tensors, strict=False)
