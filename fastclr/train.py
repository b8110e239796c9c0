"""SimCLR pretraining: one explicit loop, top to bottom.

stored uint8 images -> `two_views` on the device -> encoder f -> h -> head g -> z -> NT-Xent.

Determinism: batch t's images are slice t of epoch t // steps_per_epoch's permutation, and its
augmentations come from a generator seeded with (seed, t). Everything random is a function of the
step, so a resumed run replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastclr import config as config_mod
from fastclr.augment import two_views
from fastclr.checkpoint import latest_valid_checkpoint, remove_stale_temporaries, save_checkpoint
from fastclr.config import Config
from fastclr.data import Dataset, load_data
from fastclr.data.loader import BatchSampler, ImageSource
from fastclr.errors import FastclrError
from fastclr.export import ENCODER_FILE, save_encoder
from fastclr.knn import knn_accuracy
from fastclr.losses import contrastive_metrics, nt_xent_logits
from fastclr.models import ProjectionHead, build_encoder, feature_dim, resolve_encoder, use_cifar_stem
from fastclr.optim import build_optimizer
from fastclr.probe import extract_features, linear_probe
from fastclr.progress import Progress
from fastclr.runs import MetricsLog, default_run_dir, prepare_run_dir, write_config, write_json
from fastclr.schedule import lr_at, scaled_lr


def select_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FastclrError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FastclrError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise FastclrError("precision fp16 needs a CUDA device; use --precision bf16 on CPU")
        return torch.float16
    raise FastclrError(f"unknown precision {precision!r}; choose bf16, fp16 or fp32")


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


def validate(cfg: Config, n_images: int) -> None:
    """One-line errors for settings that cannot work."""
    t = cfg.train
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
        encoder = build_encoder(name, c, size, cfg.model.width, cfg.model.cifar_stem)
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


RESUME_KEYS = ("data.name", "model.encoder", "model.width", "model.cifar_stem", "model.head_layers", "model.head_hidden",
               "model.head_bn", "model.proj_dim", "train.batch_size", "optim.optimizer")


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
    """
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = select_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.precision, device)

    state: dict[str, Any] | None = None
    if resume is not None:
        ckpt_path, state = latest_valid_checkpoint(resume, warn=log)
        saved = config_mod.from_dict(state["config"])
        _check_resume_config(saved, cfg, allow_config_change)
        run_dir = resume
        log(f"resuming {run_dir} from {ckpt_path.name} (step {state['step']})")
    else:
        run_dir = Path(cfg.train.run_dir) if cfg.train.run_dir else default_run_dir(cfg)

    if dataset is None:
        dataset = load_data(cfg.data)
    validate(cfg, len(dataset.pretrain))
    # Only now, with the data and settings known good, does the run directory come into being.
    prepare_run_dir(run_dir)
    for p in remove_stale_temporaries(run_dir):
        log(f"removed {p.name}, left by a checkpoint write that was interrupted")
    torch.manual_seed(cfg.train.seed)  # the initial weights are a function of the seed
    model = build_model(cfg, dataset, device, encoder)
    enc, head = model.encoder, model.head
    mean = torch.tensor(model.info["mean"], device=device)
    std = torch.tensor(model.info["std"], device=device)

    t = cfg.train
    source = ImageSource(dataset.pretrain.images, device)
    sampler = BatchSampler(len(source), t.batch_size, t.seed, device)
    spe = sampler.steps_per_epoch
    peak_lr = scaled_lr(cfg.optim.lr, t.batch_size, cfg.optim.lr_scaling)
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
    budget_fixed = state is not None or t.time_budget <= 0
    warmup = int(round(cfg.optim.warmup_epochs * spe))
    write_config(run_dir, cfg)
    metrics_log = MetricsLog(run_dir)
    log(f"run {run_dir}: {model.info['encoder']} (h: {model.info['feature_dim']}-d) on {dataset.name} "
        f"({len(source)} images {dataset.image_shape}), batch {t.batch_size}, {spe} steps/epoch, "
        f"peak lr {peak_lr:g} ({cfg.optim.lr_scaling} scaling), {amp or torch.float32} on {device}")

    train_fn = torch.compile(_forward_loss) if t.compile else _forward_loss
    params = [p for m in (enc, head) for p in m.parameters() if p.requires_grad]
    gen = torch.Generator(device=device)
    bar = Progress(total_steps, step, enabled=progress)
    acc: dict[str, torch.Tensor] = {}
    window_start, window_steps = time.perf_counter(), 0
    first_bad = torch.tensor(-1, device=device)
    enc.train()
    head.train()

    def checkpoint() -> None:
        bad = int(first_bad)
        if bad >= 0:
            raise NonFiniteLoss(_nonfinite_message(bad, cfg, run_dir))
        save_checkpoint(run_dir, {
            "step": step, "total_steps": total_steps, "train_seconds": train_seconds,
            "config": config_mod.to_dict(cfg), "encoder": enc.state_dict(), "head": head.state_dict(),
            "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "model_info": model.info,
        })

    labelled = dataset.train is not None and dataset.test is not None
    if not labelled and (cfg.eval.probe or cfg.eval.monitor_every):
        log(f"{dataset.name} has no labelled train/test split: the kNN monitor and the linear probe are skipped")
    loop_start = time.perf_counter() - train_seconds
    pace_start = loop_start
    try:
        while step < total_steps:
            lr = lr_at(step, total_steps, warmup, peak_lr, cfg.optim.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            gen.manual_seed(augment_seed(t.seed, step))
            images = source.gather(sampler.indices(step))
            views = two_views(images, cfg.augment, gen, mean, std, t.channels_last)
            loss, logits, target = train_fn(enc, head, views, t.temperature, amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            opt.step()
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            # 1-based: the count of the step whose loss was bad, as `step` is counted in the logs.
            first_bad = torch.where((~finite) & (first_bad < 0), torch.tensor(step + 1, device=device), first_bad)
            _accumulate(acc, {"loss": loss.detach(), "grad_norm": grad_norm, **contrastive_metrics(logits.detach(), target)})
            step += 1
            window_steps += 1
            train_seconds = time.perf_counter() - loop_start

            if not budget_fixed and step == 15:
                # Fit the cosine to the wall-clock budget from the measured pace of steps 5..15
                # (the first steps include one-off allocation and warm-up costs).
                pace = (time.perf_counter() - pace_start) / 10
                total_steps = step + max(1, int((t.time_budget * 60 - train_seconds) / pace))
                budget_fixed = True
                bar.total = total_steps
                log(f"time budget {t.time_budget:g} min: {total_steps} steps ({total_steps / spe:.1f} epochs) at {pace * 1000:.0f} ms/step")
            if step == 5:
                pace_start = time.perf_counter()

            if step % t.log_every == 0 or step == total_steps:
                if int(first_bad) >= 0:
                    raise NonFiniteLoss(_nonfinite_message(int(first_bad), cfg, run_dir))
                now = time.perf_counter()
                rec = {k: float(v) / window_steps for k, v in acc.items()}
                rec.update(step=step, epoch=step / spe, lr=lr, elapsed=train_seconds,
                           pairs_per_s=window_steps * t.batch_size / max(now - window_start, 1e-9))
                metrics_log.log(rec)
                bar.update(step, f"loss {rec['loss']:.3f} top1 {rec['top1']:.3f} {2 * rec['pairs_per_s']:.0f} img/s")
                acc, window_start, window_steps = {}, now, 0

            end_of_epoch = step % spe == 0
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or (not t.checkpoint_every and end_of_epoch):
                checkpoint()
            if end_of_epoch and cfg.eval.monitor_every and (step // spe) % cfg.eval.monitor_every == 0 and dataset.train is not None:
                pause = time.perf_counter()
                knn = monitor_knn(enc, dataset, mean, std, device, cfg)
                metrics_log.log({"step": step, "epoch": step / spe, "knn_acc": knn})
                log(f"epoch {step // spe}: kNN monitor accuracy {knn:.4f}")
                loop_start += time.perf_counter() - pause  # monitoring is not training time
            if stop is not None and step < total_steps and stop(step):
                checkpoint()
                log(f"stopped at step {step}; continue with `fastclr pretrain --resume {run_dir}`")
                return PretrainResult(run_dir, step, train_seconds, None, stopped=True, model=model)
        checkpoint()
    finally:
        bar.close()
        metrics_log.close()

    save_encoder(run_dir / ENCODER_FILE, enc, model.info)
    log(f"trained {step} steps in {train_seconds:.0f} s; encoder saved to {run_dir / ENCODER_FILE}")
    result = PretrainResult(run_dir, step, train_seconds, None, model=model)
    if cfg.eval.probe and dataset.train is not None and dataset.test is not None:
        t0 = time.perf_counter()
        res = probe_encoder(enc, dataset, mean, std, device, cfg)
        write_json(run_dir / "probe.json", {"accuracy": res.accuracy, "l2": res.l2, "val_accuracy": res.val_accuracy,
                                             "train_accuracy": res.train_accuracy, "steps": step,
                                             "train_seconds": train_seconds, "probe_seconds": time.perf_counter() - t0})
        result.probe_accuracy = res.accuracy
        log(f"linear probe accuracy (frozen h, {dataset.name} test split): {res.accuracy * 100:.2f}%")
    return result


def _forward_loss(
    enc: nn.Module, head: nn.Module, views: torch.Tensor, temperature: float, amp: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both views through f and g as one batch (so BatchNorm sees all 2N), then NT-Xent in fp32."""
    with torch.autocast(views.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        z = head(enc(views))  # (2N, proj_dim)
    z1, z2 = z.chunk(2)
    logits, target = nt_xent_logits(z1, z2, temperature)
    loss = torch.nn.functional.cross_entropy(logits, target)
    return loss, logits, target


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


def monitor_knn(enc: nn.Module, dataset: Dataset, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                cfg: Config) -> float:
    """kNN accuracy on fixed subsets (10k training images as the bank, 2k test queries): cheap
    enough to run every epoch, and comparable from epoch to epoch."""
    assert dataset.train is not None and dataset.test is not None and dataset.train.labels is not None
    assert dataset.test.labels is not None
    tr = np.linspace(0, len(dataset.train) - 1, min(MONITOR_BANK, len(dataset.train))).astype(np.int64)
    te = np.linspace(0, len(dataset.test) - 1, min(MONITOR_QUERIES, len(dataset.test))).astype(np.int64)
    kw = dict(precision=cfg.train.precision, size=cfg.augment.crop_size, channels_last=cfg.train.channels_last)
    ftr = extract_features(enc, dataset.train.images[tr], mean, std, device, **kw)
    fte = extract_features(enc, dataset.test.images[te], mean, std, device, **kw)
    return knn_accuracy(ftr, torch.from_numpy(dataset.train.labels[tr]), fte, torch.from_numpy(dataset.test.labels[te]),
                        k=cfg.eval.knn_k)


def probe_encoder(enc: nn.Module, dataset: Dataset, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                  cfg: Config) -> Any:
    """Linear probe on frozen h: all labelled training images, accuracy on the test split."""
    assert dataset.train is not None and dataset.test is not None
    assert dataset.train.labels is not None and dataset.test.labels is not None
    kw = dict(precision=cfg.train.precision, size=cfg.augment.crop_size, channels_last=cfg.train.channels_last)
    ftr = extract_features(enc, dataset.train.images, mean, std, device, **kw)
    fte = extract_features(enc, dataset.test.images, mean, std, device, **kw)
    return linear_probe(ftr, torch.from_numpy(dataset.train.labels), fte, torch.from_numpy(dataset.test.labels))
