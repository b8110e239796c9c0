"""Loading what a finished (or stopped) run produced, for evaluation, embedding and export.

The encoder comes from the run's exported `encoder.safetensors` when present, else from the
newest checkpoint that verifies (a run stopped early has no export yet). Neither path unpickles
arbitrary objects: safetensors holds only tensors, checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastclr.checkpoint import check_run_parts, latest_valid_checkpoint, list_checkpoints
from fastclr.config import ADDED_LATER, AugmentConfig, Config, apply_overrides
from fastclr.data import Dataset, load_data, names_a_store
from fastclr.data.datasets import recorded_root
from fastclr.errors import FastclrError, first_sentence, warn_stderr
from fastclr.export import ENCODER_FILE, UnreadableExport, exported_data_content, load_encoder
from fastclr.files import not_a_folder
from fastclr.models import EncoderSpec, ProjectionHead, encoder_from_spec, resolve_encoder
from fastclr.models.cnn import parse_stages
from fastclr.presets import checkpoint_overrides, saved_overrides
from fastclr.locks import locked_by_another
from fastclr.runtime import Precision, resolve_precision


@dataclass
class LoadedRun:
    """A run's encoder (eval mode, on the requested device), its metadata and config."""

    run_dir: Path
    encoder: nn.Module
    spec: EncoderSpec
    config: Config
    precision: Precision
    """What this command computes in, resolved for the device it loaded onto (not the training
    machine's choice: a run trained with native bf16 is evaluated in fp32 where bf16 is emulated)."""
    checkpoint_step: int | None = None
    """The step of the checkpoint the encoder came from, for a run without an exported encoder (one
    stopped, or still training); None: the export a finished run wrote."""
    data_content: str = ""
    """The content identity of the store it was trained on (`Dataset.content`), as its export or
    checkpoint records it; "" for data without one (the built-in sets) or a run saved before."""

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel input mean used in training, (C,)."""
        return self.spec.mean_tensor()

    @property
    def std(self) -> torch.Tensor:
        """Per-channel input std used in training, (C,)."""
        return self.spec.std_tensor()

    @property
    def augment(self) -> AugmentConfig:
        """The run's augmentation with its views at the encoder's input side: on the data it trained
        on, its own views; on a store prepared again at another side, views h can be measured on
        (drawn at the store's side they did not fit an fc readout, or measured a ResNet elsewhere)."""
        return dataclasses.replace(self.config.augment, crop_size=self.spec.image_size)


def has_weights(run: Path) -> bool:
    """Whether `run` holds an encoder to read: its export or a checkpoint."""
    return (run / ENCODER_FILE).exists() or bool(list_checkpoints(run))


def require_weights(run: Path, command: str) -> str:
    """The owner of `run` if a live process is writing it, else ''; a one-line error, in words for
    `command` (evaluate, embed, ...), for a folder that is not a run and a run with neither an
    exported encoder nor a checkpoint: one still being written by its owner, or one stopped before
    its first checkpoint."""
    if not run.is_dir():
        raise FastclrError(f"{run} {not_a_folder(run)}; give the directory of a `fastclr pretrain` run")
    owner = locked_by_another(run)
    weights = has_weights(run)
    # a run's first seconds: its owner holds the lock before it writes config.toml
    if not (run / "config.toml").exists() and not (owner and not weights):
        raise FastclrError(f"{run} holds no config.toml; it is not a fastclr run directory: give the directory "
                           "`fastclr pretrain` wrote")
    if weights:
        return owner
    if owner:
        raise FastclrError(f"{run} is being written by {owner} and has no checkpoint yet; {command} it after its "
                           "first checkpoint")
    raise FastclrError(f"{run} has no {ENCODER_FILE} and no checkpoint: it stopped before its first checkpoint; "
                       f"start it again with the command that made it (its settings: {run / 'config.toml'}), "
                       f"then {command} it")


def load_run(run_dir: str | Path, device: torch.device | str = "cpu", precision: str = "auto",
             log: Callable[[str], None] = print, command: str = "load") -> LoadedRun:
    """The encoder of a run directory, with one-line errors for anything missing or unsafe (in words
    for `command`: `require_weights`), and the precision (auto, bf16, fp16, fp32) resolved for `device`."""
    run = Path(run_dir)
    owner = require_weights(run, command)
    cfg_path, export = run / "config.toml", run / ENCODER_FILE
    if owner:  # checkpoints and the export are written atomically: what exists is complete
        log(f"note: {run} is being written by {owner}; using its last complete "
            f"{'export' if export.exists() else 'checkpoint'}")
    checkpoint_step: int | None = None
    loaded = _readable_export(export, run, device, log) if export.exists() else None
    if loaded is not None:
        encoder, spec = loaded
        cfg = recorded_config(cfg_path)
        refuse_foreign(export, spec, cfg_path, cfg)
        content = exported_data_content(export)
    else:
        skipped: list[str] = []  # a damaged newer one is named, not passed over

        def skip(message: str) -> None:  # a warning: on stderr, which `--quiet` keeps (it silences `log`)
            skipped.append(message)
            warn_stderr(f"warning: {message}")
        ckpt, state = latest_valid_checkpoint(run, warn=skip, check=check_run_parts)
        step, total = int(state["step"]), int(state.get("total_steps", 0))
        checkpoint_step = step
        newest = not skipped
        if not owner or not newest:  # (the owner's note above says it already, unless one was skipped)
            log(f"note: {run} has no {'readable ' * export.exists()}{ENCODER_FILE}: using its "
                f"{'newest' if newest else 'newest valid'} checkpoint, "
                f"step {step}" + (f" of {total} (the run stopped before its end)" if total > step else ""))
        written_by = f"written by fastclr {state.get('fastclr_version', '?')}"
        try:
            spec = EncoderSpec.from_dict(state["model_info"])
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise FastclrError(f"{ckpt} ({written_by}) records its encoder in a form this version cannot read "
                               f"({type(e).__name__}: {e}); use that version, or finish the run with it to export "
                               "the encoder") from None
        if not spec.rebuildable:
            raise FastclrError(f"{run} was trained with a custom encoder module; load it in Python, not by name")
        encoder = encoder_from_spec(spec)
        try:
            encoder.load_state_dict(state["encoder"])
        except (KeyError, RuntimeError):
            raise FastclrError(f"{ckpt} ({written_by}) does not match the {spec.encoder} architecture of this "
                               "version; use that version, or finish the run with it to export the encoder") from None
        encoder = encoder.to(device)
        try:
            cfg = apply_overrides(Config(), checkpoint_overrides(state["config"]))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, FastclrError) as e:  # crafted, foreign
            raise FastclrError(f"{ckpt} ({written_by}) records its settings in a form this version cannot read "
                               f"({type(e).__name__}: {str(e)[:200]}); use that version, or finish the run with it "
                               "to export the encoder") from None
        if cfg_path.exists():  # the checkpoint's own settings built it: the run's must name the same network
            try:
                recorded = recorded_config(cfg_path)
            except FastclrError:  # damaged or emptied: the checkpoint's own settings are used, as they were
                recorded = None
            if recorded is not None:
                refuse_foreign(ckpt, spec, cfg_path, recorded)
        content = str(state.get("data_content", ""))
    encoder.eval()
    cfg = with_moved_store(cfg, run, content, log)
    # An explicit precision the hardware emulates: its one warning on stderr, which --quiet keeps (it
    # went to the command's log, which --quiet silences, and onto stdout, into a redirected table).
    prec = resolve_precision(precision, torch.device(device), warn=warn_stderr)
    if precision == "auto" and cfg.train.precision == "fp32" and prec.name != "fp32":
        # said where the features are coarser than the training's numbers: nothing else on the console (embed's
        # files) tells a user who trained in fp32 that auto computed bf16 features here
        log(f"note: computing in {prec.name} ({prec.reason}); {run} trained in {cfg.train.precision}: --precision "
            f"{cfg.train.precision} computes as it trained")
    elif precision == "auto" and cfg.train.precision != prec.name:  # e.g. a run trained in bf16, on a CPU without it
        log(f"note: computing in {prec.name} ({prec.reason}); {run} trained in {cfg.train.precision}, so figures "
            "computed here can differ in their last digits from those its training printed")
    return LoadedRun(run, encoder, spec, cfg, prec, checkpoint_step, content)


