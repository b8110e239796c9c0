"""SimCLR pretraining: one explicit loop, top to bottom.

stored uint8 images -> two views on the device -> encoder f -> h -> head g -> z -> NT-Xent.

Determinism: batch t's images are slice t of epoch t // steps_per_epoch's permutation (t counted in
the data, `Run.data_step`: the step itself unless a resume changed the batch), and its
augmentations come from a generator seeded with (seed, step). Everything random is a function of the
step, so a resumed run replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastclr import config as config_mod
from fastclr.checkpoint import (check_run_parts, content_sha256, latest_valid_checkpoint, list_checkpoints,
                                remove_stale_temporaries, what_is_kept)
from fastclr.config import Config, DataConfig
from fastclr.config import validate as validate_settings
from fastclr.cpu_memory import keep_freed_memory
from fastclr.data import Dataset, absolute_name, load_data, refuse_ambiguous
from fastclr.data.datasets import REGISTRY, ensure, read_checked, recorded_root, root_of
from fastclr.determinism import deterministic_kernels, no_host_sync
from fastclr.evaluation.features import state_checksum
from fastclr.export import ENCODER_FILE, export_holds, save_encoder
from fastclr.pretraining.metrics import NonFiniteLoss
from fastclr.models import CPU_WIDTH_WHY, resolve_encoder, resolve_width
from fastclr.models.foreign import InitWeights, apply_init, read_init, recorded_width
from fastclr.pretraining.model import Model, named_encoder
from fastclr.pretraining.monitor import final_probe, labelled
from fastclr.pretraining.schedule import epochs_text
from fastclr.pretraining.setup import (Run, build_run, check_data_fits, check_small_views_first,
                                      check_sync_checkable, validate)
from fastclr.pretrained import require_run_store, with_moved_store
from fastclr.pretraining.state import STATE_KEYS, check_resume_config, check_resume_data
from fastclr.pretraining.unread import refuse_unread
from fastclr.scaleout.once import resume_command
from fastclr.scaleout.same_run import check_same_run
from fastclr.presets import STORE, check_preset, config_for
from fastclr.progress import counted
from fastclr.locks import RunLock, locked_by_another
from fastclr.runs import claim_new_dir, default_run_dir, prepare_run_dir, write_config, write_json
from fastclr.cpus import gives_threads_back, set_threads
from fastclr.runtime import (Precision, agree_precision, on_meta, require_model_memory, resolve_precision, select_device,
                             use_compile)
from fastclr.signals import StopFlag, StopRequested, graceful_stop
from fastclr.tracking import TRACKING_FILE, numbers, open_trackers, read_ids, tracker_names
from fastclr.tracking import require as require_trackers
from fastclr.scaleout.distributed import (DistContext, all_reduce, broadcast_object, env_world, gather_objects,
                                          is_peer_failure, peer_failure, process_device, setup, share_outcome,
                                          shared, teardown)
from fastclr.errors import FastclrError, PeerFailure, first_sentence, narrate
from fastclr.pretraining.memory import OPTIMISER_COPIES, require_step_memory, tensor_bytes
from fastclr.files import WriteFailed, read_json, remove_empty

__all__ = ["NonFiniteLoss", "PretrainResult", "pretrain"]


@dataclass
class PretrainResult:
    """What `pretrain` returns."""

    run_dir: Path
    steps: int
    train_seconds: float
    probe_accuracy: float | None
    stopped: bool = False
    """True when `stop` ended the run early: in training (a checkpoint was written; resume it) or
    in the final probe (training is complete and exported; `stopped_in` says which)."""
    stopped_in: str = ""
    """"training" or "probe" when stopped."""
    model: Model | None = None
    rank: int = 0
    """This process's rank; only rank 0 wrote files and has the probe accuracy."""
    precision: Precision | None = None
    """The precision the run resolved and trained in."""
    random_init_accuracy: float | None = None
    """The same probe on the same network at its initial weights (eval.untrained_reference)."""


@gives_threads_back  # fastclr.pretrain in a notebook: the caller keeps its thread count
def pretrain(
    cfg: Config,
    *,
    resume: str | Path | None = None,
    allow_config_change: bool = False,
    encoder: nn.Module | None = None,
    dataset: Dataset | None = None,
    log: Callable[[str], None] = narrate,
    progress: bool = True,
    stop: Callable[[int], bool] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    file_settings: Mapping[str, Any] | None = None,
) -> PretrainResult:
    """Run SimCLR pretraining as configured; returns the run directory and the probe accuracy.

    resume: a run directory to continue from its newest valid checkpoint (config from the run,
    overridden by `cfg` where the key is in neither STATE_KEYS nor RESUME_KEYS, or is in RESUME_KEYS
    and `allow_config_change`).
    encoder: any `nn.Module` mapping (B, C, S, S) to (B, D) to train instead of a named one.
    stop: called after every step with the step count; when it returns True the run writes a
    checkpoint and returns early (`PretrainResult.stopped`), to be continued with `resume`.
    clock: the seconds the time budget and the logs count (tests drive the loop with a fake one).
    file_settings: the settings --config files gave (flat keys): those of them nothing in the run reads
    are a note, where a value given otherwise is refused (fastclr.pretraining.unread).

    Under torchrun (WORLD_SIZE > 1 in the environment) every process calls this: they form one
    process group, train with DistributedDataParallel on disjoint shares of each global batch of
    `train.batch_size` images, and rank 0 alone writes the run directory and logs. Under several
    processes `stop` is consulted where the ranks agree (every `log_every` steps, at checkpoints, and
    about every STOP_WITHIN_S of the slowest rank's steps), and every rank stops at the same step.

    Called from Python without `stop` (a notebook), a Ctrl-C stops the run as the command's does: a
    checkpoint at the next step, then the result, `stopped` (it raised KeyboardInterrupt mid-step,
    and the run kept only its last epoch's checkpoint). torch's random generator is the caller's
    again afterwards (the run seeds it with its own seed to draw the initial weights).
    """
    with _callers_rng_kept(), _ctrl_c_stops(stop) as stop:
        return _pretrain(cfg, resume=None if resume is None else Path(resume), allow_config_change=allow_config_change,
                         encoder=encoder, dataset=dataset, log=log, progress=progress, stop=stop, clock=clock,
                         file_settings=file_settings)


