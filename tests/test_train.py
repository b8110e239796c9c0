"""The training loop: exact resume, determinism, custom encoders, non-finite losses."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import synthetic_images
from fastclr.checkpoint import list_checkpoints, load_checkpoint
from fastclr.config import Config, apply_overrides
from fastclr.data import Dataset, ImageSet
from fastclr.errors import FastclrError
from fastclr.train import NonFiniteLoss, pretrain


def tiny_dataset(n: int = 96, size: int = 28) -> Dataset:
    x, y = synthetic_images(n, size)
    xt, yt = synthetic_images(32, size, seed=9)
    return Dataset("tiny", ImageSet(x, y), ImageSet(x, y), ImageSet(xt, yt), ["a", "b", "c", "d"])


def tiny_config(run_dir: Path, **over: object) -> Config:
    base = {"model.width": 0.125, "model.head_hidden": 32, "model.proj_dim": 16, "train.batch_size": 16,
            "train.epochs": 2.0, "train.run_dir": str(run_dir), "train.log_every": 3, "eval.monitor_every": 0,
            "eval.probe": False, "augment.blur_p": 0.0}
    base.update({k.replace("__", "."): v for k, v in over.items()})
    return apply_overrides(Config(), base)


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
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0])  # the one record, at the last step (12)


def test_training_reduces_the_loss_and_learns_the_synthetic_classes(tmp_path: Path) -> None:
    ds = tiny_dataset(192)
    cfg = tiny_config(tmp_path, train__epochs=6.0, eval__probe=True, train__log_every=1, model__width=0.25)
    res = pretrain(cfg, dataset=ds, progress=False, log=lambda s: None)
    import json

    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert res.probe_accuracy is not None and res.probe_accuracy >= 0.9  # 4 bar positions are easy


def test_any_module_can_be_the_encoder(tmp_path: Path) -> None:
    enc = nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    res = pretrain(tiny_config(tmp_path, train__epochs=1.0), dataset=tiny_dataset(), encoder=enc, progress=False,
                   log=lambda s: None)
    assert res.model is not None and res.model.encoder is enc and res.model.info["feature_dim"] == 8
    assert not torch.equal(enc[0].weight.cpu(), nn.Conv2d(1, 8, 3, 2).weight)  # trained where device "auto" put it


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
    with pytest.raises(NonFiniteLoss, match="non-finite loss or gradient at step 8;"):
        pretrain(cfg, dataset=tiny_dataset(), encoder=PoisonAfter(), progress=False, log=lambda s: None)
    ckpts = list_checkpoints(tmp_path)
    assert ckpts and load_checkpoint(ckpts[-1])["step"] == 6
    assert all(torch.isfinite(v).all() for v in load_checkpoint(ckpts[-1])["encoder"].values() if v.is_floating_point())


def test_bad_settings_are_one_line_errors(tmp_path: Path) -> None:
    ds = tiny_dataset()
    with pytest.raises(FastclrError, match=r"batch size 512 is larger than the dataset \(96 images\); pass --batch-size 96"):
        pretrain(tiny_config(tmp_path, train__batch_size=512), dataset=ds, progress=False, log=lambda s: None)
    with pytest.raises(FastclrError, match="temperature must be > 0"):
        pretrain(tiny_config(tmp_path, train__temperature=0.0), dataset=ds, progress=False, log=lambda s: None)
    with pytest.raises(FastclrError, match="compile must be auto, on or off, got 'maybe'"):
        pretrain(tiny_config(tmp_path / "c", train__compile="maybe"), dataset=ds, progress=False, log=lambda s: None)
    assert not (tmp_path / "c").exists()  # refused before the run directory came into being


def test_the_time_budget_counts_monitor_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget is pretraining wall time: a kNN monitor pass spends it like a step does. The clock
    is the real one plus an offset, and a stand-in monitor pass advances the offset by 1000 s: after
    the first pass (end of epoch 1, step 6) the budget of 6 s is spent, so the first fit (step 15)
    grants exactly one more step and the run ends at 16 with its two passes in the wall time on record.
    Monitoring excluded from the clock, the same run trains for its whole 6 s (hundreds of steps)."""
    import types

    import fastclr.train as train_mod

    offset = [0.0]
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))

    def slow_monitor(*args: object) -> float:
        offset[0] += 1000.0
        return 0.5

    monkeypatch.setattr(train_mod, "monitor_knn", slow_monitor)
    cfg = tiny_config(tmp_path / "run", train__time_budget=0.1, train__epochs=100.0,
                      eval__monitor_every=1, eval__monitor_share=1.0)
    res = pretrain(cfg, dataset=tiny_dataset(), progress=False, log=lambda s: None)
    assert res.steps == 16
    # the passes at steps 6 and 12 (1000 s each) plus the real seconds of the loop, which a loaded
    # machine stretched past 6 s once (checkpoint writes beside a training run)
    assert 2000.0 <= res.train_seconds < 2500.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_acc" in r] == [6, 12]


@pytest.mark.parametrize("share, passes", [(0.05, [6]), (1.0, [6, 12, 18])])
def test_monitor_passes_are_sized_by_their_measured_share_of_the_wall_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: float, passes: list[int]) -> None:
    """A pass that cost 1000 s (a stand-in on a fake clock) is 99% of the first epoch's wall time:
    with the default share of 5% the next passes are skipped until the training time has grown to
    20 times the monitor's; with a share of 1 every epoch end still gets its pass."""
    import types

    import fastclr.train as train_mod

    offset = [0.0]
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))

    def slow_monitor(*args: object) -> float:
        offset[0] += 1000.0
        return 0.5

    monkeypatch.setattr(train_mod, "monitor_knn", slow_monitor)
    cfg = tiny_config(tmp_path / "run", train__epochs=3.0, eval__monitor_every=1, eval__monitor_share=share)
    pretrain(cfg, dataset=tiny_dataset(), progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_acc" in r] == passes
