"""Where a run is, bound to the live objects it saves and restores: the checkpoint's content.

A checkpoint holds the step, the planned length, the training seconds spent, the config, encoder,
head, optimiser and loss-scaler states, the CPU generator and the encoder spec. Data order and
augmentation are pure functions of (seed, step) (the data's place: the step plus the offset a
resume with another batch leaves, `RunState.step_offset`), so nothing else is needed for a resumed
run to replay exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastclr import config as config_mod
from fastclr.checkpoint import save_checkpoint
from fastclr.config import Config
from fastclr.determinism import generator_states, restore_generators
from fastclr.errors import FastclrError
from fastclr.models import resolve_encoder
from fastclr.models.cnn import parse_stages
from fastclr.pretraining.model import Model
from fastclr.pretraining.schedule import ramp_fraction
from fastclr.pretraining.step import TrainStep

RESUME_KEYS = ("data.name", "train.batch_size", "train.views", "train.local_views", "train.supcon", "train.queue",
               "train.nn_support", "train.seed", "augment.crop_size", "augment.local_size")
"""Settings a resumed run may change only with --allow-config-change: they change the data, its
order (the seed draws it and the views), the views' sides, or the state a checkpoint carries (a
queue, a support set: started empty when newly on)."""

STATE_KEYS = ("model.encoder", "model.width", "model.cnn_stages", "model.cifar_stem", "model.head_layers",
              "model.head_hidden", "model.head_bn", "model.proj_dim", "optim.optimizer", "train.learn_temperature")
"""Settings no resumed run may change: the checkpoint's weights fit only its own network, and its
optimiser state only its own optimiser and parameters (a learned temperature is one of them)."""


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A checkpoint's optimiser state (momentum buffers, Adam's moments, step counts) under the
    settings the optimiser was built with now. torch's `load_state_dict` also puts back each group's
    saved settings: a resume given another weight decay, momentum or LARS eta kept the old ones
    while config.toml recorded the new (the learning rate alone took effect, being set every step)."""
    now = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, now):
        group.update(settings)


def check_resume_config(saved: Config, wanted: Config, allow_changes: bool, run_dir: Path | None = None,
                        built: dict[str, Any] | None = None) -> None:
    """A one-line error naming the STATE_KEYS that differ, or the RESUME_KEYS that differ unless
    changes are allowed; `run_dir`: the run resumed, named in the way out; `built`: the checkpoint's
    `model_info` (the network its config's `auto` values built)."""
    fixed = [key for key in config_mod.diff(saved, wanted, STATE_KEYS) if not _same_network(key, saved, wanted, built)]
    if fixed:
        raise FastclrError(
            f"cannot resume: {', '.join(fixed)} differ{'s' * (len(fixed) == 1)} from the checkpoint's config, and a "
            f"checkpoint fits only the network and optimiser it was saved from; drop "
            f"{'that flag' if len(fixed) == 1 else 'those flags'}, or start a new run from these weights "
            f"{_init_way(run_dir)}"
        )
    changed = config_mod.diff(saved, wanted, RESUME_KEYS)
    if changed and not allow_changes:
        # Named with both values and the way back: the difference may come from config.toml, which an
        # earlier resume with --allow-config-change rewrote before it failed, not from a flag given now.
        now, then = config_mod.to_flat(wanted), config_mod.to_flat(saved)
        one = len(changed) == 1
        raise FastclrError(
            f"cannot resume: {', '.join(f'{k} ({now[k]} here, {then[k]} in the checkpoint)' for k in changed)} "
            f"differ{'s' * one} from the checkpoint's config; give {'its value' if one else 'its values'} "
            f"({', '.join(f'{config_mod.flag_of(k)} {shlex.quote(str(then[k]))}' for k in changed)}), "
            f"or pass --allow-config-change to change {'it' if one else 'them'} deliberately"
        )