@contextmanager
def _ctrl_c_stops(stop: Callable[[int], bool] | None) -> Iterator[Callable[[int], bool] | None]:
    """`stop`, or where there is none and Ctrl-C would raise KeyboardInterrupt in this thread (Python's
    own SIGINT handler), a flag that Ctrl-C sets for the duration of the call."""
    if stop is not None or threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield stop
        return
    with graceful_stop((signal.SIGINT,), process_ends=False) as flag:
        yield flag


@contextmanager
def _callers_rng_kept() -> Iterator[None]:
    """torch's CPU generator (and the current GPU's, where CUDA was in use) as it was, given back."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
        yield


def _pretrain(cfg: Config, *, resume: Path | None, allow_config_change: bool, encoder: nn.Module | None,
              dataset: Dataset | None, log: Callable[[str], None], progress: bool, stop: Callable[[int], bool] | None,
              clock: Callable[[], float], file_settings: Mapping[str, Any] | None = None) -> PretrainResult:
    """`pretrain`, its arguments resolved."""
    if cfg.train.keep_memory:
        keep_freed_memory()
    _, world, local_rank = env_world()
    device = select_device(process_device(cfg.train.device, local_rank, world), warn=log)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A stop signal (the command's flag) ends the ranks' check-in; a caller's own `stop(step)` is for steps alone
    # (`lambda step: step % 1000 == 0` holds at 0)
    ctx = setup(device, cfg.train.dist_timeout,
                stopping=(lambda: stop.signal is not None) if isinstance(stop, StopFlag) else None)
    run: Run | None = None
    try:
        main_log = log if ctx.is_main else _silent
        set_threads(cfg.train.threads, warn=main_log)
        saved = resume is not None and (resume / "config.toml").is_file() and \
            config_mod.read_toml(resume / "config.toml").get("train.precision") == cfg.train.precision
        precision = run_precision(cfg, device, ctx, main_log, saved=saved)
        # The resolved precision is what the run's config records (and a resume reuses).
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision.name))
        with deterministic_kernels(cfg.train.deterministic and device.type == "cuda"):
            run = _start(cfg, ctx, device, precision, resume, allow_config_change, encoder, dataset, main_log,
                         progress and ctx.is_main, clock, file_settings)
            try:
                stopped = _train(run, stop)
                result = _finish(run, stopped, stop)
                run.close_trackers("KILLED" if result.stopped else "FINISHED",
                                   None if stop is None else lambda: stop(run.state.step))
                return result
            except WriteFailed as e:  # metrics, export or results: say what survives, as a checkpoint does
                raise FastclrError(f"{e}; {what_is_kept(run.run_dir)}") from None
            finally:
                run.close_trackers("FAILED")  # when the run ended with an error
                run.release()
    except Exception as e:
        if ctx.active and is_peer_failure(e):
            where = run.run_dir if run is not None else resume or cfg.train.run_dir
            raise peer_failure(ctx, e, _after_peer_loss(Path(where) if where else None)) from None
        raise
    finally:
        teardown(ctx)


def _store_path_absolute(cfg: Config) -> Config:
    """`cfg` with a store's path made absolute, as a run records it (`absolute_name`): a relative one,
    from a flag, a --config file or a run saved before, names the same store from this directory.
    So is --data-root's folder: evaluate, export and the others, which have no --data-root, looked
    for it from their own directory."""
    root = os.path.normpath(Path(os.path.expanduser(cfg.data.root)).absolute()) if cfg.data.root else cfg.data.root
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name=absolute_name(cfg.data.name), root=root))


def _init_path_absolute(cfg: Config) -> Config:
    """`cfg` with --init's file made absolute, as a run records it: its config.toml, given to
    `--config` from another directory, named a file that was not there."""
    if not cfg.model.init:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=str(Path(os.path.expanduser(cfg.model.init)).resolve())))


def _read_init(cfg: Config, dataset: Dataset, encoder: nn.Module | None, device: torch.device) -> InitWeights:
    if encoder is not None:
        raise FastclrError("model.init starts a named encoder from a file; load weights into your own module "
                           "before passing it, and leave init empty")
    with torch.device("meta"):  # names and shapes only
        target, name, _ = named_encoder(cfg, dataset.image_shape, device.type)
    return read_init(Path(cfg.model.init), target, cfg.model.init_sha256,
                     stages=cfg.model.cnn_stages if name == "cnn" else "")


def _auto_width(cfg: Config, dataset: Dataset, device: torch.device, encoder: nn.Module | None,
                log: Callable[[str], None]) -> float:
    """The width `auto` gives a new run: that of the network --init's file holds (1 for torchvision and
    timm files, which say nothing), else `resolve_width`'s for this device; said when it is not 1."""
    if encoder is not None:
        return 1.0  # a module passed in has its own channels; recorded as 1
    name = resolve_encoder(cfg.model.encoder, cfg.augment.crop_size or dataset.image_shape[0])
    here = resolve_width(0.0, name, device.type)
    if cfg.model.init:
        init = Path(cfg.model.init)
        if not init.is_file() or init.suffix in (".onnx", ".pt2"):
            return here  # not a file to start from: read_init refuses it next, and no width line misleads before
        width = recorded_width(init) or 1.0
        if width != here:
            log(f"width {width:g}: that of the network in {cfg.model.init} (--init), not the {here:g} `auto` gives a "
                f"{name} on this device")
        return width
    if here != 1.0:
        log(f"width {here:g}: a {name} on a CPU trains at {here:g} of its channels unless --width is given "
            f"({CPU_WIDTH_WHY})")
    return here


def _with_width(cfg: Config, width: float) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=width))


def _recipe_text(cfg: Config) -> str:
    """For a store, whose recipe it trains with (its built-in dataset's where it holds one, else the
    ImageNet recipe the README calls the store recipe): the settings depend on it, the name does not say."""
    if cfg.data.preset == cfg.data.name:
        return ""
    return f"; the {cfg.data.preset if cfg.data.preset != STORE else 'store (ImageNet)'} recipe"


