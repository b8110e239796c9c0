"""The typed config: flags, TOML, presets, round trips and type errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import numpy as np

import fastclr
from fastclr.config import (Config, DataConfig, apply_overrides, diff, flag_table, from_dict, read_toml, to_dict, to_flat,
                            to_toml)
from fastclr.errors import FastclrError
from fastclr.presets import PRESETS, apply_preset, config_for


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
    with pytest.raises(FastclrError, match="train.batch_size must be an integer, got 'big'"):
        apply_overrides(Config(), {"train.batch_size": "big"})
    with pytest.raises(FastclrError, match="unknown config key 'train.batchsize'"):
        apply_overrides(Config(), {"train.batchsize": 1})


@pytest.mark.parametrize("key, hint", [
    ("train.batch_sise", " (did you mean train.batch_size?)"),   # misspelt
    ("optim.batch_size", " (did you mean train.batch_size?)"),   # in another section (a TOML [optim] table)
    ("train.temprature", " (did you mean train.temperature?)"),
    ("model.zzz", ""),
    ("train.log", " (did you mean train.trackers?)"),  # the flag's name (--log), not train.log_every
    ("data.data", " (did you mean data.name?)"),
])
def test_an_unknown_key_names_the_nearest_one(key: str, hint: str) -> None:
    with pytest.raises(FastclrError) as e:
        apply_overrides(Config(), {key: 1})
    assert str(e.value) == f"unknown config key {key!r}{hint}; `fastclr pretrain --help` lists every key"


def test_presets_apply_before_overrides() -> None:
    cfg = apply_preset({"data.name": "cifar10"})
    assert cfg.augment.blur_p == 0.0 and cfg.augment.brightness == 0.4 and cfg.train.batch_size == 512
    cfg = apply_preset({"data.name": "cifar10", "augment.blur_p": 0.3})
    assert cfg.augment.blur_p == 0.3
    assert apply_preset({"data.name": "mnist"}).augment.flip_p == 0.0
    assert apply_preset({"train.epochs": 20}).train.time_budget == 0.0  # asking for epochs means epochs


def test_config_is_the_default_run_and_presets_are_its_departures() -> None:
    assert config_for() == Config() == config_for("fashion-mnist")
    store = config_for("stores/photos")
    assert (store.data.preset, store.augment.scale_min, store.augment.blur_p) == ("store", 0.08, 0.5)
    for name, preset in PRESETS.items():
        cfg = config_for(name)
        for key, value in preset.items():
            section, field = key.split(".")
            assert getattr(getattr(cfg, section), field) == value, (name, key)
        assert cfg.data.name == name and cfg.data.preset == name


@pytest.mark.parametrize("argv", [[], ["--data", "cifar10"], ["--data", "mnist", "--batch-size", "64"],
                                  ["--data", "stl10", "--scale-min", "0.8", "--epochs", "3"]])
def test_the_command_line_and_the_api_resolve_the_same_config(argv: list[str], tmp_path: Path) -> None:
    """`fastclr pretrain ARGS` and `fastclr.pretrain(fastclr.config_for(...))` train the same config:
    both resolve through `presets.config_for`."""
    from fastclr.cli import build_parser, resolve_config

    cli = resolve_config(build_parser().parse_args(["pretrain", *argv]))
    flags = dict(zip(argv[::2], argv[1::2]))
    table = {f"--{k}": f"{s}.{n}" for k, (s, n) in flag_table().items()}
    api = fastclr.config_for(overrides={table[f]: v for f, v in flags.items()})
    assert cli == api
    if "--scale-min" in flags:  # an explicit value equal to Config()'s default still beats the preset
        assert cli.augment.scale_min == 0.8 and config_for("stl10").augment.scale_min == 0.08


def test_a_config_with_another_datasets_recipe_is_refused(tmp_path: Path) -> None:
    from fastclr.data import Dataset, ImageSet

    cfg = Config(data=DataConfig(name="cifar10"))  # Config()'s Fashion-MNIST recipe on CIFAR-10
    ds = Dataset("cifar10", ImageSet(np.zeros((4, 32, 32, 3), np.uint8), None), None, None, [])
    with pytest.raises(FastclrError, match=r"holds the fashion-mnist recipe but trains on cifar10; build it with "
                                           r"fastclr.config_for\('cifar10'\)"):
        fastclr.pretrain(cfg, dataset=ds, progress=False, log=lambda s: None)


def test_toml_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = 3\n")
    with pytest.raises(FastclrError, match=r"must sit in a section such as \[train\]"):
        read_toml(bad)
    with pytest.raises(FastclrError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")


def test_a_config_file_saved_with_a_byte_order_mark_reads_as_without(tmp_path: Path) -> None:
    """Notepad and PowerShell's UTF-8 save a byte-order mark first: such a file was "not valid TOML
    (Invalid statement (at line 1, column 1))"."""
    text = '[train]\nbatch_size = 64\ntemperature = 0.3\n'
    (tmp_path / "plain.toml").write_text(text, encoding="utf-8")
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_toml(tmp_path / "bom.toml") == read_toml(tmp_path / "plain.toml") == {"train.batch_size": 64,
                                                                                      "train.temperature": 0.3}


