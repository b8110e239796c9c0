"""The loop that trains a network on labels (the supervised baseline from scratch, fine-tuning,
distillation's student): its recipe reaches every step, and the baseline is the untrained network
trained as a supervised one is (BatchNorm in train mode, its head fixed by its seed)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from conftest import synthetic_images
import fastclr.evaluation.classifier as classifier
import fastclr.evaluation.supervised as supervised
from fastclr.evaluation.classifier import LabelledSetup, TrainRecipe, shift_and_flip
from fastclr.evaluation.reference import untrained_encoder
from fastclr.models import EncoderSpec, SmallCNN
from fastclr.runtime import FP32

CPU = torch.device("cpu")


def _setup(steps: int, shift: float, warmup: float) -> LabelledSetup:
    x, y = synthetic_images(48, 28, seed=3)
    xt, yt = synthetic_images(16, 28, seed=4)
    return LabelledSetup(x, y % 4, xt, yt % 4, ["a", "b", "c", "d"], torch.tensor([0.2]), torch.tensor([0.3]), 28, CPU,
                         FP32, TrainRecipe(steps=steps, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_fraction=warmup,
                                           shift_fraction=shift, flip_p=0.0))


def _spec() -> EncoderSpec:
    dim = untrained_encoder(EncoderSpec("cnn", 1, 28, 0.25, "n/a", 0, (0.2,), (0.3,), "32|64"), 0, CPU).feature_dim
    return EncoderSpec("cnn", 1, 28, 0.25, "n/a", dim, (0.2,), (0.3,), "32|64")


def test_a_shift_moves_an_image_without_transposing_it() -> None:
    """Each shifted image is one of the 25 crops of the zero-padded image (found by brute force),
    on a non-square image of 2 channels whose every pixel differs; a pixel off the diagonal stays
    on its side of it (a transpose, which a symmetric one-pixel test cannot see, moves it)."""
    x = torch.arange(2 * 7 * 9, dtype=torch.float32).reshape(1, 2, 7, 9).repeat(32, 1, 1, 1) + 1
    out = shift_and_flip(x, 2, 0.0, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for b in range(32):
        assert any(torch.equal(out[b], padded[b, :, dy:dy + 7, dx:dx + 9]) for dy in range(5) for dx in range(5)), b
    dot = torch.zeros(32, 1, 9, 9)
    dot[:, 0, 1, 6] = 1.0
    ys, xs = torch.nonzero(shift_and_flip(dot, 2, 0.0, torch.Generator().manual_seed(1))[:, 0], as_tuple=True)[1:]
    assert int(ys.max()) <= 3 and int(xs.min()) >= 4


def test_the_recipes_shift_and_warm_up_reach_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """shift 0.0625 of 28 px is round(1.75) = 2 px at every step; 10% of 20 steps of warm-up, then
    the cosine, in closed form: lr (s + 1) / 2 for s < 2, then lr (1 + cos(pi (s - 2) / 18)) / 2."""
    shifts: list[int] = []
    rates: list[float] = []
    real_shift, real_optimizer = classifier.shift_and_flip, classifier.build_optimizer

    def shift(x: torch.Tensor, m: int, p: float, g: torch.Generator) -> torch.Tensor:
        shifts.append(m)
        return real_shift(x, m, p, g)

    def optimizer(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        opt = real_optimizer(*args, **kwargs)
        step = opt.step

        def recorded(*a: Any, **k: Any) -> Any:
            rates.append(opt.param_groups[0]["lr"])
            return step(*a, **k)

        opt.step = recorded  # type: ignore[method-assign]
        return opt

    monkeypatch.setattr(classifier, "shift_and_flip", shift)
    monkeypatch.setattr(classifier, "build_optimizer", optimizer)
    torch.manual_seed(0)
    enc = SmallCNN(1, 0.25, "32|64")
    classifier.train_classifier(enc, torch.nn.Linear(enc.feature_dim, 4), _setup(20, 0.0625, 0.1), np.arange(48), seed=0)
    assert len(shifts) == 20 and set(shifts) == {2}
    want = [1e-3 * (s + 1) / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 18)) for s in range(20)]
    assert rates == pytest.approx(want, rel=1e-12)


def test_the_baseline_from_scratch_trains_its_batchnorm_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """A network trained from labels updates BatchNorm's statistics at every step (fine-tuning
    freezes them, the baseline must not): 5 steps, 5 updates of every BatchNorm."""
    made: list[torch.nn.Module] = []

    def keep(*args: Any, **kw: Any) -> torch.nn.Module:
        made.append(untrained_encoder(*args, **kw))
        return made[-1]

    monkeypatch.setattr(supervised, "untrained_encoder", keep)
    supervised.train_from_scratch(_spec(), _setup(5, 0.0, 0.0), np.arange(48), seed=0)
    norms = [m for m in made[-1].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 5 and bool(m.running_mean.any()) for m in norms)


def test_the_baselines_head_is_fixed_by_its_seed_whatever_ran_before() -> None:
    """Subset seed 7's head is nn.Linear drawn right after the encoder, as after torch.manual_seed(7)
    pretrain draws its network (not from the seed's start again: the encoder's first draws),
    whatever the global generator held before."""
    from fastclr.models import encoder_from_spec

    spec = _spec()
    heads = []
    for before in (123, 456):
        torch.manual_seed(before)
        heads.append(supervised.scratch_network(spec, _setup(1, 0.0, 0.0), seed=7)[1].state_dict())
    torch.manual_seed(7)
    encoder_from_spec(spec)
    want = torch.nn.Linear(spec.feature_dim, 4).state_dict()
    for head in heads:
        assert head.keys() == want.keys() and all(torch.equal(head[k], want[k]) for k in want)
