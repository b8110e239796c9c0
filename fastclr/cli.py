"""The `fastclr` command line. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fastclr.config import FLAG_HELP, Config, apply_overrides, auto_value, check_settings, flag_table, read_toml
from fastclr.errors import FastclrError, PeerFailure, out_of_memory, warn_stderr
from fastclr.files import WriteFailed, is_write_error, remove_empty, write_failure_reason, write_way_out
from fastclr.signals import EXIT_STOPPED, Terminated, cleanup_on_sigterm
from fastclr.streams import outliving_readers, shown
from fastclr.evaluation.cli import add_eval_commands, memory_fix
from fastclr.ingest.commands import add_ingest_commands
from fastclr.semisup.commands import add_semisup_commands
from fastclr.presets import config_for, preset_name, saved_overrides
from fastclr.scaleout.once import print_once_a_node
from fastclr.scaleout.start import StoppedBeforeStart, tell_start_failure
from fastclr.scaleout.distributed import env_world_size, first_line

if TYPE_CHECKING:
    import torch

    from fastclr.pretrained import LoadedRun

EXIT_USAGE = 2
PATH_ERRORS = (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG,
               errno.ELOOP)
"""Errors of a path itself (not of the disk filling): told as one line naming the path."""


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    defaults = Config()
    group = p.add_argument_group("config overrides (defaults shown, then the dataset presets that change them; "
                                 "see fastclr/config.py and fastclr/presets.py)")
    for flag, (section, name) in flag_table().items():
        default = getattr(getattr(defaults, section), name)
        auto = auto_value(section, name)
        shown = f"auto ({default!r})" if auto is not None and default == auto else repr(default)
        group.add_argument(f"--{flag}", dest=f"cfg:{section}.{name}", default=argparse.SUPPRESS, metavar="V",
                           help=argparse.SUPPRESS if (section, name) == ("data", "preset") else
                           f"{section}.{name}{': ' + FLAG_HELP[key] if (key := f'{section}.{name}') in FLAG_HELP else ''} "
                           f"(default: {shown}{preset_text(key, default)})")


def preset_text(key: str, default: Any) -> str:
    """'; fashion-mnist, mnist: 256' for a key that dataset presets set: without it `--help` would
    show the bare default for settings the default run does not use."""
    from fastclr.presets import IMAGENET, PRESETS

    by_value: dict[str, list[str]] = {}
    for data, preset in {**PRESETS, "stores": IMAGENET}.items():
        if key in preset and preset[key] != default:  # a preset that repeats the default changes nothing
            by_value.setdefault(repr(preset[key]), []).append(data)
    return "".join(f"; {', '.join(names)}: {value}" for value, names in by_value.items())


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    if "data.preset" in flags:  # it names the recipe a config holds; `--data` chooses the recipe
        raise FastclrError("--preset is not a way to choose a recipe: --data DATASET trains with that dataset's own "
                           "(see --help); to train one dataset on exactly the settings of a config file, set "
                           "data.preset in it")
    if _positive(flags.get("train.epochs")) and _positive(flags.get("train.time_budget")):  # the budget sets the length
        raise FastclrError(f"--epochs {flags['train.epochs']} and --time-budget {flags['train.time_budget']} both "
                           "set the run's length, and a time budget replaces the epochs; give one of them")
    return flags


def _positive(value: object) -> bool:
    """Whether a flag's text is a number above 0 (one that is not a number is the config check's to refuse)."""
    try:
        return float(str(value)) > 0
    except ValueError:
        return False


def _epochs_mean_epochs(flags: dict[str, Any]) -> dict[str, Any]:
    """`--epochs` without `--time-budget` (in flags, or in what a resume is given) trains that many
    epochs, also over a config file or a saved run that holds a time budget (which would otherwise
    stop the run first, silently)."""
    return {"train.time_budget": 0.0} if "train.epochs" in flags and "train.time_budget" not in flags else {}


def _note_length_over_file(file: dict[str, Any], flags: dict[str, Any]) -> None:
    """Which of a run's two lengths wins, said where config files had another: a flag wins over the
    files (`--time-budget` over their epochs, `--epochs` over their budget), and in the files a time
    budget above 0 over epochs they set away from the default (a run's own config.toml holds both,
    the default epochs beside its budget, and says nothing). Refused outright only when both are
    flags (`_overrides`)."""
    budget, epochs = file.get("train.time_budget", 0), file.get("train.epochs")
    if _positive(flags.get("train.time_budget")):
        if epochs is not None and not _positive(budget):
            _note(f"--time-budget {flags['train.time_budget']} sets the run's length; the config file's train.epochs "
                  f"{epochs} is not used (leave --time-budget out to train by epochs)")
    elif "train.epochs" in flags:
        if _positive(budget):
            _note(f"--epochs {flags['train.epochs']} sets the run's length; the config file's train.time_budget "
                  f"{budget} min is not used")
    elif _positive(budget) and epochs is not None and float(epochs) != Config().train.epochs:
        _note(f"the config files' train.time_budget {budget} min sets the run's length; their train.epochs {epochs} "
              "is not used (time_budget = 0 trains by epochs)")


def _note(line: str) -> None:
    print_once_a_node(f"note: {line}", file=sys.stderr)  # every rank resolves the config alike


def resolve_config(args: argparse.Namespace) -> Config:
    """Config() <- the dataset's preset <- TOML file <- flags (`presets.config_for`)."""
    overrides: dict[str, Any] = {}
    flags = _overrides(args)
    if getattr(args, "config", None):
        overrides.update(config_files(args))
        _note_length_over_file(overrides, flags)
        overrides.update(_epochs_mean_epochs(flags))
    overrides.update(flags)
    if "train.run_dir" in overrides:  # from a file, where no shell put the home in
        overrides["train.run_dir"] = home_expanded(overrides["train.run_dir"])
    return config_for(None, overrides)


