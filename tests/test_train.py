"""The training loop: exact resume, determinism, custom encoders, non-finite losses."""

from __future__ import annotations

import io
import inspect
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tiny import tiny_config, tiny_dataset
from fastclr.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fastclr.config import Config, read_toml
from fastclr.data import Dataset, ImageSet
from fastclr.data.loader import BatchSampler
from fastclr.errors import FastclrError
from fastclr.pretraining.loop import NonFiniteLoss, pretrain
from fastclr.pretraining.schedule import lr_at
from fastclr.progress import counted


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(list_checkpoints(run_dir)[-1])
    return {**{f"enc.{k}": v for k, v in state["encoder"].items()}, **{f"head.{k}": v for k, v in state["head"].items()}}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stop_and_resume_equals_uninterrupted_run(tmp_path: Path, precision: str, device: torch.device) -> None:
    # On CUDA, bit equality needs deterministic cuDNN/cuBLAS kernels; CPU kernels are deterministic.
    over: dict[str, object] = {"train__precision": precision, "train__device": str(device)}
    if device.type == "cuda":
        over["train__deterministic"] = True
    ds = tiny_dataset()  # 96 images / batch 16 = 6 steps per epoch, 12 steps in all
    straight = pretrain(tiny_config(tmp_path / "a", **over), dataset=ds, progress=False, log=lambda s: None)
    assert straight.steps == 12 and not straight.stopped
    # stop mid-epoch (step 5 of 12), then resume
    first = pretrain(tiny_config(tmp_path / "b", **over), dataset=ds, progress=False,
                     log=lambda s: None, stop=lambda step: step == 5)
    assert first.stopped and first.steps == 5
    second = pretrain(tiny_config(tmp_path / "b", **over), resume=tmp_path / "b", dataset=ds,
                      progress=False, log=lambda s: None)
    assert second.steps == 12
    # load_checkpoint maps every tensor to the CPU, whatever device trained.
    a, b = params(tmp_path / "a"), params(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = load_checkpoint(list_checkpoints(tmp_path / "a")[-1])["optimizer"]["state"]
    sb = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))