def test_diff_names_changed_keys() -> None:
    a = Config()
    b = apply_overrides(a, {"train.batch_size": 7, "optim.lr": 0.5})
    assert diff(a, b) == ["optim.lr", "train.batch_size"]
    assert diff(a, b, ("train.batch_size",)) == ["train.batch_size"]


def test_help_shows_what_each_preset_sets() -> None:
    """`--help` names, for every flag a dataset preset changes, the datasets and the value they get."""
    from fastclr.cli import build_parser
    from fastclr.config import flag_table
    pretrain = next(a for a in build_parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
                    if a.prog.endswith("pretrain"))
    helps = {a.dest[4:]: a.help for a in pretrain._actions if a.dest.startswith("cfg:")}
    assert set(helps) == {f"{s}.{n}" for s, n in flag_table().values()}
    flat = to_flat(Config())
    for data, preset in PRESETS.items():
        for key, value in preset.items():
            listed = any(data in part and part.endswith(f": {value!r}") for part in helps[key][:-1].split("; "))
            assert listed == (value != flat[key]), (key, helps[key])  # listed exactly where it changes the default
    assert helps["augment.brightness"] == "augment.brightness (default: 0.4; stl10, stores: 0.8)"
    assert helps["model.head_hidden"] == "model.head_hidden (default: 256; cifar10, cifar100, stl10, stores: 0)"
    assert helps["optim.lr_scaling"] == "optim.lr_scaling (default: 'none')"  # no preset sets it
    # the unit or the meaning of 0 that a key alone does not say (a user without the source read "time_budget 9.5")
    from fastclr.config import FLAG_HELP

    assert set(FLAG_HELP) <= set(helps)
    assert helps["train.time_budget"].startswith("train.time_budget: minutes of training; 0: train --epochs (default: 9.5;")
    assert helps["train.dist_timeout"] == ("train.dist_timeout: seconds a process waits on the others before the run "
                                           "fails (default: 600.0)")


def test_a_config_saved_before_erasing_existed_reads_back_without_it() -> None:
    """A saved config without augment.erase_p trained without erasing: it reads back with 0, not
    today's default; a config that has the key keeps its value."""
    saved = to_dict(Config())
    assert Config().augment.erase_p > 0 and from_dict(saved).augment.erase_p == Config().augment.erase_p
    del saved["augment"]["erase_p"]
    assert from_dict(saved).augment.erase_p == 0.0


def _drop_lines(path: Path, *keys: str) -> None:
    path.write_text("".join(line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                            if line.split(" = ")[0] not in keys), encoding="utf-8")