def config_files(args: argparse.Namespace) -> dict[str, Any]:
    """The --config files' settings, each file over the ones before it (a second --config replaced
    the first without a word), each with the epochs rule."""
    merged: dict[str, Any] = {}
    for path in getattr(args, "config", None) or []:
        file = read_toml(path)
        try:  # each file's own settings here, where the file is known: with several, which one is wrong
            check_settings(file)
        except FastclrError as e:
            raise FastclrError(f"config file {path}: {e}") from None
        file = {**file, **_epochs_mean_epochs(file)}
        if "train.epochs" in file and _positive(merged.get("train.time_budget")) \
                and not _positive(file.get("train.time_budget")):  # the epochs rule, or its own budget of 0
            _note(f"config file {path}'s train.epochs {file['train.epochs']} sets the run's length; an earlier "
                  f"file's train.time_budget {merged['train.time_budget']} min is not used")
        merged.update(file)
    return merged


def resume_config(resume: Path, args: argparse.Namespace) -> Config:
    """The config `--resume RUN_DIR` continues with: the run's own (keys added since it was saved at
    the values it ran with), then a --config file, then flags."""
    if not resume.is_dir():
        what = "a file, not a run directory" if resume.exists() else "no such run directory"
        raise FastclrError(f"--resume {resume}: {what}; give the directory of an earlier run")
    saved = resume / "config.toml"
    base = saved_overrides(saved) if saved.exists() else checkpoint_settings(resume)
    # What this command asks for, a --config file then flags, each with the epochs rule.
    file, flags = config_files(args), _overrides(args)
    _note_length_over_file(file, flags)
    given = {**file, **_epochs_mean_epochs(flags), **flags}
    from fastclr.data import absolute_name

    # The same store spelled another way (relative, where the run recorded it absolute) is no other dataset
    if "data.name" in given and "data.preset" not in given and \
            absolute_name(str(given["data.name"])) != absolute_name(str(base.get("data.name", ""))):
        # Another dataset on resume (refused unless --allow-config-change): the run keeps its recipe,
        # which from now on is the recipe it trains that dataset with.
        base["data.preset"] = preset_name(str(given["data.name"]))
    base.update(given)
    base["train.run_dir"] = str(resume)  # where it continues, also when the run directory was moved
    return apply_overrides(Config(), base)


