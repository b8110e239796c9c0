"""Settings nothing reads (fastclr/pretraining/unread.py): the run they name trains to the very
weights it trains without them, so they are refused when given, never when a recipe holds them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from fastclr import pretrain
from fastclr.checkpoint import list_checkpoints, load_checkpoint
from fastclr.config import Config
from fastclr.errors import FastclrError
from fastclr.presets import config_for
from fastclr.pretraining import loop
from fastclr.pretraining.unread import refuse_unread, unread_settings
from tiny import tiny_config, tiny_dataset

SHORT = {"train__epochs": 0.5, "train__precision": "fp32", "train__device": "cpu"}  # 3 steps of 16 images
"""A run long enough for every part to act (momentum, the optimiser's state, every view's draws)."""

CHANGED: dict[str, Any] = {
    "optim.momentum": 0.5, "optim.trust_coefficient": 0.02, "train.queue_momentum": 0.5, "augment.local_size": 8,
    "augment.local_scale_min": 0.3, "augment.local_scale_max": 0.4, "model.head_hidden": 8, "model.head_bn": False,
    "augment.brightness": 0.9, "augment.contrast": 0.9, "augment.saturation": 0.1, "augment.hue": 0.4,
    "augment.grayscale_p": 0.9, "augment.blur_sigma_min": 0.5, "augment.blur_sigma_max": 3.0,
    "augment.erase_scale_min": 0.1, "augment.erase_scale_max": 0.2, "model.cnn_stages": "16|fc32", "model.cifar_stem": "on",
}
"""A value other than the default for every setting `unread_settings` can name."""


def weights(run_dir: Path, monkeypatch: pytest.MonkeyPatch, refuse: bool = False, size: int = 28,
            **over: Any) -> dict[str, torch.Tensor]:
    """The encoder and head of the tiny run with `over` on images of `size` px, trained with the
    refusal switched off."""
    if not refuse:
        monkeypatch.setattr(loop, "refuse_unread", lambda *a, **k: None)
    pretrain(tiny_config(run_dir, **{**SHORT, **over}), dataset=tiny_dataset(size=size), progress=False,
             log=lambda s: None)
    state = load_checkpoint(list_checkpoints(run_dir)[-1])
    return {f"{part}.{k}": v for part in ("encoder", "head") for k, v in state[part].items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DEFAULT_UNREAD = {"optim.momentum", "optim.trust_coefficient", "train.queue_momentum", "augment.local_size",
                  "augment.local_scale_min", "augment.local_scale_max", "augment.blur_sigma_min", "augment.blur_sigma_max",
                  "augment.saturation", "augment.hue", "augment.grayscale_p", "model.cifar_stem"}
"""What the default run on gray images reads nothing of (the table the refusal holds, written out)."""


@pytest.mark.parametrize("base, named", [
    ({}, DEFAULT_UNREAD),  # AdamW, no queue, no small views, blur off, the cnn, gray images
    ({"model__head_layers": 1, "augment__jitter_p": 0.0, "augment__erase_p": 0.0},
     DEFAULT_UNREAD | {"model.head_hidden", "model.head_bn", "augment.brightness", "augment.contrast",
                       "augment.erase_scale_min", "augment.erase_scale_max"}),
    ({"model__encoder": "resnet18", "optim__optimizer": "sgd", "train__epochs": 0.34},  # 2 steps
     DEFAULT_UNREAD - {"optim.momentum", "model.cifar_stem"} | {"model.cnn_stages"}),
], ids=["default", "one-layer-head-no-jitter-no-erasing", "resnet-sgd"])
def test_every_setting_named_unread_trains_the_same_weights_when_changed(
        base: dict[str, Any], named: set[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path / "cfg", **{**SHORT, **base})
    encoder = "resnet18" if base.get("model__encoder") == "resnet18" else "cnn"
    size = 16 if encoder == "resnet18" else 28  # (a ResNet's steps are slow at 28 px)
    unread = unread_settings(cfg, encoder=encoder, channels=1)
    changed = {k.replace(".", "__"): v for k, v in CHANGED.items() if k in unread}
    assert set(unread) == named
    assert same(weights(tmp_path / "a", monkeypatch, size=size, **base),
                weights(tmp_path / "b", monkeypatch, size=size, **base, **changed))


@pytest.mark.parametrize("key, value, where", [
    ("optim__momentum", 0.5, {"optim__optimizer": "sgd"}),
    ("optim__trust_coefficient", 0.02, {"optim__optimizer": "lars"}),
    ("model__head_hidden", 8, {}),
    ("augment__brightness", 0.9, {}),
    ("augment__erase_scale_max", 0.2, {}),
    ("model__cnn_stages", "16|fc32", {}),
    ("optim__momentum", 0.5, {"optim__optimizer": "lars"}),
    ("train__queue_momentum", 0.5, {"train__queue": 40}),
    ("augment__local_scale_min", 0.3, {"train__local_views": 2}),
    ("augment__blur_sigma_max", 3.0, {"augment__blur_p": 0.5}),
    ("model__head_bn", False, {}),
], ids=["momentum-sgd", "trust-lars", "head-hidden", "brightness", "erase-scale", "cnn-stages", "momentum-lars",
        "queue-momentum", "local-scale", "blur-sigma", "head-bn"])
def test_the_same_setting_where_its_part_is_on_changes_the_weights(
        key: str, value: Any, where: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the table: where the switch is on, the setting is read (it is not named)."""
    assert key.replace("__", ".") not in unread_settings(tiny_config(tmp_path / "cfg", **where), encoder="cnn", channels=1)
    assert not same(weights(tmp_path / "a", monkeypatch, **where), weights(tmp_path / "b", monkeypatch, **where, **{key: value}))