def against_config(spec: EncoderSpec, cfg: Config, recorded: set[str]) -> list[str]:
    """Where an encoder's record (an export's metadata, a checkpoint's model_info) names another
    network than a run's settings `cfg` (its config.toml, whose keys are `recorded`): the encoder
    (`auto` as it resolves at the record's image side), the width (unless `auto`, as earlier versions
    recorded it) and a cnn's stage spec (compared parsed). Empty where they agree."""
    m, said = cfg.model, []
    try:
        name = resolve_encoder(m.encoder, spec.image_size)
    except FastclrError:  # a name this version does not know: named as it is written
        name = m.encoder
    if spec.rebuildable and spec.encoder != name:
        said.append(f"encoder {spec.encoder}, not {name}")
    if m.width and not math.isclose(spec.width, m.width, rel_tol=1e-9):
        said.append(f"width {spec.width:g}, not {m.width:g}")
    if spec.encoder == "cnn" and spec.stages and "model.cnn_stages" in recorded:
        try:
            same = parse_stages(spec.stages) == parse_stages(m.cnn_stages)
        except (ValueError, FastclrError):  # a spec this version cannot parse: named as a difference
            same = False
        if not same:
            said.append(f"stages {spec.stages}, not {m.cnn_stages}")
    return said


def refuse_foreign(weights: Path, spec: EncoderSpec, cfg_path: Path, cfg: Config) -> None:
    """One line when the run's weights file is another network than its config.toml names: a file
    of another run put in its place loaded, and every command computed that network's h without a
    word."""
    said = against_config(spec, cfg, set(saved_overrides(cfg_path)))
    if said:
        instead = ", or delete it to use the run's checkpoints" if weights.name == ENCODER_FILE and list_checkpoints(
            weights.parent) else ""
        raise FastclrError(f"{weights} is another network than {cfg_path} records ({', '.join(said)}): a file from "
                           f"another run? Put the run's own file back{instead}, or use the run that file came from")