def test_a_run_saved_before_erasing_resumes_and_loads_without_it(tmp_path: Path) -> None:
    """The run directory's config.toml, read for `--resume` and by `load_run` (evaluate, embed,
    report), gives keys added since the run was saved the values it trained with, as `from_dict`
    does for the checkpoint: a run from before random erasing must not resume with erasing on."""
    from fastclr.cli import build_parser, resume_config
    from fastclr.pretrained import load_run
    from tiny import tiny_dataset, tiny_run

    run = tmp_path / "old"
    tiny_run(run, tiny_dataset(), data__name="mnist")
    _drop_lines(run / "config.toml", "erase_p", "preset")  # as 0.1 wrote it
    assert Config().augment.erase_p > 0
    resumed = resume_config(run, build_parser().parse_args(["pretrain", "--resume", str(run)]))
    loaded = load_run(run, log=lambda s: None).config
    for cfg in (resumed, loaded):
        assert cfg.augment.erase_p == 0.0 and cfg.data.preset == "mnist" and cfg.augment.flip_p == 0.0
    # a flag still overrides what was saved
    flagged = resume_config(run, build_parser().parse_args(["pretrain", "--resume", str(run), "--erase-p", "0.5"]))
    assert flagged.augment.erase_p == 0.5


def test_a_config_file_on_resume_means_what_the_same_flags_mean(tmp_path: Path) -> None:
    """On --resume, `epochs` from a --config file ended a saved time budget's hold only as a flag
    (the budget won, silently), and `[data] name` kept the old recipe's preset (refused as a recipe
    of another dataset even with --allow-config-change)."""
    from fastclr.cli import build_parser, resume_config
    from fastclr.runs import write_config

    run = tmp_path / "run"
    run.mkdir()
    write_config(run, apply_overrides(Config(), {"train.time_budget": 9.5, "data.name": "fashion-mnist"}))

    def resumed(toml: str, *flags: str) -> Config:
        (tmp_path / "c.toml").write_text(toml)
        return resume_config(run, build_parser().parse_args(["pretrain", "--resume", str(run), "--config",
                                                             str(tmp_path / "c.toml"), *flags]))

    cfg = resumed("[train]\nepochs = 3.0\n")
    assert (cfg.train.epochs, cfg.train.time_budget) == (3.0, 0.0)
    cfg = resumed("[train]\ntime_budget = 2.0\n", "--epochs", "4")  # the flag over the file, as for a new run
    assert (cfg.train.epochs, cfg.train.time_budget) == (4.0, 0.0)
    cfg = resumed("[train]\nepochs = 3.0\ntime_budget = 2.0\n")  # both given: the budget holds
    assert (cfg.train.epochs, cfg.train.time_budget) == (3.0, 2.0)
    cfg = resumed('[data]\nname = "mnist"\n')
    assert (cfg.data.name, cfg.data.preset) == ("mnist", "mnist")
    assert resumed('[data]\nname = "mnist"\npreset = "fashion-mnist"\n').data.preset == "fashion-mnist"


def test_the_positional_run_dir_is_the_run_dir(tmp_path: Path) -> None:
    """`fastclr pretrain RUN_DIR` trains into RUN_DIR (it was ignored without --resume); two
    different directories are refused."""
    from fastclr.cli import build_parser, pretrain_target

    run = str(tmp_path / "mine")
    resume, cfg = pretrain_target(build_parser().parse_args(["pretrain", run, "--data", "mnist"]))
    assert resume is None and cfg.train.run_dir == run and cfg.data.preset == "mnist"
    assert pretrain_target(build_parser().parse_args(["pretrain", run, "--run-dir", run]))[1].train.run_dir == run
    with pytest.raises(FastclrError, match="two run directories given"):
        pretrain_target(build_parser().parse_args(["pretrain", run, "--run-dir", str(tmp_path / "other")]))


@pytest.mark.parametrize("text", ["runs/😀-photos", "C:\\data\\é", 'a "quoted"\tname\n', "del\x7f and \x01", "𝔽ashion"])
def test_any_string_setting_survives_config_toml(tmp_path: Path, text: str) -> None:
    """A run directory or store path is the user's text: characters beyond U+FFFF (JSON's surrogate
    pairs are not TOML), quotes, backslashes and control characters all read back exactly."""
    cfg = apply_overrides(Config(), {"train.run_dir": text, "model.init": text})
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg), encoding="utf-8")
    back = apply_overrides(Config(), read_toml(p))
    assert back.train.run_dir == text and back.model.init == text and back == cfg