def test_a_ctrl_c_in_python_stops_with_a_checkpoint_resumes_exactly_and_leaves_the_callers_state(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fastclr.pretrain` in a notebook: Ctrl-C raised KeyboardInterrupt mid-step, and the run kept
    only its last epoch's checkpoint. It now stops at the next step with a checkpoint, as the
    command does, and a resume (given as text) ends bit-identical to an uninterrupted run. The
    caller's SIGINT handler and torch's generator, which the run seeds, are as they were."""
    import signal

    callers = signal.signal(signal.SIGINT, signal.default_int_handler)  # a notebook's (a test before may have set its own)
    try:
        ctrl_c_stops(tmp_path, capsys)
    finally:
        signal.signal(signal.SIGINT, callers)


def ctrl_c_stops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The test above, under Python's own SIGINT handler."""
    import os
    import signal

    ds = tiny_dataset()
    straight = pretrain(tiny_config(tmp_path / "a"), dataset=ds, progress=False, log=lambda s: None)
    calls = [0]

    def clock() -> float:  # the loop reads it every step: Ctrl-C a few steps in, from inside a step
        calls[0] += 1
        if calls[0] == 12:
            os.kill(os.getpid(), signal.SIGINT)
        return time.perf_counter()

    torch.manual_seed(123)
    first = pretrain(tiny_config(tmp_path / "b"), dataset=ds, progress=False, log=lambda s: None, clock=clock)
    drawn = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(3))  # the generator is the caller's, not the run's seed's
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert first.stopped and 0 < first.steps < 12 and list_checkpoints(tmp_path / "b")
    assert "SIGINT received: writing a checkpoint at the next step, then stopping" in capsys.readouterr().err
    second = pretrain(tiny_config(tmp_path / "b"), resume=str(tmp_path / "b"), dataset=ds, progress=False,
                      log=lambda s: None)
    assert straight.steps == second.steps == 12
    a, b = params(tmp_path / "a"), params(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_runs_learning_rates_are_the_schedule_with_its_floor(tmp_path: Path) -> None:
    """Every step's rate in metrics.jsonl is `lr_at` of that step with the configured warm-up and
    cosine floor (optim.min_lr_ratio): 12 steps, 3 of warm-up, decaying to a tenth of the peak."""
    from fastclr.runs import read_metrics

    cfg = tiny_config(tmp_path, train__log_every=1, optim__warmup_epochs=0.5, optim__min_lr_ratio=0.1)
    res = pretrain(cfg, dataset=tiny_dataset(), progress=False, log=lambda s: None)
    peak = cfg.optim.lr
    lrs = [r["lr"] for r in read_metrics(res.run_dir) if "lr" in r]
    assert res.steps == 12
    assert lrs == pytest.approx([lr_at(k, 12, 3, peak, 0.1) for k in range(12)], rel=1e-12)
    assert lrs[-1] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 9))), rel=1e-12)


def test_fractional_epochs_and_warm_up_are_the_nearest_whole_steps(tmp_path: Path) -> None:
    """6 steps an epoch: 1.95 epochs are 11.7 steps, trained as 12, and a warm-up of 0.45 epochs is
    2.7 steps, taken as 3 (the nearest whole steps, not the ones below): the rates are `lr_at` of a
    12-step run with a 3-step warm-up."""
    from fastclr.runs import read_metrics

    cfg = tiny_config(tmp_path, train__log_every=1, train__epochs=1.95, optim__warmup_epochs=0.45)
    res = pretrain(cfg, dataset=tiny_dataset(), progress=False, log=lambda s: None)
    lrs = [r["lr"] for r in read_metrics(res.run_dir) if "lr" in r]
    assert res.steps == 12
    assert lrs == pytest.approx([lr_at(k, 12, 3, cfg.optim.lr) for k in range(12)], rel=1e-12)


def test_pretrains_monitor_and_probe_are_the_protocols_on_its_own_h_and_its_untrained_network(tmp_path: Path) -> None:
    """The kNN monitor's last pass (its bank the training split, its queries the test split, each
    with its own labels), probe.json's accuracy and its untrained reference equal evaluation's
    protocols computed here on h of the final and of the untrained network. The labels are drawn
    apart from the images, so that the two networks' figures differ (on the bars both score 100%)."""
    from fastclr.evaluation.features import extract_features
    from fastclr.evaluation.knn import knn_accuracy
    from fastclr.evaluation.probe import linear_probe
    from fastclr.evaluation.reference import untrained_encoder
    from fastclr.pretrained import load_run
    from fastclr.runs import read_metrics

    bars = tiny_dataset(n_test=128)
    assert bars.train is not None and bars.test is not None
    rng = np.random.default_rng(0)
    train = ImageSet(bars.train.images, rng.integers(0, 4, len(bars.train)))
    ds = Dataset("tiny", train, train, ImageSet(bars.test.images, rng.integers(0, 4, len(bars.test))), bars.classes)
    cfg = tiny_config(tmp_path, train__precision="fp32", eval__probe=True, eval__untrained_reference=True,
                      eval__monitor_every=1, eval__monitor_share=1.0)
    res = pretrain(cfg, dataset=ds, progress=False, log=lambda s: None)
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    r, cpu = load_run(res.run_dir), torch.device("cpu")
    ytr, yte = torch.from_numpy(ds.train.labels), torch.from_numpy(ds.test.labels)
    probe = json.loads((res.run_dir / "probe.json").read_text())
    monitored = [rec for rec in read_metrics(res.run_dir) if "knn_acc" in rec]
    assert [rec["step"] for rec in monitored] == [6, 12]
    for encoder, accuracy in ((r.encoder, probe["accuracy"]),
                              (untrained_encoder(r.spec, cfg.train.seed, cpu), probe["random_init_accuracy"])):
        ftr = extract_features(encoder, ds.train.images, r.mean, r.std, cpu, size=28)
        fte = extract_features(encoder, ds.test.images, r.mean, r.std, cpu, size=28)
        assert accuracy == pytest.approx(linear_probe(ftr, ytr, fte, yte).accuracy, abs=1e-12)
        if encoder is r.encoder:
            assert monitored[-1]["knn_acc"] == pytest.approx(knn_accuracy(ftr, ytr, fte, yte, k=cfg.eval.knn_k), abs=1e-12)
    assert probe["lift"] == pytest.approx(probe["accuracy"] - probe["random_init_accuracy"], abs=1e-12)
    assert probe["lift"] != 0.0


def test_the_training_step_never_waits_for_the_device(tmp_path: Path, device: torch.device) -> None:
    """With check_sync every host-device synchronisation inside a step raises; log_every 1000 puts
    the only metrics read (and so the only wait) after the last step, and checkpoints come at
    epoch ends, outside the step."""
    if device.type != "cuda":
        pytest.skip("CUDA only: host-device synchronisation does not exist on the CPU")
    cfg = tiny_config(tmp_path, train__device="cuda", train__check_sync=True, train__log_every=1000,
                      train__checkpoint_every=0, train__epochs=2.0)
    res = pretrain(cfg, dataset=tiny_dataset(), progress=False, log=lambda s: None)
    assert res.steps == 12 and not res.stopped
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0])  # the one record, at the last step (12)


def test_training_reduces_the_loss_and_finds_the_positive_more_often(tmp_path: Path) -> None:
    """Six epochs on the bars: the loss falls, and the positive is the nearest of the 2B - 1 other
    views more often at the end than at the start. (The probe is no test of learning here: on 4 bar
    positions the untrained network probes 100% too.)"""
    ds = tiny_dataset(192)
    cfg = tiny_config(tmp_path, train__epochs=6.0, train__log_every=1, model__width=0.25)
    pretrain(cfg, dataset=ds, progress=False, log=lambda s: None)
    import json

    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    top1 = [r["top1"] for r in recs if "top1" in r]
    assert len(losses) == len(top1) == 72
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert sum(top1[-24:]) / 24 > 1.1 * sum(top1[:24]) / 24  # 0.171 against 0.142 on the Xeon with AMX


def test_a_users_encoder_that_draws_random_numbers_resumes_exactly(tmp_path: Path) -> None:
    """Dropout draws from torch's global generator, which fastclr's own steps never use: its state
    in the checkpoint is what makes such an encoder's stopped-and-resumed run the uninterrupted one."""
    def encoder() -> nn.Module:
        torch.manual_seed(7)
        return nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())

    ds, quiet = tiny_dataset(), dict(progress=False, log=lambda s: None)
    pretrain(tiny_config(tmp_path / "a"), dataset=ds, encoder=encoder(), **quiet)
    assert pretrain(tiny_config(tmp_path / "b"), dataset=ds, encoder=encoder(), stop=lambda step: step == 5, **quiet).stopped
    torch.manual_seed(123)  # whatever this process drew before, the resumed run goes on with the stopped one's draws
    pretrain(tiny_config(tmp_path / "b"), resume=tmp_path / "b", dataset=ds, encoder=encoder(), **quiet)
    a, b = params(tmp_path / "a"), params(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["lars", "sgd", "adamw"])
def test_a_resume_trains_with_the_optimiser_settings_it_is_given(tmp_path: Path, optimizer: str) -> None:
    """torch's load_state_dict puts back each group's saved settings: a resume given another weight
    decay, momentum or LARS eta trained on with the checkpoint's while config.toml recorded the new.
    The checkpoint's buffers are kept (the resumed groups' state is the saved one, then stepped);
    the settings are those given, the 1-D parameters' group still without decay."""
    ds, quiet = tiny_dataset(), dict(progress=False, log=lambda s: None)
    # each with the settings it reads (the others are refused: tests/test_unread.py)
    reads = {"optim__momentum": (0.9, 0.5), "optim__trust_coefficient": (1e-3, 0.01)}
    read = [k for k in reads if optimizer == "lars" or (optimizer == "sgd" and k == "optim__momentum")]
    first = dict(optim__optimizer=optimizer, optim__weight_decay=1e-4, **{k: reads[k][0] for k in read})
    assert pretrain(tiny_config(tmp_path, **first), dataset=ds, stop=lambda step: step == 5, **quiet).stopped
    then = dict(first, optim__weight_decay=0.1, **{k: reads[k][1] for k in read})
    pretrain(tiny_config(tmp_path, **then), resume=tmp_path, dataset=ds, **quiet)
    groups = load_checkpoint(list_checkpoints(tmp_path)[-1])["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    if optimizer != "adamw":
        assert [g["momentum"] for g in groups] == [0.5, 0.5]
    if optimizer == "lars":
        assert [g["eta"] for g in groups] == [0.01, 0.01]
    assert read_toml(tmp_path / "config.toml")["optim.weight_decay"] == 0.1


def test_any_module_can_be_the_encoder(tmp_path: Path) -> None:
    enc = nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    initial = {k: v.clone() for k, v in enc.state_dict().items()}
    res = pretrain(tiny_config(tmp_path, train__epochs=1.0), dataset=tiny_dataset(), encoder=enc, progress=False,
                   log=lambda s: None)
    assert res.model is not None and res.model.encoder is enc and res.model.spec.feature_dim == 8
    assert res.model.spec.encoder == "custom" and not res.model.spec.rebuildable
    moved = {k for k, v in enc.state_dict().items() if v.is_floating_point() and not torch.equal(v.cpu(), initial[k])}
    assert {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"} <= moved  # all of it trained
    saved = load_checkpoint(list_checkpoints(tmp_path)[-1])["encoder"]
    assert all(torch.equal(saved[k], v.cpu()) for k, v in enc.state_dict().items())  # and it is what was saved
    # Its export loads into a module of the same architecture; by name it cannot be rebuilt: one line, not
    # "unknown encoder 'custom'" (from fastclr.load_encoder, evaluate, embed and export alike).
    import fastclr
    from fastclr.cli import main

    fresh = nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    loaded, spec = fastclr.load_encoder(tmp_path / "encoder.safetensors", module=fresh)
    assert loaded is fresh and spec.encoder == "custom"
    assert all(torch.equal(fresh.state_dict()[k], v.cpu()) for k, v in enc.state_dict().items())
    with pytest.raises(FastclrError, match=r"holds your own encoder module .* fastclr.load_encoder\(path, module="):
        fastclr.load_encoder(tmp_path / "encoder.safetensors")
    with pytest.raises(FastclrError, match="does not fit the module given"):
        fastclr.load_encoder(tmp_path / "encoder.safetensors", module=nn.Linear(3, 4))
    assert main(["export", str(tmp_path), "--format", "torch-export", "--out", str(tmp_path / "e.pt2")]) == 2


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    class PoisonAfter(nn.Module):
        """A toy encoder whose output becomes NaN from its 8th forward pass in training."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                self.calls += 1
            h = self.net(x)
            return h * float("nan") if self.calls >= 8 else h

    cfg = tiny_config(tmp_path, train__epochs=3.0, train__checkpoint_every=2, train__log_every=100)
    with pytest.raises(NonFiniteLoss, match="non-finite loss or gradient at step 8;") as said:
        pretrain(cfg, dataset=tiny_dataset(), encoder=PoisonAfter(), progress=False, log=lambda s: None)
    ckpts = list_checkpoints(tmp_path)
    assert ckpts and load_checkpoint(ckpts[-1])["step"] == 6
    assert f"the last good checkpoint, {ckpts[-1].name} in {tmp_path}, is kept" in str(said.value)
    assert str(said.value).endswith(f"then resume with --resume {tmp_path} --allow-config-change")
    # Before the first checkpoint it promised one all the same, and --resume then found none
    early = tmp_path / "early"
    with pytest.raises(NonFiniteLoss, match="non-finite loss or gradient at step 8;") as said:
        pretrain(tiny_config(early, train__epochs=3.0, train__checkpoint_every=100, train__log_every=100),
                 dataset=tiny_dataset(), encoder=PoisonAfter(), progress=False, log=lambda s: None)
    assert list_checkpoints(early) == [] and f"no checkpoint of {early} was written yet" in str(said.value)
    assert str(said.value).endswith("then run the command again with them (the run starts over)")
    assert all(torch.isfinite(v).all() for v in load_checkpoint(ckpts[-1])["encoder"].values() if v.is_floating_point())


def test_bad_settings_are_one_line_errors(tmp_path: Path) -> None:
    ds = tiny_dataset()
    with pytest.raises(FastclrError, match=r"batch size 512 is larger than the dataset \(96 images\); pass --batch-size 96"):
        pretrain(tiny_config(tmp_path, train__batch_size=512), dataset=ds, progress=False, log=lambda s: None)
    # one image: the advice was "--batch-size 1 or less", itself refused (a batch needs 2)
    with pytest.raises(FastclrError, match=r"the dataset holds 1 image: contrastive training needs at least 2 a batch"):
        pretrain(tiny_config(tmp_path), dataset=tiny_dataset(1), progress=False, log=lambda s: None)
    with pytest.raises(FastclrError, match=r"train.temperature = 0.0 is not allowed: it must be >= 1e-06; e.g. --temperature"):
        pretrain(tiny_config(tmp_path, train__temperature=0.0), dataset=ds, progress=False, log=lambda s: None)
    bad = tiny_config(tmp_path / "c")
    bad.train.compile = "maybe"  # set in Python, past apply_overrides: pretrain validates again
    with pytest.raises(FastclrError, match="train.compile = 'maybe' is not allowed: it must be one of: auto, on, off"):
        pretrain(bad, dataset=ds, progress=False, log=lambda s: None)
    assert not (tmp_path / "c").exists()  # refused before the run directory came into being


class PacedClock:
    """The clock the loop reads, driven by the work instead of by time: each training step costs
    `pace(step)` seconds (charged by `PacedEncoder`'s forward pass in training mode) and each kNN
    monitor pass `monitor_s` seconds (charged by the stand-in monitor)."""

    def __init__(self, pace: Callable[[int], float], monitor_s: float = 0.0) -> None:
        self.now, self.steps, self.pace, self.monitor_s = 0.0, 0, pace, monitor_s

    def __call__(self) -> float:
        return self.now

    def monitor(self, *args: object) -> float:
        self.now += self.monitor_s
        return 0.5


class PacedEncoder(nn.Module):
    """A one-layer encoder of 8 x 8 images whose every training forward pass is one step on the clock."""

    def __init__(self, clock: PacedClock) -> None:
        super().__init__()
        self.net, self.clock = nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.clock.now += self.clock.pace(self.clock.steps)
            self.clock.steps += 1
        return self.net(x)


def paced_run(tmp_path: Path, clock: PacedClock, minutes: float, steps_per_epoch: int,
              monitor_share: float = 0.0, log: Callable[[str], None] = lambda s: None,
              log_every: int = 1000, stop: Callable[[int], bool] | None = None,
              resume: bool = False, epochs: float = 100.0, progress: bool = False, checkpoint_every: int = 10**6,
              **over: Any) -> tuple[Any, list[dict[str, Any]]]:
    """The real loop under a time budget on the paced clock (batch 2 of 8 x 8 images); `stop` and
    `resume` as in `pretrain` (the clock goes on where the stopped run left it); `over` as in `tiny_config`."""
    ds = tiny_dataset(2 * steps_per_epoch, size=8)
    cfg = tiny_config(tmp_path / "run", train__batch_size=2, train__time_budget=minutes, train__epochs=epochs,
                      train__log_every=log_every, train__checkpoint_every=checkpoint_every, train__channels_last=False,
                      model__head_hidden=8, model__proj_dim=4,
                      eval__monitor_every=1 if monitor_share else 0, eval__monitor_share=monitor_share or 0.05, **over)
    res = pretrain(cfg, dataset=ds, encoder=PacedEncoder(clock), progress=progress, log=log, clock=clock,
                   stop=stop, resume=tmp_path / "run" if resume else None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return res, records


def paced_run_stopped_at(tmp_path: Path, clock: PacedClock, stops: list[int], **kw: Any) -> tuple[Any, list[dict[str, Any]]]:
    """`paced_run` stopped at each step of `stops` in turn and resumed, then run to its end: the last
    process's result and the run's records."""
    for i, at in enumerate([*stops, None]):
        res, records = paced_run(tmp_path, clock, stop=(lambda s, at=at: s == at) if at else None, resume=i > 0, **kw)
    return res, records


def test_a_budgeted_run_resumed_before_its_first_fit_shows_no_length_it_does_not_know(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped at step 12, before the budget's first fit: the resumed process fits at step 27, and
    its progress said 'step 13/10000 ... eta ...' until then (the placeholder of 100 epochs)."""
    clock = PacedClock(lambda i: 1.0)
    paced_run(tmp_path, clock, minutes=1.0, steps_per_epoch=100, stop=lambda s: s == 12, log_every=1)
    capsys.readouterr()
    res, _ = paced_run(tmp_path, clock, minutes=1.0, steps_per_epoch=100, resume=True, log_every=1, progress=True)
    shown = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert shown[0].startswith("step 13 loss ") and "eta" not in shown[0]
    assert shown[-1].startswith(f"step {res.steps}/{res.steps} loss ") and " eta " in shown[-1]


def test_the_time_budget_reads_its_clock_once_the_device_has_done_the_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the host queues steps ahead of the device: at the pace's mark (step 5) and at every
    fit (15, then every 25) the loop waits for the device before it reads the clock, and at no
    other step (a wait drains the queue)."""
    clock = PacedClock(lambda i: 1.0)
    waited: list[int] = []
    monkeypatch.setattr("fastclr.pretraining.setup.wait_for_device", lambda device: waited.append(clock.steps))
    res, _ = paced_run(tmp_path, clock, minutes=1.0, steps_per_epoch=100)
    assert 55 <= res.steps <= 65 and waited == [5, 15, 25, 50]


def test_the_time_budget_ends_on_time_when_the_pace_drifts(tmp_path: Path) -> None:
    """0.5 s for 5 warm-up steps, 1 s/step until step 60, then 1.3 s/step. One fit at step 15
    would plan 122 steps and end at 138 s; refitted as the loop goes, the run ends within one
    refit interval (25 steps) of its 120 s."""
    clock = PacedClock(lambda i: 0.5 if i < 5 else (1.0 if i < 60 else 1.3))
    res, _ = paced_run(tmp_path, clock, minutes=2.0, steps_per_epoch=40)
    assert 120.0 - 25 * 1.3 <= res.train_seconds <= 120.0 + 1.3
    assert res.train_seconds == clock.now and res.steps == clock.steps


def test_a_refit_that_shrinks_the_run_below_its_warm_up_shortens_the_warm_up(tmp_path: Path) -> None:
    """A warm-up of 100 steps (one epoch) fits in the first fit's 122 steps; then the pace slows
    from 1 to 1.6 s/step and the refit at step 25 shrinks the run to 95 (82 in the end). The
    warm-up goes on from the 26% of the peak it has reached to the peak over a tenth of the 70
    steps left, and the learning rate decays to ~0 by the end instead of ending on its ramp. (It
    used to end at a tenth of the run, step 9, already past: 26% -> 92% of the peak in one step.)"""
    clock, lines = PacedClock(lambda i: 0.5 if i < 5 else (1.0 if i < 15 else 1.6)), []
    res, records = paced_run(tmp_path, clock, minutes=2.0, steps_per_epoch=100, log=lines.append, log_every=1)
    lrs, peak = [r["lr"] for r in records if "lr" in r], Config().optim.lr
    assert res.steps < 100 and lrs[-1] < 0.01 * peak
    assert any(line.startswith("the time budget now fits 95 steps") and "warm-up shortened to end at step 32, rising "
               "from the 26% of the peak learning rate it had reached at step 25" in line for line in lines), lines
    assert lrs[:32] == pytest.approx([peak * (k + 1) / 100 for k in range(25)] +
                                     [peak * (0.26 + 0.74 * (k - 25) / 7) for k in range(25, 32)])
    assert lrs[32] == pytest.approx(peak) and all(b <= a for a, b in zip(lrs[32:], lrs[33:]))


def test_before_the_first_fit_the_learning_rate_does_not_depend_on_epochs(tmp_path: Path) -> None:
    """train.epochs is unused under a time budget: with a 2-step warm-up, steps 2 to 14 (before the
    first fit at 15) hold the peak, for 100 epochs and for 0.05 (whose cosine decayed them to ~0)."""
    runs = []
    for epochs in (100.0, 0.05):
        _, records = paced_run(tmp_path / str(epochs), PacedClock(lambda i: 0.5 if i < 5 else 1.0), minutes=1.0,
                               steps_per_epoch=100, log_every=1, epochs=epochs, optim__warmup_epochs=0.02)
        runs.append([r["lr"] for r in records if "lr" in r])
    peak = Config().optim.lr
    assert runs[0] == runs[1] and runs[0][:15] == [peak / 2] + [peak] * 14


def test_a_run_trained_by_epochs_and_resumed_under_a_budget_holds_the_peak_then_decays(tmp_path: Path) -> None:
    """20 steps by epochs (warm-up shortened to 2 steps, decayed to ~0), then resumed with a 1-minute
    budget: it restarts at the peak, holds it to the first fit (step 35) and decays from there to
    ~0 by the end, never rising again. The fit treated it as a fresh run: the learning rate fell
    from the peak to the configured warm-up's 36% at step 35 and rose to the peak once more."""
    clock, lines = PacedClock(lambda i: 0.5 if i < 5 else 1.0), []
    paced_run(tmp_path, clock, minutes=0.0, steps_per_epoch=100, epochs=0.2, log_every=1)
    res, records = paced_run(tmp_path, clock, minutes=1.0, steps_per_epoch=100, epochs=0.2, log_every=1,
                             resume=True, log=lines.append)
    lrs, peak = [r["lr"] for r in records if "lr" in r], Config().optim.lr
    assert len(lrs) == res.steps > 40 and lrs[19] < 0.01 * peak
    assert lrs[20:35] == pytest.approx([peak] * 15)  # before the first fit: the peak, as after any warm-up
    assert all(b <= a for a, b in zip(lrs[20:], lrs[21:])) and lrs[-1] < 0.01 * peak


def test_a_budgeted_run_resumed_by_epochs_says_its_new_length_and_the_rate_it_jumps_to(tmp_path: Path) -> None:
    """A finished 1-minute run (60 steps at 1 s a step, its rate decayed to ~0) resumed with `--epochs
    0.8` (80 steps; the flag turns the budget off) trained on with the rate of an 80-step cosine at
    step 61, near its peak, without a word. The note names the new end and both rates, as the metrics hold them."""
    clock, lines = PacedClock(lambda i: 1.0), []
    first, _ = paced_run(tmp_path, clock, minutes=1.0, steps_per_epoch=100, log_every=1)
    res, records = paced_run(tmp_path, clock, minutes=0.0, steps_per_epoch=100, epochs=0.8, log_every=1,
                             resume=True, log=lines.append)
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert (first.steps, res.steps) == (60, 80) and lr[61] > 10 * lr[60]
    assert [line for line in lines if line.startswith("note:")] == [
        "note: resuming by --epochs 0.8, not the time budget of 1 min it ran under: the run now ends at step 80, not "
        f"60, and its learning rate follows the warm-up and cosine of a 0.8-epoch run: from {lr[60]:.3g} at step 60 "
        f"to {lr[61]:.3g} at step 61"]


def test_a_run_by_epochs_resumed_under_a_budget_starts_its_cosine_from_the_peak_at_the_first_fit(
        tmp_path: Path) -> None:
    """The run of the test above: 20 steps by epochs (warm-up 2 steps), resumed with a 1-minute budget.
    Its first fit, at step 35 (32.5 s spent at 1 s a step), grants 62 steps; the cosine starts there,
    at the peak held so far, and ends at step 62: from step 35 on the learning rate is the cosine
    anchored at (35, 0), not the one drawn from the warm-up's end, which jumped down at the fit."""
    clock = PacedClock(lambda i: 0.5 if i < 5 else 1.0)
    lines: list[str] = []
    paced_run(tmp_path, clock, minutes=0.0, steps_per_epoch=100, epochs=0.2, log_every=1)
    res, records = paced_run(tmp_path, clock, minutes=1.0, steps_per_epoch=100, epochs=0.2, log_every=1,
                             resume=True, log=lines.append)
    peak = tiny_config(tmp_path).optim.lr
    assert any(line.startswith("time budget 1 min: 62 steps") for line in lines) and res.steps == 62
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[35:] == pytest.approx([lr_at(k, 62, 2, peak, anchor=(35, 0.0)) for k in range(35, 62)], rel=1e-12)


def test_the_monitors_share_holds_across_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kNN pass costs 30 s, 5% of the wall time allowed: the straight run passes at step 50 only.
    Stopped at step 60 and resumed, the monitor remembers its 30 s (they are in the checkpoint), so
    it passes where the straight run does and the run trains as many steps."""
    def run(where: Path, stop: Callable[[int], bool] | None) -> tuple[Any, list[int]]:
        clock = PacedClock(lambda i: 0.5 if i < 5 else 1.0, monitor_s=30.0)
        monkeypatch.setattr("fastclr.pretraining.monitor.monitor_knn", clock.monitor)
        res, records = paced_run(where, clock, minutes=10.0, steps_per_epoch=50, monitor_share=0.05, stop=stop)
        if stop is not None:
            res, records = paced_run(where, clock, minutes=10.0, steps_per_epoch=50, monitor_share=0.05, resume=True)
        return res, [r["step"] for r in records if "knn_acc" in r]

    straight, resumed = run(tmp_path / "a", None), run(tmp_path / "b", lambda s: s == 60)
    assert straight[1] == resumed[1] == [50]
    assert abs(straight[0].steps - resumed[0].steps) <= 1  # the resumed process measures its own pace


def test_a_refit_that_shrinks_the_run_goes_on_down_the_cosine_from_where_it_was(tmp_path: Path) -> None:
    """A 5-step warm-up, then the peak held to the first fit (step 15: 12.5 s spent at 1 s a step
    since step 5, so 47 more steps fit in the minute: 62), then the cosine. From step 20 a step costs
    2 s: at the refit of step 25 (27.5 s, 1.25 s a step since step 5) 26 more fit, 51. The cosine is
    re-anchored there: from its progress at step 25 in the 62-step run, 10 / 47, linearly to 1 at step
    51, so the learning rate falls on from where it was instead of jumping to the 51-step cosine's."""
    from fastclr.pretraining.schedule import decay_progress

    pace = lambda i: 0.5 if i < 5 else (1.0 if i < 20 else 2.0)  # noqa: E731
    lines: list[str] = []
    res, records = paced_run(tmp_path, PacedClock(pace), minutes=1.0, steps_per_epoch=100, log_every=1,
                             log=lines.append, optim__warmup_epochs=0.05)
    peak = tiny_config(tmp_path).optim.lr
    assert any(line.startswith("time budget 1 min: 62 steps") for line in lines), lines
    anchor = (25, decay_progress(25, 62, 5, (15, 0.0)))
    assert anchor[1] == pytest.approx(10 / 47)
    want = ([peak * (k + 1) / 5 for k in range(5)] + [peak] * 10 + [lr_at(k, 62, 5, peak, anchor=(15, 0.0)) for k in
            range(15, 25)] + [lr_at(k, 51, 5, peak, anchor=anchor) for k in range(25, res.steps)])
    assert res.steps == 50  # the refit of step 50, 77.5 s in, ends the spent budget
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx(want, rel=1e-12)


def test_the_runs_training_seconds_count_its_checkpoints_the_last_epoch_ends_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By epochs, 1 s a step and 5 s a checkpoint, written at the epoch ends (steps 10 and 20): the
    run's training seconds, returned and in its last checkpoint, are 20 + 2 x 5, the last epoch end's
    checkpoint included (the one written after it to record them cannot count itself)."""
    clock = PacedClock(lambda i: 1.0)

    def slow_save(run_dir: Path, state: dict[str, Any]) -> Path:
        clock.now += 5.0
        return save_checkpoint(run_dir, state)

    monkeypatch.setattr("fastclr.pretraining.state.save_checkpoint", slow_save)
    cfg = tiny_config(tmp_path / "run", train__batch_size=2, train__epochs=2.0, train__channels_last=False,
                      model__head_hidden=8, model__proj_dim=4)
    res = pretrain(cfg, dataset=tiny_dataset(20, size=8), encoder=PacedEncoder(clock), progress=False,
                   log=lambda s: None, clock=clock)
    assert res.steps == 20 and res.train_seconds == 30.0
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["train_seconds"] == 30.0


def test_every_logged_steps_elapsed_seconds_are_the_training_time_at_that_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By epochs, 1 s a step, a 10 s kNN pass at the epoch ends of steps 10 and 20, a record every 3
    steps and at the last: each record's elapsed seconds are the steps so far and the passes of the
    epoch ends before it, the last step's too (written, as every log step's, before its step's pass)."""
    clock = PacedClock(lambda i: 1.0, monitor_s=10.0)
    monkeypatch.setattr("fastclr.pretraining.monitor.monitor_knn", clock.monitor)
    _, records = paced_run(tmp_path, clock, minutes=0.0, steps_per_epoch=10, monitor_share=1.0, epochs=2.0,
                           log_every=3)
    assert [(r["step"], r["elapsed"]) for r in records if "loss" in r] == \
        [(s, s + 10.0 * ((s - 1) // 10)) for s in (3, 6, 9, 12, 15, 18, 20)]


def test_the_time_budget_uses_its_time_after_a_stall_across_an_epoch_end(tmp_path: Path) -> None:
    """2.5 s/step, then a stall of 44 s/step across the epoch end at step 120 (CPU steal, as seen
    on a shared machine), then 1.2 s/step: the refits every 25 steps, not only the one at the
    epoch end, let the run use its budget at the pace it really runs at."""
    clock = PacedClock(lambda i: 0.5 if i < 5 else (1.2 if i >= 122 else (44.0 if 116 <= i < 122 else 2.5)))
    res, _ = paced_run(tmp_path, clock, minutes=9.5, steps_per_epoch=120)
    assert 570.0 - 25 * 1.2 <= res.train_seconds <= 570.0 + 1.2


def test_the_time_budget_is_a_cap_between_epoch_ends(tmp_path: Path) -> None:
    """The pace collapses from 2 to 100 s/step at step 200, mid-epoch: the run ends at the first
    refit past the budget (step 225), not at the end of its fitted schedule (step 288)."""
    clock = PacedClock(lambda i: 0.5 if i < 5 else (2.0 if i < 200 else 100.0))
    res, _ = paced_run(tmp_path, clock, minutes=9.5, steps_per_epoch=4000)
    assert res.steps == 225 and res.train_seconds == pytest.approx(0.5 * 5 + 2.0 * 195 + 100.0 * 25)


def test_the_time_budget_counts_monitor_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget is pretraining wall time: a kNN monitor pass spends it like a step does. A pass
    costs 1000 s on the clock: after the first (end of epoch 1, step 6) the budget of 6 s is spent,
    so step 7 brings the first fit forward from step 15, it grants no more (the budget is spent) and
    the run ends at 7 with that pass in its wall time (it ran to 16, through a second pass, when the
    first fit waited for step 15). Were monitoring paused out of the clock, it would run 6 s of steps."""
    clock = PacedClock(lambda i: 0.01, monitor_s=1000.0)
    monkeypatch.setattr("fastclr.pretraining.monitor.monitor_knn", clock.monitor)
    res, records = paced_run(tmp_path, clock, minutes=0.1, steps_per_epoch=6, monitor_share=1.0)
    assert res.steps == 7 and res.train_seconds == pytest.approx(1000.0 + 7 * 0.01)
    assert [r["step"] for r in records if "knn_acc" in r] == [6]


@pytest.mark.parametrize(("pace", "minutes", "steps"), [(10.0, 1.0, 6), (40.0, 0.5, 2), (4.0, 1.0, 15), (25.0, 1.0, 2)])
def test_a_time_budget_caps_a_run_whose_steps_are_too_slow_to_wait_for_the_first_fit(
        tmp_path: Path, pace: float, minutes: float, steps: int) -> None:
    """`pace` s a step, 100 steps an epoch. Waiting for the first fit (step 15) would spend 15 x pace
    s: where that is over the budget, the fit comes after step 2 (the first step's cost alone is no
    pace), or after step 1 when that step spent the budget, and the run ends at the budget: 6 steps
    (60 s) of a 1-minute budget at 10 s a step; 2 at 40 s (one more than the spent budget's, as at a
    first fit made at the first step); 2 at 25 s (fitted after step 2, 50 s, with no step more to
    grant: not a third, 75 s). At 4 s a step, 15
    steps are the budget: the fit waits for step 15 and, the budget spent, grants no more (a
    sixteenth step, 64 s, until 2026-12-06). Before, every run went on to 16 steps whatever its
    budget (160 s and 640 s)."""
    clock, lines = PacedClock(lambda i: pace), []
    res, _ = paced_run(tmp_path, clock, minutes=minutes, steps_per_epoch=100, log=lines.append)
    assert res.steps == steps and res.train_seconds == pytest.approx(steps * pace)
    assert any(line.startswith(f"time budget {minutes:g} min: {steps} steps ") for line in lines), lines


def test_a_first_fit_that_would_come_past_the_budget_by_less_than_a_step_comes_early(tmp_path: Path) -> None:
    """4.2 s a step, a 1-minute budget: waiting for the first fit at step 15 would spend 63 s, past
    the budget by less than a step. The fit comes after step 2, and the run ends at
    2 + (60 - 8.4) // 4.2 = 14 steps, 58.8 s, within its minute (not 16 steps, 67.2 s)."""
    res, _ = paced_run(tmp_path, PacedClock(lambda i: 4.2), minutes=1.0, steps_per_epoch=100)
    assert res.steps == 14 and res.train_seconds == pytest.approx(14 * 4.2) and res.train_seconds <= 60.0


def test_an_epoch_ends_refit_counts_the_checkpoint_written_before_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """1 s a step (0.5 for the first 5), 40 steps an epoch, a checkpoint of 20 s at each epoch end,
    no monitor pass, a 2-minute budget. The epoch end's refit read the seconds from before that
    checkpoint and granted steps for time already spent: the run ended at 134.5 s. It now ends
    within a step of its budget."""
    from fastclr.checkpoint import save_checkpoint

    clock = PacedClock(lambda i: 0.5 if i < 5 else 1.0)

    def slow_save(run_dir: Path, state: dict[str, Any]) -> Path:
        clock.now += 20.0
        return save_checkpoint(run_dir, state)
    monkeypatch.setattr("fastclr.pretraining.state.save_checkpoint", slow_save)
    res, _ = paced_run(tmp_path, clock, minutes=2.0, steps_per_epoch=40, checkpoint_every=0)
    assert 118.0 <= res.train_seconds <= 120.0, res.train_seconds  # the steps and the epoch ends' checkpoints


def test_a_run_by_epochs_stopped_in_its_short_warm_up_and_resumed_under_a_budget_keeps_rising(
        tmp_path: Path) -> None:
    """3 epochs of 100 steps with 5 epochs of warm-up: the warm-up is a tenth of the run, 30 steps.
    Stopped at step 10 and resumed with a 10-minute budget, the first fit (step 25) put back the
    configured 500-step warm-up: the rate fell from 83% to 5% of its peak. It rises on to its peak
    at step 30, never falling before it."""
    clock, lines = PacedClock(lambda i: 0.5 if i < 5 else 1.0), []
    kw: dict[str, Any] = dict(steps_per_epoch=100, epochs=3.0, log_every=1, optim__warmup_epochs=5.0)
    paced_run(tmp_path, clock, minutes=0.0, stop=lambda s: s == 10, **kw)
    _, records = paced_run(tmp_path, clock, minutes=10.0, resume=True, log=lines.append, **kw)
    lrs = [r["lr"] for r in sorted(records, key=lambda r: r["step"]) if "lr" in r and r["step"] <= 31]
    assert all(b > a for a, b in zip(lrs, lrs[1:30]))  # rising through the warm-up, the first fit included
    assert max(lrs) == pytest.approx(tiny_config(tmp_path).optim.lr, rel=1e-6)
    assert any(line.startswith("warm-up of 500 steps (5 epochs) was not shorter than the run by epochs its checkpoint "
                               "came from: shortened to end at step 30") for line in lines), lines


def test_a_budgeted_run_resumed_before_its_first_fit_takes_a_warm_up_it_is_given(tmp_path: Path) -> None:
    """A budgeted run stopped before its first fit and resumed with --warmup-epochs 1 (was 5): its
    first fit uses the warm-up given, 100 steps, not the checkpoint's 500 (which kept the rate rising
    to step 500 of a run of about 600)."""
    clock = PacedClock(lambda i: 1.0)
    kw: dict[str, Any] = dict(steps_per_epoch=100, minutes=10.0, log_every=1)
    paced_run(tmp_path, clock, stop=lambda s: s == 10, optim__warmup_epochs=5.0, **kw)
    paced_run(tmp_path, clock, resume=True, optim__warmup_epochs=1.0, **kw)
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["warmup_steps"] == 100


def test_an_early_fit_after_a_slow_first_step_paces_the_steps_after_it(tmp_path: Path) -> None:
    """A first step of 40 s, then 2 s a step, a 1-minute budget: the fit comes early (after step 2,
    waiting for step 15 would spend 68 s), and its pace is that of the steps after the first, 2 s,
    not (40 + 2) / 2 = 21 s: 11 steps, 60 s, not 3 steps and 44 s."""
    res, _ = paced_run(tmp_path, PacedClock(lambda i: 40.0 if i == 0 else 2.0), minutes=1.0, steps_per_epoch=1000)
    assert res.steps == 11 and res.train_seconds == pytest.approx(60.0)


@pytest.mark.parametrize("first", [5.0, 40.0])
def test_a_slow_first_step_is_no_pace_and_does_not_end_the_run(tmp_path: Path, first: float) -> None:
    """A first step of `first` seconds (torch.compile's, on by default on a GPU), then 0.05 s a step,
    a 1-minute budget: the first step was taken as the pace, the run was judged overdue and fitted
    after one step to 12 steps (5 s) or 2 (40 s), the rest of the minute unused. Now the budget is
    fitted at step 15 on the steady pace and spent: (60 - first) / 0.05 steps more or less."""
    res, _ = paced_run(tmp_path, PacedClock(lambda i: first if i == 0 else 0.05), minutes=1.0, steps_per_epoch=1000)
    assert 60.0 - 0.05 < res.train_seconds <= 60.0 + 1e-9
    assert res.steps == 1 + round((res.train_seconds - first) / 0.05)


def test_an_epoch_ends_refit_counts_the_monitor_pass_that_follows_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 s a step (0.5 for the first 5), a kNN pass of 10 s at every epoch end (50 steps), a 2-minute
    budget. At step 100 the loop has spent 107.5 s. Fitted before that epoch's pass, the run would be
    granted 11 more steps, and the pass and the steps would end it at 128.5 s. Fitted after the pass
    (117.5 s), it ends within a step of 120 s. The last steps, after the last log, are logged too."""
    clock = PacedClock(lambda i: 0.5 if i < 5 else 1.0, monitor_s=10.0)
    monkeypatch.setattr("fastclr.pretraining.monitor.monitor_knn", clock.monitor)
    res, records = paced_run(tmp_path, clock, minutes=2.0, steps_per_epoch=50, monitor_share=1.0, log_every=1000)
    assert [r["step"] for r in records if "knn_acc" in r] == [50, 100]
    assert 120.0 - 1.0 <= res.train_seconds <= 120.0 + 1.0, res.train_seconds
    assert res.steps == 102 and res.train_seconds == pytest.approx(2.5 + 97 * 1.0 + 2 * 10.0)
    assert [r["step"] for r in records if "loss" in r] == [102]


def test_the_logged_rate_counts_training_steps_not_the_monitor_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 s a step, batch 2: 2 pairs/s in every window, also the one after an epoch end's 10 s kNN pass
    (it logged 2 x 10 / (10 + 10) = 1.0 when the window started before the pass)."""
    clock = PacedClock(lambda i: 1.0, monitor_s=10.0)
    monkeypatch.setattr("fastclr.pretraining.monitor.monitor_knn", clock.monitor)
    _, records = paced_run(tmp_path, clock, minutes=0.0, steps_per_epoch=10, monitor_share=1.0, log_every=5,
                           epochs=2.0)
    assert [r["step"] for r in records if "knn_acc" in r] == [10, 20]
    assert [(r["step"], r["pairs_per_s"]) for r in records if "pairs_per_s" in r] == [(5, 2.0), (10, 2.0), (15, 2.0),
                                                                                      (20, 2.0)]


@pytest.mark.parametrize("share, passes", [(0.05, [6]), (1.0, [6, 12, 18])])
def test_monitor_passes_are_sized_by_their_measured_share_of_the_wall_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: float, passes: list[int]) -> None:
    """A pass costs 1000 s, 99% of the first epoch's wall time: with a share of 5% the later passes
    are skipped until the training time has grown to 20 times the monitor's; with a share of 1
    every epoch end gets its pass."""
    clock = PacedClock(lambda i: 0.01, monitor_s=1000.0)
    monkeypatch.setattr("fastclr.pretraining.monitor.monitor_knn", clock.monitor)
    ds = tiny_dataset(12, size=8)
    cfg = tiny_config(tmp_path / "run", train__batch_size=2, train__epochs=3.0, train__channels_last=False,
                      model__head_hidden=8, model__proj_dim=4, eval__monitor_every=1, eval__monitor_share=share)
    pretrain(cfg, dataset=ds, encoder=PacedEncoder(clock), progress=False, log=lambda s: None, clock=clock)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_acc" in r] == passes


def test_a_run_shorter_than_its_warm_up_gets_a_shorter_one_and_says_so(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = tiny_config(tmp_path, train__epochs=2.0, optim__warmup_epochs=5.0, train__log_every=1)
    pretrain(cfg, dataset=tiny_dataset(), progress=False, log=lines.append)  # 6 steps per epoch, 12 in all
    assert any("warm-up of 30 steps (5 epochs) is not shorter than the run's 12 steps: shortened to 1 step (a tenth "
               "of the run, at least 1)" in line for line in lines)
    assert any(line.startswith("trained 12 steps in ") for line in lines)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "lr" in line]
    assert lrs[0] == pytest.approx(cfg.optim.lr)  # the peak at the first step, then the cosine
    assert lrs == sorted(lrs, reverse=True)


def test_counts_are_said_in_the_singular_for_one() -> None:
    assert [counted(n, "step") for n in (0, 1, 2, 21)] == ["0 steps", "1 step", "2 steps", "21 steps"]


def test_a_time_budget_that_fits_less_than_the_warm_up_shortens_it_and_warns(tmp_path: Path) -> None:
    """1 s a step, a 1-minute budget, 100 steps an epoch: about 62 steps fit, fewer than the one
    epoch (100 steps) of warm-up, as when a ResNet-18 meets a 2-core CPU. A tenth of the fitted run
    has passed at the first fit (step 15), so the warm-up goes on from the 16% of the peak it has
    reached to the peak over a tenth of the steps left, then the cosine takes it down to nothing by
    the end (with the configured warm-up it would still be rising, at most 0.62 of the peak; ended
    at a tenth of the run, it went from 16% to 93% of the peak in one step); the log says both, and
    warns that 0.6 epochs are too few."""
    lines: list[str] = []
    clock = PacedClock(lambda i: 0.5 if i < 5 else 1.0)
    res, records = paced_run(tmp_path, clock, minutes=1.0, steps_per_epoch=100, log=lines.append, log_every=1)
    peak = tiny_config(tmp_path).optim.lr
    lrs = [r["lr"] for r in records if "lr" in r]
    assert len(lrs) == res.steps and 55 <= res.steps <= 65
    assert lrs[:15] == pytest.approx([peak * (i + 1) / 100 for i in range(15)])  # before the fit
    fit = next(line for line in lines if line.startswith("time budget 1 min: "))
    fitted = int(fit.split(": ")[1].split()[0])
    shown = fit.split("(")[1].split(" epochs")[0]  # the fit and the warning give the same epochs, cut alike
    assert shown == f"{math.floor(fitted / 100 * 10) / 10:.1f}" and f"warning: only {shown} epochs fit in 1 min" in "\n".join(lines)
    end = 15 + math.ceil((fitted - 15) / 10)
    assert lrs[15:end + 1] == pytest.approx([peak * (0.16 + 0.84 * (k - 15) / (end - 15)) for k in range(15, end + 1)])
    assert lrs[end:] == pytest.approx([lr_at(k, fitted, end, peak) for k in range(end, fitted)])
    assert lrs[-1] < 0.01 * peak
    assert f"warm-up of 100 steps (1 epoch) is not shorter than the run's {fitted} steps: shortened to end at step " \
           f"{end}, rising from the 16% of the peak learning rate it had reached at step 15" in "\n".join(lines)
    assert any(line.startswith(f"warning: only {fitted / 100:.1f} epochs fit in 1 min at 1000 ms/step") for line in lines)
    kept = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])  # what a resume keeps
    assert kept["warmup_steps"] == end and kept["ramp_anchor"] == [15, pytest.approx(0.16)]


def test_a_runs_warnings_go_to_stderr_and_its_other_lines_to_stdout(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`fastclr pretrain > run.txt` hid the few-epochs warning in the file: pretrain's own lines went
    to stdout, warnings too. Its default log now puts a warning on stderr, as every other command's."""
    from fastclr.errors import narrate

    narrate("warning: w")
    narrate("a line; warning: not at its start")
    assert capsys.readouterr() == ("a line; warning: not at its start\n", "warning: w\n")
    clock = PacedClock(lambda i: 1.0)
    paced_run(tmp_path, clock, minutes=1.0, steps_per_epoch=100, log=narrate)
    out, err = capsys.readouterr()
    assert err.startswith("warning: only 0.") and "warning:" not in out and "time budget 1 min: " in out
    assert inspect.signature(pretrain).parameters["log"].default is narrate  # the command's, which passes none


def test_the_shortened_warm_up_stays_when_a_refit_lengthens_the_run(tmp_path: Path) -> None:
    """1 s a step until the first fit (step 15: 62 steps fit, under the 100-step warm-up, which
    ends at step 20), then 0.25 s: the refits lengthen the run to 200 steps, past the configured
    warm-up. The warm-up stays 20 steps: between the refits at steps 50 and 75 the learning rate
    falls along the cosine (were the warm-up taken from each refit's length, the refit at step 50,
    to about 143 steps, would put it back on the 100-step ramp, rising from 0.51 of the peak)."""
    clock = PacedClock(lambda i: 0.5 if i < 5 else (1.0 if i < 15 else 0.25))
    res, records = paced_run(tmp_path, clock, minutes=1.0, steps_per_epoch=100, log_every=1)
    lrs = [r["lr"] for r in records if "lr" in r]
    assert res.steps > 150
    peak = tiny_config(tmp_path).optim.lr
    between = lrs[51:75]
    assert all(b < a for a, b in zip(between, between[1:]))
    assert max(lrs[15:]) <= peak * (1 + 1e-6) and lrs[-1] < 0.01 * peak


@pytest.mark.parametrize("epochs", [0.0, 0.05])
def test_a_budgeted_run_ignores_train_epochs(tmp_path: Path, epochs: float) -> None:
    """With a time budget train.epochs is unused: 0 epochs, or fewer steps than the first fit (5 of
    100 a epoch), give the run the budget fits, learning rate for learning rate (they gave 1 and 5
    steps)."""
    pace = lambda i: 0.5 if i < 5 else 1.0  # noqa: E731
    want, want_records = paced_run(tmp_path / "a", PacedClock(pace), minutes=1.0, steps_per_epoch=100, log_every=1)
    got, records = paced_run(tmp_path / "b", PacedClock(pace), minutes=1.0, steps_per_epoch=100, log_every=1,
                             epochs=epochs)
    assert got.steps == want.steps > 50
    assert [r["lr"] for r in records if "lr" in r] == [r["lr"] for r in want_records if "lr" in r]


def test_a_refit_that_lengthens_the_run_never_raises_the_learning_rate(tmp_path: Path) -> None:
    """2 s a step until step 40 (another process took the CPU), then 0.5 s: the refit at step 50
    lengthens the run from the 63 steps fitted at step 15 to 75, and the cosine drawn from the end
    of the warm-up to the new end put the learning rate back up (1.0e-4 -> 3.0e-4 in a 139 ->
    184-step run). Re-anchored where the refit is made, it goes on falling from where it was,
    reaches the end of the cosine, and a resumed run takes the anchor from its checkpoint."""
    pace = lambda i: 0.5 if i < 5 else (2.0 if i < 40 else 0.5)  # noqa: E731
    lines: list[str] = []
    res, records = paced_run(tmp_path / "a", PacedClock(pace), minutes=2.0, steps_per_epoch=100, log_every=1,
                             log=lines.append)
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    peak_at = max(range(len(lrs)), key=lambda i: lrs[i][1])
    after = [lr for _, lr in lrs[peak_at:]]
    assert any(line.startswith("time budget 2 min: 63 steps") for line in lines) and res.steps == 75
    assert all(b <= a * (1 + 1e-9) for a, b in zip(after, after[1:])), after
    assert after[-1] < 0.01 * after[0]
    clock = PacedClock(pace)
    first, _ = paced_run(tmp_path / "b", clock, minutes=2.0, steps_per_epoch=100, log_every=1,
                         stop=lambda step: step == 60)
    anchor = load_checkpoint(list_checkpoints(tmp_path / "b" / "run")[-1])["decay_anchor"]
    assert first.steps == 60 and anchor[0] == 50 and 0 < anchor[1] < 1
    _, resumed = paced_run(tmp_path / "b", clock, minutes=2.0, steps_per_epoch=100, log_every=1, resume=True)
    straight = dict(lrs)
    # until the straight run's next refit (step 75; the resumed process paces itself from step 65)
    checked = {r["step"]: r["lr"] for r in resumed if "lr" in r and 60 < r["step"] <= 75}
    assert sorted(checked) == list(range(61, 76)) and all(lr == straight[k] for k, lr in checked.items())


def budgeted_straight_and_resumed(tmp_path: Path, stop_at: int) -> tuple[Any, list[dict[str, Any]], Any,
                                                                           list[dict[str, Any]], list[str]]:
    """1 s a step after 5 of 0.5 s, a 1-minute budget, 100 steps an epoch: the run straight into
    tmp_path/a (result, records), and into tmp_path/b stopped after `stop_at` steps and resumed
    (the resumed result, all its records, the resumed process's log lines)."""
    pace = lambda i: 0.5 if i < 5 else 1.0  # noqa: E731
    straight, straight_records = paced_run(tmp_path / "a", PacedClock(pace), minutes=1.0, steps_per_epoch=100,
                                           log_every=1)
    clock, lines = PacedClock(pace), []
    first, _ = paced_run(tmp_path / "b", clock, minutes=1.0, steps_per_epoch=100, log_every=1,
                         stop=lambda step: step == stop_at)
    assert first.stopped and first.steps == stop_at
    second, records = paced_run(tmp_path / "b", clock, minutes=1.0, steps_per_epoch=100, log_every=1,
                                log=lines.append, resume=True)
    return straight, straight_records, second, records, lines


def test_a_budgeted_run_stopped_before_its_first_fit_resumes_onto_it(tmp_path: Path) -> None:
    """Stopped at step 10, before the first fit (step 15), and resumed: the resumed process makes
    that fit (length, shortened warm-up, the log line) on its own pace, at step 25, where its ramp
    has reached 26% of the peak: the warm-up goes on from there to the peak over a tenth of the
    steps left, then the cosine ends with the uninterrupted run. It used to keep the 100-step
    warm-up and never reach the peak."""
    straight, straight_records, second, records, lines = budgeted_straight_and_resumed(tmp_path, stop_at=10)
    assert second.steps == straight.steps and any(line.startswith("time budget 1 min: ") for line in lines)
    # the summary's training seconds span both processes; it says how many steps this one ran
    assert any(line.startswith(f"trained {second.steps} steps in ") and f"({second.steps - 10} of them in this process, "
               in line for line in lines), lines[-3:]
    peak, end = tiny_config(tmp_path).optim.lr, 25 + math.ceil((second.steps - 25) / 10)
    lrs = [r["lr"] for r in sorted(records, key=lambda r: r["step"]) if "lr" in r]
    assert lrs == pytest.approx([peak * (k + 1) / 100 for k in range(25)] +
                                [peak * (0.26 + 0.74 * (k - 25) / (end - 25)) for k in range(25, end)] +
                                [lr_at(k, second.steps, end, peak) for k in range(end, second.steps)])
    kept = load_checkpoint(list_checkpoints(tmp_path / "b" / "run")[-1])
    assert kept["warmup_steps"] == end and kept["ramp_anchor"] == [25, pytest.approx(0.26)]


def test_a_checkpoint_that_does_not_say_whether_it_was_fitted_is_fitted_from_the_first_fits_step(
        tmp_path: Path) -> None:
    """A checkpoint from before budget_fitted (and the anchors and the pace's mark) were kept, written
    at step 15, the first fit's: the fit was made (12.5 s spent at 1 s a step: 17 more steps in the
    half minute, 32 in all, the warm-up shortened to end at step 17), so the resumed process keeps it:
    it makes no first fit of its own, and every learning rate from step 15 is warm-up-then-cosine over
    those 32 steps."""
    pace = lambda i: 0.5 if i < 5 else 1.0  # noqa: E731
    clock = PacedClock(pace)
    lines: list[str] = []
    paced_run(tmp_path, clock, minutes=0.5, steps_per_epoch=100, log_every=1, stop=lambda step: step == 15)
    newest = list_checkpoints(tmp_path / "run")[-1]
    state = load_checkpoint(newest)
    assert (state["step"], state["total_steps"], state["warmup_steps"], state["budget_fitted"]) == (15, 32, 17, True)
    for key in ("budget_fitted", "pace_mark", "ramp_anchor", "decay_anchor"):
        state.pop(key, None)
    newest.unlink()
    save_checkpoint(tmp_path / "run", state)
    res, records = paced_run(tmp_path, clock, minutes=0.5, steps_per_epoch=100, log_every=1, resume=True,
                             log=lines.append)
    assert not any(line.startswith("time budget 0.5 min: ") for line in lines), lines
    peak = tiny_config(tmp_path).optim.lr
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert res.steps == 32 and [lrs[k + 1] for k in range(15, 32)] == \
        pytest.approx([lr_at(k, 32, 17, peak) for k in range(15, 32)], rel=1e-12)


def test_a_budgeted_run_stopped_where_its_epoch_ends_refit_ends_it_ends_there_when_resumed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 s a step, 40 steps an epoch, a 30 s kNN pass at each epoch end, a 1-minute budget: the
    refit after the first epoch's pass finds the budget spent and ends the run at step 40. Stopped
    at step 40 (its checkpoint written before that refit) and resumed, the refit it owes ends it
    there too (it trained a 41st step: the one more step of a first fit, which that refit is not)."""
    pace = lambda i: 0.5 if i < 5 else 1.0  # noqa: E731
    over: dict[str, Any] = dict(minutes=1.0, steps_per_epoch=40, monitor_share=1.0)
    results = []
    for run, stops in (("a", []), ("b", [40])):
        clock = PacedClock(pace, monitor_s=30.0)
        monkeypatch.setattr("fastclr.pretraining.monitor.monitor_knn", clock.monitor)
        res, _ = paced_run_stopped_at(tmp_path / run, clock, stops, **over)
        results.append((res.steps, res.train_seconds))
    assert results[0] == results[1] == (40, pytest.approx(2.5 + 35 * 1.0 + 30.0))


def test_a_run_resumed_twice_refits_where_the_process_that_wrote_its_checkpoint_would_have(tmp_path: Path) -> None:
    """A 2-minute budget, 40 steps an epoch, 1 s a step, then 2 s from step 35. Resumed at step 30, a
    process fits first at step 45, so it makes no refit at the epoch end of step 40. Stopped there
    and resumed, the refit that checkpoint owes is owed past the writer's first fit (45, kept in it),
    not past a fresh run's (15): the learning rates of the run stopped twice are those of the run
    stopped once up to that one's refit at step 50 (they were not from step 42). After it, each
    resumed process refits on its own pace from its own first fit (55 for the one resumed at 40), by
    design, so the two runs part there."""
    pace = lambda i: 0.5 if i < 5 else (1.0 if i < 35 else 2.0)  # noqa: E731
    over: dict[str, Any] = dict(minutes=2.0, steps_per_epoch=40, log_every=1)
    lrs = []
    for run, stops in (("a", [30]), ("b", [30, 40])):
        _, records = paced_run_stopped_at(tmp_path / run, PacedClock(pace), stops, **over)
        lrs.append({r["step"]: r["lr"] for r in records if "lr" in r})
    assert load_checkpoint(list_checkpoints(tmp_path / "b" / "run")[0])["first_fit_at"] == 45
    assert [lrs[1][k] for k in range(1, 51)] == pytest.approx([lrs[0][k] for k in range(1, 51)], rel=1e-12)


def test_a_resumed_budgeted_run_keeps_its_shortened_warm_up(tmp_path: Path) -> None:
    """The run of the test above (1 s a step, 1 minute, a 100-step warm-up shortened at the first
    fit) stopped at step 30 and resumed: the resumed half reads the shortened warm-up from the
    checkpoint, says so, and sets the learning rate of every step exactly as the uninterrupted run
    did. The resumed process paces its own steps from step 35 (`TimeBudget.resume_at`), so it fits
    the same 62 steps as the uninterrupted run."""
    straight, straight_records, second, records, lines = budgeted_straight_and_resumed(tmp_path, stop_at=30)
    assert second.steps == straight.steps
    warmup = load_checkpoint(list_checkpoints(tmp_path / "b" / "run")[-1])["warmup_steps"]
    assert warmup == 15 + math.ceil((second.steps - 15) / 10)
    assert any(line.startswith("warm-up of 100 steps (1 epoch) was not shorter than the run when it was fitted: "
                               f"shortened to end at step {warmup}, rising from the 16% of") for line in lines), lines
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}  # the resumed half rewrites nothing before step 30
    assert [lrs[k] for k in sorted(lrs)] == [r["lr"] for r in straight_records if "lr" in r]
    peak = tiny_config(tmp_path).optim.lr
    # step 31's record is the lr of step index 30: on the cosine after the short warm-up (0.87 of the
    # peak), not on the configured 100-step ramp (0.31)
    assert lrs[31] == pytest.approx(lr_at(30, second.steps, warmup, peak)) and lrs[31] > 0.5 * peak


@pytest.mark.parametrize("minutes, steps, stop_at", [(1.0, 60, 20), (0.4, 24, 20), (1.0, 60, 15)])
def test_a_resume_given_another_time_budget_fits_it_at_once(tmp_path: Path, minutes: float, steps: int,
                                                            stop_at: int) -> None:
    """1 s a step, 0.5 minutes: fitted to 30 steps at step 15, stopped at 20, resumed with another
    budget. The resumed process's own first fit comes 15 steps later, at 35, past the run's end: the
    new budget went unused (30 steps again) while config.toml recorded it. It is now fitted at the
    resume, at the checkpoint's pace: 1 minute gives 60 steps, 0.4 minutes 24; the learning rate
    never rises on the way. Also from a checkpoint written at the first fit's own step (15)."""
    clock = PacedClock(lambda i: 1.0)
    first, _ = paced_run(tmp_path, clock, minutes=0.5, steps_per_epoch=100, stop=lambda s: s == stop_at, log_every=1)
    assert first.stopped and first.steps == stop_at
    lines: list[str] = []
    res, records = paced_run(tmp_path, clock, minutes=minutes, steps_per_epoch=100, resume=True, log_every=1,
                             log=lines.append)
    assert res.steps == steps
    assert f"time budget 0.5 -> {minutes:g} min: {steps} steps (were 30), at the pace the checkpoint recorded" in lines
    lrs = [r["lr"] for r in records if "lr" in r and r["step"] > stop_at]
    top = lrs.index(max(lrs))  # the end of a warm-up still under way at step 15 (it was shortened to the run)
    assert all(b >= a for a, b in zip(lrs[:top], lrs[1:top + 1]))
    assert all(b <= a + 1e-12 for a, b in zip(lrs[top:], lrs[top + 1:])) and len(lrs) == steps - stop_at


def test_a_budgeted_run_stopped_twice_before_its_first_fit_still_makes_it(tmp_path: Path) -> None:
    """Stopped at step 10 (before the first fit at 15), resumed (its own fit moves to step 25) and
    stopped again at 20, then resumed: the checkpoint says no process has fitted yet, so the third
    makes the fit (at step 35) and the run fills its minute like the uninterrupted one. It used to
    count as fitted for starting past step 15: a 0.2-epoch run ended at 26 steps after 23.5 s."""
    pace = lambda i: 0.5 if i < 5 else 1.0  # noqa: E731
    straight, _ = paced_run(tmp_path / "a", PacedClock(pace), minutes=1.0, steps_per_epoch=100, epochs=0.2)
    clock, lines = PacedClock(pace), []
    for stop_at, resume in ((10, False), (20, True)):
        part, _ = paced_run(tmp_path / "b", clock, minutes=1.0, steps_per_epoch=100, epochs=0.2,
                            stop=lambda step, at=stop_at: step == at, resume=resume)
        assert part.stopped and part.steps == stop_at
        assert load_checkpoint(list_checkpoints(tmp_path / "b" / "run")[-1])["budget_fitted"] is False
    last, _ = paced_run(tmp_path / "b", clock, minutes=1.0, steps_per_epoch=100, epochs=0.2, log=lines.append,
                        resume=True)
    assert any(line.startswith("time budget 1 min: ") for line in lines), lines
    assert abs(last.steps - straight.steps) <= 2 and last.train_seconds >= 60.0 - 2 * 1.0
    assert load_checkpoint(list_checkpoints(tmp_path / "b" / "run")[-1])["budget_fitted"] is True


def test_a_run_stopped_at_an_epoch_end_makes_that_epoch_ends_refit_when_resumed(tmp_path: Path) -> None:
    """20 steps an epoch, a 100-step warm-up, a 3-minute budget; 1 s a step, then 2.5 s from step
    20. The refit at the epoch end of step 40 shrinks the run to 100 steps and the warm-up with it;
    that epoch end's checkpoint is written before its refit. Stopped there and resumed, the run
    makes the same refit on the same pace (the checkpoint keeps where the pace is measured from),
    so its learning rates are the uninterrupted run's until the latter's next refit (step 50). The
    resumed run used to skip it and stay on the 100-step ramp until step 60 (61% -> the peak)."""
    pace = lambda i: 0.5 if i < 5 else (1.0 if i < 20 else 2.5)  # noqa: E731
    over = dict(minutes=3.0, steps_per_epoch=20, log_every=1, optim__warmup_epochs=5.0)
    straight_lines: list[str] = []
    _, straight = paced_run(tmp_path / "a", PacedClock(pace), log=straight_lines.append, **over)
    clock, lines = PacedClock(pace), []
    first, _ = paced_run(tmp_path / "b", clock, stop=lambda step: step == 40, **over)
    assert first.steps == 40
    _, resumed = paced_run(tmp_path / "b", clock, resume=True, log=lines.append, **over)
    shrink = "the time budget now fits 100 steps, not more than the warm-up: warm-up shortened to end at step 46, " \
             "rising from the 41% of the peak learning rate it had reached at step 40"
    assert any(line.startswith(shrink) for line in straight_lines) and any(line.startswith(shrink) for line in lines)
    want = {r["step"]: r["lr"] for r in straight if "lr" in r and 40 < r["step"] <= 50}
    assert {r["step"]: r["lr"] for r in resumed if "lr" in r and 40 < r["step"] <= 50} == want and len(want) == 10


def test_a_budgeted_run_resumed_inside_its_shortened_warm_up_goes_on_along_it(tmp_path: Path) -> None:
    """The same run stopped at step 17, between the first fit (step 15) and the end of the warm-up
    it shortened (step 20): the checkpoint keeps where the ramp was anchored, so the resumed half
    sets every learning rate exactly as the uninterrupted run did, still rising to the peak."""
    straight, straight_records, second, records, _ = budgeted_straight_and_resumed(tmp_path, stop_at=17)
    assert second.steps == straight.steps
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert [lrs[k] for k in sorted(lrs)] == [r["lr"] for r in straight_records if "lr" in r]
    assert lrs[17] < lrs[18] < lrs[19] < lrs[20] < lrs[21] == pytest.approx(tiny_config(tmp_path).optim.lr)


def test_a_run_resumed_after_a_crash_logs_each_step_once(tmp_path: Path) -> None:
    """A crash after the checkpoint of step 8 (its later checkpoints lost) and a resume: steps 9-12
    are trained and logged again; metrics.jsonl holds each step's record once, the resumed ones."""
    from fastclr.runs import read_metrics

    ds = tiny_dataset()  # 6 steps an epoch, 12 in all
    cfg = tiny_config(tmp_path / "run", train__log_every=1, train__checkpoint_every=4)
    pretrain(cfg, dataset=ds, progress=False, log=lambda s: None)
    for late in list_checkpoints(tmp_path / "run")[1:]:  # the two newest are kept: 8 and 12, which the crash took
        late.unlink()
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["step"] == 8
    straight = read_metrics(tmp_path / "run")
    pretrain(cfg, resume=tmp_path / "run", dataset=ds, progress=False, log=lambda s: None)
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert steps == list(range(1, 13)) == [r["step"] for r in straight if "loss" in r]


@pytest.mark.parametrize("batch, world, resuming, advice", [
    (256, 3, False, "run 2 or 4 processes instead, or pass --batch-size 255"),
    # a resumed run keeps its batch size unless told: the flag alone was refused on resume
    (256, 3, True, "run 2 or 4 processes instead, or pass --batch-size 255 --allow-config-change (the run keeps its "
                   "batch size otherwise)"),
    (96, 5, False, "run 4 or 6 processes instead, or pass --batch-size 95"),
    (7, 2, False, "run 1 or 7 processes instead, or pass --batch-size 6"),
])
def test_a_batch_that_does_not_split_over_the_processes_names_counts_that_do(
        batch: int, world: int, resuming: bool, advice: str) -> None:
    from fastclr.pretraining.setup import validate

    with pytest.raises(FastclrError) as e:
        validate(tiny_config(Path("run"), train__batch_size=batch), 1000, world, resuming=resuming)
    assert str(e.value) == (f"batch size {batch} (the global batch) does not split evenly over {world} processes; "
                            + advice)
    for fits in (advice.split()[1], advice.split()[3]):  # the counts named do split it
        assert batch % int(fits) == 0


def test_a_batch_of_the_whole_dataset_is_accepted_and_a_larger_one_refused() -> None:
    """The refusal's advice for N images, --batch-size N, is itself accepted (one full batch an
    epoch); N + 1 is refused."""
    from fastclr.pretraining.setup import validate

    validate(tiny_config(Path("run"), train__batch_size=96), 96)
    with pytest.raises(FastclrError, match=r"batch size 97 is larger than the dataset \(96 images\); pass --batch-size 96"):
        validate(tiny_config(Path("run"), train__batch_size=97), 96)


@pytest.mark.parametrize("stop_at,saved_before", [(2, False), (8, False), (8, True)])  # in the warm-up at batch 32, past it
def test_a_resume_with_another_batch_goes_on_from_the_place_in_the_data_it_had_reached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: int, saved_before: bool) -> None:
    """96 images: batch 16 gives 6 steps per epoch, batch 32 gives 3. Stopped at step `stop_at` of
    batch 16 (epoch stop_at / 6), resumed at batch 32 for 3 epochs, the run draws the batches, and
    follows the learning rate, that a batch-32 run from the start has at the same epoch: data step
    stop_at / 2 on, and it ends after 3 epochs of it (step 9 there). `saved_before`: a checkpoint
    written before the steps per epoch were kept in it, which the saved batch size stands for."""
    ds = tiny_dataset()
    drawn: list[tuple[int, int]] = []
    real = BatchSampler.indices
    monkeypatch.setattr(BatchSampler, "indices", lambda self, step: drawn.append((self.batch_size, step)) or real(self, step))
    over = dict(train__log_every=1, train__epochs=3.0, optim__warmup_epochs=1.0)
    pretrain(tiny_config(tmp_path / "straight", train__batch_size=32, **over), dataset=ds, progress=False, log=lambda s: None)
    first = pretrain(tiny_config(tmp_path / "b", train__batch_size=16, **over), dataset=ds, progress=False,
                     log=lambda s: None, stop=lambda step: step == stop_at)
    assert first.stopped
    if saved_before:
        state = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
        del state["steps_per_epoch"], state["step_offset"]
        list_checkpoints(tmp_path / "b")[-1].unlink()
        save_checkpoint(tmp_path / "b", state)
    drawn.clear()
    lines: list[str] = []
    pretrain(tiny_config(tmp_path / "b", train__batch_size=32, **over), resume=tmp_path / "b", allow_config_change=True,
             dataset=ds, progress=False, log=lines.append)
    place = stop_at // 2
    assert drawn == [(32, d) for d in range(place, 9)]
    assert any(line.startswith(f"resumed at step {stop_at} with 3 steps per epoch (the checkpoint's: 6): going on "
                               f"from epoch {place / 3:.1f} of the data") for line in lines)
    offset = place - stop_at

    def records(run: str) -> dict[int, dict[str, float]]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "lr" in r}

    straight, resumed = records("straight"), records("b")
    after = [step for step in resumed if step > stop_at]
    assert after == list(range(stop_at + 1, 9 - offset + 1))
    for step in after:
        assert resumed[step]["lr"] == pytest.approx(straight[step + offset]["lr"], rel=1e-12)
        assert resumed[step]["epoch"] == pytest.approx(straight[step + offset]["epoch"], rel=1e-12)
    assert load_checkpoint(list_checkpoints(tmp_path / "b")[-1])["step_offset"] == offset


def test_a_resume_with_another_batch_runs_no_second_monitor_pass_for_an_epoch_it_had_measured(tmp_path: Path) -> None:
    """Batch 16 (6 steps an epoch) stopped at step 13, past epoch 2's pass at step 12; at batch 32
    step 13 is data step 6.5, rounded to 6, an epoch end: not a pass owed (it was not one for the
    run that wrote the checkpoint). The next pass is at the end of epoch 3, step 16."""
    ds = tiny_dataset()
    over = dict(train__epochs=3.0, eval__monitor_every=1, eval__monitor_share=1.0)
    pretrain(tiny_config(tmp_path, train__batch_size=16, **over), dataset=ds, progress=False, log=lambda s: None,
             stop=lambda step: step == 13)
    pretrain(tiny_config(tmp_path, train__batch_size=32, **over), resume=tmp_path, allow_config_change=True,
             dataset=ds, progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_acc" in r] == [6, 12, 16]


def test_a_time_budget_resumed_from_a_run_by_epochs_that_changed_its_batch_goes_on_up_its_ramp(tmp_path: Path) -> None:
    """A run by epochs at batch 16 (warm-up 12 steps), resumed at batch 32 (data step = step - 2,
    warm-up to data step 6), then resumed with a time budget at step 5: the budget's first step
    has the learning rate the run by epochs has there (4/6 of the peak), not a ramp read in steps
    (6/8)."""
    import shutil

    ds = tiny_dataset()
    over = dict(train__log_every=1, train__epochs=3.0, optim__warmup_epochs=2.0)
    pretrain(tiny_config(tmp_path / "a", train__batch_size=16, **over), dataset=ds, progress=False, log=lambda s: None,
             stop=lambda step: step == 4)
    pretrain(tiny_config(tmp_path / "a", train__batch_size=32, **over), resume=tmp_path / "a", allow_config_change=True,
             dataset=ds, progress=False, log=lambda s: None, stop=lambda step: step == 5)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    lines: list[str] = []
    for run, budget in (("a", 0.0), ("b", 1.0)):
        pretrain(tiny_config(tmp_path / run, train__batch_size=32, train__time_budget=budget, **over),
                 resume=tmp_path / run, dataset=ds, progress=False, log=lines.append, stop=lambda step: step == 6)
    lr = {run: [json.loads(line)["lr"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if '"lr"' in line][-1] for run in "ab"}
    peak = tiny_config(tmp_path).optim.lr
    assert lr["a"] == pytest.approx(peak * 4 / 6, rel=1e-12) and lr["b"] == pytest.approx(lr["a"], rel=1e-12)
    assert not any("shortened to" in line for line in lines)


def test_two_resumes_with_other_batches_go_on_from_the_place_in_the_data_each_had_reached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """96 images, by epochs: batch 16 (6 steps an epoch) stopped at step 4 (epoch 4/6), batch 32
    (3 an epoch) from data step 2 for one step, stopped at step 5 (data step 3: epoch 1), then batch
    16 again from data step 6. The offsets add up: the last part draws the batches, and has the learning rate
    and epoch, that a batch-16 run from the start has at the same place, and ends with its 18th."""
    ds = tiny_dataset()
    drawn: list[tuple[int, int]] = []
    real = BatchSampler.indices
    monkeypatch.setattr(BatchSampler, "indices", lambda self, step: drawn.append((self.batch_size, step)) or real(self, step))
    over = dict(train__log_every=1, train__epochs=3.0, optim__warmup_epochs=1.5)
    pretrain(tiny_config(tmp_path / "straight", train__batch_size=16, **over), dataset=ds, progress=False,
             log=lambda s: None)
    drawn.clear()
    for batch, stop_at in ((16, 4), (32, 5), (16, None)):
        pretrain(tiny_config(tmp_path / "b", train__batch_size=batch, **over), dataset=ds, progress=False,
                 log=lambda s: None, resume=None if stop_at == 4 else tmp_path / "b", allow_config_change=True,
                 stop=lambda step, at=stop_at: step == at)
    assert drawn == [(16, d) for d in range(4)] + [(32, 2)] + [(16, d) for d in range(6, 18)]

    def records(run: str) -> dict[int, dict[str, float]]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "lr" in r}

    straight, resumed = records("straight"), records("b")
    assert sorted(resumed) == list(range(1, 18))  # 4 + 1 + 12 steps; the step count stays monotonic
    for step in range(6, 18):
        assert resumed[step]["lr"] == pytest.approx(straight[step + 1]["lr"], rel=1e-12)
        assert resumed[step]["epoch"] == pytest.approx(straight[step + 1]["epoch"], rel=1e-12)
    assert load_checkpoint(list_checkpoints(tmp_path / "b")[-1])["step_offset"] == 1


def _progress_at(monkeypatch: pytest.MonkeyPatch, times: list[float], **kwargs: Any) -> tuple[Any, io.StringIO]:
    """A Progress writing to a StringIO (not a terminal) whose clock reads `times` in turn."""
    import fastclr.progress as progress

    clock = iter(times)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    return progress.Progress(stream=stream, **kwargs), stream


def test_the_progress_rate_and_eta_count_only_the_steps_this_process_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed at step 40 of 100 and at step 60 ten seconds later: 20 steps in 10 s is 2 steps/s,
    and the 40 steps left take 20 s (not the 60 done before the resume, nor 100 - 20)."""
    bar, stream = _progress_at(monkeypatch, [0.0, 10.0], total=100, start=40, every=0.0, rate_of="steps")
    bar.update(60, "loss 1.5")
    assert stream.getvalue() == "step 60/100 steps, 2 steps/s loss 1.5 eta 0:20\n"


def test_the_progress_rate_counts_from_the_loops_start_not_the_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar is made during the set-up; 30 s of restoring a checkpoint and starting trackers came
    before the first step and sat in every rate and eta. Restarted as the loop begins, 20 steps
    in 10 s are 2 steps/s (not 20 in 40 s), and the 80 left take 40 s (not 160)."""
    bar, stream = _progress_at(monkeypatch, [0.0, 30.0, 40.0], total=100, every=0.0, rate_of="steps")
    bar.restart()
    bar.update(20)
    assert stream.getvalue() == "step 20/100 steps, 2 steps/s eta 0:40\n"


def test_the_loop_restarts_its_progress_clock_once_the_set_up_is_done(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar is made while the run is built; its clock restarts once the run is recorded (config.toml
    written, a checkpoint restored, trackers started) and before the first step."""
    import fastclr.progress as progress

    seen: list[tuple[bool, int]] = []
    real = progress.Progress.restart

    def restart(self: Any) -> None:
        seen.append(((tmp_path / "config.toml").exists(), len(list_checkpoints(tmp_path))))
        real(self)
    monkeypatch.setattr(progress.Progress, "restart", restart)
    pretrain(tiny_config(tmp_path, train__epochs=1.0, train__batch_size=32), dataset=tiny_dataset(64), progress=True,
             log=lambda s: None)
    assert seen == [(True, 0)]  # once, after the set-up, before any step


def test_a_progress_line_waits_its_interval_except_for_the_last_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off a terminal a line is printed at most every `every` seconds, but the last step is always
    shown, however soon after the line before it."""
    bar, stream = _progress_at(monkeypatch, [0.0, 1.0, 2.0, 3.0], total=10, every=30.0)
    bar.update(1)  # the first line: nothing printed yet
    bar.update(5)  # 1 s after it: waits
    bar.update(10)  # the last step
    assert [line.split(" eta")[0] for line in stream.getvalue().splitlines()] == ["step 1/10", "step 10/10"]
    assert stream.getvalue().endswith("eta 0:00\n")


@pytest.mark.parametrize("columns", [80, 40, 200])
def test_a_terminals_progress_line_fits_its_width_and_clears_the_rest(monkeypatch: pytest.MonkeyPatch,
                                                                      columns: int) -> None:
    """Every update was padded to 100 characters: on an 80-column terminal it wrapped, and "\r"
    went back only to the wrapped row, leaving a line behind at each update. Each rewrite is now at
    most the width less one, and clears what a longer earlier line left (ESC [K)."""
    import os
    import re

    bar, stream = _progress_at(monkeypatch, [0.0] + [float(i) for i in range(1, 4)], total=1000, tty_every=0.0)
    monkeypatch.setattr(stream, "isatty", lambda: True)
    bar.tty = True
    asked: list[int] = []
    monkeypatch.setattr(stream, "fileno", lambda: 2)  # the progress goes to stderr
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=1: asked.append(fd) or os.terminal_size((columns, 24)))
    for step in (1, 2, 3):
        bar.update(step, "loss 5.5432 top1 0.1234 top5 0.4321 lr 0.0030 knn 0.8765 " * 5)
    pieces = stream.getvalue().split("\r")[1:]
    assert len(pieces) == 3 and all(p.endswith("\x1b[K") for p in pieces) and set(asked) == {2}
    assert all(len(p) - len("\x1b[K") == columns - 1 for p in pieces)  # the long line, cut at the width
    assert pieces[0].startswith("step 1/1000")
    assert all(re.search(r"\u2026 eta \d+:\d\d\x1b\[K$", p) for p in pieces)  # the metrics are cut, not the eta


def test_a_terminal_that_cannot_move_the_cursor_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """TERM=dumb (Emacs' shell): each rewrite's "\r" and ESC [K were shown as they are."""
    import io

    from fastclr.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "dumb")
    stream = Terminal()
    bar = Progress(total=3, stream=stream, every=0.0)
    for step in (1, 2, 3):
        bar.update(step, "loss 1.0")
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert [line.split(" eta ")[0] for line in stream.getvalue().splitlines()] == [
        f"step {s}/3 loss 1.0" for s in (1, 2, 3)]
    monkeypatch.setenv("TERM", "xterm")
    assert Progress(total=3, stream=Terminal()).tty


@pytest.mark.parametrize(("seconds", "text"), [(7.0, "0:07"), (7.6, "0:08"), (59.6, "1:00"), (3599.6, "1:00:00"),
                                               (3725, "1:02:05"), (-3.0, "0:00")])
def test_durations_are_rounded_to_the_nearest_second(seconds: float, text: str) -> None:
    """The nearest whole second, carried into the minutes and hours (59.6 s is 1:00, not 0:60)."""
    from fastclr.progress import format_seconds

    assert format_seconds(seconds) == text


@pytest.mark.parametrize(("batch", "per_epoch"), [(64, "1 step/epoch"), (32, "2 steps/epoch")])
def test_the_run_line_counts_the_steps_of_an_epoch_in_words(tmp_path: Path, batch: int, per_epoch: str) -> None:
    lines: list[str] = []
    pretrain(tiny_config(tmp_path, train__batch_size=batch, train__epochs=1.0), dataset=tiny_dataset(64),
             progress=False, log=lines.append)
    head = next(line for line in lines if line.startswith("run "))
    assert f", batch {batch}, {per_epoch}, peak lr" in head


@pytest.mark.parametrize(("setting", "said"), [("auto", "on cpu, eager (--compile auto)"), ("off", "on cpu, eager")])
def test_the_run_line_records_what_compile_resolved_to(tmp_path: Path, setting: str, said: str) -> None:
    """config.toml keeps `auto` (a resume resolves it on its own machine); the log says what it
    became here: auto is eager on a CPU (fastclr.runtime.use_compile)."""
    lines: list[str] = []
    pretrain(tiny_config(tmp_path, train__compile=setting, train__epochs=1.0), dataset=tiny_dataset(64),
             progress=False, log=lines.append)
    head = next(line for line in lines if line.startswith("run "))
    assert head.endswith(said)
    assert read_toml(tmp_path / "config.toml")["train.compile"] == setting


def test_a_module_that_cannot_take_the_data_is_one_error_and_its_run_dir_is_not_left_behind(tmp_path: Path) -> None:
    """`pretrain(cfg, encoder=...)` with a module for other inputs (3 channels for grey images, a
    linear layer) raised torch's RuntimeError from the probe of h's size and left the --run-dir it
    had made, empty; a parameter-free fixed feature map trains its head."""
    import re

    ds = tiny_dataset()
    for module, said in [(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), "expected input[2, 1, 28, 28] to have 3 "
                          "channels, but got 1 channels instead"), (nn.Linear(3, 3), "mat1 and mat2 shapes cannot be "
                                                                   "multiplied (56x28 and 3x3)")]:
        with pytest.raises(FastclrError, match=re.escape("the encoder cannot take this data's images, (batch, 1, 28, "
                                                         "28): ")) as e:
            pretrain(tiny_config(tmp_path / "new" / "run", train__device="cpu"), dataset=ds, encoder=module,
                     progress=False, log=lambda s: None)
        assert said in str(e.value)
        assert not (tmp_path / "new").exists()
    fixed = pretrain(tiny_config(tmp_path / "fixed", train__device="cpu"), dataset=ds,
                     encoder=nn.Sequential(nn.AvgPool2d(4), nn.Flatten()), progress=False, log=lambda s: None)
    assert fixed.model.spec.feature_dim == 49 and fixed.steps == 2 * (len(ds.pretrain) // 16)


def test_a_finished_run_whose_last_checkpoint_cannot_be_written_again_keeps_the_epoch_ends_and_exports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run ending on an epoch end writes that step's checkpoint again after the loop, for the
    seconds since; on a disk with room for one copy the finished run ended in an error, with no
    exported encoder, though the epoch end's checkpoint of the very step was complete. That
    checkpoint stands, said in a note, and the run exports; a first write that fails still fails."""
    import fastclr.pretraining.state as state_module
    from fastclr.checkpoint import CheckpointWriteFailed, what_is_kept

    real, written = state_module.save_checkpoint, []

    def room_for_one(run_dir: Path, state: dict[str, Any], **kw: Any) -> Path:
        if int(state["step"]) in written:  # as save_checkpoint says it, with its way on (to resume)
            raise CheckpointWriteFailed(run_dir / "checkpoints" / "x.pt", "No space left on device; 0.0 B free there",
                                        what_is_kept(run_dir))
        written.append(int(state["step"]))
        return real(run_dir, state, **kw)

    monkeypatch.setattr(state_module, "save_checkpoint", room_for_one)
    ds, lines = tiny_dataset(), []
    res = pretrain(tiny_config(tmp_path / "a", train__device="cpu"), dataset=ds, progress=False, log=lines.append)
    last = 2 * (len(ds.pretrain) // 16)
    assert res.steps == last and written == [last // 2, last] and (tmp_path / "a" / "encoder.safetensors").exists()
    # the reason alone: the whole message told the user to resume a run that goes on to finish
    assert f"note: the checkpoint of step {last} written at the epoch end stands, without the seconds since " \
           "(writing it again failed: No space left on device; 0.0 B free there)" in lines
    assert load_checkpoint(list_checkpoints(tmp_path / "a")[-1])["step"] == last
    monkeypatch.setattr(state_module, "save_checkpoint", lambda *a, **kw: (_ for _ in ()).throw(FastclrError("full")))
    with pytest.raises(FastclrError, match="full"):
        pretrain(tiny_config(tmp_path / "b", train__device="cpu"), dataset=ds, progress=False, log=lambda s: None)


def test_a_step_that_cannot_fit_in_available_memory_is_refused_before_the_run_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a container's memory limit `--batch-size 16384` (and a width whose AdamW state did not
    count) grew the process until the kernel killed it, exit 137 and no word: the allocator fails,
    and the command names it, only under `ulimit -v`. A lower bound of what the end of the forward
    pass holds is checked first: the weights and AdamW's two moments (the last step's gradients are
    freed by then); every conv and linear output of every view; the logits and their log-softmax,
    (rows x columns) twice in fp32, or one block's tile; with gradient caching the larger of a
    chunk's activations and the logits, never held together."""
    from fastclr.pretraining.memory import kept_per_image, step_bytes
    from fastclr.runtime import Precision

    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    assert kept_per_image(net, 1, 8) == 4 * 8 * 8 + 10
    cfg = tiny_config(tmp_path / "r", train__batch_size=64)
    bf16, fp32 = Precision("bf16", "x"), Precision("fp32", "x")
    assert step_bytes(cfg, 1000, 266, 1, fp32) == 1000 * 4 * 3 + 128 * 266 * 4 + 2 * 128 * 128 * 4
    assert step_bytes(cfg, 1000, 266, 2, bf16) == 1000 * 4 * 3 + 64 * 266 * 2 + 2 * 64 * 128 * 4  # a rank's rows, all columns
    blocked = tiny_config(tmp_path / "r", train__batch_size=64, train__loss_block=16)
    assert step_bytes(blocked, 1000, 266, 1, fp32) == 1000 * 4 * 3 + 128 * 266 * 4 + 16 * 128 * 4
    cached = tiny_config(tmp_path / "r", train__batch_size=64, train__grad_cache_chunk=8)
    assert step_bytes(cached, 1000, 266, 1, fp32) == 1000 * 4 * 3 + max(16 * 266 * 4, 2 * 128 * 128 * 4)
    # multi-crop's small views (--local-views 3, each keeping 50 numbers): their activations, and their rows in
    # the logits as every view's (they counted nothing: a run of 20,000 small views passed, then ran out of memory)
    small = tiny_config(tmp_path / "r", train__batch_size=64, train__local_views=3)
    assert step_bytes(small, 1000, 266, 1, fp32, per_small=50) == \
        1000 * 4 * 3 + 64 * (2 * 266 + 3 * 50) * 4 + 2 * (5 * 64) * (5 * 64) * 4
    monkeypatch.setattr("fastclr.runtime.available_memory", lambda meminfo=None: 2**20)  # the weights fit, the step not
    with pytest.raises(FastclrError) as e:
        pretrain(tiny_config(tmp_path / "run", train__device="cpu", train__batch_size=96), dataset=tiny_dataset(),
                 progress=False, log=lambda s: None)
    assert str(e.value).startswith("a step of batch 96 (2 views of 28 px, ") and str(e.value).endswith(
        "GiB but 0.0 GiB are available; give a smaller --batch-size, or --grad-cache-chunk 24 (the encoder 24 images "
        "at a time), or run where there is more memory")  # the activations the larger part; a chunk under the batch
    assert not (tmp_path / "run").exists()
    # a fix that would itself be refused is not offered: the memory savers compute the plain loss only
    with pytest.raises(FastclrError) as e:
        pretrain(tiny_config(tmp_path / "run", train__device="cpu", train__batch_size=96, train__views=3),
                 dataset=tiny_dataset(), progress=False, log=lambda s: None)
    assert str(e.value).endswith("GiB are available; give a smaller --batch-size, or run where there is more memory")
    with pytest.raises(FastclrError, match=r"^a step of batch 96 \(2 views of 28 px and 4 of 14 px, "):
        pretrain(tiny_config(tmp_path / "run", train__device="cpu", train__batch_size=96, train__local_views=4),
                 dataset=tiny_dataset(), progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_a_resume_with_another_seed_keeps_the_seed_its_weights_were_drawn_with(tmp_path: Path) -> None:
    """`--resume RUN --seed 3 --allow-config-change` rewrote train.seed in config.toml, and the
    untrained reference of evaluate and the monitor, rebuilt from it, was seed 3's random start,
    not the run's own. config.toml keeps the start's seed (model.init_seed) beside the new one."""
    from fastclr.config import weights_seed
    from fastclr.evaluation.reference import untrained_encoder
    from fastclr.pretrained import load_run
    from fastclr.pretraining.model import build_model

    ds = tiny_dataset()
    pretrain(tiny_config(tmp_path / "run", train__device="cpu", train__epochs=1.0), dataset=ds, progress=False,
             log=lambda s: None)
    pretrain(tiny_config(tmp_path / "run", train__device="cpu", train__epochs=2.0, train__seed=3), dataset=ds,
             resume=tmp_path / "run", allow_config_change=True, progress=False, log=lambda s: None)
    cfg = read_toml(tmp_path / "run" / "config.toml")
    assert (cfg["train.seed"], cfg["model.init_seed"]) == (3, 0)
    run = load_run(tmp_path / "run", log=lambda s: None)
    assert weights_seed(run.config) == 0
    start = tiny_config(tmp_path / "fresh", train__device="cpu")
    torch.manual_seed(0)  # as pretrain draws its encoder
    drawn = build_model(start, ds, torch.device("cpu")).encoder.state_dict()
    rebuilt = untrained_encoder(run.spec, weights_seed(run.config), torch.device("cpu")).state_dict()
    assert all(torch.equal(drawn[k], rebuilt[k].contiguous()) for k in drawn)
    # resumed again with the first seed: the start's seed is train.seed again
    pretrain(tiny_config(tmp_path / "run", train__device="cpu", train__epochs=3.0, train__seed=0), dataset=ds,
             resume=tmp_path / "run", allow_config_change=True, progress=False, log=lambda s: None)
    assert read_toml(tmp_path / "run" / "config.toml")["model.init_seed"] == -1


def test_a_resumed_checkpoint_in_memory_counts_as_held_by_the_memory_checks(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On a resume the checkpoint (weights, AdamW's moments) is in memory when the checks run, its
    moments then the optimiser's own: they were counted twice, so a run that trained near the
    limit could be refused on --resume. The checks subtract the checkpoint's bytes."""
    from fastclr.checkpoint import list_checkpoints, load_checkpoint
    from fastclr.pretraining.memory import tensor_bytes

    ds, seen = tiny_dataset(), []
    first = pretrain(tiny_config(tmp_path / "run", train__device="cpu", train__epochs=1.0), dataset=ds,
                     progress=False, log=lambda s: None)
    assert first.steps
    state = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    held = tensor_bytes(state)
    encoder_bytes = sum(v.numel() * v.element_size() for v in state["encoder"].values())
    assert held > 3 * encoder_bytes  # the encoder's weights and AdamW's two moments of them, at least
    monkeypatch.setattr("fastclr.runtime.require_memory", lambda needed, what, fix: seen.append(needed))
    pretrain(tiny_config(tmp_path / "fresh", train__device="cpu", train__epochs=1.0), dataset=ds, progress=False,
             log=lambda s: None)
    fresh, seen[:] = list(seen), []
    pretrain(tiny_config(tmp_path / "run", train__device="cpu", train__epochs=2.0), dataset=ds,
             resume=tmp_path / "run", progress=False, log=lambda s: None)
    assert len(fresh) == len(seen) == 2 and [a - b for a, b in zip(fresh, seen)] == [held, held]


def test_a_new_run_started_from_a_config_with_init_seed_draws_its_weights_with_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config.toml of a run resumed with another --seed holds model.init_seed; a new run started
    from it (`--config`, or every key being a flag, `--init-seed`) recorded the value but drew its
    weights from --seed, and evaluate's untrained reference was then another network's start. The
    weights are drawn with it, so the run and its reference agree."""
    import fastclr.pretraining.setup as setup_module
    from fastclr.evaluation.reference import untrained_encoder
    from fastclr.pretrained import load_run

    drawn: dict[str, torch.Tensor] = {}
    real = setup_module.build_model

    def capture(*args: Any, **kwargs: Any) -> Any:
        model = real(*args, **kwargs)
        drawn.update({k: v.detach().clone() for k, v in model.encoder.state_dict().items()})
        return model

    monkeypatch.setattr(setup_module, "build_model", capture)
    pretrain(tiny_config(tmp_path / "run", train__device="cpu", model__init_seed=5), dataset=tiny_dataset(),
             progress=False, log=lambda s: None)
    spec = load_run(tmp_path / "run", log=lambda s: None).spec
    for seed, same in ((5, True), (0, False)):
        ref = untrained_encoder(spec, seed, torch.device("cpu")).state_dict()
        assert all(torch.equal(drawn[k], ref[k].contiguous()) for k in drawn) is same, seed