def checkpoint_settings(run: Path) -> dict[str, Any]:
    """The settings of a run whose config.toml is gone, from its newest valid checkpoint (each holds
    the whole config); the run writes config.toml again. A folder without checkpoints either is not
    a run."""
    from fastclr.checkpoint import check_run_parts, latest_valid_checkpoint, list_checkpoints
    from fastclr.presets import checkpoint_overrides

    if not list_checkpoints(run):
        raise FastclrError(f"{run} holds no config.toml; it is not a fastclr run directory: give the directory an "
                           "earlier `fastclr pretrain` wrote (`--resume auto` starts a run where there is none)")
    path, state = latest_valid_checkpoint(run, warn=print, check=check_run_parts)
    try:
        flat = checkpoint_overrides(state["config"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, FastclrError) as e:
        raise FastclrError(f"{run} has no config.toml and its checkpoint {path.name} records its settings in a form "
                           f"this version cannot read ({type(e).__name__}); resume it with the version that wrote it") from None
    print(f"note: {run} has no config.toml: resuming with the settings its checkpoint {path.name} holds, which "
          "config.toml records again")
    return flat


def pretrain_target(args: argparse.Namespace) -> tuple[Path | None, Config]:
    """The run `fastclr pretrain` continues (None for a new one) and the config it trains with."""
    from fastclr.checkpoint import list_checkpoints

    resume = None
    if args.resume is not None and not args.resume.strip():  # `--resume "$RUN"` with RUN unset: not a new run
        raise FastclrError("--resume was given an empty run directory (an unset variable?); give the run directory "
                           "to continue, or leave --resume out to start a new run")
    flag = _overrides(args).get("train.run_dir")
    for given, named in ((args.run_dir, "the run directory"), (flag, "--run-dir")):
        if given is not None and not str(given).strip():  # `fastclr pretrain "$RUN"` with RUN unset
            raise FastclrError(f"{named} given is empty (an unset variable?); give the run directory, or leave it "
                               "out to start a new run under runs/")
    if args.resume == "auto":
        # `--resume auto RUN_DIR`: continue RUN_DIR if it holds a checkpoint, else start it fresh.
        flag = _overrides(args).get("train.run_dir")
        if args.run_dir and flag and Path(flag).resolve() != Path(args.run_dir).resolve():
            raise FastclrError(f"two run directories given ({args.run_dir} and --run-dir {flag}); give one")
        # As a new run finds it: a flag, else a --config file's train.run_dir (which started the run)
        target_name = home_expanded(args.run_dir or flag or (config_files(args).get("train.run_dir") if args.config
                                                             else None))
        if not target_name:
            raise FastclrError("--resume auto needs the run directory: fastclr pretrain --resume auto RUN_DIR")
        target = Path(str(target_name))
        if list_checkpoints(target):
            resume = target
        else:
            args.__dict__["cfg:train.run_dir"] = str(target)
    elif args.resume:
        resume = Path(args.resume)
        if args.run_dir:
            raise FastclrError("give either --resume RUN_DIR or --resume auto RUN_DIR, not both a directory and a positional")
        flag = _overrides(args).get("train.run_dir")
        if flag and Path(flag).resolve() != resume.resolve():
            raise FastclrError(f"two run directories given (--resume {resume} and --run-dir {flag}); a resumed run "
                               "continues in its own directory: drop --run-dir")
    elif args.run_dir:  # `fastclr pretrain RUN_DIR`: a new run in RUN_DIR
        given = _overrides(args).get("train.run_dir")
        if given and Path(given).resolve() != Path(args.run_dir).resolve():
            raise FastclrError(f"two run directories given ({args.run_dir} and --run-dir {given}); give one")
        args.__dict__["cfg:train.run_dir"] = args.run_dir
    if resume is not None:
        return resume, resume_config(resume, args)
    cfg = resolve_config(args)
    if args.config and "data.root" not in _overrides(args):
        # A run's config.toml names the folder its data was read from: given to --config on another machine,
        # where that folder is not, it is searched past with a note (a --data-root flag is refused as typed).
        from fastclr.data.datasets import recorded_root

        root = recorded_root(cfg.data.name, cfg.data.root, f"--config {args.config[-1]}",
                             lambda line: _note(line.removeprefix("note: ")))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))
    return None, cfg


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Train SimCLR, then print the linear-probe accuracy."""
    from fastclr.signals import EXIT_STOPPED, graceful_stop
    from fastclr.pretraining.loop import pretrain
    from fastclr.runs import settings_alone

    resume, cfg = pretrain_target(args)
    if resume is None and cfg.train.run_dir:
        own = Path(os.path.expanduser(cfg.train.run_dir)) / "config.toml"
        for given in getattr(args, "config", None) or []:
            # The run's settings would replace the file they were read from: refused unless it holds nothing
            # else (a run killed before its first checkpoint, started again with its own settings).
            if Path(given).resolve() == own.resolve() and not settings_alone(own):
                raise FastclrError(f"--config {given} is where the run writes its own settings (config.toml of its "
                                   f"directory), which would replace it and what it holds beside them (comments, "
                                   "layout); keep it elsewhere, or give another run directory")
    if "TORCHELASTIC_RUN_ID" in os.environ and env_world_size() > 1:
        # A torchrun rank: torchrun starts each with setsid(), apart from its launcher, so a launcher killed outright
        # (a scheduler's SIGKILL, the OOM killer) left the ranks training and holding the run's lock.
        from fastclr.signals import die_with_parent

        die_with_parent(os.getppid(), signal.SIGTERM)
    with graceful_stop() as stop:
        result = pretrain(cfg, resume=resume, allow_config_change=args.allow_config_change, progress=not args.quiet,
                          stop=stop, file_settings=_file_settings(args))
        late = stop.signal  # one after the last step, with no probe left to cut short
        stop.finished = not result.stopped
    if result.stopped:
        return EXIT_STOPPED  # the loop (rank 0) said where it stopped and how to continue
    if late is not None and result.rank == 0:
        warn_stderr(f"note: {signal.Signals(late).name} came too late to stop the run: it trained to its end and its "
                    "encoder is saved; there is nothing to resume")
    if result.probe_accuracy is not None:
        versus = "" if result.random_init_accuracy is None else (
            f", same network untrained {result.random_init_accuracy * 100:.2f}%")
        print(f"linear-probe accuracy: {result.probe_accuracy * 100:.2f}%{versus}  (run: {result.run_dir})")
    return 0


def _file_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the --config files give, each file over the ones before it, flags left out: a
    value of theirs nothing in the run reads is a note (a run's own config.toml reused with a part
    switched off), one given by a flag a refusal."""
    flags = _overrides(args)
    merged: dict[str, Any] = {}
    for path in getattr(args, "config", None) or []:
        merged.update(read_toml(path))
    return {k: v for k, v in merged.items() if k not in flags}