def _origin_text(dataset: Dataset) -> str:
    """Where the files were read from, when the name does not say it already."""
    return f" from {dataset.origin}" if dataset.origin and dataset.origin != dataset.name else ""


STOP_WITHIN_S = 5.0
"""Under several processes, how much training a stop may wait for before the ranks agree on it:
torchrun gives its ranks 30 s after it forwards a signal, then kills them, and with slow steps
(5 s a step for ResNet-18 on a CPU) agreeing only every --log-every steps lost every step since
the last checkpoint."""


@dataclasses.dataclass(frozen=True)
class Agreed:
    """The ranks' last agreement: its step, its time on this rank's clock, the step of the next."""

    step: int
    at: float
    next: int


def agree_every(step_s: float, log_every: int) -> int:
    """Steps between the ranks' agreements at `step_s` seconds a step (the slowest rank's): about
    STOP_WITHIN_S of training, at least 1, and at most the log interval (where they agree anyway)."""
    return max(1, min(log_every, int(STOP_WITHIN_S / max(step_s, 1e-9))))


def _train(run: Run, stop: Callable[[int], bool] | None) -> bool:
    """The loop: per step lr, views, step, budget, log, checkpoint, monitor, stop. True when `stop`
    ended it early (after a checkpoint)."""
    s, t, ctx = run.state, run.cfg.train, run.ctx
    first_step = s.step
    window_start = run.clock()
    agreed = Agreed(step=s.step, at=window_start, next=s.step + 1)
    saved = -1  # the step of the last checkpoint written here
    run.loop_start = window_start - s.train_seconds
    run.bar.restart()
    try:
        owed = run.epoch_ended() if s.start_step and s.saved_at_epoch_end else None
        if owed is not None and run.monitor.due(owed, s.train_seconds) and s.step not in run.metrics_log.monitored:
            # The pass a stop (or a crash) right after this epoch end's checkpoint left undone.
            run.monitor_pass()
            s.train_seconds = run.clock() - run.loop_start
            window_start = run.clock()
        if run.finished_before:
            return False  # nothing left to train: its checkpoint stands as written
        if owed is not None:  # and the refit that follows the pass: the checkpoint came before both
            run.refit_budget(end_of_epoch=True, after_monitor=True, owed=True)
        run.refit_to_new_budget()
        while s.step < s.total_steps:
            lr = run.set_lr()
            # The step never waits for the device: metrics stay on it until a log step.
            # (Checked from the third step of this process on: the first ones compile and warm up.)
            with no_host_sync(run.device, t.check_sync and s.step >= first_step + 2):
                idx = run.sampler.indices(run.data_step)
                out = run.train_step(run.views(run.source.gather(idx), s.step), run.groups(idx))
                run.health.update(out, s.step)
                run.window.add(out)
            s.step += 1
            s.train_seconds = run.clock() - run.loop_start
            epoch_ended = run.epoch_ended()
            run.refit_budget(end_of_epoch=epoch_ended is not None)

            log_now = s.step % t.log_every == 0 or s.step == s.total_steps
            checkpoint_now = (s.step % t.checkpoint_every == 0) if t.checkpoint_every else epoch_ended is not None
            stop_now = False
            if ctx.active and (log_now or checkpoint_now or s.step >= agreed.next):
                # Decisions every rank must share, taken where the host waits for the device anyway:
                # the first non-finite step anywhere, and whether any rank was asked to stop.
                now = run.clock()
                stop_now, slowest = run.health.agree(stop is not None and s.step < s.total_steps and stop(s.step), ctx,
                                                     step_s=(now - agreed.at) / (s.step - agreed.step))
                agreed = Agreed(step=s.step, at=now, next=s.step + agree_every(slowest, t.log_every))
            if not ctx.active:
                stop_now = stop is not None and s.step < s.total_steps and stop(s.step)
            if log_now or checkpoint_now or stop_now:
                # Also at every checkpoint: the window is not in it, so a resume would lose its steps.
                run.health.check(run.cfg, run.run_dir)
                now = run.clock()
                run.log_window(lr, now - window_start)
                window_start = now
            paused = run.clock()  # the checkpoint and the monitor pass are not the window's training time
            if checkpoint_now or stop_now:
                run.checkpoint()
                saved = s.step
            if stop_now:  # a stop exits promptly, without the epoch end's monitor pass
                run.log(f"stopped at step {s.step}; checkpoint written; continue with {resume_command(run.run_dir)}")
                return True
            if run.monitor.due(epoch_ended, s.train_seconds):
                run.monitor_pass()
                s.train_seconds = run.clock() - run.loop_start
            window_start += run.clock() - paused
            if epoch_ended is not None:
                run.refit_budget(end_of_epoch=True, after_monitor=True)
        s.train_seconds = run.clock() - run.loop_start  # with the last epoch's monitor pass
        if run.window.steps:  # steps after the last log: the epoch end's refit ended the run
            if ctx.active:
                run.health.agree(False, ctx)
            run.health.check(run.cfg, run.run_dir)
            run.log_window(lr, run.clock() - window_start)
        try:
            run.checkpoint()  # with the seconds of the last epoch end's checkpoint and monitor pass
        except PeerFailure:
            raise
        except FastclrError as e:
            if saved != s.step:
                raise
            # Written again only for its seconds: a full disk (room for one copy) kept the finished run
            # from its export, though the epoch end's checkpoint of this very step is complete.
            why = getattr(e, "reason", str(e))  # (a write failure's whole message says to resume)
            run.log(f"note: the checkpoint of step {s.step} written at the epoch end stands, without the seconds "
                    f"since (writing it again failed: {why})")
        return False
    finally:
        run.bar.close()
        run.metrics_log.close()


