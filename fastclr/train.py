"""SimCLR pretraining: one explicit loop, top to bottom.

stored uint8 images -> `two_views` on the device -> encoder f -> h -> head g -> z -> NT-Xent.

Determinism: batch t's images are slice t of epoch t // steps_per_epoch's permutation, and its
augmentations come from a generator seeded with (seed, t). Everything random is a function of the
step, so a resumed run replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastclr import config as config_mod
from fastclr.augment import render_views, two_views
from fastclr.checkpoint import latest_valid_checkpoint, remove_stale_temporaries, save_checkpoint
from fastclr.config import Config
from fastclr.cpu_memory import keep_freed_memory
from fastclr.data import Dataset, load_data
from fastclr.determinism import deterministic_kernels, no_host_sync
from fastclr.data.loader import BatchSampler, ImageSource
from fastclr.distributed import (
    DistContext,
    all_reduce,
    broadcast_object,
    env_world,
    is_peer_failure,
    peer_failure,
    process_device,
    setup,
    teardown,
)
from fastclr.errors import FastclrError
from fastclr.evaluation.reference import SMALL_LIFT, untrained_encoder
from fastclr.export import ENCODER_FILE, save_encoder
from fastclr.global_bn import convert_batchnorm
from fastclr.knn import knn_accuracy
from fastclr.models import ProjectionHead, build_encoder, feature_dim, resolve_encoder, use_cifar_stem
from fastclr.optim import build_optimizer
from fastclr.probe import extract_features, linear_probe
from fastclr.progress import Progress
from fastclr.runs import MetricsLog, default_run_dir, prepare_run_dir, write_config, write_json
from fastclr.schedule import TimeBudget, lr_at, scaled_lr
from fastclr.runtime import Precision, resolve_precision, select_device, set_threads, use_compile
from fastclr.step import SimCLRNet, TrainStep


def channel_stats(images: np.ndarray, limit: int = 20000, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (float32 (C,)) of uint8 (N, H, W, C) images scaled to [0, 1],
    from an evenly spaced subset of at most `limit` images (exact for N <= limit).

    Sums are accumulated chunk by chunk in float64, so a memory-mapped store larger than RAM
    is read a few hundred rows at a time."""
    idx = np.arange(0, len(images), max(1, len(images) // limit))
    c = images.shape[-1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(idx), chunk):
        x = np.asarray(images[idx[start : start + chunk]], dtype=np.float64).reshape(-1, c) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += x.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0)).clip(1e-3)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def augment_seed(seed: int, step: int) -> int:
    """Seed of step `step`'s augmentation generator."""
    return (seed * 2_654_435_761 + step * 40_503 + 1) % (2**63 - 1)


def validate(cfg: Config, n_images: int, world_size: int = 1) -> None:
    """One-line errors for settings that cannot work."""
    t = cfg.train
    if world_size > 1 and t.batch_size % world_size:
        raise FastclrError(
            f"batch size {t.batch_size} (the global batch) does not split evenly over {world_size} processes; "
            f"pass --batch-size {max(1, t.batch_size // world_size) * world_size}"
        )
    use_compile(t.compile, torch.device("cpu"))  # a bad setting fails here, before anything is written
    if t.loss_block < 0 or t.grad_cache_chunk < 0:
        raise FastclrError("loss_block and grad_cache_chunk must be >= 0 (0 turns them off)")
    if t.temperature <= 0:
        raise FastclrError(f"temperature must be > 0, got {t.temperature}; the paper uses 0.1 to 0.5 (e.g. --temperature 0.2)")
    if t.batch_size < 2:
        raise FastclrError(f"batch size must be at least 2 (one negative pair), got {t.batch_size}")
    if t.batch_size > n_images:
        raise FastclrError(
            f"batch size {t.batch_size} is larger than the dataset ({n_images} images); pass --batch-size {n_images} or less"
        )
    if t.epochs <= 0 and t.time_budget <= 0:
        raise FastclrError("nothing to train: set --epochs > 0 or --time-budget > 0 (minutes)")
    if cfg.optim.lr <= 0:
        raise FastclrError(f"learning rate must be > 0, got {cfg.optim.lr}")
    if cfg.model.proj_dim < 1 or cfg.model.head_layers < 1:
        raise FastclrError("proj_dim and head_layers must be >= 1")