def cmd_download(args: argparse.Namespace) -> int:
    """Make sure a built-in dataset's files are present (download and verify if missing), and
    read them as training would: a file present but damaged is an error, not "present"."""
    from fastclr.data.datasets import REGISTRY, ensure, read_checked

    if args.name not in REGISTRY:  # not spec()'s error, which offers a store: nothing is downloaded into one
        raise FastclrError(f"unknown dataset {args.name!r}; fastclr downloads: {', '.join(REGISTRY)}")
    made = [d for d in (Path(args.root), *Path(args.root).parents) if not d.exists()] if args.root else []
    if args.root and not args.no_download:  # the folder to download into, made as asked
        Path(args.root).mkdir(parents=True, exist_ok=True)
    # With --root a download puts the dataset there, even where another folder holds a copy (the
    # folder an error's advice names); --no-download only checks, looking there first.
    try:
        folder = ensure(args.name, args.root, download=not args.no_download,
                        only_root=bool(args.root) and not args.no_download)
    except BaseException:  # a SIGTERM's exit too
        remove_empty(made)  # a failed download leaves no empty folder it made, --root's parents included
        raise
    try:
        ds = read_checked(args.name, folder)
    except FastclrError as e:
        raise FastclrError(f"{e} (the copy in {folder} is damaged: delete or replace it; files are never "
                           "downloaded over one)") from None
    splits = ", ".join(f"{len(s)} {n}" for n, s in (("train", ds.train), ("test", ds.test)) if s is not None)
    # What was checked: a present file is read whole and its counts, shapes and labels must agree; its
    # bytes are compared with the publisher's checksum only when this command downloads it.
    print(f"{args.name}: {folder} ({len(ds.pretrain)} images for pretraining; {splits}; read, sizes and labels "
          "consistent)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a run's encoder in another format."""
    from fastclr.export import check_export, export_encoder, export_format
    from fastclr.files import through_link
    from fastclr.pretrained import load_run
    from fastclr.runs import refuse_nameless, refuse_output, refuse_unwritable_file

    refuse_nameless(Path(args.out), example="encoder.safetensors")
    args.out = str(through_link(Path(args.out)))  # a link is written through: its target's name decides (export_encoder)
    refuse_output(Path(args.out))
    refuse_unwritable_file(Path(args.out))
    run = load_run(args.run_dir, "cpu", "fp32", log=print, command="export")  # its notes: a checkpoint, an owner
    fmt = export_format(args.format, Path(args.out), run.spec)
    check_export(fmt, run.spec)  # before the data is read or a folder made
    config_text = (Path(args.run_dir) / "config.toml").read_text(encoding="utf-8")
    check, checked_on = (_check_images(run) if fmt == "onnx" else (None, ""))
    folder = Path(args.out).parent
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # what this command creates, innermost first
    folder.mkdir(parents=True, exist_ok=True)  # as embed and finetune do, before the work
    try:
        paths = export_encoder(run.encoder, run.spec, config_text, fmt, Path(args.out), check,
                               data_content=run.data_content, checkpoint_step=run.checkpoint_step)
    except BaseException:  # a refused export (onnxruntime's check) leaves no empty folder behind
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    for path in paths:
        print(f"wrote {path}" + (f" (onnxruntime's h equals PyTorch's on {checked_on})" if checked_on else ""))
    return 0


def _check_images(run: LoadedRun) -> tuple[torch.Tensor | None, str]:
    """Up to 64 of the run's own images, test ones first, standardised as the encoder expects, and
    what they are; where the run's data is not here (a run directory copied to another machine, a
    store moved or prepared again) None, for random ones, with a note: the other formats need no data."""
    import numpy as np
    import torch

    from fastclr.pretrained import run_data
    from fastclr.evaluation.features import prepare_images

    try:
        ds = run_data(run)
    except FastclrError as e:
        print(f"note: the run's images are not here to check the ONNX file on ({e}); it is checked on random images")
        return None, "random images"
    # the test images first, then training ones up to 64 (a small store's test split can hold 8); a
    # copy: a store's images are a read-only memory map, which torch.from_numpy warns about
    test = ds.test.images[:64] if ds.test is not None else ds.pretrain.images[:0]
    images = np.concatenate([test, ds.pretrain.images[: 64 - len(test)]])
    return (prepare_images(torch.from_numpy(images), run.mean, run.std, run.spec.image_size),
            f"{len(images)} of the run's images")


def cmd_info(args: argparse.Namespace) -> int:
    """Print this machine's versions, CPU/GPU, precision choice and matmul rates."""
    from fastclr.info import main as info_main

    return info_main(as_json=args.json, measure=not args.no_measure)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    return _parser_and_commands()[0]


class OneLineParser(argparse.ArgumentParser):
    """A parser whose usage errors are one line naming `--help`, as every other error of fastclr's is
    (argparse printed the command's whole usage first: 30 lines for `pretrain`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: argparse took `--epoch 3` as --epochs and `evaluate --seed 3` as --seeds
        # (where finetune's --seed means another thing) without a word; a start of a name is refused
        # with the option it nears, as a misspelling is.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        _error(f"{self.prog}: error: {message}; `{self.prog} --help` lists the options")  # once a node, as others
        self.exit(2)


def _parser_and_commands() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The argument parser, and each subcommand's parser by name."""
    from fastclr.version import __version__

    p = OneLineParser(prog="fastclr", description="SimCLR pretraining and evaluation.")
    p.add_argument("--version", action="version", version=f"fastclr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="train an encoder with SimCLR, then run the linear probe")
    pre.add_argument("--config", action="append",
                     help="a TOML file of overrides ([data], [augment], [model], [optim], [train], [eval]); given "
                          "more than once, each file overrides the ones before it")
    pre.add_argument("--resume", metavar="RUN_DIR|auto",
                     help="continue RUN_DIR from its newest valid checkpoint; `--resume auto RUN_DIR` resumes RUN_DIR "
                          "when it holds a checkpoint and starts it fresh otherwise")
    pre.add_argument("run_dir", nargs="?", help="the run directory (the same as --run-dir); with --resume auto: the "
                     "run to continue or start")
    pre.add_argument("--allow-config-change", action="store_true",
                     help="allow resuming with a different dataset, batch size, views, small views, --supcon, queue, "
                          "support set, seed, --crop-size or --local-size (a network the checkpoint does not fit is never allowed: "
                          "start a new run with --init)")
    pre.add_argument("--quiet", action="store_true", help="no progress line")
    _add_config_flags(pre)
    pre.set_defaults(func=cmd_pretrain)

    dl = sub.add_parser("download", help="fetch a built-in dataset (or check that it is present)")
    from fastclr.data.datasets import REGISTRY

    dl.add_argument("name", help="one of: " + ", ".join(REGISTRY))
    dl.add_argument("--root", "--data-root", help="directory to download into (it holds the dataset afterwards, even where another "
                    "folder holds a copy); with --no-download, the directory to look in first")
    dl.add_argument("--no-download", action="store_true", help="only check, never download")
    dl.set_defaults(func=cmd_download)
    add_ingest_commands(sub)
    add_eval_commands(sub)
    add_semisup_commands(sub)

    ex = sub.add_parser("export", help="write a run's encoder in another format (fastclr, torchvision names, "
                        "torch.export, ONNX)")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("--format", default="auto", choices=["auto", "fastclr", "torchvision", "torch-export", "onnx"],
                    help="(default: auto, the one --out's suffix names: .safetensors fastclr, .pth torchvision, "
                    ".pt2 torch-export, .onnx onnx) "
                    "torchvision: a ResNet state dict in torchvision's (and timm's) names; torch-export: a "
                    "torch.export program (.pt2) with a dynamic batch; onnx: an ONNX model checked in onnxruntime "
                    "on the run's images (needs the onnx extra: README, Installing); fastclr: safetensors with fastclr's metadata")
    ex.add_argument("--out", required=True, help="torchvision: FILE.pth (metadata in FILE.pth.json) or "
                    "FILE.safetensors; torch-export: FILE.pt2; onnx: FILE.onnx; fastclr: FILE.safetensors")
    ex.set_defaults(func=cmd_export)
    inf = sub.add_parser("info", help="versions, CPU and GPU, the precision fastclr would choose and why, matmul rates")
    inf.add_argument("--json", action="store_true", help="one JSON object instead of text")
    inf.add_argument("--no-measure", action="store_true", help="skip the two-second matmul measurement")
    inf.set_defaults(func=cmd_info)
    return p, dict(sub.choices)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line parsed; an option the command does not know is refused by that command's
    parser (in one line naming it, not the list of commands) with the nearest option it has:
    `pretrain --time-budgt 5` printed fastclr's top-level usage and no hint."""
    parser, commands = _parser_and_commands()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = commands[args.command]
        # argparse lists a parser's options only in a private attribute: should it go, no hint, still the error
        known = [o for a in getattr(sub, "_actions", ()) if getattr(a, "help", None) != argparse.SUPPRESS
                 for o in getattr(a, "option_strings", ())]  # not a hidden option, which refuses itself
        hints = [f"{name}: give it after the command, as in `fastclr {args.command} {name}`" if close == [name]
                 else f"{name}: did you mean {' or '.join(close)}?"
                 for token in extra if token.startswith("--") for name in [token.split("=")[0]]
                 for close in [_nearest_options(name, known)] if close]
        sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else ""))
    for key, value in vars(args).items():
        args.__dict__[key] = [home_expanded(v) for v in value] if isinstance(value, list) else home_expanded(value)
    return args


