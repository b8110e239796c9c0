"""Encoders f (images -> h) and the projection head g (h -> z), by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastclr.config import parse_switch
from fastclr.errors import FastclrError, first_sentence
from fastclr.models.cnn import CNN_STAGES, SmallCNN, check_stages
from fastclr.models.head import ProjectionHead
from fastclr.models.modes import in_eval_mode
from fastclr.models.resnet import ResNet, resnet18, resnet34, resnet50
from fastclr.models.spec import EncoderSpec

__all__ = ["BuiltEncoder", "CPU_RESNET_WIDTH", "CPU_WIDTH_WHY", "ENCODERS", "EncoderSpec", "ProjectionHead", "ResNet", "SmallCNN", "build_encoder",
           "encoder_from_spec", "feature_dim", "resolve_encoder", "resolve_width"]


BuiltEncoder = SmallCNN | ResNet
"""What `build_encoder` returns: a module whose `feature_dim` is typed (an int), for users' type checkers."""


def _cnn(in_channels: int, width: float, cifar_stem: bool, image_size: int, stages: str) -> SmallCNN:
    check_stages(stages)
    return SmallCNN(in_channels, width, stages, image_size=image_size)


def _resnet(ctor: Callable[[int, float, bool], ResNet]) -> Callable[[int, float, bool, int, str], ResNet]:
    return lambda in_channels, width, cifar_stem, image_size, stages: ctor(in_channels, width, cifar_stem)


# name -> constructor(in_channels, width, cifar_stem, image_size, cnn stages)
ENCODERS: dict[str, Callable[[int, float, bool, int, str], BuiltEncoder]] = {
    "cnn": _cnn,
    "resnet18": _resnet(resnet18),
    "resnet34": _resnet(resnet34),
    "resnet50": _resnet(resnet50),
}

# Inputs at or below this side get the CIFAR stem: a 7x7/2 conv plus max-pool would leave a
# 32 px image 8 px wide before the first residual stage.
CIFAR_STEM_MAX_SIZE = 64


def resolve_encoder(name: str, image_size: int) -> str:
    """`auto` -> cnn for images of 28 px and below, resnet18 otherwise; other names are checked."""
    if name == "auto":
        return "cnn" if image_size <= 28 else "resnet18"
    if name not in ENCODERS:
        raise FastclrError(f"unknown encoder {name!r}; choose one of: auto, {', '.join(ENCODERS)}")
    return name


# Width `auto` on a CPU: a ResNet at a quarter of its width (16-128 channels for ResNet-18, about
# 1/16 of the FLOPs). On 2 cores of a Xeon with AMX, 9.5 minutes on 32 px colour Fashion-MNIST,
# the store recipe's batch of 512: the full ResNet-18 fits 109 steps and probes 60.8% (untrained
# 51.9%) at 5.7 GB peak, a quarter 704 steps and 78.2% (untrained 36.0%) at 1.9 GB; at batch 256
# a quarter 83.1%, half 80.5%, an eighth 77.0% (docs/benchmarks.md section 6, "Width auto").
CPU_RESNET_WIDTH = 0.25
CPU_WIDTH_WHY = "it learns more in the same time there; --width 1 for the full network"
"""Why a CPU gets `CPU_RESNET_WIDTH`, as the run's log and `fastclr info` say it."""


def resolve_width(width: float, encoder: str, device_type: str) -> float:
    """The channel multiplier a run trains at: `width` as given, or for 0 (`auto`) a quarter for a
    ResNet (`encoder` resolved) on a CPU and 1 otherwise (the cnn everywhere; any encoder on a GPU)."""
    if width > 0:
        return width
    return CPU_RESNET_WIDTH if device_type == "cpu" and encoder.startswith("resnet") else 1.0


def use_cifar_stem(setting: str, image_size: int) -> bool:
    """Resolve the `cifar_stem` setting (auto/on/off) for an input size."""
    on = parse_switch(setting, "cifar_stem")
    return image_size <= CIFAR_STEM_MAX_SIZE if on is None else on


def build_encoder(name: str, in_channels: int, image_size: int, width: float = 1.0, cifar_stem: str = "auto",
                  cnn_stages: str = CNN_STAGES) -> BuiltEncoder:
    """An encoder by name for (in_channels, image_size, image_size) inputs; has `.feature_dim`."""
    if width <= 0:
        raise FastclrError(f"width must be > 0, got {width} (`auto`, 0, is resolved for the device by resolve_width)")
    resolved = resolve_encoder(name, image_size)
    return ENCODERS[resolved](in_channels, width, use_cifar_stem(cifar_stem, image_size), image_size, cnn_stages)


def encoder_from_spec(spec: EncoderSpec) -> BuiltEncoder:
    """A freshly initialised encoder of the architecture `spec` records."""
    stem = spec.cifar_stem if spec.cifar_stem in ("on", "off") else "auto"  # "n/a": not a ResNet, no stem
    return build_encoder(spec.encoder, spec.in_channels, spec.image_size, spec.width, stem, spec.stages or CNN_STAGES)


@torch.no_grad()
def feature_dim(encoder: nn.Module, in_channels: int, image_size: int) -> int:
    """The dimension of h: the encoder's `feature_dim` attribute, else measured by a forward pass."""
    dim = getattr(encoder, "feature_dim", None)
    if isinstance(dim, int):
        return dim
    # A fixed feature map (no parameters, perhaps buffers) is a fair encoder to train a head on.
    held = next(iter(encoder.state_dict().values()), None)
    device = held.device if isinstance(held, torch.Tensor) else torch.device("cpu")
    with in_eval_mode(encoder):
        try:
            out = encoder(torch.zeros(2, in_channels, image_size, image_size, device=device))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a module for other inputs: torch's words alone
            raise FastclrError(f"the encoder cannot take this data's images, (batch, {in_channels}, {image_size}, "
                               f"{image_size}): {first_sentence(e)}; give a module for that input that returns "
                               "(batch, features)") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FastclrError(f"the encoder returns {shape}; it must return (batch, features)")
    return int(out.shape[1])
