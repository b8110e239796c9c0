"""The decoupled contrastive loss measured as a recipe lever (benchmarks/decoupled_loss.py) is the
formula of Yeh et al. 2022: a float64 loop over anchors, positive left out of the denominator; the
temperature schedule (benchmarks/temperature_schedule.py) gives every step the cosine's t."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import fastclr.pretraining.step as step_mod
from conftest import REPO
from fastclr.pretraining import pretrain
from fastclr.pretraining.losses import nt_xent
from fastclr.scaleout.distributed import DistContext
from tiny import tiny_config, tiny_dataset

sys.path.insert(0, str(REPO / "benchmarks"))
from decoupled_loss import decoupled_loss  # noqa: E402
from temperature_schedule import schedule_arm  # noqa: E402


def dcl_loop(z: torch.Tensor, t: float) -> float:
    """mean over the 2N anchors i of -s_ij / t + log sum_{k != i, j} exp(s_ik / t), in float64."""
    u = z.double() / z.double().norm(dim=1, keepdim=True)
    n2 = len(u)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sim = [float(u[i] @ u[k]) / t for k in range(n2)]
        total += -sim[j] + math.log(sum(math.exp(sim[k]) for k in range(n2) if k not in (i, j)))
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_decoupled_loss_is_the_formula(t: float) -> None:
    z = torch.randn(12, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss, _ = decoupled_loss(z, t, 0, DistContext())
    assert float(loss) == pytest.approx(dcl_loop(z, t), rel=1e-10)
    # It differs from NT-Xent by exactly the positive's share of the denominator: DCL < NT-Xent.
    assert float(loss) < float(nt_xent(*z.chunk(2), t))


def test_temperature_schedule_lever_gives_every_step_the_cosines_t(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/temperature_schedule.py: step s of S trains at t_min + (t_max - t_min)(1 + cos(2 pi c s / S)) / 2
    (Kukleva et al. 2023), t_max first and t_min half a period later, and the fixed t again outside the lever."""
    seen: list[float] = []
    original = step_mod.backward_step

    def spy(net: torch.nn.Module, views: torch.Tensor, temperature: float, *rest: object) -> object:
        seen.append(temperature)
        return original(net, views, temperature, *rest)

    monkeypatch.setattr(step_mod, "backward_step", spy)
    ds = tiny_dataset()  # 96 images, batch 16: 6 steps per epoch, 12 in the 2 epochs
    spec, within, extra = schedule_arm("train.temperature=0.1,tmax=0.9,cycles=1.5")
    assert (spec, extra) == ("train.temperature=0.1", {"t_max": 0.9, "cycles": 1.5})  # what levers.py trains and records
    with within():
        pretrain(tiny_config(tmp_path / "a", train__temperature=0.1), dataset=ds, progress=False, log=lambda s: None)
    want = [0.1 + 0.8 * 0.5 * (1 + math.cos(2 * math.pi * 1.5 * s / 12)) for s in range(12)]
    assert seen == pytest.approx(want, rel=1e-12, abs=0)
    assert seen[0] == pytest.approx(0.9) and seen[4] == pytest.approx(0.1)  # s / S = 1 / 3: half a period of 1.5
    seen.clear()
    spec, within, extra = schedule_arm("train.temperature=0.1")  # an arm without tmax= is levers.py's own
    assert (spec, extra) == ("train.temperature=0.1", {})
    with within():
        pretrain(tiny_config(tmp_path / "b", train__temperature=0.1), dataset=ds, progress=False, log=lambda s: None)
    assert seen == [0.1] * 12  # and the patch was undone on leaving the first