def _nearest_options(name: str, known: list[str]) -> list[str]:
    """The options `name` is the start of (`--temp`: --temperature; difflib's nearest was --help),
    else the one nearest in spelling; none where nothing is near."""
    if name in known:  # a command's own option given before the command
        return [name]
    starting = [o for o in known if o.startswith(name)]
    return starting[:3] if starting else difflib.get_close_matches(name, known, n=1)


def home_expanded(value: object) -> object:
    """A path given as `~/...` (or `~`) with the home directory put in, as a shell does for a word
    of its own but not after `--out=` or inside a --config file: `./~/runs` was made in the current
    directory, which a later `rm -rf ~...` could mistake for the home itself."""
    if isinstance(value, str) and (value == "~" or value.startswith(("~/", "~" + os.sep))):
        return os.path.expanduser(value)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn user errors into one line and exit code 2."""
    try:
        args = parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None) and "pretrain" in (sys.argv[1:] if argv is None else argv) and env_world_size() > 1:
            tell_start_failure("its command line was refused; its log says why")
        raise
    rank = args.command == "pretrain" and env_world_size() > 1
    # A kill's SIGTERM unwinds (partial files removed, locks freed) but in a torchrun rank, whose
    # pretraining stops gracefully on it and whose threads can abort an unwinding exit.
    with outliving_readers(), cleanup_on_sigterm() if not rank else contextlib.nullcontext(), \
            quiet_thread_write_errors():
        try:
            code = _run(args)
        except BaseException as e:
            if rank:  # the other ranks, waiting for this one to start, are told why it will not
                tell_start_failure(f"{type(e).__name__}: {first_line(e)}")
            raise
        if rank:
            if code != 0:
                tell_start_failure(_said[-1] if _said else f"exit status {code}")
            _exit_now(code)  # a torchrun rank, after a result or an error: its threads can abort a normal exit
    return code


def _thread_hook(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's event writer thread on a full disk said nothing the command's own line does
    not: its traceback came first, then the one line (the writer gives the error to the main thread
    at its next write). Every other thread's error keeps its traceback (an experiment tracker's
    thread hands nothing on)."""
    if isinstance(args.exc_value, OSError) and is_write_error(args.exc_value) and \
            type(args.thread).__module__.startswith("tensorboard."):
        return
    threading.__excepthook__(args)