@dataclass
class Model:
    """The trainable pair (f, g) and what is needed to rebuild and feed f."""

    encoder: nn.Module
    head: nn.Module
    info: dict[str, Any]
    """encoder name, in_channels, image_size, width, cifar_stem, feature_dim, mean, std."""


def build_model(cfg: Config, dataset: Dataset, device: torch.device, encoder: nn.Module | None = None) -> Model:
    """Build (or adopt a user's) encoder and the projection head for `dataset`."""
    h, w, c = dataset.image_shape
    size = cfg.augment.crop_size or h
    mean, std = channel_stats(dataset.pretrain.images)
    if encoder is None:
        name = resolve_encoder(cfg.model.encoder, size)
        encoder = build_encoder(name, c, size, cfg.model.width, cfg.model.cifar_stem, cfg.model.cnn_stages)
        stem = "on" if use_cifar_stem(cfg.model.cifar_stem, size) else "off"
    else:
        name, stem = "custom", "n/a"
    encoder = encoder.to(device)
    dim = feature_dim(encoder, c, size)
    head = ProjectionHead(dim, cfg.model.head_hidden or dim, cfg.model.proj_dim, cfg.model.head_layers, cfg.model.head_bn)
    head = head.to(device)
    if cfg.train.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    info = dict(encoder=name, in_channels=c, image_size=size, width=cfg.model.width, cifar_stem=stem,
                feature_dim=dim, mean=mean.tolist(), std=std.tolist())
    if name == "cnn":
        info["stages"] = cfg.model.cnn_stages  # so the export rebuilds this shape whatever the default becomes
    return Model(encoder, head, info)


@dataclass
class PretrainResult:
    """What `pretrain` returns."""

    run_dir: Path
    steps: int
    train_seconds: float
    probe_accuracy: float | None
    stopped: bool = False
    """True when `stop` ended the run early (a checkpoint was written)."""
    model: Model | None = None
    rank: int = 0
    """This process's rank; only rank 0 wrote files and has the probe accuracy."""
    precision: Precision | None = None
    """The precision the run resolved and trained in."""
    random_init_accuracy: float | None = None
    """The same probe on the same network at its initial weights (eval.untrained_reference)."""


RESUME_KEYS = ("data.name", "model.encoder", "model.width", "model.cnn_stages", "model.cifar_stem", "model.head_layers",
               "model.head_hidden", "model.head_bn", "model.proj_dim", "train.batch_size", "optim.optimizer")


def _check_resume_config(saved: Config, wanted: Config, allow_changes: bool) -> None:
    changed = config_mod.diff(saved, wanted, RESUME_KEYS)
    if changed and not allow_changes:
        raise FastclrError(
            f"cannot resume: {', '.join(changed)} differ from the checkpoint's config; drop those flags, "
            "or pass --allow-config-change to change them deliberately"
        )


class NonFiniteLoss(FastclrError):
    """The loss or gradient became NaN/inf."""


