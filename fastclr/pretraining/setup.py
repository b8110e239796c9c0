"""Everything a pretraining run builds once, before its first step, and the few things it does
with them between steps (log, checkpoint, refit the budget, monitor)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastclr.augment import local_config, render_views
from fastclr.config import Config, weights_seed
from fastclr.data import Dataset
from fastclr.data.loader import BatchSampler, ImageSource
from fastclr.errors import FastclrError
from fastclr.pretraining.metrics import Health, MetricsWindow
from fastclr.pretraining.model import Model, build_model, named_encoder
from fastclr.models import feature_dim, resolve_encoder
from fastclr.models.cnn import AttentionPool
from fastclr.models.modes import in_eval_mode
from fastclr.pretraining.monitor import KnnMonitor
from fastclr.pretraining.optim import build_optimizer
from fastclr.pretraining.schedule import (TimeBudget, decay_progress, epochs_text, few_epochs_warning, lr_at, scaled_lr,
                                          shortened_warmup, warmup_for)
from fastclr.pretraining.state import RunState
from fastclr.pretraining.step import SimCLRNet, TrainStep
from fastclr.pretraining.objective import LearnedTemperature, Objective, is_plain, objective_options
from fastclr.pretraining.queue import KeyNetwork, RowQueue
from fastclr.pretraining.views import ViewMaker
from fastclr.progress import Progress, counted
from fastclr.locks import RunLock
from fastclr.runs import MetricsLog
from fastclr.runtime import Precision
from fastclr.scaleout.distributed import DistContext, broadcast_object, shared
from fastclr.scaleout.global_bn import convert_batchnorm


def validate(cfg: Config, n_images: int, world_size: int = 1, resuming: bool = False) -> None:
    """One-line errors for settings that cannot work with this data and this many processes (each
    setting's own range was checked by `config.validate` already); `resuming`: a run's batch size
    changes only with --allow-config-change, so other process counts come first."""
    t = cfg.train
    if world_size > 1 and t.batch_size % world_size:
        fits = [d for d in range(1, t.batch_size + 1) if t.batch_size % d == 0]
        near = [max(d for d in fits if d < world_size)] + [d for d in fits if d > world_size][:1]
        other = max(1, t.batch_size // world_size) * world_size
        raise FastclrError(
            f"batch size {t.batch_size} (the global batch) does not split evenly over {world_size} processes; "
            f"run {' or '.join(map(str, near))} processes instead, or pass --batch-size {other}"
            + (" --allow-config-change (the run keeps its batch size otherwise)" if resuming else "")
        )
    if n_images < 2:  # a batch of one image has no negative (and train.batch_size is at least 2)
        raise FastclrError(f"the dataset holds {counted(n_images, 'image')}: contrastive training needs "
                           "at least 2 a batch; give it more images")
    if t.batch_size > n_images:
        raise FastclrError(
            f"batch size {t.batch_size} is larger than the dataset ({n_images} images); pass --batch-size {n_images} or less"
        )
    if t.epochs <= 0 and t.time_budget <= 0:
        raise FastclrError("nothing to train: set --epochs > 0 or --time-budget > 0 (minutes)")
    if t.learn_temperature and cfg.optim.optimizer != "adamw":
        # log t sits with BatchNorm and biases, which plain momentum steps at the network's rate:
        # under LARS's large-batch rate it reached its clip (t = 1) in 4 steps; AdamW's steps are
        # normalised (0.2 -> 0.204 over the same run)
        raise FastclrError(f"--learn-temperature is trained with --optimizer adamw; {cfg.optim.optimizer} steps its "
                           "log at the network's full learning rate and drives it to its clip within a few steps: "
                           "use --optimizer adamw, or a fixed --temperature")
    if t.supcon and t.queue:
        # The queue holds projections without their labels, so its rows of an anchor's own class would
        # be pushed away as negatives, against what --supcon asks (multi_positive: extra rows are negatives)
        raise FastclrError("--supcon and --queue do not combine: the queue keeps no labels, so its rows of an "
                           "anchor's own class would be pushed away as negatives; drop one of them")
    if not is_plain(t) and (t.loss_block or t.grad_cache_chunk):
        chosen = ", ".join(objective_options(t))
        raise FastclrError(f"{chosen} and --loss-block/--grad-cache-chunk do not combine (those memory savers "
                           "compute two-view NT-Xent only); drop one of them")


def check_sync_checkable(cfg: Config, world_size: int, device: torch.device) -> None:
    """One line for --check-sync where a step cannot help waiting (every step past the first two
    would fail): global BatchNorm over several CUDA processes is torch's SyncBatchNorm, which drops
    the statistics of empty shares by a boolean mask, a wait for the GPU in every BatchNorm layer
    (torch/nn/modules/_functions.py, pytorch issue 78549); and fp16 with an objective option or SGD
    reads the loss scaler's overflow flag on the host."""
    t = cfg.train
    if t.check_sync and device.type == "cuda" and world_size > 1 and t.sync_bn and not t.grad_cache_chunk:
        raise FastclrError(f"--check-sync true with global BatchNorm over {world_size} processes: torch's SyncBatchNorm "
                           "waits for the GPU in every BatchNorm layer (pytorch issue 78549), so every step would fail "
                           "the check; add --sync-bn false to check the rest of the step, or drop --check-sync")
    # fp16's loss scaling: the objective's step reads the overflow flag on the host, as torch's
    # GradScaler does for a non-fused SGD (tests/test_host_syncs.py)
    waits = objective_options(t) + (["--optimizer sgd"] if cfg.optim.optimizer == "sgd" else [])
    if t.check_sync and device.type == "cuda" and t.precision == "fp16" and waits:
        raise FastclrError(f"--check-sync true with fp16 and {', '.join(waits)}: the step reads the loss scaler's "
                           "overflow flag on the host, so every step would fail the check; check with --precision bf16 "
                           "or fp32, or drop --check-sync")


def check_data_fits(cfg: Config, dataset: Dataset, custom_encoder: bool = False) -> None:
    """One line, before the run directory is made, for data these settings cannot train on: an odd
    side for the cnn (its first layer folds 2 x 2 pixels into channels: a traceback at the first
    step), small views larger than the views, or --supcon with no label on any pretraining image (it trained plain NT-Xent silently)."""
    side = cfg.augment.crop_size or dataset.image_shape[0]
    if not custom_encoder and resolve_encoder(cfg.model.encoder, side) == "cnn" and side % 2:
        raise FastclrError(f"the cnn encoder reads images of an even side (its first layer folds 2 x 2 pixels into "
                           f"channels), and these views are {side} px; pass --crop-size {side - 1}, or --encoder resnet18")
    small = cfg.augment.local_size
    if cfg.train.local_views and small > side:
        raise FastclrError(f"--local-size {small} is larger than the views ({side} px), and multi-crop's small views "
                           f"must not be (they are the small ones); give --local-size {side} or less (0: half the side)")
    labels = dataset.pretrain.labels
    if cfg.train.supcon and (labels is None or not bool((labels >= 0).any())):
        raise FastclrError(f"--supcon takes its positives from the labels of the pretraining images, and {dataset.name} "
                           "labels none of them; drop --supcon, or prepare the images with a folder per class")


def check_small_views(encoder: nn.Module, size: int, channels: int, feature_dim: int, device: torch.device) -> None:
    """Refuse multi-crop when the encoder cannot read h off its small views (a readout sized for
    the full view: the cnn's attention pooling, or an fc readout whose map does not reach its side)."""
    with in_eval_mode(encoder):
        try:
            with torch.no_grad():
                h = encoder(torch.zeros(2, channels, size, size, device=device))
            problem = "" if h.shape[1:] == (feature_dim,) else f"it gives {tuple(h.shape[1:])} numbers, not {feature_dim}"
        except (RuntimeError, ValueError, AssertionError) as e:  # shape errors of torch and of custom encoders
            problem = (str(e).splitlines() or [type(e).__name__])[0]
    if problem and any(isinstance(m, AttentionPool) for m in encoder.modules()):
        # Its position embedding is one per position of the full view's map: no smaller side fits.
        raise FastclrError(f"--local-views: the cnn's attention pooling reads only the full view's map, not {size} px "
                           f"small views ({problem}); use another readout (fcN, or gap) with --local-views")
    if problem:
        raise FastclrError(f"--local-views: the encoder cannot read h off {size} px small views ({problem}); "
                           "set --local-size to a side it reads (for the cnn's fc readout, half the image side) "
                           "or use a readout with global pooling")


def check_small_views_first(cfg: Config, dataset: Dataset) -> None:
    """`check_small_views` before the run directory is made, on a CPU copy of the named encoder
    (refused at set-up, it left an empty run directory); a module passed in is checked at set-up."""
    if not cfg.train.local_views:
        return
    h, _, c = dataset.image_shape
    with torch.random.fork_rng(devices=[]):  # the run's own draws start from its seed, later
        encoder, _, _ = named_encoder(cfg, dataset.image_shape, "cpu")
    dim = feature_dim(encoder, c, cfg.augment.crop_size or h)
    check_small_views(encoder, local_config(cfg.augment, dataset.pretrain.images.shape[1]).crop_size, c, dim,
                      torch.device("cpu"))


def wait_for_device(device: torch.device) -> None:
    """Return once `device` has done the work queued on it (at once on the CPU, which works in order)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Run:
    """A run's objects, built once by `build_run`; the loop calls them with what changes per step."""

    cfg: Config
    ctx: DistContext
    device: torch.device
    precision: Precision
    run_dir: Path
    dataset: Dataset
    model: Model
    source: ImageSource
    sampler: BatchSampler
    views: ViewMaker
    train_step: TrainStep
    state: RunState
    budget: TimeBudget | None
    health: Health
    window: MetricsWindow
    monitor: KnnMonitor
    metrics_log: MetricsLog
    bar: Progress
    log: Callable[[str], None]
    clock: Callable[[], float]
    peak_lr: float
    warmup_steps: int
    """The configured warm-up (the one in use is `state.warmup_steps`)."""
    started: float = 0.0
    """The clock when pretraining began (data loading and set-up count in its wall time)."""
    lock: RunLock | None = None
    """Rank 0's claim on the run directory."""
    loop_start: float = 0.0
    """The clock at which the loop would have started had it never been interrupted."""
    finished_before: bool = False
    """Resumed from a checkpoint of its own last step: nothing to train, its record stands."""
    budget_was: float | None = None
    """The time budget (minutes) of the checkpoint this run resumed from, where it was fitted and
    is given another one now: fitted to the new one at once (`refit_to_new_budget`)."""

    def release(self) -> None:
        """Give the run directory up (rank 0)."""
        if self.lock is not None:
            self.lock.release()

    def groups(self, indices: torch.Tensor) -> torch.Tensor | None:
        """Group ids of the views of the images at `indices` (None for plain NT-Xent)."""
        objective = self.train_step.objective
        return objective.groups(indices) if objective is not None else None

    def close_trackers(self, status: str, stopping: Callable[[], bool] | None = None) -> None:
        """End the tracked runs (once): FINISHED, KILLED (stopped, resumable) or FAILED; `stopping`
        ends a wait for them once a stop is asked for."""
        trackers, self.metrics_log.trackers = self.metrics_log.trackers, []
        for t in trackers:
            t.close(status, stopping)

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch."""
        return self.sampler.steps_per_epoch

    @property
    def data_step(self) -> int:
        """The step's place in the data: batch `data_step` of the sampler's order (`RunState.step_offset`)."""
        return self.state.step + self.state.step_offset

    @property
    def epochs_done(self) -> float:
        """Epochs of the data trained so far, in this batch's steps per epoch."""
        return self.data_step / self.steps_per_epoch

    def epoch_ended(self) -> int | None:
        """The epoch the last step ended, or None in mid-epoch."""
        epoch, rest = divmod(self.data_step, self.steps_per_epoch)
        return epoch if rest == 0 else None

    def place_schedule(self) -> None:
        """Resumed by epochs at another place in the data than its step count says (another batch or
        dataset: `RunState.step_offset`): the run, and its warm-up, end where the configured epochs
        do in this batch's steps, less the offset, so the learning rate (`set_lr`, at the place in
        the data) is the one a run with this batch from the start has there. Call once the
        checkpoint is restored."""
        s = self.state
        if self.budget is None and s.step_offset:  # a time budget keeps the length it fitted, in steps
            s.total_steps, s.warmup_steps = max(1, s.total_steps - s.step_offset), s.warmup_steps - s.step_offset

    def set_lr(self) -> float:
        """Warm-up then cosine, per step (a pure function of the step: `lr_at`); returns the lr set."""
        s = self.state
        # Before a time budget's first fit the run's length is unknown (train.epochs is unused then):
        # the peak is held after the warm-up, not a cosine over a length the budget will replace.
        unfitted = self.budget is not None and self.first_fit_ahead and s.step < self.budget.first_fit_at
        # A run by epochs: at the place in the data (`data_step`, `place_schedule`), where a resume with
        # another batch has the new batch's schedule. A time budget's is in steps, as it fitted it.
        d = s.step_offset if self.budget is None else 0
        lr = self.peak_lr if unfitted and s.step >= s.warmup_steps else \
            lr_at(s.step + d, s.total_steps + d, s.warmup_steps + d, self.peak_lr, self.cfg.optim.min_lr_ratio,
                  s.decay_anchor, s.ramp_anchor)  # anchors: a budget's only
        for group in self.train_step.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def refit_budget(self, end_of_epoch: bool, after_monitor: bool = False, owed: bool = False,
                     new_budget: bool = False) -> None:
        """Fit the step count to the time budget where due (rank 0's clock rules, so every rank
        runs the same number of steps). Call after every step, and again at an epoch end once the
        kNN monitor's pass is done (`after_monitor`): an epoch end's refit waits for it, since the
        budget counts its seconds and a last fit made before it grants steps the pass then spends.
        The first fit does not wait: at its step a pass would be most of the pace it measures.
        `owed`: the epoch end's refit of a run resumed from that epoch end's checkpoint, which was
        written before it (paced as the process that wrote it paced: `TimeBudget.resume_at`);
        `new_budget`: a fitted run resumed with another budget, refitted at its resume whatever step
        its checkpoint was written at (`refit_to_new_budget`)."""
        s, b = self.state, self.budget
        if b is None:
            return
        fitted = not self.first_fit_ahead
        # The process that wrote the checkpoint refitted only past its own first fit's step.
        writer_first_fit = s.first_fit_at if s.first_fit_at is not None else b.first_fit
        if owed and not new_budget and not (fitted and writer_first_fit < s.step < s.total_steps):
            return
        if not fitted and not after_monitor and s.step < b.first_fit_at:
            # The host's clock, without waiting for the device (a wait drains a GPU's queue): the host
            # reaches a step no later than the device finishes it, so no fit is brought forward early.
            # Rank 0 decides, as for every fit: a distributed run exchanges one flag a step until then.
            seconds = self.clock() - self.loop_start
            if broadcast_object(b.overdue(s.step, seconds), self.ctx):
                b.first_fit_at = s.step
        first = s.step == b.first_fit_at and not fitted
        due = owed or b.due(s.step, s.total_steps, end_of_epoch, fitted=fitted)
        if not after_monitor:
            if due or s.step == b.mark_at:
                # The host runs steps ahead of a GPU: the budget's seconds are those of steps the GPU has done.
                wait_for_device(self.device)
                s.train_seconds = self.clock() - self.loop_start
            b.observe(s.step, s.train_seconds)
            if end_of_epoch and not first:
                return
        elif first:
            return
        elif due:  # after the epoch end's checkpoint, and its monitor pass if one ran: their seconds count too
            wait_for_device(self.device)
            s.train_seconds = self.clock() - self.loop_start
        if due:
            total = broadcast_object(b.fit(s.step, s.train_seconds, first=first), self.ctx)
            refit = fitted or s.step != b.first_fit_at  # not the first fit, whose old total was a placeholder
            if refit and total != s.total_steps and s.step >= s.warmup_steps:
                # the cosine goes on from where it is to the new end, never back up
                s.decay_anchor = (s.step, decay_progress(s.step, s.total_steps, s.warmup_steps, s.decay_anchor))
            s.total_steps = total
            self.bar.total = s.total_steps
            if refit and s.warmup_steps >= s.total_steps > 1 and s.step < s.warmup_steps:
                # a slower pace shrank the run below its warm-up
                s.warmup_steps, s.ramp_anchor = shortened_warmup(s.step, s.warmup_steps, s.total_steps, s.ramp_anchor)
                self.log(f"the time budget now fits {counted(s.total_steps, 'step')}, not more than the warm-up: warm-up "
                         f"{self.shortened_text()}, so the learning rate decays")
            if not fitted and s.step == b.first_fit_at:
                budget, epochs = self.cfg.train.time_budget, (s.total_steps + s.step_offset) / self.steps_per_epoch
                ms = b.pace(s.step, s.train_seconds) * 1000
                self.log(f"time budget {budget:g} min: {counted(s.total_steps, 'step')} ({epochs_text(epochs)} epochs) at "
                         f"{ms:.0f} ms/step; refitted every {b.refit_every} steps")
                if s.step >= s.warmup_steps:
                    # Past its warm-up already (a run trained by epochs, resumed with a budget): the
                    # peak was held until this fit, and the cosine starts from it here. Fitted as a
                    # fresh run's, the warm-up went back to the configured one's 17% at this step.
                    s.decay_anchor = (s.step, 0.0)
                elif s.ramp_anchor is not None:  # a ramp restored under way (`RunState.restore`) goes on from it
                    s.warmup_steps, s.ramp_anchor = shortened_warmup(s.step, s.warmup_steps, s.total_steps,
                                                                     s.ramp_anchor)
                else:  # once: later refits keep it
                    s.warmup_steps, s.ramp_anchor = shortened_warmup(s.step, self.warmup_steps, s.total_steps)
                s.budget_fitted = True
                self.log_short_warmup(by_epochs=s.ramp_anchor is not None and s.ramp_anchor[0] < s.step)
                warning = few_epochs_warning(epochs, budget, ms, on_cpu=self.device.type == "cpu")
                if warning:
                    self.log(warning)

    def refit_to_new_budget(self) -> None:
        """Fit a resumed run to the time budget it is given now, at the pace its checkpoint recorded:
        its next fit was `first_fit` steps after the resume, past the end of a run with fewer steps
        left, so the new budget went unused while config.toml recorded it."""
        if self.budget_was is None or self.state.step >= self.state.total_steps:
            return
        before = self.state.total_steps
        self.refit_budget(end_of_epoch=False, after_monitor=True, owed=True, new_budget=True)
        self.log(f"time budget {self.budget_was:g} -> {self.cfg.train.time_budget:g} min: "
                 f"{counted(self.state.total_steps, 'step')} (were {before}), at the pace the checkpoint recorded")

    @property
    def first_fit_ahead(self) -> bool:
        """Whether this process makes the time budget's first fit: a fresh run, or one resumed from a
        checkpoint written before any process fitted (one resumed before its fit and stopped again
        before it, too); the checkpoint holds the fit otherwise."""
        if self.budget is None:
            return False
        fitted = self.state.budget_fitted
        # checkpoints before 2026-12-05 do not say: fitted when written past the first fit's step
        return not fitted if fitted is not None else self.state.start_step < self.budget.first_fit

    def reach_first_fit(self) -> None:
        """A run whose first fit is ahead runs at least to it, whatever train.epochs says (unused with
        a time budget): call once the state is restored."""
        if self.budget is not None and self.first_fit_ahead:
            self.state.total_steps = max(self.state.total_steps, self.budget.first_fit_at + 1)

    def log_short_warmup(self, resumed: bool = False, by_epochs: bool = False) -> None:
        """Say so when the run's warm-up is shorter than configured (`shortened_warmup`); `resumed`:
        as its checkpoint kept it (the run's length may have changed since); `by_epochs`: as a run by
        epochs shortened it, whose checkpoint a budgeted run goes on from."""
        s, warmup, epochs = self.state, self.warmup_steps, self.cfg.optim.warmup_epochs
        if s.warmup_steps != warmup or s.ramp_anchor is not None:
            why = ("was not shorter than the run when it was fitted" if resumed else
                   "was not shorter than the run by epochs its checkpoint came from" if by_epochs else
                   f"is not shorter than the run's {counted(s.total_steps, 'step')}")
            self.log(f"warm-up of {counted(warmup, 'step')} ({epochs:g} epoch{'' if epochs == 1 else 's'}) {why}: "
                     f"{self.shortened_text()}; set --warmup-epochs to choose")

    def shortened_text(self) -> str:
        """How the warm-up was shortened, for the log."""
        s = self.state
        if s.ramp_anchor is None:
            return f"shortened to {counted(s.warmup_steps, 'step')} (a tenth of the run, at least 1)"
        step, share = s.ramp_anchor
        return (f"shortened to end at step {s.warmup_steps}, rising from the {share:.0%} of the peak learning rate "
                f"it had reached at step {step}")

    def log_window(self, lr: float, window_seconds: float) -> None:
        """Write the window's metrics (metrics.jsonl, TensorBoard) and update the progress line."""
        s, t = self.state, self.cfg.train
        steps = self.window.steps
        rec: dict[str, Any] = self.window.close(self.ctx)
        if self.precision.loss_scaling:
            rec["loss_scale"] = self.train_step.loss_scale()
        rec.update(step=s.step, epoch=self.epochs_done, lr=lr, elapsed=s.train_seconds,
                   pairs_per_s=steps * t.batch_size / max(window_seconds, 1e-9))
        self.metrics_log.log(rec)
        # pairs_per_s counts images (each with t.views views, and t.local_views small ones); the
        # progress line counts augmented views of either size.
        self.bar.update(s.step, f"loss {rec['loss']:.3f} top1 {rec['top1']:.3f} "
                                f"{(t.views + t.local_views) * rec['pairs_per_s']:.0f} img/s")

    def checkpoint(self) -> None:
        """Refuse a bad state, then rank 0 writes the checkpoint, and every rank returns only once
        it is written: a rank that left for a stop's exit first made torchrun kill rank 0 during
        the write (exit 75 counts as a failure to it), and a write that failed left the others
        waiting for rank 0 until the collectives' timeout."""
        self.health.check(self.cfg, self.run_dir)
        if self.ctx.is_main:
            self.state.monitor_seconds = self.monitor.seconds
            self.state.pace_mark = self.budget.mark if self.budget is not None else None
            self.state.first_fit_at = self.budget.first_fit_at if self.budget is not None else None
            self.state.skip_streak = int(self.health.skip_streak)
        shared(self.ctx.is_main, lambda: self.state.save(self.run_dir), self.ctx, self.device,
               f"rank 0 could not write the checkpoint of step {self.state.step} (its error says why); the last "
               f"complete checkpoint in {self.run_dir} is kept")

    def monitor_pass(self) -> None:
        """One kNN monitor pass on rank 0 (the others wait for it in the next step's collectives)."""
        knn = self.monitor(self.model.encoder, self.clock)
        self.metrics_log.log({"step": self.state.step, "epoch": self.epochs_done, "knn_acc": knn})
        self.log(f"epoch {self.data_step // self.steps_per_epoch}: kNN monitor accuracy {knn:.4f}")


def build_run(cfg: Config, ctx: DistContext, device: torch.device, precision: Precision, run_dir: Path,
              dataset: Dataset, encoder: nn.Module | None, log: Callable[[str], None], progress: bool,
              clock: Callable[[], float], compiled: bool) -> Run:
    """Model, data, views, step, state and the loop's helpers for `cfg`, seeded; `compiled` is
    `train.compile` resolved (`use_compile`, before the run directory was written)."""
    t = cfg.train
    torch.manual_seed(weights_seed(cfg))  # the initial weights are a function of the seed
    model = build_model(cfg, dataset, device, encoder)
    if t.local_views and encoder is not None:  # a named encoder was checked before (check_small_views_first)
        check_small_views(model.encoder, local_config(cfg.augment, dataset.pretrain.images.shape[1]).crop_size,
                          dataset.pretrain.images.shape[-1], model.spec.feature_dim, device)
    # Gradient caching runs every BatchNorm on one chunk at a time (ghost BatchNorm, gradcache.py):
    # made global, a chunk would be normalised with the same chunk of every other process, and
    # the ghost batch would grow with the number of processes. Left local, it is the chunk alone,
    # as in one process.
    if ctx.active and t.sync_bn and not t.grad_cache_chunk:
        model.encoder = convert_batchnorm(model.encoder, device)
        model.head = convert_batchnorm(model.head, device)
    source = ImageSource(dataset.pretrain.images, device)
    sampler = BatchSampler(len(source), t.batch_size // ctx.world_size, t.seed, device, ctx.rank, ctx.world_size)
    peak_lr = scaled_lr(cfg.optim.lr, t.batch_size, cfg.optim.lr_scaling)  # scaled with the global batch
    if t.learn_temperature:
        model.temperature = LearnedTemperature(t.temperature).to(device)
    trained = [model.encoder, model.head] + ([model.temperature] if model.temperature is not None else [])
    opt = build_optimizer(cfg.optim.optimizer, trained, peak_lr, cfg.optim.weight_decay, cfg.optim.momentum,
                          cfg.optim.trust_coefficient)
    net: nn.Module = SimCLRNet(model.encoder, model.head, model.temperature)
    no_sync: Callable[[], AbstractContextManager[object]] = nullcontext
    if ctx.active:
        # Buffers are not broadcast: with global BN they agree anyway; without it, rank 0's are saved.
        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)
        net, no_sync = ddp, ddp.no_sync
    # --compile fuses the augmentation's pixel work (crop/flip/resize, jitter, blur, solarize,
    # normalise) and the model's BatchNorm/ReLU/add chains into a few kernels; the random draws
    # and the loss stay eager. The loss is 0.1-0.3 ms of a 20 ms ResNet-18 step on an H100, and
    # compiled together with the model and the metrics, Triton 3.6 (torch 2.11) failed to build
    # its fused nll_loss kernel for a batch-512 Fashion-MNIST run.
    if compiled:
        net = torch.compile(net)  # type: ignore[assignment]  # an OptimizedModule, typed as a plain callable
    views = ViewMaker(cfg.augment, model.spec.mean_tensor(), model.spec.std_tensor(), device, seed=t.seed,
                      channels_last=t.channels_last, global_batch=t.batch_size, rank=ctx.rank,
                      world_size=ctx.world_size, render=torch.compile(render_views) if compiled else render_views,
                      views=t.views, local_views=t.local_views)
    keys = queue = None
    if t.queue:
        keys = KeyNetwork(SimCLRNet(model.encoder, model.head), t.queue_momentum)
        queue = RowQueue(t.queue, cfg.model.proj_dim, device)
    support = RowQueue(t.nn_support, cfg.model.proj_dim, device) if t.nn_support else None
    objective = None if is_plain(t) else Objective(t, dataset.pretrain.labels, device, model.temperature, keys, queue,
                                                   support)
    train_step = TrainStep(net, opt, precision, device, temperature=t.temperature, loss_block=t.loss_block,
                           grad_cache_chunk=t.grad_cache_chunk, ctx=ctx, no_sync=no_sync, objective=objective)
    spe = sampler.steps_per_epoch
    total, warmup = max(1, int(round(t.epochs * spe))), int(round(cfg.optim.warmup_epochs * spe))
    # A budgeted run's length is known at its first fit (refit_budget); until then, the configured warm-up.
    budget = TimeBudget(t.time_budget * 60) if t.time_budget > 0 else None
    state = RunState(cfg, model, train_step, total_steps=total,
                     warmup_steps=warmup if budget is not None else warmup_for(warmup, total), steps_per_epoch=spe)
    state.data_content = dataset.content
    run = Run(cfg=cfg, ctx=ctx, device=device, precision=precision, run_dir=run_dir, dataset=dataset, model=model,
              source=source, sampler=sampler, views=views, train_step=train_step, state=state,
              budget=budget, health=Health(device),
              window=MetricsWindow(),
              monitor=KnnMonitor(dataset, model.spec, device, cfg, precision, enabled=ctx.is_main),
              metrics_log=MetricsLog(run_dir, enabled=ctx.is_main), bar=Progress(1, enabled=progress), log=log,
              clock=clock, peak_lr=peak_lr, warmup_steps=warmup)
    if t.time_budget <= 0:
        run.log_short_warmup()
    return run