@contextlib.contextmanager
def quiet_thread_write_errors() -> Iterator[None]:
    """`_thread_hook` for the command's duration; the hook found is put back after."""
    before, threading.excepthook = threading.excepthook, _thread_hook
    try:
        yield
    finally:
        threading.excepthook = before


def _run(args: argparse.Namespace) -> int:
    """The command's exit code; user errors printed as one line (code 2)."""
    try:
        _refuse_ranks(args.command)
        return int(args.func(args))
    except PeerFailure as e:  # whatever the command: the communication library's threads outlive a dead peer
        _error(f"error: {e}")
        _exit_now(EXIT_USAGE)
    except StoppedBeforeStart as e:  # a stop, as the training loop's: a scheduler requeues 75
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except WriteFailed as e:  # a command's own output (embed, export, evaluate, report): with the way on
        _error(f"error: {e}; files already complete were kept; {write_way_out(e.cause, 'another place')}, and run the "
               "command again")
        return EXIT_USAGE
    except FastclrError as e:
        _error(f"error: {e}")
        return EXIT_USAGE
    except OSError as e:
        if e.filename and e.errno in PATH_ERRORS:  # a path the user gave that cannot be used as asked
            _error(f"error: cannot use {e.filename} ({e.strerror}); give another path, or fix it or its permissions")
            return EXIT_USAGE
        if not is_write_error(e):
            raise
        # A write outside the atomic writers (a log line, a cache): still one line, never a traceback. Without
        # a file name (a library's writer), the command's output names the disk: the space of the folder
        # above the working directory was told ("62.1 GiB free") for a full disk elsewhere.
        output = e.filename or _output_of(args)
        what = f"{output}" if e.filename else f"into {output}" if output else "a file"
        reason = write_failure_reason(e, Path(output)) if output else (e.strerror or str(e))
        _error(f"error: cannot write {what} ({reason}); files already complete were kept; "
               f"{write_way_out(e, 'another place')}, and run the command again")
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)  # after a progress bar's unfinished line
        return 130
    except Terminated as e:  # as Ctrl-C's line: a kill said nothing (prepare, embed), the exit status alone
        if e.signum == signal.SIGTERM:  # a hang-up has no terminal left to read it
            print(f"\nterminated ({signal.Signals(e.signum).name})", file=sys.stderr)
        raise
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError; MemoryError is Python's own
        if isinstance(e, RuntimeError) and str(e).startswith("Symlink loop from "):  # pathlib's resolve() (Python < 3.13) for a link leading to itself
            _error(f"error: cannot use {str(e).removeprefix('Symlink loop from ')} (a symbolic link that leads back to "
                   "itself); give another path, or fix the link")
            return EXIT_USAGE
        size = out_of_memory(e)
        if size is None:
            raise
        memory = "GPU" if "CUDA" in str(e) or "HIP" in str(e) else "device" if "MPS" in str(e) else "system"
        asked = f"asked for {size} more and the {memory} refused it" if size else f"ran out of {memory} memory"
        fix = memory_fix(args.protocols) if args.command == "evaluate" else MEMORY_FIX.get(args.command, "")
        _error(f"error: out of memory: fastclr {args.command} {asked}; {fix + ', or ' if fix else ''}run where there is "
               "more memory; files already complete were kept")
        return EXIT_USAGE