def pretrain(
    cfg: Config,
    *,
    resume: Path | None = None,
    allow_config_change: bool = False,
    encoder: nn.Module | None = None,
    dataset: Dataset | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop: Callable[[int], bool] | None = None,
) -> PretrainResult:
    """Run SimCLR pretraining as configured; returns the run directory and the probe accuracy.

    resume: a run directory to continue from its newest valid checkpoint (config from the run,
    overridden by `cfg` only where `allow_config_change` or the key is not in RESUME_KEYS).
    encoder: any `nn.Module` mapping (B, C, S, S) to (B, D) to train instead of a named one.
    stop: called after every step with the step count; when it returns True the run writes a
    checkpoint and returns early (`PretrainResult.stopped`), to be continued with `resume`.

    Under torchrun (WORLD_SIZE > 1 in the environment) every process calls this: they form one
    process group, train with DistributedDataParallel on disjoint shares of each global batch of
    `train.batch_size` images, and rank 0 alone writes the run directory and logs. Under several
    processes `stop` is consulted every `log_every` steps (and at checkpoints), and every rank
    stops at the same step.
    """
    set_threads(cfg.train.threads)
    if cfg.train.keep_memory:
        keep_freed_memory()
    _, world, local_rank = env_world()
    device = select_device(process_device(cfg.train.device, local_rank, world))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = setup(device, cfg.train.dist_timeout)
    try:
        main_log = log if ctx.is_main else _silent
        precision = run_precision(cfg, device, ctx, main_log)
        # The resolved precision is what the run's config records (and a resume reuses).
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision.name))
        with deterministic_kernels(cfg.train.deterministic and device.type == "cuda"):
            return _pretrain(cfg, ctx, device, precision, resume, allow_config_change, encoder, dataset,
                             main_log, progress and ctx.is_main, stop)
    except Exception as e:
        if ctx.active and is_peer_failure(e):
            raise peer_failure(ctx, e, resume or cfg.train.run_dir or "the run directory") from None
        raise
    finally:
        teardown(ctx)


def run_precision(cfg: Config, device: torch.device, ctx: DistContext, log: Callable[[str], None]) -> Precision:
    """The run's precision, decided once from this machine (rank 0's choice under torchrun, so
    that every rank computes alike), with the reason in the log's first line."""
    rows = min(2 * cfg.train.batch_size, 1024)  # a matmul of about the head's shape
    precision = resolve_precision(cfg.train.precision, device, shape=(rows, 1024, 256), warn=log)
    if ctx.active:
        name, reason = broadcast_object((precision.name, precision.reason), ctx)
        precision = Precision(name, reason)
    log(f"precision {precision.name}: {precision.reason}")
    return precision


def _silent(message: str) -> None:
    """The log of ranks other than 0: they reach the same decisions and have nothing to add."""