def _saved_run(path: Path, **over: Any) -> Path:
    """A run directory holding only the config.toml of a tiny mnist run (what resume reads first)."""
    from tiny import tiny_config

    path.mkdir()
    (path / "config.toml").write_text(to_toml(tiny_config(path, data__name="mnist", **over)), encoding="utf-8")
    return path


def test_resume_continues_in_its_own_directory_and_refuses_another(tmp_path: Path) -> None:
    """`--resume RUN --run-dir OTHER` (and `--resume auto RUN --run-dir OTHER`) name two run
    directories: refused, as `pretrain RUN --run-dir OTHER` is. A resumed run's config records the
    directory it continues in, also when the run was moved since."""
    from fastclr.cli import build_parser, pretrain_target

    run = _saved_run(tmp_path / "run")
    moved = tmp_path / "moved"
    run.rename(moved)
    for argv in (["--resume", str(moved), "--run-dir", str(tmp_path / "other")],
                 ["--resume", "auto", str(moved), "--run-dir", str(tmp_path / "other")]):
        with pytest.raises(FastclrError, match="two run directories given"):
            pretrain_target(build_parser().parse_args(["pretrain", *argv]))
    resume, cfg = pretrain_target(build_parser().parse_args(["pretrain", "--resume", str(moved)]))
    assert resume == moved and cfg.train.run_dir == str(moved)
    assert pretrain_target(build_parser().parse_args(["pretrain", "--resume", str(moved), "--run-dir", str(moved)]))[0] == moved
    same = str(moved.parent / "x" / ".." / moved.name)  # the same directory, spelled another way
    assert pretrain_target(build_parser().parse_args(["pretrain", "--resume", str(moved), "--run-dir", same]))[0] == moved


def test_epochs_given_as_a_flag_replace_a_saved_time_budget(tmp_path: Path) -> None:
    """A saved config.toml holds the recipe's time budget, which stops a run before any epoch count:
    `--epochs` as a flag (without `--time-budget`) means epochs on resume and over `--config` too."""
    from fastclr.cli import build_parser, pretrain_target

    run = _saved_run(tmp_path / "run", train__time_budget=9.5, train__epochs=100.0)
    for argv in (["--resume", str(run), "--epochs", "5"], ["--config", str(run / "config.toml"), "--epochs", "5"]):
        cfg = pretrain_target(build_parser().parse_args(["pretrain", *argv]))[1]
        assert (cfg.train.epochs, cfg.train.time_budget) == (5.0, 0.0)
    with pytest.raises(FastclrError, match="both set the run's length"):  # the budget would replace the epochs
        pretrain_target(build_parser().parse_args(["pretrain", "--resume", str(run), "--epochs", "5", "--time-budget", "3"]))
    assert pretrain_target(build_parser().parse_args(["pretrain", "--resume", str(run)]))[1].train.time_budget == 9.5


def test_resume_on_another_dataset_is_refused_unless_allowed_and_then_passes_the_recipe_check(tmp_path: Path) -> None:
    """README: resuming with a different dataset is refused naming data.name, and
    --allow-config-change permits it (the preset check refused it either way)."""
    from fastclr.cli import build_parser, pretrain_target
    from fastclr.pretraining.state import check_resume_config
    from fastclr.presets import check_preset

    run = _saved_run(tmp_path / "run")
    saved = apply_overrides(Config(), read_toml(run / "config.toml"))
    cfg = pretrain_target(build_parser().parse_args(["pretrain", "--resume", str(run), "--data", "fashion-mnist"]))[1]
    check_preset(cfg)
    assert cfg.data.preset == "fashion-mnist" and cfg.augment == saved.augment  # the run keeps its recipe
    with pytest.raises(FastclrError, match="data.name"):
        check_resume_config(saved, cfg, allow_changes=False)
    check_resume_config(saved, cfg, allow_changes=True)