def _output_of(args: argparse.Namespace) -> str:
    """Where the command writes (its --out, --run-dir, or the run it resumes or evaluates), for a
    write error that names no file; "" when it says none."""
    for name in ("out", "run_dir", "resume"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value and value != "auto":
            return value
    return ""


ACROSS_PROCESSES = ("pretrain", "info")
"""The commands torchrun may start several of: pretraining, and `info` (each node's own report)."""


def _refuse_ranks(command: str) -> None:
    """One line for a command other than ACROSS_PROCESSES started by torchrun as several processes:
    each ran the whole command alone (`evaluate` twice, each process writing the same eval.json)."""
    if command not in ACROSS_PROCESSES and "TORCHELASTIC_RUN_ID" in os.environ and env_world_size() > 1:
        raise FastclrError(f"fastclr {command} runs as one process, and torchrun started {env_world_size()}; run it "
                           "without torchrun (only pretrain trains across processes)")


MEMORY_FIX = {"pretrain": "give a smaller --batch-size or --width", "embed": "give a smaller --batch-size", "finetune": "give a smaller --batch-size",
              "distill": "give a smaller --batch-size or --student-width", "distil": "give a smaller --batch-size or "
              "--student-width"}
"""What a command can be given to need less memory (the others' needs are the run's own; evaluate's
depend on its protocols: `evaluation.cli.memory_fix`)."""


def _error(line: str) -> None:
    """A user error's one line on stderr: once a node under `fastclr-torchrun`, whose ranks all find
    a setting error alike (`print_once_a_node`), and as is for any other process."""
    _said.append(line)
    print_once_a_node(shown(line), file=sys.stderr)  # a file name's escape sequences reach no terminal


_said: list[str] = []
"""The user errors this process printed (`_error`), the last of which a torchrun rank that stops before
training tells the others."""


def _exit_now(code: int) -> NoReturn:
    """Exit without running interpreter finalisation. Under torchrun the communication library's
    background threads can be left joinable (after a peer died, and at times after a run that
    ended well), and their C++ destructors at normal exit abort the process (SIGABRT, "terminate
    called without an active exception"): the user would get -6 instead of 0 or the documented 2.
    Everything the run keeps is on disk by now: checkpoints are written atomically and the
    metrics file was closed while the exception unwound."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