def _start(cfg: Config, ctx: DistContext, device: torch.device, precision: Precision, resume: Path | None,
           allow_config_change: bool, encoder: nn.Module | None, dataset: Dataset | None,
           log: Callable[[str], None], progress: bool, clock: Callable[[], float],
           file_settings: Mapping[str, Any] | None = None) -> Run:
    """Read the checkpoint to resume (if any) and the data, check the settings, create the run
    directory, and build the run."""
    started = clock()
    validate_settings(cfg)  # a config built in Python has not been through apply_overrides
    check_preset(cfg)
    cfg = _init_path_absolute(_store_path_absolute(cfg))
    state, saved = None, None
    # What the settings are compared with for the ones nothing reads: the recipe a new run starts from
    recipe = config_for(None, {"data.name": cfg.data.name, "data.preset": cfg.data.preset})
    width_said: list[str] = []
    seen: set[str] = set()
    if resume is not None:
        # Every rank reads the same file, so the run directory must be on a filesystem all nodes see.
        seen = {p.name for p in list_checkpoints(resume)}
        owner = "" if seen else locked_by_another(resume)  # a run still before its first checkpoint: say whose
        if owner:
            raise FastclrError(f"{resume} is being written by {owner} and has no checkpoint yet; wait for it to "
                               "finish (or stop it), then resume")
        ckpt_path, state = latest_valid_checkpoint(resume, warn=log, check=check_run_parts)
        try:
            saved = _store_path_absolute(config_mod.from_dict(state["config"]))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, FastclrError) as e:  # crafted, foreign
            raise FastclrError(f"{ckpt_path} (written by fastclr {state.get('fastclr_version', '?')}) records its "
                               f"settings in a form this version cannot read ({type(e).__name__}: {str(e)[:200]}); "
                               "resume it with that version") from None
        if not cfg.model.width:  # auto: the width the run trained at, whatever this device would choose
            cfg = _with_width(cfg, saved.model.width)
        info = state.get("model_info")
        built: dict[str, Any] = info if isinstance(info, dict) else {}
        # before the refusals of changes: a change of a setting nothing reads is no change to allow
        refuse_unread(cfg, (saved, recipe), encoder=built.get("encoder"), channels=built.get("in_channels"),
                      files=file_settings)
        check_resume_config(saved, cfg, allow_config_change, resume, built=built)
        cfg = _start_settings_kept(saved, cfg, log)
        if cfg.data.root and cfg.data.root == saved.data.root:  # the run's own, not one given now (refused as typed)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=recorded_root(
                cfg.data.name, cfg.data.root, str(resume), log)))
        run_dir = resume
        _check_same_step(int(state["step"]), ctx, device)
        log(f"resuming {run_dir} from {ckpt_path.name} (step {state['step']})")
    else:
        _check_same_step(-1, ctx, device)
        # ~ in a file (os.path's expanduser: pathlib's raises where no home is known)
        run_dir = Path(os.path.expanduser(broadcast_object(str(cfg.train.run_dir or default_run_dir(cfg)), ctx)))
        refuse_unread(cfg, (recipe,), files=file_settings)  # what needs no data, before any is read or downloaded
    if dataset is None:
        if resume is not None:
            recorded = cfg.data.name
            cfg = with_moved_store(cfg, resume, str(state.get("data_content", "")) if state else "", log)
            if saved is not None and saved.data.name == recorded != cfg.data.name:  # the same store: no change to note
                saved = dataclasses.replace(saved, data=dataclasses.replace(saved.data, name=cfg.data.name))
            require_run_store(resume, cfg.data.name)
        else:  # a name given now (a resume's is the one its run recorded)
            refuse_ambiguous(cfg.data.name)
        _fetch_once_a_node(cfg.data, ctx, device)
        data_cfg = cfg.data
        # Every rank reads its own copy (a node's disk): one that cannot is told to the others, which went
        # on into the next collective and blamed a lost peer, first.
        dataset = shared(True, lambda: load_data(data_cfg), ctx, device, "another rank could not read its data (its "
                         "line says why)")
        assert dataset is not None
        if not cfg.data.root and (found := root_of(cfg.data.name, dataset.origin)):
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=found))
    side, channels = cfg.augment.crop_size or dataset.image_shape[0], dataset.image_shape[2]
    built_now = "custom" if encoder is not None else resolve_encoder(cfg.model.encoder, side)
    refuse_unread(cfg, (recipe,) if saved is None else (saved, recipe), encoder=built_now, channels=channels,
                  files=file_settings, log=log)
    check_same_run(cfg, dataset, content_sha256(state) if state is not None and ctx.active else "", ctx)
    if state is not None:
        check_resume_data(str(state.get("data_content", "")), dataset.name, dataset.content, allow_config_change, log)
    elif not cfg.model.width:  # auto, decided once (rank 0's); config.toml records it
        # said once --init's file is read: an unreadable one is refused without a width line first
        cfg = _with_width(cfg, broadcast_object(_auto_width(cfg, dataset, device, encoder, width_said.append), ctx))
    validate(cfg, len(dataset.pretrain), ctx.world_size, resuming=state is not None)
    check_sync_checkable(cfg, ctx.world_size, device)
    check_data_fits(cfg, dataset, custom_encoder=encoder is not None)
    if encoder is None:
        check_small_views_first(cfg, dataset)
        shapes = on_meta(lambda: named_encoder(cfg, dataset.image_shape, device.type)[0])
        # A checkpoint in memory whose moments become a CPU run's optimiser state; on a GPU they are copied there.
        held = tensor_bytes(state) if state is not None and device.type == "cpu" else 0
        require_model_memory(shapes, device, f"the encoder at width {cfg.model.width:g}", "give a smaller --width, or "
                             "run where there is more memory", OPTIMISER_COPIES.get(cfg.optim.optimizer, 0), held)
        require_step_memory(cfg, shapes, dataset.image_shape, ctx.world_size, precision, device, held)
    compiled = use_compile(cfg.train.compile, device)  # an explicit on where Triton cannot run: refused before anything is written
    init = None
    if state is None and cfg.model.init:  # read and matched now, before anything is written
        init = _read_init(cfg, dataset, encoder, device)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_sha256=init.sha256))
    for line in width_said:
        log(line)
    lock, failure, made = None, None, []
    if ctx.is_main:
        # Only now, with the data and settings known good, does the run directory come into being,
        # and it belongs to this process (rank 0) until the run ends.
        try:
            require_trackers(tracker_names(cfg.train.trackers))
            if state is None and not cfg.train.run_dir:
                parents = [d for d in run_dir.parents if not d.exists()]
                run_dir = claim_new_dir(run_dir)  # a default name another run took in the same second gets a suffix
                made = [run_dir, *parents]
            elif state is None:  # a --run-dir this run makes: removed too if the run does not start
                made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
            prepare_run_dir(run_dir, resuming=state is not None)
            lock = RunLock(run_dir, log)
            if state is None:
                # Again with the lock held: a run may finish and let go of its lock between the look
                # above and this lock (which waits for an owner), and a finished run is never written into.
                prepare_run_dir(run_dir)
                forget_dead_attempt(run_dir)
            if state is not None and {p.name for p in list_checkpoints(run_dir)} - seen:
                # Its owner wrote a newer checkpoint (a stop, say) after we chose ours and before we held the
                # lock: continuing from ours would drop those steps and then their metrics records.
                raise FastclrError(f"{run_dir} got a newer checkpoint while this process was starting (another "
                                   f"process was still writing it); run the same command again to resume from the newest")
        except Exception as e:  # another process writing it, say: the other ranks are told, not left waiting
            failure = e  # raised again by share_outcome below, where a claimed default name is removed
    try:  # `share_outcome` inside the try, not `shared`: a lock taken is released if the exchange fails
        share_outcome(failure, ctx, device, f"rank 0 could not take {run_dir} for this run (its error says why)")
        run_dir = Path(broadcast_object(str(run_dir), ctx))
        if lock is not None:
            for p in remove_stale_temporaries(run_dir):
                log(f"removed {p.name}, left by a write that was interrupted")
        run = build_run(cfg, ctx, device, precision, run_dir, dataset, encoder, log, progress, clock, compiled)
    except BaseException:
        if lock is not None:
            lock.release()
        remove_empty(made)  # a folder made for a run that did not start (its lock is gone first)
        raise
    run.lock, run.started = lock, started
    try:  # whatever fails from here on (a damaged metrics.jsonl or tracking.json) gives the directory up
        _ready(run, cfg, state, saved, init, log)
    except BaseException:
        run.release()
        remove_empty(made)
        raise
    if not labelled(dataset) and (cfg.eval.probe or cfg.eval.monitor_every):
        log(f"{dataset.name} has no labelled train/test split: the kNN monitor and the linear probe are skipped")
    t, spec = cfg.train, run.model.spec
    log(f"run {run_dir}: {spec.encoder} (h: {spec.feature_dim}-d) on {dataset.name} ({len(run.source)} images "
        f"{dataset.image_shape}{_origin_text(dataset)}{_recipe_text(cfg)}), {_batch_text(cfg, ctx)}, {counted(run.steps_per_epoch, 'step')}/epoch, peak lr {run.peak_lr:g} "
        f"({_lr_text(cfg, ctx)}), {precision.name} on {device}, {_compile_text(cfg.train.compile, compiled)}"
        + "".join(f", {p}" for p in ([f"NT-Xent in row blocks of {t.loss_block}"] if t.loss_block else [])
                  + ([f"gradient caching in chunks of {t.grad_cache_chunk} images"] if t.grad_cache_chunk else [])))
    return run


