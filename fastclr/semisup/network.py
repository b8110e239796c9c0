"""The classifier a few-label pipeline produces: encoder f, the first layers of the projection head
g kept (the "neck"), and a linear layer to the classes; saved and loaded as one safetensors file.

SimCLRv2 (Chen et al. 2020b, section 2) fine-tunes from a middle layer of its 3-layer head rather
than from h: the head's first layer is kept as part of the classifier. `head_layers=0` is the
SimCLR (v1) choice, fine-tuning from h.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fastclr.errors import FastclrError
from fastclr.files import atomic_write
from fastclr.models import EncoderSpec, ProjectionHead, encoder_from_spec
from fastclr.tensor_file import safetensors_writer
from fastclr.version import __version__

CLASSIFIER_FILE = "classifier.safetensors"


class Classifier(nn.Module):
    """Standardised images (B, C, S, S) -> logits (B, K): fc(neck(encoder(x)))."""

    def __init__(self, encoder: nn.Module, neck: nn.Sequential, fc: nn.Linear):
        super().__init__()
        self.encoder, self.neck, self.fc = encoder, neck, fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the linear layer reads: h, or the output of the kept head layers."""
        return self.neck(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def backbone(self) -> nn.Sequential:
        """encoder then neck as one module (sharing their parameters): what the features come from."""
        return nn.Sequential(self.encoder, self.neck)


def _neck_modules(layers: int, batch_norm: bool) -> int:
    """How many modules of ProjectionHead.net its first `layers` layers are: (Linear, [BN], ReLU) each."""
    return layers * (3 if batch_norm else 2)


def head_linear_layers(head: ProjectionHead) -> int:
    """The number of linear layers of a projection head."""
    return sum(isinstance(m, nn.Linear) for m in head.net)


def neck_of(head: ProjectionHead, layers: int) -> nn.Sequential:
    """A copy of the first `layers` layers of `head`, each with its BatchNorm and ReLU; the output
    layer cannot be kept (it is the contrastive space, not a hidden layer)."""
    total = head_linear_layers(head)
    if not 0 <= layers < total:
        raise FastclrError(f"--from-head-layer {layers}: the run's projection head has {total} linear layers, so "
                           f"0 (h) to {total - 1} can be fine-tuned from")
    batch_norm = any(isinstance(m, nn.BatchNorm1d) for m in head.net)
    return copy.deepcopy(nn.Sequential(*list(head.net)[:_neck_modules(layers, batch_norm)]))


def neck_widths(neck: nn.Sequential) -> list[int]:
    """Output width of each linear layer of a neck."""
    return [m.out_features for m in neck if isinstance(m, nn.Linear)]


def empty_neck(layers: list[int], in_dim: int, batch_norm: bool) -> nn.Sequential:
    """A neck with the layout `neck_of` copies (so its state dict keys match), freshly initialised."""
    if not layers:
        return nn.Sequential()
    if len(set(layers)) != 1:
        raise FastclrError(f"a neck of layers {layers} was not cut from a fastclr projection head")
    head = ProjectionHead(in_dim, layers[0], out_dim=1, layers=len(layers) + 1, batch_norm=batch_norm)
    return nn.Sequential(*list(head.net)[:_neck_modules(len(layers), batch_norm)])


def save_classifier(path: Path, model: Classifier, spec: EncoderSpec, classes: list[str],
                    info: dict[str, Any] | None = None) -> Path:
    """Write the whole classifier (encoder, neck, fc) and what rebuilds it to `path`, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    batch_norm = any(isinstance(m, nn.BatchNorm1d) for m in model.neck)
    layout = {"neck": neck_widths(model.neck), "neck_bn": batch_norm, "classes": classes,
              "fastclr_version": __version__, **(info or {})}
    meta = {"fastclr": json.dumps(spec.to_dict()), "classifier": json.dumps(layout)}
    atomic_write(path, safetensors_writer(state, meta))
    return path


def load_classifier(path: str | Path, device: torch.device | str = "cpu"
                    ) -> tuple[Classifier, EncoderSpec, dict[str, Any]]:
    """Rebuild a saved classifier (eval mode) with its encoder spec and its record (classes, ...).

    Its input is a float (B, C, S, S) batch standardised with the spec's mean and std."""
    from fastclr.runtime import loading_device

    p, device = Path(path), loading_device(device)
    if p.is_dir():
        p = p / CLASSIFIER_FILE
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(p), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise FastclrError(f"{p} is not a readable classifier ({e}); write it again with `fastclr finetune` "
                           "or `fastclr distill`") from None
    if "classifier" not in meta or "fastclr" not in meta:
        raise FastclrError(f"{p} carries no fastclr classifier metadata; it was not written by fastclr")
    try:
        spec = EncoderSpec.from_dict(json.loads(meta["fastclr"]))
        layout = json.loads(meta["classifier"])
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise FastclrError(f"{p} has fastclr classifier metadata that is damaged or from a version this one cannot "
                           f"read ({type(e).__name__}: {e})") from None
    neck = empty_neck(list(layout["neck"]), spec.feature_dim, bool(layout["neck_bn"]))
    width = layout["neck"][-1] if layout["neck"] else spec.feature_dim
    model = Classifier(encoder_from_spec(spec), neck, nn.Linear(width, len(layout["classes"])))
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise FastclrError(f"{p} does not match the {spec.encoder} architecture of this fastclr version "
                           f"(written by {layout.get('fastclr_version', '?')})") from None
    return model.to(device).eval(), spec, layout