def recorded_config(path: Path) -> Config:
    """The config a run's config.toml records, with one-line errors that name the file: an empty
    one rebuilt the defaults (Fashion-MNIST's recipe) without a word, and a value out of range was
    told with a flag the command reading the run does not have."""
    flat = saved_overrides(path)
    if set(flat) <= {*ADDED_LATER, "data.preset"}:
        raise FastclrError(f"{path} records no setting (it is empty): the run's settings are lost from it; restore "
                           "it from a copy of the run")
    try:
        return apply_overrides(Config(), flat)
    except FastclrError as e:  # the flag its example names is pretrain's, not this command's
        what = re.sub(r";? (pass )?e\.g\. --.*$", "", str(e))
        raise FastclrError(f"{path}, the run's recorded settings, was edited or damaged: {what}; correct it there, or "
                           "restore it from a copy of the run") from None


def _readable_export(export: Path, run: Path, device: torch.device | str,
                     log: Callable[[str], None]) -> tuple[nn.Module, EncoderSpec] | None:
    """The run's exported encoder, or None where that file is damaged and the run keeps checkpoints
    to use instead (said in a note). Every command was refused with "export it again", which no
    command can do: `export` read the same file, and would not write over a run's own."""
    try:
        return load_encoder(export, device)
    except UnreadableExport as e:
        if not list_checkpoints(run):
            raise FastclrError(f"{export} {e.reason}, and {run} keeps no checkpoint to use instead; train it again: "
                               f"fastclr pretrain --config {run / 'config.toml'} --run-dir NEW") from None
        log(f"note: {export} {e.reason} (delete it, and the run's checkpoints are used without this note)")
        return None


def run_data(run: LoadedRun, given: Dataset | None = None, log: Callable[[str], None] = print) -> Dataset:
    """The data `run` was trained on (or `given`, checked to fit its encoder); a store that is no
    longer at the path the run recorded is named as the run's own, moved or deleted (the store's own
    message offered to create a new one there, as if it had never existed). A store prepared again
    since the run trained on it (its content identity differs) is said in a note: what is measured
    on it is measured on the store as it is now."""
    dataset = given
    if dataset is None:
        require_run_store(run.run_dir, run.config.data.name)
        data = run.config.data
        dataset = load_data(dataclasses.replace(data, root=recorded_root(data.name, data.root, str(run.run_dir), log)))
    channels = dataset.image_shape[-1]
    if channels != run.spec.in_channels:  # the first convolution's traceback, after the set-up's minutes
        raise FastclrError(f"{dataset.name} holds images of {channels} channel{'s' * (channels > 1)} and the encoder "
                           f"of {run.run_dir} takes {run.spec.in_channels}: it is not the data the run trained on "
                           "(a store prepared again with other --channels?); prepare it again as it was, or give "
                           "data of the run's kind")
    if run.data_content and dataset.content and dataset.content != run.data_content:
        log(_prepared_again(dataset.name, run))
    return dataset


def note_prepared_again(run: LoadedRun, store: Path, log: Callable[[str], None], folder: bool = False) -> None:
    """`run_data`'s note for a command that reads a store by its path (a folder decoded as the run's
    store was prepared, a neighbour search): where `store` is the run's own and was prepared again
    since the run trained on it, its images are decoded and read as they are now (another side,
    another fit), and the figures differ from the same command's before, without a word. `folder`:
    said of a folder decoded as that store is prepared now."""
    if not run.data_content or not names_a_store(run.config.data.name):
        return
    now = store_content(store)
    if now and now != run.data_content and Path(run.config.data.name).resolve() == store.resolve():
        log(f"note: {store} was prepared again since {run.run_dir} trained on it: the folder is decoded as it is "
            "prepared now (its side or fit may differ from the images the run trained on)" if folder else
            _prepared_again(str(store), run))