def _after_peer_loss(run_dir: Path | None) -> str:
    """What survives a lost rank and how to go on: resume from the newest checkpoint, or, where
    none was written (a peer lost while setting up or in the first epoch), start again."""
    kept = list_checkpoints(run_dir) if run_dir is not None and run_dir.is_dir() else []
    if run_dir is not None and kept:
        return f"{kept[-1].name} in {run_dir} is kept; resume with --resume {run_dir} under the same torchrun command"
    return (f"no checkpoint of {run_dir} was written yet" if run_dir is not None else
            "it stopped before the run directory was chosen") + "; start the run again with the same command"


def forget_dead_attempt(run_dir: Path) -> None:
    """A new run in a directory whose first attempt died before its first checkpoint (so it starts
    afresh, `prepare_run_dir` allowing it) does not inherit that attempt's tracked run or
    TensorBoard events: its trackers continued the dead attempt's run, with its parameters and
    steps, and TensorBoard showed both attempts' curves. (Called with the run's lock held.)"""
    (run_dir / TRACKING_FILE).unlink(missing_ok=True)
    tb = run_dir / "tb"
    if tb.is_dir():
        for events in tb.glob("events.out.tfevents.*"):
            events.unlink()


def _start_settings_kept(saved: Config, cfg: Config, log: Callable[[str], None]) -> Config:
    """`cfg` with the settings of how the run started taken from its checkpoint's config `saved`:
    the weights it started from (--init, read only by a new run; the seed they were drawn with, where
    another --seed is allowed) and, when learned, the temperature's start (the checkpoint holds where
    it got to). A resume given others trained on as before while
    config.toml recorded them (and an init's checksum as empty). A different --init is said in a
    note; the same one again (a job script run again) silently keeps the checksum."""
    keys = ("model.init",) + (("train.temperature",) if saved.train.learn_temperature else ())
    # --init is recorded absolute; a run saved before recorded it as given, relative to where it started
    same_file = bool(saved.model.init and cfg.model.init) and Path(saved.model.init).resolve() == Path(cfg.model.init)
    changed = [k for k in config_mod.diff(saved, cfg, keys) if not (k == "model.init" and same_file)]
    if changed:
        log(f"note: {', '.join(changed)} set{'s' * (len(changed) == 1)} how a run starts, and this one continues from "
            "its checkpoint: not used, and its config.toml keeps the run's")
    kept = {k: v for k, v in config_mod.to_flat(saved).items() if k in keys or k == "model.init_sha256"}
    # Another seed (allowed) draws the data from here on; the weights were drawn with the run's first.
    start = config_mod.weights_seed(saved)
    kept["model.init_seed"] = start if start != cfg.train.seed else -1
    return config_mod.apply_overrides(cfg, kept)


def _compile_text(setting: str, compiled: bool) -> str:
    """What the first log line says of torch.compile: config.toml keeps the setting (`auto` is
    resolved again on the machine a resume runs on), so the log is where the choice is recorded."""
    return ("compiled" if compiled else "eager") + (f" (--compile {setting})" if setting == "auto" else "")