def _same_network(key: str, saved: Config, wanted: Config, built: dict[str, Any] | None) -> bool:
    """Whether two differently written values of `key` still build the checkpoint's network: a
    stage spec is compared parsed, so "relu:32|256|fc512" is "32|256|fc512" (ReLU is the default);
    an encoder named as what `auto` built for the run's images is that encoder."""
    if key == "model.cnn_stages":
        return parse_stages(saved.model.cnn_stages) == parse_stages(wanted.model.cnn_stages)
    if key == "model.encoder" and built and "image_size" in built and "encoder" in built:
        try:  # what the checkpoint's network is, not what its config resolves to (a custom module's is "custom")
            return resolve_encoder(wanted.model.encoder, int(built["image_size"])) == built["encoder"]
        except FastclrError:  # an unknown name: named as a difference, then refused by name when built
            return False
    return False


def check_fits(state: dict[str, Any], model: Model) -> None:
    """One line, before anything is loaded or written, when the checkpoint's tensors do not fit the
    network these settings build: the data's channels or side, or the encoder `auto` picks for
    them, changed (another dataset, --crop-size; allowed with --allow-config-change where they fit)."""
    for part, module in (("encoder", model.encoder), ("head", model.head)):
        mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if {k: tuple(v.shape) for k, v in state[part].items()} == mine:
            continue
        saved = state.get("model_info", {})
        now = model.spec.to_dict()
        changed = [f"{k} {saved[k]} -> {now[k]}" for k in ("encoder", "in_channels", "image_size", "cifar_stem",
                                                            "feature_dim") if k in saved and saved[k] != now[k]]
        raise FastclrError(f"cannot resume: the checkpoint's {part} does not fit the network these settings build"
                           f"{' (' + '; '.join(changed) + ')' if changed else ''}; resume with the data and --crop-size "
                           "the run trained with, or start a new run")


def check_resume_data(saved: str, dataset_name: str, content: str, allow_changes: bool,
                      log: Callable[[str], None]) -> None:
    """A one-line error when the store a run trained on was prepared again with other images,
    classes or options since its checkpoint (`saved` and `content`: store.json's "content"; ''
    where unknown), unless changes are allowed (then a note): the same path is not the same data."""
    if not saved or not content or saved == content:
        return
    if not allow_changes:
        raise FastclrError(f"cannot resume: {dataset_name} is not the data this run trained on (it was prepared again "
                           "since, with other images, classes or options); resume with that data, or pass "
                           "--allow-config-change to go on with it as it is now")
    log(f"note: {dataset_name} was prepared again since the checkpoint; going on with it as it is now")


def _init_way(run_dir: Path | None) -> str:
    """How to start a new run from `run_dir`'s weights: its export when it has one (a finished run),
    else an export made first (an unfinished run has only checkpoints)."""
    export = (run_dir or Path("RUN_DIR")) / "encoder.safetensors"
    if run_dir is None or export.exists():
        return f"with --init {export}"
    return f"(`fastclr export {run_dir} --out weights.safetensors`, then --init weights.safetensors)"


def data_offset(step: int, offset: int, saved_steps_per_epoch: int, steps_per_epoch: int) -> int:
    """The step offset (`RunState.step_offset`) of a run resumed at `step` whose checkpoint had
    `offset` at `saved_steps_per_epoch`: the same place in the data, in epochs, at this run's
    `steps_per_epoch` (rounded to a whole batch)."""
    if saved_steps_per_epoch == steps_per_epoch:
        return offset
    return round((step + offset) * steps_per_epoch / saved_steps_per_epoch) - step