def test_seeds_stop_where_the_generators_do_and_stage_specs_are_checked_with_the_settings() -> None:
    """train.seed is any seed torch's generators take (up to 2**64 - 1), refused past it with the
    settings; the data order multiplies it, past 2**64, and still draws an epoch (it overflowed
    after the run directory was made), the same one as before for seeds that did not overflow. A
    bad stage spec is refused with the settings too, before any data is read or run directory made."""
    from fastclr.data.loader import epoch_permutation
    import torch

    with pytest.raises(FastclrError, match=r"train.seed = 18446744073709551616 is not allowed: it must be in "
                                           r"\[0, 18446744073709551615\]"):
        apply_overrides(Config(), {"train.seed": 2**64})
    for seed in (2**64 - 1, 2**44 + 5, 2**32):
        assert apply_overrides(Config(), {"train.seed": seed}).train.seed == seed
        assert sorted(epoch_permutation(10, 3, seed).tolist()) == list(range(10))
    g = torch.Generator().manual_seed(7 * 1_000_003 + 3)
    assert torch.equal(epoch_permutation(10, 3, 7), torch.randperm(10, generator=g))
    for spec in ("32|256|fc", "32|256|fc0", "32|x|fc512", ""):
        with pytest.raises(FastclrError, match="is not a stage spec"):
            apply_overrides(Config(), {"model.cnn_stages": spec})


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,-1"], "--seeds takes seeds from 0"),
    (["--supervised-seeds", "-1"], "--supervised-seeds takes seeds from 0"),
    (["--finetune-seeds", str(2**64)], "--finetune-seeds takes seeds from 0"),
    (["--lr", "inf"], "--lr must be a finite number above 0"),
    (["--knn-tau", "inf"], "--knn-tau must be a finite number above 0"),
])
def test_evaluate_refuses_seeds_and_numbers_it_cannot_use_before_it_starts(argv: list[str], message: str) -> None:
    from fastclr.cli import build_parser
    from fastclr.evaluation.cli import options_from_args

    with pytest.raises(FastclrError, match=message):
        options_from_args(build_parser().parse_args(["evaluate", "run", *argv]))


def test_a_checkpoint_only_run_saved_before_presets_gets_its_datasets_preset(tmp_path: Path) -> None:
    """load_run reads a run without encoder.safetensors from its checkpoint: a config saved before
    data.preset existed gets its dataset's preset there too, as config.toml's reader gives it."""
    from fastclr.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    from fastclr.pretrained import load_run
    from tiny import tiny_dataset, tiny_run

    run = tmp_path / "old"
    tiny_run(run, tiny_dataset(), data__name="mnist")
    state = load_checkpoint(list_checkpoints(run)[-1])
    del state["config"]["data"]["preset"]
    for p in list_checkpoints(run):
        p.unlink()
    save_checkpoint(run, state)
    (run / "encoder.safetensors").unlink()
    assert load_run(run, log=lambda s: None).config.data.preset == "mnist"


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("Yes", True), ("on", True),
                                         ("0", False), ("false", False), ("no", False), ("OFF", False)])
def test_every_spelling_of_a_switch_sets_a_true_or_false_setting(text: str, value: bool) -> None:
    """A true/false setting given as a flag takes 1/true/yes/on and 0/false/no/off, in any case."""
    cfg = apply_overrides(Config(), {"train.channels_last": text, "eval.probe": text})
    assert cfg.train.channels_last is value and cfg.eval.probe is value