def _ready(run: Run, cfg: Config, state: dict[str, Any] | None, saved: Config | None, init: InitWeights | None,
           log: Callable[[str], None]) -> None:
    """Start the built run from its init weights or checkpoint (`saved`: its config, as `_start`
    read it), and record it: config.toml, the metrics log cut back to the checkpoint, the
    experiment trackers."""
    ctx, run_dir = run.ctx, run.run_dir
    if init is not None:
        apply_init(run.model.encoder, init)
        log(init.summary())
        objective = run.train_step.objective
        if objective is not None and objective.keys is not None:
            objective.keys.copy_online()  # the queue's key network starts from the init too, not the random draw
    if state is not None:
        try:
            run.state.restore(state, len(run.dataset.pretrain))
        except torch.OutOfMemoryError:
            raise  # the CLI's own line for it, with the way out
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            # Parts of the right form whose content does not fit (an optimiser state of other
            # parameter groups, a queue of another size): from a file edited to pass its checksum.
            raise FastclrError(f"cannot resume {run_dir}: its checkpoint holds state this run's network and optimiser "
                               f"cannot take ({type(e).__name__}: {first_sentence(e)}); start a new run with another "
                               "--run-dir") from None
        if run.state.saved_steps_per_epoch != run.steps_per_epoch:
            log(f"resumed at step {run.state.step} with {run.steps_per_epoch} steps per epoch (the checkpoint's: "
                f"{run.state.saved_steps_per_epoch}): going on from epoch {epochs_text(run.epochs_done)} of the data, "
                f"the place it had reached")
        run.place_schedule()
        run.monitor.seconds = run.state.monitor_seconds
        run.health.skip_streak.fill_(run.state.skip_streak)
        if run.budget is not None:
            run.budget.resume_at(run.state.step, run.state.pace_mark)
            if not run.first_fit_ahead:  # a fit the checkpoint holds; a fit ahead says its own
                run.log_short_warmup(resumed=True)  # the warm-up the checkpoint kept
                if saved is not None and 0 < saved.train.time_budget != cfg.train.time_budget:
                    run.budget_was = saved.train.time_budget
    run.reach_first_fit()
    # Until a time budget's first fit the run's length is a placeholder: no total, no eta.
    run.bar.total = None if run.budget is not None and run.first_fit_ahead else run.state.total_steps
    run.bar.start = run.state.step
    # A checkpoint of the run's own last step (not a stopped run that fewer epochs now end there):
    # nothing is trained, and config.toml stays the record of how the run was trained.
    run.finished_before = state is not None and run.state.step >= max(run.state.total_steps, int(state["total_steps"]))
    if state is not None and not run.finished_before and run.state.step >= run.state.total_steps:
        # fewer epochs than the stopped run has trained: it ends where it is, mid-schedule
        log(f"note: --epochs {cfg.train.epochs:g} ends at step {run.state.total_steps}, before step {run.state.step}, "
            f"which this run has reached: it ends there, part way down the learning rate of its "
            f"{int(state['total_steps'])}-step schedule")
    if state is not None and saved is not None and run.state.step < run.state.total_steps:  # steps left to train
        _note_changed_settings(saved, cfg, run.state.step, log)
        _note_emptied_state(saved, cfg, log)
        _note_new_length(saved, cfg, run, int(state["total_steps"]), log)
    def record() -> None:  # rank 0's; what fails here (a damaged metrics.jsonl, say) is told to the others
        names = tracker_names(cfg.train.trackers)
        # read now: a damaged tracking.json is refused before config.toml records settings nothing trained with
        known = read_ids(run_dir) if names else {}
        if state is not None and run.state.step < run.state.total_steps:
            _retire_export(run_dir, state, log)
        if run.finished_before and saved is not None:
            _note_unused_settings(saved, cfg, log)
            if not (run_dir / "config.toml").exists():  # gone: the record comes back from the checkpoint, as trained
                write_config(run_dir, saved)
        else:
            write_config(run_dir, cfg)
        run.metrics_log.keep_until(run.state.step)  # a resumed run logs the steps after its checkpoint again
        run.metrics_log.trackers = open_trackers(names, run_dir, config_mod.to_flat(cfg), warn=log)
        if state is not None:  # a tracked run started by this resume (none could be reached before, or
            # tracking.json was deleted) began at the checkpoint's step: it gets the records kept before it
            fresh = [t for t in run.metrics_log.trackers if getattr(t, "name", None) not in known]
            run.metrics_log.send_kept(fresh)
    shared(ctx.is_main, record, ctx, run.device, f"rank 0 could not record the run in {run_dir} (its error says why)")


RUNTIME_KEYS = frozenset({"data.root", "data.download", "train.channels_last", "train.compile", "train.device",
                          "train.threads", "train.keep_memory", "train.log_every", "train.checkpoint_every",
                          "train.run_dir", "train.dist_timeout", "train.deterministic", "train.check_sync",
                          "train.trackers", "eval.probe", "eval.monitor_every", "eval.knn_k", "eval.untrained_reference",
                          "eval.monitor_share"})
"""Settings of how a process runs and reports, not of what a run trains."""


def _trained_changes(saved: Config, wanted: Config, left_out: frozenset[str] = frozenset()) -> list[str]:
    """The keys of what a run trains (not RUNTIME_KEYS, nor `left_out`) whose values differ."""
    return [k for k in config_mod.diff(saved, wanted) if k not in RUNTIME_KEYS and k not in left_out]


NOT_NOTED = frozenset({"train.epochs", "train.time_budget", "model.init", "model.init_sha256", "model.init_seed",
                       "data.preset", "train.loss_block", *STATE_KEYS})
"""Settings a resume's note of changes leaves out: the run's length and how it started (their own
notes say so), the recipe's name (its settings are compared one by one; a checkpoint saved before
it was recorded reads as the default's), the loss's row blocks (the same values and gradients),
and the network and optimiser, which a resume cannot change (only write alike). Gradient caching's
chunk is noted: each chunk is normalised by its own BatchNorm statistics, so another chunk is
another step (at a batch of 32, step 1's loss 5.0215 whole, 5.0486 in chunks of 16, 5.1343 of 8)."""