def _prepared_again(name: str, run: LoadedRun) -> str:
    return (f"note: {name} changed since {run.run_dir} trained on it (prepared again: its images, labels or splits "
            "differ); what follows is measured on it as it is now")


MOVED_LEVELS = 4
"""How far up from a run, and how many of the recorded path's last names, `moved_store` tries."""


def moved_store(run_dir: Path, name: str, content: str) -> Path | None:
    """Where the store a run recorded at `name`, no longer there, is now, when the run's project
    folder was moved or copied with it (to another machine, another home): the recorded path's last
    names tried under each folder above the run (/old/projA/stores/s -> /new/projB/stores/s for a
    run now in /new/projB/runs/r), and taken only where the store holds the same images, labels and
    splits (its content identity is the run's). None otherwise, and for a run that records none."""
    if not content or not names_a_store(name) or Path(name).exists():
        return None
    tail = Path(name).parts[1:]  # the names after the root
    for above in list(run_dir.resolve().parents)[:MOVED_LEVELS]:
        for k in range(1, min(len(tail), MOVED_LEVELS) + 1):
            candidate = above.joinpath(*tail[-k:])
            if store_content(candidate) == content:
                return candidate
    return None


def store_content(path: Path) -> str:
    """The content identity in a store's store.json ("" where it is no readable store)."""
    try:
        meta = json.loads((path / "store.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(meta.get("content", "")) if isinstance(meta, dict) else ""


def with_moved_store(cfg: Config, run_dir: Path, content: str, log: Callable[[str], None]) -> Config:
    """`cfg` reading its store where `moved_store` finds it, said in a note; else `cfg` as it is."""
    moved = moved_store(run_dir, cfg.data.name, content)
    if moved is None:
        return cfg
    log(f"note: {run_dir} was trained on the store {cfg.data.name}, which is no longer there; using {moved}, which "
        "holds the same images, labels and splits (moved with the run)")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name=str(moved)))


def require_run_store(run_dir: Path, name: str) -> None:
    """A one-line error when the data of the run at `run_dir`, `name`, is a store that is no
    longer at that path."""
    if names_a_store(name) and not Path(name).exists():
        raise FastclrError(f"{run_dir} was trained on the store {name}, which is no longer there (moved or "
                           f"deleted); put it back at that path, or prepare it again with `fastclr prepare FOLDER "
                           f"--size S --out {name}` from the same folder")


def head_checkpoint(run: LoadedRun) -> dict[str, Any] | None:
    """The newest valid checkpoint's state (head, learned temperature), None without checkpoints. It
    must hold the run's encoder: a head from an older step (the newest checkpoint damaged) would sit
    under an encoder it was not trained with, and is refused in one line."""
    if not list_checkpoints(run.run_dir):
        return None
    path, state = latest_valid_checkpoint(run.run_dir, check=check_run_parts)
    mine = run.encoder.state_dict()
    theirs = state["encoder"]
    if set(theirs) != set(mine) or any(not torch.equal(theirs[k].to(mine[k].device), mine[k]) for k in mine):
        raise FastclrError(f"the newest checkpoint of {run.run_dir} that verifies, {path.name}, does not hold the "
                           f"encoder of {ENCODER_FILE} (a newer one is damaged), so its projection head does not "
                           "belong to it; fine-tune from h with --from-head-layer 0")
    return state


def trained_head(run: LoadedRun, device: torch.device, state: dict[str, Any] | None = None) -> ProjectionHead | None:
    """The projection head g of `state` (else of `head_checkpoint`), in eval mode; None without one."""
    state = state if state is not None else head_checkpoint(run)
    if state is None:
        return None
    m = run.config.model
    head = ProjectionHead(run.spec.feature_dim, m.head_hidden or run.spec.feature_dim, m.proj_dim, m.head_layers,
                          m.head_bn)
    try:
        head.load_state_dict(state["head"])
    except RuntimeError as e:  # (a checkpoint edited to pass its checksum: fastclr's own always fit)
        raise FastclrError(f"the projection head in the checkpoint of {run.run_dir} does not fit the run's settings "
                           f"({first_sentence(e)}); fine-tune from h with --from-head-layer 0") from None
    return head.to(device).eval()


def trained_temperature(run: LoadedRun, state: dict[str, Any] | None) -> float:
    """The temperature the run ended with: the learned one where it learned it, else its setting."""
    if state is not None and "temperature" in state:
        return float(state["temperature"]["log_t"].exp()[0])
    return run.config.train.temperature
