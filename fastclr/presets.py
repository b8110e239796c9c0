"""Each dataset's recipe, as its departures from `Config()` (the Fashion-MNIST CPU recipe), and
`config_for`, the one place a run's config is resolved: the command line and the Python API
both call it, so `fastclr.pretrain(fastclr.config_for("cifar10"))` trains what
`fastclr pretrain --data cifar10` trains.

Order: `Config()` <- the dataset's preset <- a TOML file <- flags (or the API's overrides).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastclr.config import ADDED_LATER, Config, DataConfig, apply_overrides, from_dict, read_toml, to_flat
from fastclr.errors import FastclrError

# The paper's ImageNet recipe (Chen et al. 2020, appendix A) with its schedule: 96 px colour photos
# (STL-10) and the user's own images, for which no dataset-specific tuning exists.
IMAGENET: dict[str, Any] = {
    "augment.scale_min": 0.08, "augment.brightness": 0.8, "augment.contrast": 0.8, "augment.saturation": 0.8,
    "augment.hue": 0.2, "augment.blur_p": 0.5, "augment.solarize_p": 0.0, "augment.erase_p": 0.0,
    "augment.local_scale_min": 0.05, "augment.local_scale_max": 0.14,  # SwAV's local crops (Caron et al. 2020)
    "model.head_hidden": 0, "optim.lr": 2e-3, "train.batch_size": 512, "train.temperature": 0.2,
    "train.time_budget": 0.0,
}

# CIFAR: colour strength 0.5 and no blur (SimCLR appendix B.9: blur hurts at 32 px).
CIFAR: dict[str, Any] = {**IMAGENET, "augment.brightness": 0.4, "augment.contrast": 0.4, "augment.saturation": 0.4,
                         "augment.hue": 0.1, "augment.blur_p": 0.0}

PRESETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {},  # Config() itself
    "mnist": {"augment.flip_p": 0.0},  # a mirrored digit is another glyph
    "cifar10": CIFAR,
    "cifar100": CIFAR,
    "stl10": IMAGENET,
}
STORE = "store"
"""The preset name of a store (a path): the ImageNet recipe."""


def preset_name(data_name: str) -> str:
    """The preset a dataset name (or a store path) brings: its own name; for a store written from
    a built-in dataset (`fastclr prepare --builtin`), that dataset's (the same images trained with
    the ImageNet recipe and no time budget: 100 epochs instead of the 9.5 minutes the Fashion-MNIST
    recipe measured); else "store"."""
    return data_name if data_name in PRESETS else store_builtin(data_name) or STORE


def store_builtin(path: str) -> str | None:
    """The built-in dataset whose images the store at `path` holds as published (its store.json's
    options, written by `prepare --builtin`), else None."""
    try:
        meta = json.loads((Path(os.path.expanduser(path)) / "store.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    options = meta.get("options") if isinstance(meta, dict) else None
    name = options.get("builtin") if isinstance(options, dict) else None
    return name if isinstance(name, str) and name in PRESETS else None


def config_for(data: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """The config of a run on `data` (or `overrides["data.name"]`): `Config()`, then the dataset's
    preset, then `overrides` ({"section.field": value}, e.g. from TOML and flags)."""
    given = dict(overrides or {})
    name = str(given.get("data.name", data or DataConfig().name))
    # A recipe named in the overrides (a saved run's, or data.preset set to train one dataset with
    # another's settings) is the one its unset values come from, as its name says
    preset = str(given.get("data.preset", preset_name(name)))
    merged: dict[str, Any] = {**PRESETS.get(preset, IMAGENET), "data.name": name, "data.preset": preset}
    if "train.epochs" in given and "train.time_budget" not in given:
        merged["train.time_budget"] = 0.0  # asking for epochs means epochs, not the recipe's time budget
    merged.update(given)
    return apply_overrides(Config(), merged)


def apply_preset(overrides: Mapping[str, Any]) -> Config:
    """`config_for` with the dataset named in `overrides`."""
    return config_for(None, overrides)


def saved_overrides(path: str | Path) -> dict[str, Any]:
    """The flat overrides a run directory's config.toml rebuilds its config from (on `Config()`):
    keys added since it was saved at the values that reproduce it (ADDED_LATER, as `from_dict`
    does for a checkpoint's config), and the
    dataset's preset name where a run saved before data.preset existed lacks it."""
    flat = {**ADDED_LATER, **read_toml(path)}
    flat.setdefault("data.preset", preset_name(str(flat.get("data.name", DataConfig().name))))
    return flat


def checkpoint_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The flat overrides a checkpoint's config (its nested dict) rebuilds the run's config from, as
    `saved_overrides` does for config.toml: keys added since at the values that reproduce it
    (`from_dict`), and the dataset's preset name where a checkpoint saved before data.preset lacks it."""
    flat = to_flat(from_dict(config))
    if "preset" not in config.get("data", {}):
        flat["data.preset"] = preset_name(str(flat["data.name"]))
    return flat


def check_preset(cfg: Config) -> None:
    """A one-line error when `cfg` carries another dataset's recipe than the one it trains on."""
    if cfg.data.name not in PRESETS and not Path(os.path.expanduser(cfg.data.name)).exists():
        return  # a store not there (moved with its run, or gone): its recipe is unknown here; reading it says more
    want = preset_name(cfg.data.name)
    # A run on a store of a built-in dataset saved before such a store took that dataset's recipe holds the store's
    if cfg.data.preset != want and not (cfg.data.preset == STORE and want != cfg.data.name):
        raise FastclrError(
            f"this config holds the {cfg.data.preset} recipe but trains on {cfg.data.name}; build it with "
            f"fastclr.config_for({cfg.data.name!r}) (then change what you need), or set data.preset = {want!r} "
            "to train on exactly these settings")