def _note_changed_settings(saved: Config, wanted: Config, step: int, log: Callable[[str], None]) -> None:
    """A resume that trains on with other settings (a temperature, a learning rate, the views) was
    silent, and config.toml then records them as the whole run's: the note names each change and
    the steps that trained without it."""
    changed = _trained_changes(saved, wanted, NOT_NOTED)
    if changed:
        now, then = config_mod.to_flat(wanted), config_mod.to_flat(saved)
        log(f"note: resuming with {', '.join(f'{k} {then[k]!r} -> {now[k]!r}' for k in changed)}: the steps from "
            f"{step + 1} on train with {'it' if len(changed) == 1 else 'them'}, the {step} before with the run's "
            "earlier settings, and config.toml now records the new")  # (not "did not": a run resumed back trained some)


def _note_emptied_state(saved: Config, wanted: Config, log: Callable[[str], None]) -> None:
    """A queue or support set a resume turns on or resizes starts empty (`Objective.load_state_dict`):
    the loss then drops to the level of a batch without them and climbs back as they fill, which
    the note of changed settings alone did not explain."""
    for what, then, now in (("queue", saved.train.queue, wanted.train.queue),
                            ("support set", saved.train.nn_support, wanted.train.nn_support)):
        if not now or now == then:
            continue
        held = f"the {then}-row {what} is not carried over: " if then else ""
        keys = ", and its key network starts as a copy of the network" if what == "queue" else ""
        log(f"note: {held}the {now}-row {what} starts empty{keys}; the loss moves while it fills")


def _note_new_length(saved: Config, cfg: Config, run: Run, was_total: int, log: Callable[[str], None]) -> None:
    """A resume by epochs whose length differs from the checkpoint's (other --epochs, or --epochs over
    the time budget it ran under) trained on a cosine of the new length without a word: the rate
    could jump from the end of a finished budget's decay back near its peak. Says where the run now
    ends and the rate's move. (A run under a budget now: the budget's own lines say so.)"""
    s = run.state
    same = saved.train.epochs == cfg.train.epochs or (not s.step_offset and s.total_steps == was_total)
    if run.budget is not None or (saved.train.time_budget <= 0 and same):
        return
    before = float(run.train_step.optimizer.param_groups[0]["lr"])  # the checkpoint's, its last step's
    after = run.set_lr()
    length = (f"by --epochs {cfg.train.epochs:g}, not the time budget of {saved.train.time_budget:g} min it ran under"
              if saved.train.time_budget > 0 else f"with train.epochs {saved.train.epochs:g} -> {cfg.train.epochs:g}")
    log(f"note: resuming {length}: the run now ends at step {s.total_steps}"
        + ("" if s.step_offset else f", not {was_total}")
        + f", and its learning rate follows the warm-up and cosine of a {cfg.train.epochs:g}-epoch run: "
        f"from {before:.3g} at step {s.step} to {after:.3g} at step {s.step + 1}")


def _note_unused_settings(saved: Config, wanted: Config, log: Callable[[str], None]) -> None:
    """(`saved`: the checkpoint's config with its store path absolute, as `_start` read it.) A finished run resumed with other training settings and nothing left to train: they are
    neither used nor recorded (its config.toml and checkpoint were rewritten with them, so a
    finished run's record named a learning rate it never trained with). Says so."""
    changed = _trained_changes(saved, wanted)
    if changed:
        log(f"note: {', '.join(changed)} differ{'s' * (len(changed) == 1)} from the run's, but it has nothing left to "
            "train: not used, and its config.toml is kept as trained"
            + ("; a finished run trains further only with more --epochs" if "train.time_budget" in changed
               or "train.epochs" in changed else ""))


def _retire_export(run_dir: Path, state: dict[str, Any], log: Callable[[str], None]) -> None:
    """A finished run that trains on (more epochs): its export holds the step it resumes from, and
    `evaluate`, `embed` and `neighbours` would read it over the newer checkpoints to come, so it
    goes until the run ends. An export of other weights (a newer step whose checkpoint is damaged,
    the resume having fallen back to an older one) is their only intact copy and stays."""
    export = run_dir / ENCODER_FILE
    if export.exists() and export_holds(export, state["encoder"]):
        export.unlink()
        log(f"{ENCODER_FILE} removed: it held step {state['step']}, which the run now trains past (the same weights "
            "are in that step's checkpoint); it is written again when the run ends")


def _finish(run: Run, stopped: bool, stop: Callable[[int], bool] | None) -> PretrainResult:
    """Rank 0 exports the encoder and, when the data has labels, runs the linear probe. A stop
    request during the probe (a `stop` with an `interruptible` phase, as the CLI's) ends it at
    once: the encoder is saved, the run reports itself stopped, `fastclr evaluate` probes later."""
    s = run.state
    result = PretrainResult(run.run_dir, s.step, s.train_seconds, None, stopped=stopped, model=run.model, rank=run.ctx.rank,
                            precision=run.precision, stopped_in="training" if stopped else "")
    if isinstance(stop, StopFlag) and not stopped:
        stop.training_over = True  # a signal from here on ends the run once its encoder is saved
    if stopped or not run.ctx.is_main:
        return result  # rank 0 exports and probes alone; the others are done
    if _already_finished(run, result):
        return result
    save_encoder(run.run_dir / ENCODER_FILE, run.model.encoder, run.model.spec, data_content=s.data_content)
    for t in run.metrics_log.trackers:
        t.artifact(run.run_dir / ENCODER_FILE, "encoder")
    wall = run.clock() - run.started
    this = f"{s.step - s.start_step} of them in this process, " if s.start_step else ""  # train_seconds spans resumes
    run.log(f"trained {counted(s.step, 'step')} in {s.train_seconds:.0f} s ({this}{wall:.0f} s with data loading, set-up and "
            f"export); encoder saved to {run.run_dir / ENCODER_FILE}")
    if run.cfg.eval.probe and labelled(run.dataset):
        try:
            with getattr(stop, "interruptible", nullcontext)():
                record, line = final_probe(run.model.encoder, run.dataset, run.model.spec, run.device, run.cfg,
                                           run.precision)
        except StopRequested:
            run.log(f"stopped during the linear probe; the encoder is saved: `fastclr evaluate {run.run_dir}` probes it")
            result.stopped, result.stopped_in = True, "probe"
            return result
        write_json(run.run_dir / "probe.json",  # the weights' checksum: the report tells a probe of older ones
                   dict(record, steps=s.step, train_seconds=s.train_seconds, pretrain_wall_seconds=wall,
                        encoder_sha256=state_checksum(run.model.encoder)))
        for t in run.metrics_log.trackers:
            t.results(numbers(record, "probe/"), s.step)
        result.probe_accuracy = record["accuracy"]
        result.random_init_accuracy = record.get("random_init_accuracy")
        run.log(line)
    return result