def test_toml_booleans_set_auto_on_off_settings_and_are_no_integers(tmp_path: Path) -> None:
    """An auto/on/off setting written as a TOML boolean (or a "true"/"false" string) means on/off;
    an integer setting refuses a boolean rather than reading true as 1."""
    p = tmp_path / "c.toml"
    p.write_text('[train]\ncompile = true\n[model]\ncifar_stem = false\n', encoding="utf-8")
    cfg = apply_overrides(Config(), read_toml(p))
    assert (cfg.train.compile, cfg.model.cifar_stem) == ("on", "off")
    cfg = apply_overrides(Config(), {"train.compile": "false", "model.cifar_stem": "True"})
    assert (cfg.train.compile, cfg.model.cifar_stem) == ("off", "on")
    p.write_text('[train]\nthreads = true\n', encoding="utf-8")
    with pytest.raises(FastclrError) as e:
        apply_overrides(Config(), read_toml(p))
    assert str(e.value) == "train.threads must be an integer, got True; write e.g. threads = 0"  # the example had none
    for key, value, message in (("eval.probe", 1, "must be true or false, got 1; write e.g. probe = true"),
                                ("train.log_every", 1.5, "must be an integer, got 1.5; write e.g. log_every = 25"),
                                ("train.temperature", True, "must be a finite number, got True; write e.g. "
                                                            "temperature = 0.2")):
        with pytest.raises(FastclrError) as e:
            apply_overrides(Config(), {key: value})
        assert str(e.value) == f"{key} {message}"


def test_a_toml_boolean_is_no_path_or_name_and_no_dunder_is_a_key(tmp_path: Path) -> None:
    """`run_dir = true` became the folder ./on (any string setting took a boolean as on/off);
    `__doc__` passed the unknown-key check (hasattr) and `__class__` ended in a KeyError traceback."""
    p = tmp_path / "c.toml"
    for text, message in (("[train]\nrun_dir = true\n", "train.run_dir must be a string, got True"),
                          ("[data]\nroot = false\n", "data.root must be a string, got False"),
                          ('[train]\n__doc__ = "x"\n', "unknown config key 'train.__doc__'"),
                          ('[train]\n__class__ = "x"\n', "unknown config key 'train.__class__'")):
        p.write_text(text, encoding="utf-8")
        with pytest.raises(FastclrError, match=message.replace(".", r"\.").replace("(", r"\(")):
            apply_overrides(Config(), read_toml(p))
    assert apply_overrides(Config(), {"train.run_dir": "true"}).train.run_dir == "true"  # a folder named so


def test_a_config_built_in_python_is_checked_for_the_kind_of_each_setting() -> None:
    """`validate` (what `pretrain` runs on a config made in Python) checked ranges only: a switch
    set to the string 'false' trained as true, a batch of 64.0 went on as a float, and epochs '10'
    raised a TypeError traceback. Each is one line naming the key; an int for a float setting stays
    allowed, as in TOML; a path that is no valid UTF-8 cannot be recorded in config.toml."""
    from fastclr.config import validate

    for section, name, value, kind in (("train", "supcon", "false", "true or false"),
                                       ("train", "batch_size", 64.0, "an integer"),
                                       ("train", "epochs", "10", "a finite number"),
                                       ("train", "seed", True, "an integer"),
                                       ("train", "run_dir", 3, "a string")):
        cfg = Config()
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(FastclrError, match=f"^{section}.{name} = {value!r} must be {kind}; e.g. --"):
            validate(cfg)
    cfg = Config()
    cfg.train.epochs = 10
    validate(cfg)
    cfg.train.run_dir = "runs/x\udcff"  # what os.fsdecode makes of the byte 0xff
    with pytest.raises(FastclrError, match=r"^train.run_dir = .* is not valid UTF-8 \(config.toml records every "
                                           r"setting as text\); rename it$"):
        validate(cfg)


def test_a_misspelt_toml_section_is_refused_not_ignored(tmp_path: Path) -> None:
    """A file's [trian] table names no section: its keys are refused with the nearest key, never
    dropped while the run trains on the defaults."""
    p = tmp_path / "c.toml"
    p.write_text("[trian]\nbatch_size = 64\n", encoding="utf-8")
    with pytest.raises(FastclrError,
                       match=r"unknown config key 'trian.batch_size' \(did you mean train.batch_size\?\)"):
        apply_overrides(Config(), read_toml(p))