def _pretrain(
    cfg: Config,
    ctx: DistContext,
    device: torch.device,
    precision: Precision,
    resume: Path | None,
    allow_config_change: bool,
    encoder: nn.Module | None,
    dataset: Dataset | None,
    log: Callable[[str], None],
    progress: bool,
    stop: Callable[[int], bool] | None,
) -> PretrainResult:
    started = time.perf_counter()  # pretraining wall time: data, set-up, loop and export
    state: dict[str, Any] | None = None
    if resume is not None:
        # Every rank reads the same file, so the run directory must be on a filesystem all nodes see.
        ckpt_path, state = latest_valid_checkpoint(resume, warn=log)
        saved = config_mod.from_dict(state["config"])
        _check_resume_config(saved, cfg, allow_config_change)
        run_dir = resume
        _check_same_step(int(state["step"]), ctx, device)
        log(f"resuming {run_dir} from {ckpt_path.name} (step {state['step']})")
    else:
        run_dir = Path(broadcast_object(str(cfg.train.run_dir or default_run_dir(cfg)), ctx))

    if dataset is None:
        dataset = load_data(cfg.data)
    validate(cfg, len(dataset.pretrain), ctx.world_size)
    if ctx.is_main:
        # Only now, with the data and settings known good, does the run directory come into being.
        prepare_run_dir(run_dir)
        for p in remove_stale_temporaries(run_dir):
            log(f"removed {p.name}, left by a checkpoint write that was interrupted")
    torch.manual_seed(cfg.train.seed)  # the initial weights are a function of the seed
    model = build_model(cfg, dataset, device, encoder)
    t = cfg.train
    if ctx.active and t.sync_bn:
        model.encoder = convert_batchnorm(model.encoder, device)
        model.head = convert_batchnorm(model.head, device)
    enc, head = model.encoder, model.head
    mean = torch.tensor(model.info["mean"], device=device)
    std = torch.tensor(model.info["std"], device=device)

    per_rank = t.batch_size // ctx.world_size
    source = ImageSource(dataset.pretrain.images, device)
    sampler = BatchSampler(len(source), per_rank, t.seed, device, ctx.rank, ctx.world_size)
    spe = sampler.steps_per_epoch
    peak_lr = scaled_lr(cfg.optim.lr, t.batch_size, cfg.optim.lr_scaling)  # scaled with the global batch
    opt = build_optimizer(cfg.optim.optimizer, [enc, head], peak_lr, cfg.optim.weight_decay, cfg.optim.momentum,
                          cfg.optim.trust_coefficient)
    total_steps = max(1, int(round(t.epochs * spe)))
    step = 0
    if state is not None:
        enc.load_state_dict(state["encoder"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        # A time-budgeted run keeps the step count it fitted; otherwise --epochs may extend a run.
        total_steps = int(state["total_steps"]) if t.time_budget > 0 else total_steps
        train_seconds = float(state.get("train_seconds", 0.0))
    else:
        train_seconds = 0.0
    net: nn.Module = SimCLRNet(enc, head)
    no_sync: Callable[[], AbstractContextManager[object]] = nullcontext
    if ctx.active:
        # Buffers are not broadcast: with global BN they agree anyway; without it, rank 0's are saved.
        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)
        net, no_sync = ddp, ddp.no_sync
    budget = TimeBudget(t.time_budget * 60) if t.time_budget > 0 else None
    warmup = int(round(cfg.optim.warmup_epochs * spe))
    if ctx.is_main:
        write_config(run_dir, cfg)
    metrics_log = MetricsLog(run_dir, enabled=ctx.is_main)
    log(f"run {run_dir}: {model.info['encoder']} (h: {model.info['feature_dim']}-d) on {dataset.name} "
        f"({len(source)} images {dataset.image_shape}), {_batch_text(cfg, ctx)}, {spe} steps/epoch, "
        f"peak lr {peak_lr:g} ({_lr_text(cfg, ctx)}), {precision.name} on {device}{_memory_text(cfg)}")

    compiled = use_compile(t.compile, device)
    # --compile fuses the augmentation's pixel work (crop/flip/resize, jitter, blur, solarize,
    # normalise) and the model's BatchNorm/ReLU/add chains into a few kernels; the random draws
    # and the loss stay eager. The loss is 0.1-0.3 ms of a 20 ms ResNet-18 step on an H100, and
    # compiled together with the model and the metrics, Triton 3.6 (torch 2.11) failed to build
    # its fused nll_loss kernel for a batch-512 Fashion-MNIST run.
    render = torch.compile(render_views) if compiled else render_views
    if compiled:
        net = torch.compile(net)
    train_step = TrainStep(net, opt, precision, device, temperature=t.temperature, loss_block=t.loss_block,
                           grad_cache_chunk=t.grad_cache_chunk, ctx=ctx, no_sync=no_sync)
    if state is not None:
        train_step.load_state_dict(state.get("loss_scaler", {}))
    gen = torch.Generator(device=device)
    bar = Progress(total_steps, step, enabled=progress)
    acc: dict[str, torch.Tensor] = {}
    window_start, window_steps = time.perf_counter(), 0
    first_bad = torch.tensor(-1, device=device)
    skip_streak = torch.zeros((), device=device)  # consecutive updates skipped by loss scaling
    monitor_seconds = 0.0
    net.train()

    def checkpoint() -> None:
        bad = int(first_bad)
        if bad >= 0:
            raise NonFiniteLoss(_nonfinite_message(bad, cfg, run_dir))
        if not ctx.is_main:
            return
        save_checkpoint(run_dir, {
            "step": step, "total_steps": total_steps, "train_seconds": train_seconds,
            "config": config_mod.to_dict(cfg), "encoder": enc.state_dict(), "head": head.state_dict(),
            "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "model_info": model.info,
            "loss_scaler": train_step.state_dict(),
        })

    labelled = dataset.train is not None and dataset.test is not None
    if not labelled and (cfg.eval.probe or cfg.eval.monitor_every):
        log(f"{dataset.name} has no labelled train/test split: the kNN monitor and the linear probe are skipped")
    loop_start = time.perf_counter() - train_seconds
    first_step = step
    try:
        while step < total_steps:
            lr = lr_at(step, total_steps, warmup, peak_lr, cfg.optim.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            # The step itself never waits for the device: metrics stay on it until a log step.
            # (Checked from the third step of this process on: the first ones compile and warm up.)
            with no_host_sync(device, t.check_sync and step >= first_step + 2):
                gen.manual_seed(augment_seed(t.seed, step))
                images = source.gather(sampler.indices(step))
                if ctx.active:
                    views = two_views(images, cfg.augment, gen, mean, std, t.channels_last, t.batch_size,
                                      ctx.rank * per_rank, render)
                else:
                    views = two_views(images, cfg.augment, gen, mean, std, t.channels_last, render=render)
                out = train_step(views)
                # Under loss scaling an overflowing gradient is an expected, skipped step; a
                # non-finite loss, or MAX_SKIP_STREAK overflows in a row, is not.
                skip_streak = (skip_streak + 1) * out.skipped
                finite = torch.isfinite(out.loss) & (torch.isfinite(out.grad_norm) | (out.skipped > 0)) & (
                    skip_streak < MAX_SKIP_STREAK)
                # 1-based: the count of the step whose loss was bad, as `step` is counted in the logs.
                first_bad = torch.where((~finite) & (first_bad < 0), step + 1, first_bad)
                grad_norm = torch.where(out.skipped > 0, torch.zeros_like(out.grad_norm), out.grad_norm)
                _accumulate(acc, {"loss": out.loss, "grad_norm": grad_norm, "skipped": out.skipped, **out.metrics})
            step += 1
            window_steps += 1
            train_seconds = time.perf_counter() - loop_start

            end_of_epoch = step % spe == 0
            if budget is not None:
                budget.observe(step, train_seconds)
                if budget.due(step, total_steps, end_of_epoch, resumed=state is not None):
                    # Rank 0's clock rules, so every rank runs the same number of steps.
                    total_steps = broadcast_object(budget.fit(step, train_seconds), ctx)
                    bar.total = total_steps
                    if state is None and step == budget.first_fit:
                        log(f"time budget {t.time_budget:g} min: {total_steps} steps ({total_steps / spe:.1f} epochs) "
                            f"at {budget.pace(step, train_seconds) * 1000:.0f} ms/step; refitted every "
                            f"{budget.refit_every} steps")
            log_now = step % t.log_every == 0 or step == total_steps
            checkpoint_now = bool(t.checkpoint_every and step % t.checkpoint_every == 0) or (
                not t.checkpoint_every and end_of_epoch)
            stop_now = False
            if ctx.active and (log_now or checkpoint_now):
                # Decisions every rank must share, taken where the host waits for the device anyway:
                # the first non-finite step anywhere, and whether any rank was asked to stop.
                first_bad, stop_now = _agree(first_bad, stop is not None and step < total_steps and stop(step), ctx)

            if log_now:
                if int(first_bad) >= 0:
                    raise NonFiniteLoss(_nonfinite_message(int(first_bad), cfg, run_dir))
                now = time.perf_counter()
                rec = {k: float(v) / window_steps for k, v in _mean_over_ranks(acc, ctx).items()}
                rec["skipped"] = round(rec["skipped"] * window_steps)  # a count of steps, not a mean
                if precision.loss_scaling:
                    rec["loss_scale"] = train_step.loss_scale()
                rec.update(step=step, epoch=step / spe, lr=lr, elapsed=train_seconds,
                           pairs_per_s=window_steps * t.batch_size / max(now - window_start, 1e-9))
                metrics_log.log(rec)
                bar.update(step, f"loss {rec['loss']:.3f} top1 {rec['top1']:.3f} {2 * rec['pairs_per_s']:.0f} img/s")
                acc, window_start, window_steps = {}, now, 0

            if checkpoint_now:
                checkpoint()
            if (end_of_epoch and cfg.eval.monitor_every and (step // spe) % cfg.eval.monitor_every == 0
                    and dataset.train is not None and ctx.is_main
                    and monitor_seconds <= cfg.eval.monitor_share * train_seconds):
                # Rank 0 alone; the others wait for it in the next step's collectives (dist_timeout).
                # Its time counts (the time budget is pretraining wall time), so passes are skipped
                # while they have cost more than `monitor_share` of it: sized by what this machine
                # measures, whatever its speed relative to the step.
                m0 = time.perf_counter()
                knn = monitor_knn(enc, dataset, mean, std, device, cfg, precision)
                monitor_seconds += time.perf_counter() - m0
                metrics_log.log({"step": step, "epoch": step / spe, "knn_acc": knn})
                log(f"epoch {step // spe}: kNN monitor accuracy {knn:.4f}")
            if not ctx.active:
                stop_now = stop is not None and step < total_steps and stop(step)
            if stop_now:
                checkpoint()
                log(f"stopped at step {step}; continue with `fastclr pretrain --resume {run_dir}`")
                return PretrainResult(run_dir, step, train_seconds, None, stopped=True, model=model, rank=ctx.rank,
                                      precision=precision)
        train_seconds = time.perf_counter() - loop_start  # with the last epoch's monitor pass
        checkpoint()
    finally:
        bar.close()
        metrics_log.close()

    result = PretrainResult(run_dir, step, train_seconds, None, model=model, rank=ctx.rank, precision=precision)
    if not ctx.is_main:
        return result  # rank 0 exports and probes alone; the others are done
    save_encoder(run_dir / ENCODER_FILE, enc, model.info)
    wall = time.perf_counter() - started
    log(f"trained {step} steps in {train_seconds:.0f} s ({wall:.0f} s with data loading, set-up and export); "
        f"encoder saved to {run_dir / ENCODER_FILE}")
    if cfg.eval.probe and dataset.train is not None and dataset.test is not None:
        t0 = time.perf_counter()
        res = probe_encoder(enc, dataset, mean, std, device, cfg, precision)
        record = {"accuracy": res.accuracy, "l2": res.l2, "val_accuracy": res.val_accuracy,
                  "train_accuracy": res.train_accuracy, "steps": step, "train_seconds": train_seconds,
                  "pretrain_wall_seconds": wall}
        versus = ""
        if cfg.eval.untrained_reference and model.info["encoder"] != "custom":
            untrained = untrained_encoder(model.info, cfg.train.seed, device)
            ref = probe_encoder(untrained, dataset, mean, std, device, cfg, precision)
            record.update(random_init_accuracy=ref.accuracy, lift=res.accuracy - ref.accuracy)
            flag = "; SMALL: most of it is the architecture's" if res.accuracy - ref.accuracy < SMALL_LIFT else ""
            versus = (f" (the same network untrained: {ref.accuracy * 100:.2f}%, lift "
                      f"{(res.accuracy - ref.accuracy) * 100:+.2f} points{flag})")
        record["probe_seconds"] = time.perf_counter() - t0
        write_json(run_dir / "probe.json", record)
        result.probe_accuracy = res.accuracy
        result.random_init_accuracy = record.get("random_init_accuracy")
        log(f"linear probe accuracy (frozen h, {dataset.name} test split): {res.accuracy * 100:.2f}%{versus}")
    return result


def _batch_text(cfg: Config, ctx: DistContext) -> str:
    b = cfg.train.batch_size
    return f"batch {b}" if not ctx.active else f"global batch {b} ({ctx.world_size} processes x {b // ctx.world_size})"


def _lr_text(cfg: Config, ctx: DistContext) -> str:
    rule = cfg.optim.lr_scaling
    if not ctx.active:
        return f"{rule} scaling"
    return f"lr {cfg.optim.lr:g} with {rule} scaling to the global batch {cfg.train.batch_size}"


def _memory_text(cfg: Config) -> str:
    t = cfg.train
    parts = ([f"NT-Xent in row blocks of {t.loss_block}"] if t.loss_block else []) + (
        [f"gradient caching in chunks of {t.grad_cache_chunk} images"] if t.grad_cache_chunk else [])
    return "".join(f", {p}" for p in parts)


def _agree(first_bad: torch.Tensor, stop_vote: bool, ctx: DistContext) -> tuple[torch.Tensor, bool]:
    """The earliest non-finite step on any rank (-1: none) and whether any rank votes to stop."""
    never = torch.iinfo(torch.long).max
    mine = torch.stack([torch.where(first_bad < 0, never, first_bad), torch.tensor(-int(stop_vote), device=first_bad.device)])
    low = all_reduce(mine, ctx, "min")  # one collective for both: (2,)
    bad = torch.where(low[0] == never, -1, low[0])
    return bad, bool(low[1] < 0)


def _mean_over_ranks(acc: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, torch.Tensor]:
    """Window sums averaged over ranks: each rank's loss is the mean over its anchors, so the
    average is the loss of the global batch."""
    if not ctx.active or not acc:
        return acc
    keys = sorted(acc)
    total = all_reduce(torch.stack([acc[k].float() for k in keys]), ctx, "sum") / ctx.world_size
    return dict(zip(keys, total.unbind()))


def _check_same_step(step: int, ctx: DistContext, device: torch.device) -> None:
    """Every rank must have read the same checkpoint (a run directory not shared between nodes
    would otherwise resume ranks from different states)."""
    if not ctx.active:
        return
    t = torch.tensor([step, -step], device=device)
    low = all_reduce(t, ctx, "min")
    if int(low[0]) != -int(low[1]):
        raise FastclrError(
            f"ranks resumed from different checkpoints (steps {int(low[0])} to {-int(low[1])}); the run directory "
            "must be on a filesystem that every node sees, with the same content"
        )


def _accumulate(acc: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    for k, v in values.items():
        acc[k] = acc[k] + v if k in acc else v.clone()


def _nonfinite_message(step: int, cfg: Config, run_dir: Path) -> str:
    return (
        f"non-finite loss or gradient at step {step}; the last good checkpoint in {run_dir} is kept. Try a higher temperature "
        f"(now {cfg.train.temperature}), a lower learning rate (now {cfg.optim.lr}) or --precision fp32 "
        f"(now {cfg.train.precision}), then resume with --resume {run_dir} --allow-config-change"
    )


MONITOR_BANK, MONITOR_QUERIES = 10000, 2000
MAX_SKIP_STREAK = 30
"""Updates skipped in a row by loss scaling before the run stops: each halves the scale, so by
then it has fallen 2^30-fold and the gradients are not overflowing but broken."""


def monitor_knn(enc: nn.Module, dataset: Dataset, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                cfg: Config, precision: Precision) -> float:
    """kNN accuracy on fixed subsets (10k training images as the bank, 2k test queries): cheap
    enough to run every epoch, and comparable from epoch to epoch."""
    assert dataset.train is not None and dataset.test is not None and dataset.train.labels is not None
    assert dataset.test.labels is not None
    tr = np.linspace(0, len(dataset.train) - 1, min(MONITOR_BANK, len(dataset.train))).astype(np.int64)
    te = np.linspace(0, len(dataset.test) - 1, min(MONITOR_QUERIES, len(dataset.test))).astype(np.int64)
    kw = dict(precision=precision, size=cfg.augment.crop_size, channels_last=cfg.train.channels_last)
    ftr = extract_features(enc, dataset.train.images[tr], mean, std, device, **kw)
    fte = extract_features(enc, dataset.test.images[te], mean, std, device, **kw)
    return knn_accuracy(ftr, torch.from_numpy(dataset.train.labels[tr]), fte, torch.from_numpy(dataset.test.labels[te]),
                        k=cfg.eval.knn_k, precision=precision)


def probe_encoder(enc: nn.Module, dataset: Dataset, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                  cfg: Config, precision: Precision) -> Any:
    """Linear probe on frozen h: all labelled training images, accuracy on the test split."""
    assert dataset.train is not None and dataset.test is not None
    assert dataset.train.labels is not None and dataset.test.labels is not None
    kw = dict(precision=precision, size=cfg.augment.crop_size, channels_last=cfg.train.channels_last)
    ftr = extract_features(enc, dataset.train.images, mean, std, device, **kw)
    fte = extract_features(enc, dataset.test.images, mean, std, device, **kw)
    return linear_probe(ftr, torch.from_numpy(dataset.train.labels), fte, torch.from_numpy(dataset.test.labels),
                        feature_dtype=precision.feature_dtype)