class RunState:
    """The counters of a run (step, total_steps, train_seconds) and the objects whose state a
    checkpoint carries; `save` writes them, `restore` puts a checkpoint's content back."""

    def __init__(self, cfg: Config, model: Model, train_step: TrainStep, total_steps: int, warmup_steps: int,
                 steps_per_epoch: int) -> None:
        self.cfg, self.model, self.train_step = cfg, model, train_step
        self.step, self.total_steps, self.train_seconds = 0, total_steps, 0.0
        self.steps_per_epoch = steps_per_epoch
        self.step_offset = 0
        """Added to the step where it stands for a place in the data (the epoch, the batch's slice of
        its permutation, a run's length in epochs): nonzero once a run resumed with other steps per
        epoch (another batch or dataset, --allow-config-change), so that it goes on from the share of
        an epoch it had reached, not from its step count read in the new batch's steps."""
        self.saved_steps_per_epoch = steps_per_epoch
        """The steps per epoch of the checkpoint resumed from (this run's own when none)."""
        self.saved_at_epoch_end = False
        """Whether the checkpoint resumed from was written at an epoch end, counted as its run
        counted (a place the new batch's rounding puts at an epoch end may not have been one)."""
        self.warmup_steps = warmup_steps
        """The warm-up the schedule uses: fixed when the run's length is (set-up, or a budget's first
        fit) and kept by a budgeted run's checkpoints, so later refits never move it."""
        self.decay_anchor: tuple[int, float] | None = None
        """Where a time budget's last refit re-anchored the cosine (`decay_progress`): the step and
        the progress there; None: the one cosine from the end of the warm-up."""
        self.ramp_anchor: tuple[int, float] | None = None
        """Where a time budget's fit shortened a warm-up under way (`shortened_warmup`): the step and
        the share of the peak reached there; None: the ramp from the first step."""
        self.budget_fitted: bool | None = False
        """Whether a time budget's first fit has been made, by this process or one before it (None:
        a checkpoint from before 2026-12-05, which does not say)."""
        self.data_content = ""
        """The store's content identity the run trains on (`Dataset.content`), kept in checkpoints."""
        self.pace_mark: tuple[int, float] | None = None
        """Where the time budget measured its pace from when the checkpoint was written (`TimeBudget.mark`)."""
        self.first_fit_at: int | None = None
        """The step of the first fit of the process that wrote the checkpoint (`TimeBudget.first_fit_at`):
        it refitted only past it, so a refit its last epoch end still owed is owed only past it too."""
        self.start_step = 0
        """The step this process started from: 0, or the checkpoint's step when resumed."""
        self.monitor_seconds = 0.0
        """What the kNN monitor's passes have cost so far: its share of the training time holds
        across a resume (a resumed monitor that started from 0 ran passes the straight run skips)."""
        self.skip_streak = 0
        """fp16: the updates skipped in a row up to now, so that the guard against an endless streak
        (MAX_SKIP_STREAK) holds across resumes (a job preempted often enough never tripped it)."""

    def restore(self, state: dict[str, Any], n_images: int) -> None:
        """Continue from a checkpoint's content (`n_images`: the data's, now). A time-budgeted run
        keeps the step count it fitted; otherwise `train.epochs` may extend a run."""
        check_fits(state, self.model)
        self.model.encoder.load_state_dict(state["encoder"])
        self.model.head.load_state_dict(state["head"])
        load_optimizer(self.train_step.optimizer, state["optimizer"])
        self.train_step.load_state_dict(state.get("loss_scaler", {}))
        if self.model.temperature is not None:
            self.model.temperature.load_state_dict(state["temperature"])
        if self.train_step.objective is not None:
            self.train_step.objective.load_state_dict(state)
        restore_generators(state, self.device)
        self.step = int(state["step"])
        # Absent before 2026-12-06: then the steps per epoch of the saved batch on this data.
        saved_spe = int(state.get("steps_per_epoch") or
                        max(1, n_images // int(state["config"]["train"]["batch_size"])))
        saved_offset = int(state.get("step_offset", 0))
        self.step_offset = data_offset(self.step, saved_offset, saved_spe, self.steps_per_epoch)
        self.saved_steps_per_epoch = saved_spe
        self.saved_at_epoch_end = (self.step + saved_offset) % saved_spe == 0
        if self.cfg.train.time_budget > 0:
            configured = self.warmup_steps
            self.total_steps = int(state["total_steps"])
            self.warmup_steps = int(state.get("warmup_steps", self.warmup_steps))  # absent before 2026-12-02
            anchor = state.get("decay_anchor")  # absent before 2026-12-05
            self.decay_anchor = (int(anchor[0]), float(anchor[1])) if anchor is not None else None
            self.budget_fitted = state.get("budget_fitted")  # absent before 2026-12-05
            mark = state.get("pace_mark")  # absent before 2026-12-05
            self.pace_mark = (int(mark[0]), float(mark[1])) if mark is not None else None
            fit_at = state.get("first_fit_at")  # absent before 2026-12-06
            self.first_fit_at = int(fit_at) if fit_at is not None else None
            ramp = state.get("ramp_anchor")  # absent before 2026-12-05
            self.ramp_anchor = (int(ramp[0]), float(ramp[1])) if ramp is not None else None
            by_epochs = float(state["config"]["train"].get("time_budget", 0)) <= 0  # the checkpoint's run
            if saved_offset and by_epochs and self.ramp_anchor is None and \
                    self.step < self.warmup_steps and self.warmup_steps + saved_offset > 0:
                # A run by epochs that had changed its batch, in its warm-up: its ramp was taken at
                # the place in the data (`Run.set_lr`); a budget's is in steps, from the share reached.
                self.ramp_anchor = (self.step, ramp_fraction(self.step + saved_offset, self.warmup_steps + saved_offset))
            elif by_epochs and self.ramp_anchor is None and 0 < self.step < self.warmup_steps != configured:
                # A run by epochs stopped in its warm-up, a tenth of that run: the budget's first fit goes
                # on from the share it reached (the configured warm-up took the rate from 83% to 5% of
                # the peak), and the configured one is not used.
                self.ramp_anchor = (self.step, ramp_fraction(self.step, self.warmup_steps))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.monitor_seconds = float(state.get("monitor_seconds", 0.0))  # absent before 2026-12-03
        self.skip_streak = int(state.get("skip_streak", 0))  # absent before 2026-12-04
        self.start_step = self.step

    @property
    def device(self) -> torch.device:
        """Where the run trains (its head's parameters: a user's encoder may have none)."""
        return next(self.model.head.parameters()).device

    def save(self, run_dir: Path) -> Path:
        """Write the newest checkpoint of `run_dir` (atomically; see fastclr.checkpoint)."""
        return save_checkpoint(run_dir, {
            "step": self.step, "total_steps": self.total_steps, "train_seconds": self.train_seconds,
            "steps_per_epoch": self.steps_per_epoch, "step_offset": self.step_offset,
            "warmup_steps": self.warmup_steps, "monitor_seconds": self.monitor_seconds, "skip_streak": self.skip_streak,
            **({"decay_anchor": list(self.decay_anchor)} if self.decay_anchor is not None else {}),
            **({"ramp_anchor": list(self.ramp_anchor)} if self.ramp_anchor is not None else {}),
            **({"budget_fitted": self.budget_fitted} if self.budget_fitted is not None else {}),
            **({"pace_mark": list(self.pace_mark)} if self.pace_mark is not None else {}),
            **({"first_fit_at": self.first_fit_at} if self.first_fit_at is not None else {}),
            **({"data_content": self.data_content} if self.data_content else {}),
            "config": config_mod.to_dict(self.cfg), "encoder": self.model.encoder.state_dict(),
            "head": self.model.head.state_dict(), "optimizer": self.train_step.optimizer.state_dict(),
            **generator_states(self.device), "model_info": self.model.spec.to_dict(),
            "loss_scaler": self.train_step.state_dict(),
            **({"temperature": self.model.temperature.state_dict()} if self.model.temperature is not None else {}),
            **(self.train_step.objective.state_dict() if self.train_step.objective is not None else {}),
        })