def test_a_learned_temperature_may_start_at_either_end_of_its_range() -> None:
    """--learn-temperature keeps t in LEARNED_TEMPERATURE_RANGE, both ends included: a start at
    either end is accepted, one just outside refused."""
    from fastclr.config import LEARNED_TEMPERATURE_RANGE

    low, high = LEARNED_TEMPERATURE_RANGE
    for t in (low, high):
        cfg = apply_overrides(Config(), {"train.learn_temperature": True, "train.temperature": t})
        assert cfg.train.temperature == t
    for t in (low * 0.99, high * 1.01):
        with pytest.raises(FastclrError, match="where --learn-temperature keeps t"):
            apply_overrides(Config(), {"train.learn_temperature": True, "train.temperature": t})


def test_a_saved_run_keeps_the_preset_it_recorded(tmp_path: Path) -> None:
    """A run that trained on its own settings (data.preset set to another recipe than its
    dataset's, as the recipe check suggests) resumes with the preset it recorded; only a config
    saved without one gets its dataset's."""
    from fastclr.cli import build_parser, resume_config
    from fastclr.presets import saved_overrides

    run = _saved_run(tmp_path / "run", data__preset="fashion-mnist")
    assert saved_overrides(run / "config.toml")["data.preset"] == "fashion-mnist"
    cfg = resume_config(run, build_parser().parse_args(["pretrain", "--resume", str(run)]))
    assert (cfg.data.name, cfg.data.preset) == ("mnist", "fashion-mnist")
    _drop_lines(run / "config.toml", "preset")
    assert saved_overrides(run / "config.toml")["data.preset"] == "mnist"


