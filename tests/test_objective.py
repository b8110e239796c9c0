"""--views K, --supcon and --learn-temperature in the training step: the views, the groups, the
gradient of the learned temperature, two ranks against one process, and exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from dist_helpers import run_ranks

from fastclr.augment import render_views, view_params
from fastclr.config import LEARNED_TEMPERATURE_RANGE, AugmentConfig, Config, TrainConfig, apply_overrides
from fastclr.errors import FastclrError
from fastclr.pretraining.multi_positive import multi_positive_loss
from fastclr.pretraining.objective import LearnedTemperature, Objective, is_plain
from fastclr.pretraining.step import SimCLRNet, backward_step
from fastclr.scaleout.distributed import DistContext, all_reduce, setup
from test_distributed import small_net
from tiny import straight_and_resumed

IMAGES, VIEWS, SIZE = 8, 3, 8
LABELS = np.array([0, 1, 0, -1, 2, 1, -1, 0])  # dataset labels, -1: unlabelled


def test_k_views_of_a_rank_are_its_rows_of_the_single_process_views() -> None:
    """Parameters drawn for K x the global batch, each rank keeping its images' rows of every view
    block: the views a rank renders are those one process renders for the same images."""
    cfg = AugmentConfig(blur_p=0.5)
    images = torch.randint(0, 256, (IMAGES, 12, 12, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    one = render_views(images, view_params(images.shape, cfg, torch.Generator().manual_seed(4), torch.device("cpu"),
                                           views=VIEWS), cfg)
    assert one.shape == (VIEWS * IMAGES, 1, 12, 12)
    b = IMAGES // 2
    for rank in range(2):
        mine = images[rank * b:(rank + 1) * b]
        p = view_params(mine.shape, cfg, torch.Generator().manual_seed(4), torch.device("cpu"), global_batch=IMAGES,
                        offset=rank * b, views=VIEWS)
        rows = torch.cat([torch.arange(rank * b, (rank + 1) * b) + v * IMAGES for v in range(VIEWS)])
        assert torch.equal(render_views(mine, p, cfg), one[rows])


def test_groups_follow_images_and_with_supcon_their_labels() -> None:
    cpu = torch.device("cpu")
    idx = torch.tensor([3, 0, 2])
    plain = Objective(TrainConfig(views=VIEWS), None, cpu, None)
    assert plain.groups(idx).tolist() == [3, 0, 2] * VIEWS
    sup = Objective(TrainConfig(views=2, supcon=True), LABELS, cpu, None)
    assert sup.groups(idx).tolist() == [-4, 0, 0] * 2  # image 3 has no label: a group of its own (-1 - 3)


def test_the_learned_temperature_gets_the_closed_form_gradient_and_stays_in_range() -> None:
    """Two views, NT-Xent: l_i = -s_ip / t + log sum_k exp(s_ik / t), so
    dL/dlog t = t dL/dt = mean_i (s_i,pos(i) - sum_k p_ik s_ik) / t."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2 * 6, 5, generator=g, dtype=torch.float64)
    learned = LearnedTemperature(0.2).double()
    obj = Objective(TrainConfig(learn_temperature=True), None, torch.device("cpu"), learned)
    loss, metrics = obj.loss(z, obj.groups(torch.arange(6)), DistContext())
    loss.backward()
    a = torch.nn.functional.normalize(z, dim=1)
    s = a @ a.T
    t = float(learned().detach())  # 0.2 as the float32 parameter holds it
    logits = (s / t).masked_fill(torch.eye(12, dtype=torch.bool), -math.inf)
    p = torch.softmax(logits, 1)
    pos = torch.cat([torch.arange(6, 12), torch.arange(6)])
    expected = (s[torch.arange(12), pos] - (p * s.masked_fill(torch.eye(12, dtype=torch.bool), 0)).sum(1)).mean() / t
    assert float(learned.log_t.grad[0]) == pytest.approx(float(expected), rel=1e-10)
    assert float(metrics["temperature"]) == pytest.approx(0.2, rel=1e-7)
    # An update that carries t out of range is clipped back after the step (Objective.after_update),
    # and at the bound the gradient is alive: a clamp inside the forward pass gave 0 there for good.
    for outside, bound in ((50.0, LEARNED_TEMPERATURE_RANGE[1]), (1e-5, LEARNED_TEMPERATURE_RANGE[0])):
        learned.log_t.data.fill_(math.log(outside))
        obj.after_update(z, None, DistContext())
        assert float(learned().detach()) == pytest.approx(bound)
        learned.log_t.grad = None
        obj.loss(z, obj.groups(torch.arange(6)), DistContext())[0].backward()
        assert abs(float(learned.log_t.grad[0])) > 1e-3


def test_a_learned_temperature_must_start_in_its_range() -> None:
    with pytest.raises(FastclrError, match=r"train.temperature = 2.0 is outside \[0.01, 1\], where --learn-temperature"):
        apply_overrides(Config(), {"train.learn_temperature": True, "train.temperature": 2.0})
    assert apply_overrides(Config(), {"train.temperature": 2.0}).train.temperature == 2.0  # a fixed t may be anything


