"""--queue Q: the ring buffer's order and size, the key network's momentum update in closed form,
the loss it feeds, and exact resume with a queue."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_helpers import run_ranks
from fastclr import pretrain
from fastclr.checkpoint import list_checkpoints, load_checkpoint
from fastclr.config import TrainConfig
from fastclr.errors import FastclrError
from fastclr.pretraining.multi_positive import multi_positive_loss
from fastclr.pretraining.objective import Objective
from fastclr.pretraining.queue import KeyNetwork, RowQueue
from fastclr.scaleout.distributed import DistContext, setup
from tiny import tiny_config, tiny_dataset


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def test_the_queue_keeps_the_last_rows_oldest_first() -> None:
    q = RowQueue(5, 3, torch.device("cpu"))
    assert q.oldest_first() is None
    rows = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    q.enqueue(rows[:3])
    assert torch.allclose(q.oldest_first(), unit(rows[:3]))  # not full: the filled rows only
    q.enqueue(rows[3:7])  # wraps around
    assert torch.allclose(q.oldest_first(), unit(rows[2:7]))
    q.enqueue(rows[7:12])
    assert torch.allclose(q.oldest_first(), unit(rows[7:12]))
    q.enqueue(torch.cat([rows, rows]))  # more than it holds: the last five
    assert torch.allclose(q.oldest_first(), unit(rows[7:12]))
    state = q.state_dict()
    r = RowQueue(5, 3, torch.device("cpu"))
    r.load_state_dict(state)
    r.enqueue(rows[:2])
    q.enqueue(rows[:2])
    assert torch.equal(r.oldest_first(), q.oldest_first())


def test_the_key_network_follows_the_online_one_by_the_momentum_rule() -> None:
    """After n updates towards fixed online weights theta: theta_k = m^n theta_k0 + (1 - m^n) theta."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    keys = KeyNetwork(online, momentum=0.9)
    start = [p.detach().clone() for p in keys.net.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online[1].running_mean.fill_(0.5)
    for _ in range(3):
        keys.update()
    for k0, k, theta in zip(start, keys.net.parameters(), online.parameters()):
        assert torch.allclose(k, 0.9 ** 3 * k0 + (1 - 0.9 ** 3) * theta, rtol=1e-12, atol=1e-14)
        assert not k.requires_grad
    assert torch.equal(keys.net[1].running_mean, online[1].running_mean)  # buffers copied


def test_the_objective_adds_the_queue_as_negatives_and_enqueues_every_view() -> None:
    torch.manual_seed(1)
    online = nn.Linear(6, 4).double()
    keys, queue = KeyNetwork(online, 0.5), RowQueue(7, 4, torch.device("cpu"))
    cfg = TrainConfig(queue=7)
    obj = Objective(cfg, None, torch.device("cpu"), None, keys, queue)
    queue.enqueue(torch.randn(5, 4, dtype=torch.float64))
    z = torch.randn(6, 4, dtype=torch.float64)
    groups = obj.groups(torch.arange(3))
    loss, _ = obj.loss(z, groups, DistContext())
    want, _ = multi_positive_loss(z, groups, cfg.temperature, extra=queue.oldest_first())
    assert torch.equal(loss, want)
    views = torch.randn(6, 6, dtype=torch.float64)
    obj.after_update(views, None, DistContext())
    assert queue.filled == 7 and torch.allclose(queue.oldest_first()[-6:], unit(keys.net(views)).float(), atol=1e-6)


def test_the_queue_takes_the_keys_of_the_full_views_from_the_key_network_once_it_has_moved() -> None:
    """MoCo's order (He et al. 2020): theta_k <- m theta_k + (1 - m) theta_q after the online update,
    then k = f_k(x). The queue holds the keys of the full-size views (with --local-views, views =
    (full, small)) from the moved key network: in closed form for a linear network, not the online
    network's keys, the key network's before it moved, or the small crops'."""
    torch.manual_seed(2)
    online = nn.Linear(6, 4).double()
    keys, queue = KeyNetwork(online, 0.5), RowQueue(16, 4, torch.device("cpu"))
    w0, b0 = keys.net.weight.detach().clone(), keys.net.bias.detach().clone()
    obj = Objective(TrainConfig(queue=16, local_views=2), None, torch.device("cpu"), None, keys, queue)
    with torch.no_grad():  # the online update of this step
        online.weight.add_(1.0)
        online.bias.sub_(0.5)
    full, small = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    obj.after_update((full, small), None, DistContext())
    w, b = 0.5 * w0 + 0.5 * online.weight.detach(), 0.5 * b0 + 0.5 * online.bias.detach()
    assert queue.filled == 6
    assert torch.allclose(queue.oldest_first(), unit(full @ w.T + b).float(), atol=1e-6)


def test_stop_and_resume_with_a_queue_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    over: dict[str, object] = {"train__queue": 40, "train__queue_momentum": 0.9, "train__precision": "fp32",
                               "train__device": "cpu"}
    ds = tiny_dataset()
    pretrain(tiny_config(tmp_path / "a", **over), dataset=ds, progress=False, log=lambda s: None)
    assert pretrain(tiny_config(tmp_path / "b", **over), dataset=ds, progress=False, log=lambda s: None,
                    stop=lambda step: step == 5).stopped
    pretrain(tiny_config(tmp_path / "b", **over), resume=tmp_path / "b", dataset=ds, progress=False, log=lambda s: None)
    a, b = (load_checkpoint(list_checkpoints(tmp_path / d)[-1]) for d in "ab")
    assert a["step"] == b["step"] == 12
    assert a["queue"]["filled"] == 40 and a["queue"]["pointer"] == b["queue"]["pointer"] == (12 * 32) % 40
    assert torch.equal(a["queue"]["rows"], b["queue"]["rows"])
    for part in ("encoder", "head", "key_network"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    moved = [k for k in a["head"] if k.endswith("weight") and not torch.equal(a["head"][k], a["key_network"]["head." + k])]
    assert moved  # the key network lags the online one (momentum 0.9), it is not a copy
    assert not math.isnan(float(a["queue"]["rows"].sum()))


def test_supcon_with_a_queue_is_refused(tmp_path: Path) -> None:
    """The queue keeps projections without labels: its rows of an anchor's own class were pushed away."""
    with pytest.raises(FastclrError, match=r"^--supcon and --queue do not combine: the queue keeps no labels"):
        pretrain(tiny_config(tmp_path / "run", train__supcon=True, train__queue=40), dataset=tiny_dataset(),
                 progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_a_resume_that_resizes_the_queue_says_it_starts_empty(tmp_path: Path) -> None:
    """The loss fell to the level of no queue and climbed back as it filled; the note named the new
    size alone. After the resume's first step the queue holds that step's 32 keys only."""
    over: dict[str, object] = {"train__queue": 40, "train__precision": "fp32", "train__device": "cpu"}
    ds, run = tiny_dataset(), tmp_path / "run"
    assert pretrain(tiny_config(run, **over), dataset=ds, progress=False, log=lambda s: None,
                    stop=lambda step: step == 5).stopped
    assert load_checkpoint(list_checkpoints(run)[-1])["queue"]["filled"] == 40
    lines: list[str] = []
    assert pretrain(tiny_config(run, **{**over, "train__queue": 80}), resume=run, allow_config_change=True, dataset=ds,
                    progress=False, log=lines.append, stop=lambda step: step == 6).stopped
    assert ("note: the 40-row queue is not carried over: the 80-row queue starts empty, and its key network starts as "
            "a copy of the network; the loss moves while it fills") in lines
    state = load_checkpoint(list_checkpoints(run)[-1])
    assert state["step"] == 6 and state["queue"]["filled"] == 32


def test_the_key_network_starts_from_the_init_weights(tmp_path: Path) -> None:
    """--queue with --init: the key network is a copy of the network as it starts, init weights
    included (it copied the random draw made before the init was applied). After one step of
    momentum m, theta_k = m theta_k0 + (1 - m) theta_1, so theta_k0 is recovered in closed form."""
    ds = tiny_dataset()
    pretrain(tiny_config(tmp_path / "a", train__epochs=1.0), dataset=ds, progress=False, log=lambda s: None)
    init = load_checkpoint(list_checkpoints(tmp_path / "a")[-1])["encoder"]
    m = 0.5
    over: dict[str, object] = {"train__queue": 40, "train__queue_momentum": m, "train__precision": "fp32",
                               "model__init": str(tmp_path / "a" / "encoder.safetensors")}
    assert pretrain(tiny_config(tmp_path / "b", **over), dataset=ds, progress=False, log=lambda s: None,
                    stop=lambda step: step == 1).stopped
    b = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    assert b["step"] == 1
    weights = [k for k in init if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert weights
    for k in weights:
        start = (b["key_network"]["encoder." + k] - (1 - m) * b["encoder"][k]) / m
        torch.testing.assert_close(start, init[k], rtol=0, atol=1e-6)


IMAGES, VIEWS, DIM = 6, 2, 4


def step_views(step: int) -> torch.Tensor:
    """(K * G, 5): view 1 of the step's G images, then view 2."""
    return torch.randn(VIEWS * IMAGES, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))


def queue_after_steps(rank: int, world: int, size: int) -> torch.Tensor:
    """The queue after three steps of enqueueing this rank's share of every step's views."""
    ctx = setup(torch.device("cpu"), 30.0) if world > 1 else DistContext()
    torch.manual_seed(0)
    keys, queue = KeyNetwork(nn.Linear(5, DIM).double(), 0.0), RowQueue(size, DIM, torch.device("cpu"))
    obj = Objective(TrainConfig(queue=size), None, torch.device("cpu"), None, keys, queue)
    b = IMAGES // world
    share = torch.cat([torch.arange(rank * b, (rank + 1) * b) + v * IMAGES for v in range(VIEWS)])
    for step in range(3):
        obj.after_update(step_views(step)[share], None, ctx)
    return queue.oldest_first()


def test_two_ranks_keep_the_queue_of_one_process(tmp_path: Path) -> None:
    """A queue of 9 rows, 12 keys a step: each step drops 3 of its own keys, and those must be the
    same views (view 1 of the first images) on 2 ranks as on 1 process, in the same order."""
    one = queue_after_steps(0, 1, 9)
    ranks = run_ranks(queue_after_steps, 2, tmp_path, 9, timeout=120)
    torch.manual_seed(0)
    want = unit(nn.Linear(5, DIM).double()(step_views(2))).float()[-9:]  # the last step's last 9 keys
    assert torch.allclose(one, want, atol=1e-6)
    for got in ranks:
        assert torch.equal(got, one)