def test_the_preset_flag_and_an_empty_resume_are_one_line_errors(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--preset read in --help as a way to pick a recipe but could only fail, telling a command-line
    user to call fastclr.config_for; --resume "" (an unset variable in a job script) started a new
    run from scratch and exited 0. Both are refused in one line before anything is written."""
    from fastclr.cli import build_parser, main, pretrain_target

    assert main(["pretrain", "--data", "mnist", "--preset", "cifar10", "--run-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("error: --preset is not a way to choose a recipe: --data DATASET trains")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--help"])
    assert "--preset" not in capsys.readouterr().out
    with pytest.raises(FastclrError, match=r"^--resume was given an empty run directory \(an unset variable\?\)"):
        pretrain_target(build_parser().parse_args(["pretrain", "--resume", ""]))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [["pretrain", ""], ["pretrain", "--run-dir", ""], ["pretrain", " ", "--epochs", "1"]])
def test_an_empty_run_directory_is_refused_not_replaced_by_a_new_one(argv: list[str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`fastclr pretrain "$RUN"` with RUN unset trained a new run under runs/ and exited 0, as
    `--resume ""` did before: the job script believed it had trained $RUN."""
    from fastclr.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "given is empty (an unset variable?); give the run directory" in err
    assert list(tmp_path.iterdir()) == []


def test_config_files_given_twice_are_layered_in_order_under_the_flags(tmp_path: Path) -> None:
    """`--config A --config B` trained B alone: A's temperature was dropped without a word."""
    from fastclr.cli import parse_args, resolve_config

    (tmp_path / "a.toml").write_text("[train]\ntemperature = 0.3\nbatch_size = 64\n", encoding="utf-8")
    (tmp_path / "b.toml").write_text("[optim]\nlr = 0.01\n[train]\nbatch_size = 32\n", encoding="utf-8")
    args = parse_args(["pretrain", "--config", str(tmp_path / "a.toml"), "--config", str(tmp_path / "b.toml"),
                       "--proj-dim", "16"])
    cfg = resolve_config(args)
    assert (cfg.train.temperature, cfg.optim.lr, cfg.train.batch_size, cfg.model.proj_dim) == (0.3, 0.01, 32, 16)
    alone = resolve_config(parse_args(["pretrain", "--config", str(tmp_path / "b.toml")]))
    assert alone.train.temperature == Config().train.temperature  # the layering, not b.toml, gave 0.3


@pytest.mark.parametrize("body, said", [
    ("[train]\ntemperature = \"warm\"\n", "train.temperature must be a finite number, got 'warm'"),
    # text in quotes for a switch or a number was read as a flag's text: "yes" a probe, "no" none
    ("[eval]\nprobe = \"yes\"\n", "eval.probe must be true or false, got 'yes' (text, in quotes); write e.g. "
                                  "probe = true"),
    ("[train]\nepochs = \"0.01\"\n", "train.epochs must be a finite number, got '0.01' (text, in quotes); write "
                                    "e.g. epochs = 100.0"),
    ("[train]\nrun_dir = 3\n", 'train.run_dir must be a string, got 3; write e.g. run_dir = "..."'),
    ("[train]\nprecision = \"fp8\"\n", "train.precision = 'fp8' is not allowed: it must be one of"),
    ("[train]\nbatchsize = 64\n", "unknown config key 'train.batchsize' (did you mean train.batch_size?)"),
])
def test_a_bad_setting_in_one_of_several_config_files_names_that_file(tmp_path: Path, body: str, said: str) -> None:
    """With `--config base.toml --config exp.toml`, a bad value was named without its file: which of
    the two to fix was left to the user (a file on resume too)."""
    import re

    from fastclr.cli import parse_args, resolve_config, resume_config

    base, exp = tmp_path / "base.toml", tmp_path / "exp.toml"
    base.write_text("[train]\nbatch_size = 64\n", encoding="utf-8")
    exp.write_text(body, encoding="utf-8")
    run = _saved_run(tmp_path / "run")
    for call in (lambda a: resolve_config(parse_args(["pretrain", *a])),
                 lambda a: resume_config(run, parse_args(["pretrain", "--resume", str(run), *a]))):
        with pytest.raises(FastclrError, match=rf"^config file {re.escape(str(exp))}: {re.escape(said)}"):
            call(["--config", str(base), "--config", str(exp)])
        call(["--config", str(base)])  # the good file alone passes


def test_a_home_in_a_path_is_put_in_where_no_shell_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out=~/x`, `--run-dir=~/x` and a --config file's run_dir made a folder named "~" in the
    current directory; `--resume auto` did not find a --config file's run_dir at all ("needs the run
    directory"), though the same file started the run there."""
    from fastclr.cli import parse_args, pretrain_target

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert parse_args(["export", "~/runs/a", "--out=~/enc.pt2"]).out == str(tmp_path / "home" / "enc.pt2")
    args = parse_args(["pretrain", "--run-dir=~/runs/a"])
    assert pretrain_target(args)[1].train.run_dir == str(tmp_path / "home" / "runs" / "a")
    (tmp_path / "f.toml").write_text('[train]\nrun_dir = "~/runs/b"\n', encoding="utf-8")
    resume, cfg = pretrain_target(parse_args(["pretrain", "--config", "f.toml"]))
    assert resume is None and cfg.train.run_dir == str(tmp_path / "home" / "runs" / "b")
    resume, cfg = pretrain_target(parse_args(["pretrain", "--resume", "auto", "--config", "f.toml"]))
    assert resume is None and cfg.train.run_dir == str(tmp_path / "home" / "runs" / "b")  # no checkpoint yet: new
    assert parse_args(["pretrain", "--cnn-stages", "~x"]).__dict__["cfg:model.cnn_stages"] == "~x"  # not a home path


def test_a_config_file_that_never_ends_or_is_huge_is_one_line_and_a_pipe_is_read(tmp_path: Path) -> None:
    """`--config /dev/zero` read forever into a MemoryError traceback; a config is read bounded, from a
    file or a pipe (`--config <(...)`)."""
    import os
    import threading

    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    for path in [huge, *([Path("/dev/zero")] if Path("/dev/zero").exists() else [])]:
        with pytest.raises(FastclrError, match=rf"^config file {path} is larger than 1 MiB, which no config is; check "
                                               r"the path given to --config$"):
            read_toml(path)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "piped.toml"
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda: fifo.write_text("[train]\ntemperature = 0.5\n"))
        writer.start()
        assert read_toml(fifo) == {"train.temperature": 0.5}
        writer.join(10)
