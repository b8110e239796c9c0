"""Per-dataset departures from the defaults in config.py, applied before files and flags.

The defaults in config.py are the Fashion-MNIST CPU recipe for training and the paper's ImageNet
recipe for augmentation; each dataset below overrides only what differs for it.
"""

from __future__ import annotations

from typing import Any

from fastclr.config import Config, DataConfig, apply_overrides

# Colour strength 0.5 and no blur for CIFAR (SimCLR appendix B.9: blur hurts at 32 px).
_CIFAR: dict[str, Any] = {
    "augment.brightness": 0.4, "augment.contrast": 0.4, "augment.saturation": 0.4, "augment.hue": 0.1,
    "augment.blur_p": 0.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {},
    "mnist": {"augment.flip_p": 0.0},  # a mirrored digit is another glyph
    "cifar10": _CIFAR,
    "cifar100": _CIFAR,
    "stl10": {},  # 96 px colour photos: the paper's ImageNet recipe
}

# Stores of the user's own images (a path, not a name) get the paper's ImageNet recipe.
STORE_PRESET: dict[str, Any] = {}


def preset_for(data_name: str) -> dict[str, Any]:
    """The overrides a dataset name (or a store path) brings."""
    return PRESETS.get(data_name, STORE_PRESET)


def apply_preset(overrides: dict[str, Any]) -> Config:
    """Config defaults, then the preset of the dataset named in `overrides`, then `overrides`."""
    name = str(overrides.get("data.name", DataConfig().name))
    merged = dict(preset_for(name))
    merged.update(overrides)
    return apply_overrides(Config(), merged)