def _already_finished(run: Run, result: PretrainResult) -> bool:
    """A finished run resumed with nothing left to train (a `--resume auto` job script run again):
    when its export holds these very weights and its probe.json this step, they stand and are not
    made again (the probe alone took 37 s of a few-step run). Says so, and fills `result` from
    probe.json."""
    s, export = run.state, run.run_dir / ENCODER_FILE
    if s.start_step == 0 or s.step != s.start_step or not export_holds(export, run.model.encoder.state_dict()):
        return False
    probed = run.cfg.eval.probe and labelled(run.dataset)
    try:
        record = read_json(run.run_dir / "probe.json", "") if probed else None
    except (OSError, FastclrError):  # none, or damaged: the probe is made again
        return False
    if probed and (record is None or record.get("steps") != s.step):
        return False
    if record is not None:
        result.probe_accuracy, result.random_init_accuracy = record["accuracy"], record.get("random_init_accuracy")
    run.log(f"{run.run_dir} already finished its {counted(s.step, 'step')}: nothing to train, and its encoder"
            f"{' and probe stand as they were' if record else ' stands as it was'} "
            f"(`fastclr evaluate {run.run_dir}` measures it again)")
    return True


def run_precision(cfg: Config, device: torch.device, ctx: DistContext, log: Callable[[str], None],
                  saved: bool = False) -> Precision:
    """The run's precision, decided once from this machine (under torchrun from every rank's own
    choice, `agree_precision`, so that every rank computes alike and natively), with the reason in
    the log's first line. `saved`: a resumed run keeping the precision its config recorded (said
    so, with the cost where it is emulated)."""
    rows = min(2 * cfg.train.batch_size, 1024)  # a matmul of about the head's shape
    precision = resolve_precision(cfg.train.precision, device, shape=(rows, 1024, 256), warn=log, saved=saved)
    if ctx.active:
        precision = agree_precision([Precision(*c) for c in gather_objects((precision.name, precision.reason), ctx)])
    log(f"precision {precision.name}: {precision.reason}")
    return precision


def _silent(message: str) -> None:
    """The log of ranks other than 0: they reach the same decisions and have nothing to add."""


def _batch_text(cfg: Config, ctx: DistContext) -> str:
    b = cfg.train.batch_size
    return f"batch {b}" if not ctx.active else f"global batch {b} ({ctx.world_size} processes x {b // ctx.world_size})"


def _lr_text(cfg: Config, ctx: DistContext) -> str:
    rule = cfg.optim.lr_scaling
    if not ctx.active:
        return f"{rule} scaling"
    return f"lr {cfg.optim.lr:g} with {rule} scaling to the global batch {cfg.train.batch_size}"


DOWNLOAD_WAIT_S = 24 * 3600.0
"""How long a node's other ranks wait for its download (STL-10's 2.6 GB outlasts the collectives'
10-minute timeout below 4.4 MB/s); the download's own stalls end it sooner."""


def _fetch_once_a_node(data: DataConfig, ctx: DistContext, device: torch.device) -> None:
    """Under several processes a built-in dataset missing here is downloaded by each node's local
    rank 0 while the others wait: every rank fetched the same archives into the same folder (eight
    times the traffic on an 8-GPU node, and one rank refused by the server failed the job). A
    download that fails ends every rank with one line. A dataset decoded once into a mapped file
    (STL-10) is decoded there too, downloads on or off, so that the node's ranks then map the one file
    (each decoding its own, they wrote eight temporaries of 2.9 GB at once on an 8-GPU node)."""
    if not ctx.active:
        return
    fetches = data.name in REGISTRY and (data.download or REGISTRY[data.name].decodes_once)
    # Agreed first: a node given another --data (a typo, a store) went on alone to fail, while the
    # others waited in the download's group for its 24 hours (the ranks' same-data check comes later)
    mine = torch.tensor([int(fetches), -int(fetches)], device=device)
    most, least = (int(v) for v in all_reduce(mine, ctx, "max").tolist())
    if most != -least:
        raise FastclrError(f"rank {ctx.rank}: the ranks were given different data (here --data {data.name}"
                           f"{'' if data.download else ' --no-download'}, and another elsewhere); give every node the "
                           "same command")
    if not fetches:  # a store, or a built-in present and never decoded once
        return
    decodes = REGISTRY[data.name].decodes_once

    def fetch() -> None:
        folder = ensure(data.name, data.root or None, download=data.download)
        if decodes:
            read_checked(data.name, folder)

    what = {(True, False): "downloaded", (True, True): "downloaded or decoded", (False, True): "decoded"}
    did = what[data.download, decodes]
    shared(ctx.local_rank == 0, fetch, ctx, device,
           f"{data.name} could not be {did} (the error of the rank that {did.split()[-1]} it says why)",
           wait_s=DOWNLOAD_WAIT_S)


def _check_same_step(step: int, ctx: DistContext, device: torch.device) -> None:
    """Every rank must have read the same checkpoint (a run directory not shared between nodes
    would otherwise resume ranks from different states); `step` -1: this rank starts afresh, which
    all must (`--resume auto` is decided by each rank: a checkpoint one node sees and another not
    left them in different collectives, hanging until the timeout)."""
    if not ctx.active:
        return
    t = torch.tensor([step, -step], device=device)
    low = all_reduce(t, ctx, "min")
    first, last = int(low[0]), -int(low[1])
    if first == -1 and last != -1:
        raise FastclrError(
            f"some ranks start the run afresh and others resume it from step {last} (a checkpoint some saw and others "
            "did not); the run directory must be on a filesystem that every node sees: run the same command again")
    if first != last:
        raise FastclrError(
            f"ranks resumed from different checkpoints (steps {first} to {last}); the run directory "
            "must be on a filesystem that every node sees, with the same content"
        )
