"""The typed config: flags, TOML, presets, round trips and type errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastclr.config import Config, apply_overrides, diff, flag_table, from_dict, read_toml, to_dict, to_toml
from fastclr.errors import FastclrError
from fastclr.presets import apply_preset


def test_every_field_has_one_unique_flag() -> None:
    table = flag_table()
    n_fields = sum(len(v) for v in to_dict(Config()).values())
    assert len(table) == n_fields
    assert table["data"] == ("data", "name") and table["batch-size"] == ("train", "batch_size")


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = apply_overrides(Config(), {"train.batch_size": "64", "augment.hue": 0.05, "data.name": "cifar10"})
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    assert apply_overrides(Config(), read_toml(p)) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_values_are_parsed_to_the_field_type() -> None:
    cfg = apply_overrides(Config(), {"train.batch_size": "128", "train.channels_last": "false", "optim.lr": "3e-3"})
    assert cfg.train.batch_size == 128 and cfg.train.channels_last is False and cfg.optim.lr == 0.003
    with pytest.raises(FastclrError, match="train.batch_size must be a int, got 'big'"):
        apply_overrides(Config(), {"train.batch_size": "big"})
    with pytest.raises(FastclrError, match="unknown config key 'train.batchsize'"):
        apply_overrides(Config(), {"train.batchsize": 1})


def test_presets_apply_before_overrides() -> None:
    cfg = apply_preset({"data.name": "cifar10"})
    assert cfg.augment.blur_p == 0.0 and cfg.augment.brightness == 0.4
    cfg = apply_preset({"data.name": "cifar10", "augment.blur_p": 0.3})
    assert cfg.augment.blur_p == 0.3
    assert apply_preset({"data.name": "mnist"}).augment.flip_p == 0.0


def test_toml_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = 3\n")
    with pytest.raises(FastclrError, match=r"must sit in a section such as \[train\]"):
        read_toml(bad)
    with pytest.raises(FastclrError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")


def test_diff_names_changed_keys() -> None:
    a = Config()
    b = apply_overrides(a, {"train.batch_size": 7, "optim.lr": 0.5})
    assert diff(a, b) == ["optim.lr", "train.batch_size"]
    assert diff(a, b, ("train.batch_size",)) == ["train.batch_size"]


def test_help_shows_what_each_preset_sets() -> None:
    """`--help` names, for every flag a dataset preset changes, the datasets and the value they get
    (the default run is the Fashion-MNIST preset, not the bare defaults of config.py)."""
    from fastclr.cli import build_parser
    from fastclr.config import flag_table
    from fastclr.presets import PRESETS

    pretrain = next(a for a in build_parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
                    if a.prog.endswith("pretrain"))
    helps = {a.dest[4:]: a.help for a in pretrain._actions if a.dest.startswith("cfg:")}
    assert set(helps) == {f"{s}.{n}" for s, n in flag_table().values()}
    for data, preset in PRESETS.items():
        for key, value in preset.items():
            assert any(data in part and part.endswith(f": {value!r}") for part in helps[key][:-1].split("; ")), (key, helps[key])
    assert helps["model.head_hidden"] == "model.head_hidden (default: 0; fashion-mnist, mnist: 256)"
    assert helps["optim.lr_scaling"] == "optim.lr_scaling (default: 'none')"  # no preset sets it
