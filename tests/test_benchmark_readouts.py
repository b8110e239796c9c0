"""Ways of reading an encoder out of a finished run, measured as levers (benchmarks/): BatchNorm
statistics recomputed on clean images (bn_recalibration.py) are the average of the batches'
statistics, and the weight averages (weight_average.py) follow the closed form of an exponential
moving average; the rotation lever (rotation_lever.py) turns a view by exactly the angle drawn;
the encoder levers (encoder_levers.py) change the blocks they name, only within their arm, in the
run's network and its untrained reference alike."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO
from fastclr.evaluation.features import prepare_images
from fastclr.runtime import FP32

sys.path.insert(0, str(REPO / "benchmarks"))
from bn_recalibration import recalibrated  # noqa: E402
from weight_average import Averages  # noqa: E402
from encoder_levers import Blocks, built_with, split_spec  # noqa: E402
from fastclr.evaluation.reference import untrained_encoder  # noqa: E402
from fastclr.models import encoder_from_spec  # noqa: E402
from fastclr.models.cnn import CNN_STAGES, SmallCNN  # noqa: E402
from fastclr.models.spec import EncoderSpec  # noqa: E402


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


def test_encoder_levers_swap_the_named_blocks_only_within_the_arm() -> None:
    assert split_spec("act=silu,train.temperature=0.2,k5=2") == ("train.temperature=0.2", Blocks("silu", "max", 2))
    plain = SmallCNN()
    with built_with(Blocks("gelu", "avg", 2)):
        changed = SmallCNN()
    after = SmallCNN()
    renamed = {"ReLU": "GELU", "MaxPool2d": "AvgPool2d"}
    kinds = [type(m).__name__ for m in plain.modules()]
    assert [type(m).__name__ for m in changed.modules()] == [renamed.get(k, k) for k in kinds]
    assert [type(m).__name__ for m in after.modules()] == kinds  # the class is restored after the arm
    convs = [m for m in changed.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(5, 5)] * 2 + [(3, 3)] * (len(convs) - 2)
    # Parameters other than the two 5x5 convolutions keep their names and shapes, and h its width.
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    wide = {k: v.shape for k, v in changed.state_dict().items() if v.shape != shapes[k]}
    assert set(shapes) == set(changed.state_dict()) and len(wide) == 2
    assert all(s[-2:] == (5, 5) for s in wide.values())
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert changed.eval()(x).shape == plain.eval()(x).shape == (3, plain.feature_dim)


def test_the_activation_lever_builds_what_the_stage_spec_option_builds() -> None:
    def kinds(m: nn.Module) -> list[type]:
        return [type(x) for x in m.modules()]

    with built_with(Blocks("silu")):
        lever = SmallCNN()
    assert kinds(lever) == kinds(SmallCNN(stages="silu:" + CNN_STAGES))
    with built_with(Blocks("silu")):  # an attention readout keeps its ReLU under both
        lever_attn = SmallCNN(stages="32|64|attn64")
    assert kinds(lever_attn) == kinds(SmallCNN(stages="silu:32|64|attn64"))
    assert isinstance(lever_attn.pool.out[1], nn.ReLU)
    with built_with(Blocks("silu", acth="relu")):  # the convolutions' alone
        convs_only = SmallCNN()
    assert {type(m) for m in convs_only.features.modules() if isinstance(m, (nn.ReLU, nn.SiLU))} == {nn.SiLU}
    assert [type(m) for m in convs_only.pool.modules() if isinstance(m, (nn.ReLU, nn.SiLU))] == [nn.ReLU]


def test_an_encoder_lever_untrained_reference_is_built_within_the_arm() -> None:
    """levers.run builds the untrained reference inside the arm, as here: it is then the network
    the run starts from, new 5x5 convolutions included (tests/test_train.py checks the reference
    against pretrain's own first weights)."""
    spec = EncoderSpec("cnn", 1, 28, 1.0, "n/a", 512, (0.5,), (0.25,), stages=CNN_STAGES)
    with built_with(Blocks("silu", "avg", 3)):
        torch.manual_seed(7)
        run_initial = encoder_from_spec(spec)  # pretrain seeds, then builds the encoder first
        reference = untrained_encoder(spec, 7, torch.device("cpu"))
    assert [type(m) for m in reference.modules()] == [type(m) for m in run_initial.modules()]
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in reference.modules())
    ours = reference.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in run_initial.state_dict().items())


def test_every_result_line_names_its_command_commit_date_and_machine(tmp_path: Path) -> None:
    """Results files held the machine and the command (only some of them): which code produced a line,
    and when, had to be guessed from the docs' prose. A line's own fields are kept over these."""
    import datetime
    import json
    import subprocess

    from harness import describe, record

    record(tmp_path / "r.jsonl", {"x": 1, "machine": "as the benchmark named it"})
    (line,) = (tmp_path / "r.jsonl").read_text().splitlines()
    rec = json.loads(line)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    assert rec["commit"].removesuffix("-dirty") == (git.stdout.strip() if git.returncode == 0 else "unknown")
    when = datetime.datetime.strptime(rec["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 120
    assert rec["command"] == " ".join([sys.executable, *sys.argv]) and rec["x"] == 1
    assert rec["machine"] == "as the benchmark named it" != describe()
