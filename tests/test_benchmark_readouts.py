"""Ways of reading an encoder out of a finished run, measured as levers (benchmarks/): BatchNorm
statistics recomputed on clean images (bn_recalibration.py) are the average of the batches'
statistics, and the weight averages (weight_average.py) follow the closed form of an exponential
moving average; the rotation lever (rotation_lever.py) turns a view by exactly the angle drawn."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from conftest import REPO
from fastclr.evaluation.features import prepare_images
from fastclr.runtime import FP32

sys.path.insert(0, str(REPO / "benchmarks"))
from bn_recalibration import recalibrated  # noqa: E402
from weight_average import Averages  # noqa: E402


def test_recalibrated_statistics_are_the_mean_of_the_batch_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 4, 4, 1), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor([0.3]), torch.tensor([0.2])
    encoder = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten()).eval()
    encoder[0].running_mean.fill_(5.0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    out = recalibrated(encoder, images, mean, std, size=4, precision=FP32, batch_size=4)  # batches of 4, 4, 2
    batches = [prepare_images(images[s:s + 4], mean, std, 4).double() for s in (0, 4, 8)]
    want_mean = sum(float(b.mean()) for b in batches) / 3
    want_var = sum(float(b.var(unbiased=True)) for b in batches) / 3
    bn = out[0]
    assert float(bn.running_mean) == pytest.approx(want_mean, rel=1e-5)
    assert float(bn.running_var) == pytest.approx(want_var, rel=1e-5)
    assert not out.training and bn.momentum == 0.1
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # the original is untouched
    assert torch.equal(bn.weight, encoder[0].weight) and torch.equal(bn.bias, encoder[0].bias)


def test_weight_averages_follow_the_closed_form() -> None:
    torch.manual_seed(0)
    live = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    w0 = {k: v.clone().double() for k, v in live.state_dict().items()}
    averages = Averages(live, [0.9, 0.5])
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
        live[1].running_mean.add_(2.0)
    w = {k: v.clone().double() for k, v in live.state_dict().items()}
    for step in range(7):
        assert averages.update(step) is False  # never stops the run
    for d, net in zip([0.9, 0.5], averages.copies):
        for k, v in net.state_dict().items():
            if v.is_floating_point():  # w_avg after k steps of a constant w: w + d^k (w0 - w)
                assert torch.allclose(v.double(), w[k] + d**7 * (w0[k] - w[k]), atol=1e-6), k
            else:  # the batch counter is not averaged
                assert torch.equal(v, w0[k].to(v.dtype)), k


def test_rotation_lever_turns_views_exactly_by_right_angles() -> None:
    from rotation_lever import rotate

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = rotate(x, torch.tensor([90.0, -90.0, 0.0]))
    assert torch.allclose(y[0], torch.rot90(x[0], -1, (1, 2)), atol=1e-5)  # clockwise as displayed
    assert torch.allclose(y[1], torch.rot90(x[1], 1, (1, 2)), atol=1e-5)
    assert torch.allclose(y[2], x[2], atol=1e-6)