def test_a_setting_nothing_reads_is_refused_before_anything_is_written(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FastclrError) as e:
        weights(tmp_path / "r", monkeypatch, refuse=True, optim__momentum=0.5, augment__blur_sigma_max=3.0)
    line = str(e.value)
    assert "\n" not in line
    assert "--momentum 0.5 is read by nothing in this run: --optimizer adamw has no momentum" in line
    assert "--blur-sigma-max 3.0 is read by nothing in this run: --blur-p is 0" in line
    assert line.endswith("drop them (the flag, or the line of a --config file that sets them), or train with "
                         "--optimizer sgd or lars / --blur-p above 0")
    assert not (tmp_path / "r").exists()
    # what needs no data is refused before the data is read (or downloaded): here a store that is not there
    cfg = tiny_config(tmp_path / "r", **{**SHORT, "data__name": str(tmp_path / "no-store"), "model__head_layers": 1})
    with pytest.raises(FastclrError, match=r"^--head-hidden 32 is read by nothing in this run: --head-layers 1"):
        pretrain(cfg, progress=False, log=lambda s: None)


def test_values_a_recipe_holds_are_never_named_only_those_given() -> None:
    cifar = config_for("cifar10")  # saturation 0.4 and hue 0.1 by its recipe: unread on gray images
    assert {"augment.saturation", "augment.hue"} <= unread_settings(cifar, encoder="cnn", channels=1).keys()
    refuse_unread(cifar, (config_for("cifar10"),), encoder="cnn", channels=1)  # nothing given: no error
    # nor the default recipe's, carried onto a store in Python (its small views' crops differ from the store recipe's)
    store = config_for(None, {"data.name": "photos", "data.preset": "store"})
    default = Config()
    carried = dataclasses.replace(default, data=dataclasses.replace(default.data, name="photos", preset="store"))
    assert carried.augment.local_scale_min != store.augment.local_scale_min
    refuse_unread(carried, (store,), encoder="resnet18", channels=3)
    # nor 0 or false, which ask for the part off or none: what the run does (a script passing --grayscale-p 0 to
    # every dataset was refused on gray ones)
    fashion = config_for("fashion-mnist")
    refuse_unread(config_for("fashion-mnist", {"augment.grayscale_p": 0.0, "optim.momentum": 0.0, "augment.hue": 0.0}),
                  (fashion,), encoder="cnn", channels=1)
    # a --config file's values (a run's own config.toml reused with a part switched off) are a note, a flag's an error
    sgd_file = {"optim.optimizer": "sgd", "optim.momentum": 0.8}
    switched = config_for("fashion-mnist", {**sgd_file, "optim.optimizer": "adamw"})
    lines: list[str] = []
    refuse_unread(switched, (fashion,), encoder="cnn", channels=1, files={"optim.momentum": 0.8}, log=lines.append)
    assert lines == ["note: --momentum 0.8 (from the --config file) is read by nothing in this run: --optimizer adamw "
                     "has no momentum"]
    with pytest.raises(FastclrError, match=r"^--momentum 0\.8 is read by nothing"):
        refuse_unread(switched, (fashion,), encoder="cnn", channels=1, files={}, log=lines.append)
    given = config_for("cifar10", {"augment.hue": 0.3})
    with pytest.raises(FastclrError, match=r"^--hue 0\.3 is read by nothing in this run: the images are gray"):
        refuse_unread(given, (cifar,), encoder="cnn", channels=1)


def test_a_resume_given_a_setting_nothing_reads_is_refused_and_the_run_kept(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the resume trained on and its note said the steps after the checkpoint trained with
    the new value; a --local-size change without small views asked for --allow-config-change."""
    run = tmp_path / "run"
    weights(run, monkeypatch, refuse=True)
    config = (run / "config.toml").read_bytes()
    for over, named in (({"optim__momentum": 0.1}, "--momentum 0.1"), ({"augment__local_size": 16}, "--local-size 16")):
        cfg = tiny_config(run, **{**SHORT, "train__epochs": 1.0, **over})
        with pytest.raises(FastclrError, match=f"^{named} is read by nothing in this run") as e:
            pretrain(cfg, resume=run, dataset=tiny_dataset(), progress=False, log=lambda s: None,
                     allow_config_change=False)
        assert "--allow-config-change" not in str(e.value)
    assert (run / "config.toml").read_bytes() == config
    assert len(list_checkpoints(run)) == 1