def global_views() -> torch.Tensor:
    """(K * G, 1, S, S): view 1 of the G images, then view 2, then view 3."""
    return torch.randn(VIEWS * IMAGES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def one_step(rank: int, world: int) -> dict[str, Any]:
    """Loss (averaged over ranks) and gradients of one multi-view supervised step on this rank's share."""
    ctx = setup(torch.device("cpu"), 30.0)
    b = IMAGES // world
    learned = LearnedTemperature(0.3)
    net = SimCLRNet(*small_net(True).children(), learned)
    ddp = DistributedDataParallel(net, forward_sync_buffers=False)
    obj = Objective(TrainConfig(views=VIEWS, supcon=True, learn_temperature=True), LABELS, torch.device("cpu"), learned)
    idx = torch.arange(rank * b, (rank + 1) * b)
    rows = torch.cat([idx + v * IMAGES for v in range(VIEWS)])
    loss, _ = backward_step(ddp, global_views()[rows], 0.3, None, 0, ctx, objective=obj, groups=obj.groups(idx))
    return {"loss": all_reduce(loss, ctx) / world, "grads": {n: p.grad for n, p in net.named_parameters()}}


def test_two_ranks_give_the_multi_view_supcon_loss_and_gradients_of_one_process(tmp_path: Path) -> None:
    """Rows gathered with gradient + DDP's averaging = one process on all K * G views (1e-5, fp32),
    the learned temperature's gradient included; BatchNorm per rank's share, as without --sync-bn."""
    ranks = run_ranks(one_step, 2, tmp_path, timeout=120)
    learned = LearnedTemperature(0.3)
    net = SimCLRNet(*small_net(True).children(), learned)
    obj = Objective(TrainConfig(views=VIEWS, supcon=True, learn_temperature=True), LABELS, torch.device("cpu"), learned)
    # One process on the global batch: the same loss as the ranks' mean when each rank's BatchNorm
    # sees its own share, so the reference runs the shares through the network separately.
    views = global_views()
    b = IMAGES // 2
    z = []
    for r in range(2):
        idx = torch.arange(r * b, (r + 1) * b)
        z.append(net(views[torch.cat([idx + v * IMAGES for v in range(VIEWS)])]))
    shares = [torch.arange(r * b, (r + 1) * b) for r in range(2)]
    groups = [obj.groups(i) for i in shares]
    everything, all_groups = torch.cat(z), torch.cat(groups)
    losses = []
    for r in range(2):
        loss, _ = multi_positive_loss(z[r], groups[r], learned(), candidates=everything, candidate_groups=all_groups,
                                      offset=r * len(groups[r]))
        losses.append(loss)
    mean = torch.stack(losses).mean()
    mean.backward()
    for got in ranks:
        torch.testing.assert_close(got["loss"], mean.detach(), rtol=0, atol=1e-5)
        for n, p in net.named_parameters():
            torch.testing.assert_close(got["grads"][n], p.grad, rtol=0, atol=1e-5, msg=n)
    assert abs(float(learned.log_t.grad[0])) > 1e-4  # the temperature's gradient is checked, not zero


def test_stop_and_resume_with_every_option_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """K = 3 views, supervised contrastive and a learned temperature: the temperature is part of the
    checkpoint, and the resumed run ends bit-equal to the straight one."""
    over: dict[str, object] = {"train__views": 3, "train__supcon": True, "train__learn_temperature": True,
                               "train__precision": "fp32", "train__device": "cpu"}
    a, b = straight_and_resumed(tmp_path, **over)
    assert a["step"] == b["step"] == 12
    for part in ("encoder", "head", "temperature"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["temperature"]["log_t"] != pytest.approx(math.log(TrainConfig().temperature), abs=1e-6)  # it was trained
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["temperature"] for r in logged if "loss" in r]  # logged every window


def test_the_plain_objective_keeps_the_nt_xent_step() -> None:
    """Two views, no labels, a fixed temperature: no Objective object at all, NT-Xent as before."""
    assert is_plain(TrainConfig())
    assert not any(is_plain(dataclasses.replace(TrainConfig(), **o))
                   for o in ({"views": 3}, {"local_views": 1}, {"supcon": True}, {"learn_temperature": True}))


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_a_learned_temperature_with_lars_or_sgd_is_refused_before_anything_is_written(
        optimizer: str, tmp_path: Path) -> None:
    """log t sits with the 1-D parameters, which LARS and SGD step by plain momentum at the
    network's full rate: under LARS's large-batch rate t went 0.2 -> 0.41 -> 0.74 -> 1.0 (its clip)
    in 4 steps and stayed there. AdamW normalises its steps; the others are refused in one line."""
    from tiny import tiny_config, tiny_dataset
    from fastclr.errors import FastclrError
    from fastclr.pretraining.loop import pretrain

    cfg = tiny_config(tmp_path / "run", train__learn_temperature=True, optim__optimizer=optimizer)
    with pytest.raises(FastclrError, match=rf"^--learn-temperature is trained with --optimizer adamw; {optimizer} steps "
                                           r"its log at the network's full learning rate .*: use --optimizer adamw"):
        pretrain(cfg, dataset=tiny_dataset(), progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()
