"""Data parallelism on CPU/gloo with spawned ranks: the gradients of one process on the global
batch, the same training run whatever the number of processes, and failures that end every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import cli_env
from tiny import TINY_FLAGS as TINY
from dist_helpers import free_port, rank_env, run_ranks
from fastclr.augment import two_views
from fastclr.checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint
from fastclr.config import AugmentConfig
from fastclr.data.loader import BatchSampler
from fastclr.scaleout.distributed import DistContext, all_reduce, gather_with_grad, setup
from fastclr.scaleout.global_bn import convert_batchnorm
from fastclr.models import ProjectionHead
from fastclr.pretraining.step import SimCLRNet, backward_step

GLOBAL, SIZE = 8, 8  # images in the global batch, view side


def small_net(batch_norm: bool) -> SimCLRNet:
    """A conv encoder and a 2-layer head, with or without BatchNorm, seeded."""
    torch.manual_seed(0)
    norm: list[nn.Module] = [nn.BatchNorm2d(4)] if batch_norm else []
    enc = nn.Sequential(nn.Conv2d(1, 4, 3), *norm, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return SimCLRNet(enc, ProjectionHead(16, 12, 6, 2, batch_norm=batch_norm))


def global_views() -> torch.Tensor:
    """(2G, 1, S, S) laid out [view 1 of G images; view 2 of the same G]."""
    return torch.randn(2 * GLOBAL, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def local_views(views: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's share: both views of images [rB, (r+1)B)."""
    b = GLOBAL // world
    return torch.cat([views[rank * b : (rank + 1) * b], views[GLOBAL + rank * b : GLOBAL + (rank + 1) * b]])


# name: (BatchNorm made global, loss row block, GradCache chunk)
VARIANTS = {"plain": (False, 0, 0), "row-blocks": (False, 3, 0), "grad-cache": (False, 0, 2), "global-bn": (True, 0, 0)}


def one_step(rank: int, world: int) -> dict[str, Any]:
    """Every variant's mean loss over ranks, parameter gradients and BN buffers after one step."""
    ctx = setup(torch.device("cpu"), 30.0)
    out = {}
    for name, (bn, block, chunk) in VARIANTS.items():
        net = small_net(bn)
        if bn:
            net = convert_batchnorm(net, torch.device("cpu"))
        ddp = DistributedDataParallel(net, forward_sync_buffers=False)
        loss, _ = backward_step(ddp, local_views(global_views(), rank, world), 0.2, None, block, ctx, chunk,
                                no_sync=ddp.no_sync)
        out[name] = {"loss": all_reduce(loss, ctx) / world, "grads": {n: p.grad for n, p in net.named_parameters()},
                     "buffers": {n: b.clone() for n, b in net.named_buffers()}}
    # bf16 rows: rank 0 weighs every gathered row 1 + 3/1024, rank 1 weighs it 3/1024. Summed in
    # float32 each row's gradient is 1 + 6/1024, which bf16 (steps of 1/128 above 1) rounds to
    # 1 + 1/128; rounded to bf16 first (1 and 3/1024) and summed in bf16, it was 1.
    x = torch.ones(3, 4, dtype=torch.bfloat16, requires_grad=True)
    gathered = gather_with_grad(x, ctx)
    (gathered.float() * (1 + 3 / 1024 if rank == 0 else 3 / 1024)).sum().backward()
    out["bf16_gather"] = {"dtype": str(gathered.dtype), "grad": x.grad}
    return out


def test_two_ranks_give_the_loss_and_gradients_of_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """Negatives gathered with gradient + DDP's averaging = the single-process step on all 2G views,
    for the plain loss, the row-block loss, gradient caching and global BatchNorm (1e-5, fp32)."""
    ranks = run_ranks(one_step, 2, tmp_path, timeout=120)
    for name, (bn, _, _) in VARIANTS.items():
        net = small_net(bn)
        loss, _ = backward_step(net, global_views(), 0.2, None, 0, DistContext())
        for r in ranks:
            got = r[name]
            torch.testing.assert_close(got["loss"], loss, rtol=0, atol=1e-5, msg=name)
            for n, p in net.named_parameters():
                torch.testing.assert_close(got["grads"][n], p.grad, rtol=0, atol=1e-5, msg=f"{name} {n}")
            for n, b in net.named_buffers():  # BN running statistics: those of the global batch
                torch.testing.assert_close(got["buffers"][n], b, rtol=0, atol=1e-6, msg=f"{name} {n}")
    # The gradient is not trivially small: a factor-of-W error would show.
    assert max(float(p.grad.abs().max()) for p in net.parameters()) > 1e-2
    for r in ranks:  # half-precision rows are gathered, and their gradients summed over ranks, in float32
        assert r["bf16_gather"]["dtype"] == "torch.float32"
        assert r["bf16_gather"]["grad"].dtype == torch.bfloat16
        assert torch.equal(r["bf16_gather"]["grad"], torch.full((3, 4), 1 + 1 / 128, dtype=torch.bfloat16))


def test_converting_batchnorm_keeps_each_layers_parameters_statistics_and_mode() -> None:
    """A network whose BatchNorm layers hold trained statistics (an encoder passed in, a resumed
    run) keeps every parameter and buffer when its layers are made global, and in eval mode, or
    with one process, computes exactly what the plain layers did."""
    from fastclr.scaleout.global_bn import GlobalBatchNorm

    net = small_net(True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, lo, hi in ((m.running_mean, -1.0, 1.0), (m.running_var, 0.5, 2.0), (m.weight, 0.5, 1.5),
                                  (m.bias, -0.5, 0.5)):
                    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g))
                m.num_batches_tracked.fill_(7)
    x = global_views()
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        want = net(x)
    converted = convert_batchnorm(net, torch.device("cpu"))
    layers = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == 2 and all(isinstance(m, GlobalBatchNorm) and not m.training for m in layers)
    after = converted.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    with torch.no_grad():
        assert torch.equal(converted(x), want)
    converted.train()
    with torch.no_grad():  # one process in training mode: the plain layer's batch statistics and update
        got = converted(x)
        net_plain = small_net(True)
        net_plain.load_state_dict(before)
        net_plain.train()
        torch.testing.assert_close(got, net_plain(x), rtol=0, atol=1e-6)
    for k, v in net_plain.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v, rtol=0, atol=1e-7, msg=k)


def test_ranks_take_disjoint_shares_that_make_up_the_single_process_batch_and_views() -> None:
    n, b, world = 40, 4, 2
    one = BatchSampler(n, b * world, seed=3, device=torch.device("cpu"))
    shards = [BatchSampler(n, b, seed=3, device=torch.device("cpu"), rank=r, world_size=world) for r in range(world)]
    assert shards[0].steps_per_epoch == one.steps_per_epoch == 5
    for step in range(7):  # across an epoch boundary
        parts = [s.indices(step) for s in shards]
        assert torch.equal(torch.cat(parts), one.indices(step))
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
    epoch = torch.cat([s.indices(i) for s in shards for i in range(5)])
    assert len(set(epoch.tolist())) == 40  # one epoch covers every image once

    images = torch.randint(0, 256, (2 * b, 12, 12, 3), dtype=torch.uint8)
    cfg = AugmentConfig(crop_size=8)
    full = two_views(images, cfg, torch.Generator().manual_seed(5))  # (4b, 3, 8, 8)
    for r in range(world):
        mine = two_views(images[r * b : (r + 1) * b], cfg, torch.Generator().manual_seed(5), global_batch=2 * b,
                         offset=r * b)
        torch.testing.assert_close(mine, local_views_of(full, r, b, 2 * b), rtol=0, atol=1e-6)


def local_views_of(views: torch.Tensor, rank: int, b: int, g: int) -> torch.Tensor:
    return torch.cat([views[rank * b : (rank + 1) * b], views[g + rank * b : g + (rank + 1) * b]])


# The runs compared: global batch 32 of 96 images (3 steps per epoch), SGD so that rounding
# differences stay rounding differences (Adam divides tiny gradients by their tiny scale).
SAME: dict[str, Any] = {"train__batch_size": 32, "train__precision": "fp32", "train__log_every": 2,
                        "optim__optimizer": "sgd", "optim__lr": 0.01, "optim__lr_scaling": "sqrt",
                        "optim__weight_decay": 0.0, "augment__erase_p": 0.0, "augment__scale_min": 0.6}
"""Random erasing off: a rectangle of one grey level gives many equal activations, which a
rounding-size difference moves across a ReLU together (first-layer weights 4.7e-5 apart after 6
steps with it, measured). Crops from 60% as before the default became 80% (2026-12-02): with 80%
these views put enc.0.weight beyond atol 1e-5 in two of three full-suite runs, the same kind of
rounding across a ReLU. The views themselves are the same under any number of processes, erasing
included (test_objective.py's rank rows)."""


def smooth_encoder() -> nn.Module:
    """Conv-BN-ReLU twice, then average pooling. No max-pooling: on these flat synthetic images
    max-pool windows hold near-ties, and a 5e-7 difference in the weights (the rounding of 1 x 32
    against 2 x 16) re-routes a window's gradient, a 1% jump in the first layer's gradient
    (measured); a smooth encoder keeps rounding differences at rounding size. Seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())


def train_runs(rank: int, world: int, root: Path) -> dict[str, Any]:
    """In one process group: a straight run, a run that rank 1 alone is asked to stop at step 4
    then resumed, and a run whose encoder turns NaN on rank 1 only. Counts which ranks wrote files."""
    import fastclr.locks
    import fastclr.runs
    import fastclr.pretraining.loop as train
    from tiny import tiny_config, tiny_dataset

    setup(torch.device("cpu"), 30.0)  # pretrain adopts this group and leaves it open
    writes: dict[str, int] = {}

    def counting(name: str, fn: Any) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            writes[name] = writes.get(name, 0) + 1
            return fn(*a, **k)
        return wrapped

    import fastclr.pretraining.state as state

    saving = {"delay": 0.0, "fail": False}  # rank 0's checkpoint writes made slow, or failing, for one run
    counted = counting("save_checkpoint", state.save_checkpoint)

    def save_checkpoint(*a: Any, **k: Any) -> Any:
        if saving["fail"]:
            raise OSError(28, "No space left on device", str(root / "full"))
        time.sleep(float(saving["delay"]))
        return counted(*a, **k)
    state.save_checkpoint = save_checkpoint
    for name in ("write_config", "save_encoder", "write_json", "prepare_run_dir"):
        setattr(train, name, counting(name, getattr(train, name)))
    real_log = fastclr.runs.MetricsLog.log
    fastclr.runs.MetricsLog.log = lambda self, rec: (counting("metrics", real_log) if self.enabled else real_log)(self, rec)

    ds = tiny_dataset(96)  # global batch 32: 3 steps per epoch
    def cfg(run: str, **over: Any) -> Any:
        return tiny_config(root / run, **{**SAME, "eval__probe": True, **over})
    lines: list[str] = []
    straight = train.pretrain(cfg("straight"), dataset=ds, encoder=smooth_encoder(), progress=False, log=lines.append)
    # Only rank 1 is asked to stop (as if only its node got SIGTERM): both stop at the same step.
    saving["delay"] = 1.0  # a slow write: rank 1 returned (and under torchrun exited 75) before it was on disk
    first = train.pretrain(cfg("resumed"), dataset=ds, encoder=smooth_encoder(), progress=False, log=lambda s: None,
                           stop=lambda s: rank == 1 and s >= 4)
    saving["delay"] = 0.0
    on_disk_at_return = [load_checkpoint(c)["step"] for c in list_checkpoints(root / "resumed")]
    second = train.pretrain(cfg("resumed"), resume=root / "resumed", dataset=ds, encoder=smooth_encoder(),
                            progress=False, log=lambda s: None)

    class PoisonOnRank1(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.calls = nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += self.training
            h = self.net(x)
            return h * float("nan") if rank == 1 and self.calls >= 5 else h

    try:
        train.pretrain(cfg("nan", train__epochs=3.0, train__checkpoint_every=2, train__log_every=100), dataset=ds,
                       encoder=PoisonOnRank1(), progress=False, log=lambda s: None)
        nan_error = ""
    except train.NonFiniteLoss as e:
        nan_error = str(e)
    try:  # rank 0 starts a run afresh while rank 1 resumes one (--resume auto seeing different directories)
        if rank == 0:
            train.pretrain(cfg("mixed"), dataset=ds, encoder=smooth_encoder(), progress=False, log=lambda s: None)
        else:
            train.pretrain(cfg("resumed"), resume=root / "resumed", dataset=ds, encoder=smooth_encoder(),
                           progress=False, log=lambda s: None)
        mixed_error = ""
    except train.FastclrError as e:
        mixed_error = str(e)
    # Rank 1 given another setting, other images of the same count, fewer images, or (resuming) a checkpoint of the
    # same step with other content: it trained on silently, or (other counts of steps) waited for the timeout.
    import dataclasses
    import shutil

    from fastclr.checkpoint import save_checkpoint
    from fastclr.data import ImageSet
    if rank == 0:
        for copy in ("ck-a", "ck-b"):
            shutil.copytree(root / "straight", root / copy)
        ck = load_checkpoint(list_checkpoints(root / "ck-b")[-1])
        ck["encoder"]["0.weight"] += 1e-3
        save_checkpoint(root / "ck-b", ck)
    all_reduce(torch.zeros(1), DistContext(rank, world))  # the copies exist before either rank resumes
    flipped = dataclasses.replace(ds, pretrain=ImageSet(ds.pretrain.images[:, ::-1].copy(), ds.pretrain.labels))
    fewer = tiny_dataset(64)
    given_other: dict[str, str] = {}
    for case, over, data, resume in (("setting", {"train__temperature": 0.5}, ds, None),
                                     ("layout", {"train__channels_last": False}, ds, None), ("images", {}, flipped, None),
                                     ("count", {}, fewer, None), ("checkpoint", {}, ds, "ck")):
        try:
            train.pretrain(cfg(resume or f"other-{case}", train__epochs=3.0, **(over if rank == 1 else {})),
                           dataset=data if rank == 1 else ds, encoder=smooth_encoder(), progress=False,
                           log=lambda s: None, resume=root / ("ck-a" if rank == 0 else "ck-b") if resume else None)
            given_other[case] = ""
        except train.FastclrError as e:
            given_other[case] = str(e)
    # Each rank reads its own copy of a built-in (a node's disk); rank 1's is truncated. Rank 0 went on into
    # the next collective and blamed a lost peer ("start the run again with the same command"), first.
    from conftest import write_idx_dataset

    mine = root / f"data-rank{rank}"
    write_idx_dataset(mine / "mnist", n_train=96, n_test=32)
    if rank == 1:
        labels = mine / "mnist" / "train-labels-idx1-ubyte.gz"
        labels.write_bytes(labels.read_bytes()[:-10])
    try:
        train.pretrain(cfg("unreadable", data__name="mnist", data__root=str(mine), data__download=False),
                       encoder=smooth_encoder(), progress=False, log=lambda s: None)
        unreadable_error = ""
    except train.FastclrError as e:
        unreadable_error = str(e)
    held = None
    if rank == 0:  # another process writing the run directory: rank 0 is refused the lock
        (root / "held").mkdir()
        held = fastclr.locks.RunLock(root / "held", log=lambda s: None)
    began = time.perf_counter()
    try:
        train.pretrain(cfg("held"), dataset=ds, encoder=smooth_encoder(), progress=False, log=lambda s: None)
        held_error = ""
    except train.FastclrError as e:
        held_error = str(e)
    held_seconds = time.perf_counter() - began
    if held is not None:
        held.release()
    if rank == 0:  # a resume whose metrics.jsonl is damaged mid-file: rank 0 refuses it while recording the run
        import shutil

        shutil.copytree(root / "straight", root / "damaged")
        lines_kept = (root / "damaged" / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (root / "damaged" / "metrics.jsonl").write_text(lines_kept[0] + "{not json\n" + "".join(lines_kept[1:]),
                                                        encoding="utf-8")
    all_reduce(torch.zeros(1), DistContext(rank, world))  # the copy exists before either rank resumes
    began = time.perf_counter()
    try:
        train.pretrain(cfg("damaged", train__epochs=3.0), resume=root / "damaged", dataset=ds, encoder=smooth_encoder(),
                       progress=False, log=lambda s: None)
        damaged_error = ""
    except train.FastclrError as e:
        damaged_error = str(e)
    damaged_seconds = time.perf_counter() - began
    saving["fail"] = True  # rank 0 cannot write the first checkpoint: both ranks end, neither waits for a timeout
    began = time.perf_counter()
    try:
        train.pretrain(cfg("full"), dataset=ds, encoder=smooth_encoder(), progress=False, log=lambda s: None)
        write_error = ""
    except (OSError, train.FastclrError) as e:
        write_error = f"{type(e).__name__}: {e}"
    write_error_seconds, saving["fail"] = time.perf_counter() - began, False
    train.pretrain(cfg("grad-cache", train__grad_cache_chunk=8, train__epochs=1.0), dataset=ds, encoder=smooth_encoder(), progress=False,
                   log=lambda s: None)
    # A 6 s budget on clocks that disagree: rank 1's has spent it at its first step (which alone
    # would bring the first fit forward), rank 0's reaches the planned fit at step 15 well within it.
    ticks = iter(range(10**9))
    budgeted = train.pretrain(cfg("budget", train__time_budget=0.1, train__checkpoint_every=10**6), dataset=ds,
                              encoder=smooth_encoder(), progress=False, log=lambda s: None,
                              clock=lambda: next(ticks) * (100.0 if rank == 1 else 0.01))
    # Steps slow on rank 1's clock (10 s each), a log every 100 steps, checkpoints at epoch ends (3, 6, 9): a stop
    # asked of rank 1 at step 5 waited for the epoch end at step 6 (with 5 s steps under torchrun, for its
    # 30 s of grace to run out and a kill); the ranks now agree every STOP_WITHIN_S of the slowest one's steps.
    ticks_slow = iter(range(10**9))
    slow = train.pretrain(cfg("slow-stop", train__epochs=3.0, train__log_every=100), dataset=ds, encoder=smooth_encoder(),
                          progress=False, log=lambda s: None, stop=lambda s: rank == 1 and s >= 5,
                          clock=lambda: next(ticks_slow) * (10.0 if rank == 1 else 0.01))
    # Width auto where the ranks' own answers differ (as nodes with other devices would give): rank 1
    # alone would build its network at half the channels, and its weights would fit no other rank's.
    real_width = train.resolve_width
    if rank == 1:
        train.resolve_width = lambda width, encoder, device_type: 0.5
    auto = train.pretrain(cfg("auto-width", model__width=0.0, model__cnn_stages="8|16|fc16", train__epochs=1.0,
                              eval__probe=False), dataset=ds, progress=False, log=lambda s: None)
    train.resolve_width = real_width
    assert auto.model is not None
    return {"steps": (straight.steps, first.steps, first.stopped, second.steps), "writes": writes, "lines": lines,
            "budget_steps": budgeted.steps, "slow_stop": (slow.steps, slow.stopped),
            "auto_width_shapes": {k: tuple(v.shape) for k, v in auto.model.encoder.state_dict().items()},
            "probe": straight.probe_accuracy, "nan_error": nan_error, "on_disk_at_return": on_disk_at_return,
            "write_error": write_error, "mixed_error": mixed_error, "given_other": given_other, "held_error": held_error, "held_seconds": held_seconds,
            "damaged_error": damaged_error, "damaged_seconds": damaged_seconds, "write_error_seconds": write_error_seconds,
            "unreadable_error": unreadable_error}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("ddp")
    return root, run_ranks(train_runs, 2, root / "results", root, timeout=240)


def params(run: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(list_checkpoints(run)[-1])
    return {**{f"enc.{k}": v for k, v in state["encoder"].items()}, **{f"head.{k}": v for k, v in state["head"].items()}}


def test_two_ranks_of_batch_b_train_like_one_process_of_batch_2b(two_rank_runs: tuple[Path, list[dict[str, Any]]],
                                                                  tmp_path: Path) -> None:
    """Same config (global batch 32, global BN): 2 x 16 and 1 x 32 reach the same parameters."""
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config, tiny_dataset

    root, _ = two_rank_runs
    cfg = tiny_config(tmp_path, **SAME)
    pretrain(cfg, dataset=tiny_dataset(96), encoder=smooth_encoder(), progress=False, log=lambda s: None)
    one, two = params(tmp_path), params(root / "straight")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    start = load_checkpoint(list_checkpoints(tmp_path)[0])  # step 3: the parameters did move
    moved = max(float((start["encoder"][k] - one[f"enc.{k}"]).abs().max()) for k in start["encoder"]
                if start["encoder"][k].is_floating_point())
    assert moved > 1e-3
    logged = lambda run: [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                          if "loss" in r]
    for (s1, l1), (s2, l2) in zip(logged(tmp_path), logged(root / "straight"), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)  # the logged loss is the global batch's


def test_gradient_caching_with_batchnorm_trains_like_one_process(two_rank_runs: tuple[Path, list[dict[str, Any]]],
                                                                  tmp_path: Path) -> None:
    """Chunks of 8 (ghost BatchNorm): each process's chunk is one of the single process's chunks,
    normalised alone, so 2 x 16 and 1 x 32 reach the same weights. With BatchNorm made global, a
    chunk was normalised with the other process's chunk (16 images, not 8): weights 0.25 apart.
    One epoch (3 steps): longer, this run's trajectory meets near-ties that turn rounding into
    1e-3 differences, the same between 1 and 2 threads of one process (measured)."""
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config, tiny_dataset

    root, _ = two_rank_runs
    pretrain(tiny_config(tmp_path, **SAME, train__grad_cache_chunk=8, train__epochs=1.0), dataset=tiny_dataset(96),
             encoder=smooth_encoder(), progress=False, log=lambda s: None)
    one, two = params(tmp_path), params(root / "grad-cache")
    # Running statistics are each process's own chunks (rank 0's saved), not compared.
    weights = [k for k in one if not any(w in k for w in ("running_", "num_batches"))]
    for k in weights:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    start = smooth_encoder().state_dict()
    assert max(float((start[k] - one[f"enc.{k}"]).abs().max()) for k in start if f"enc.{k}" in weights) > 1e-3


def test_rank_0_alone_writes_and_states_the_global_batch(two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    root, (r0, r1) = two_rank_runs
    assert r1["writes"] == {} and r1["lines"] == [] and r1["probe"] is None
    assert {"save_checkpoint", "write_config", "save_encoder", "write_json", "prepare_run_dir", "metrics"} <= set(r0["writes"])
    steps = [json.loads(line)["step"] for line in (root / "straight" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [2, 3, 4, 6]  # one record per log step and per checkpoint (epochs of 3 steps), not per rank
    head = next(line for line in r0["lines"] if line.startswith("run "))
    assert "global batch 32 (2 processes x 16)" in head and "lr 0.01 with sqrt scaling to the global batch 32" in head
    assert f"peak lr {0.01 * 32 ** 0.5:g}" in head


def test_a_stop_asked_of_one_rank_stops_both_and_resume_continues_exactly(
        two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    root, (r0, r1) = two_rank_runs
    assert r0["steps"] == r1["steps"] == (6, 4, True, 6)  # (straight, stopped at, stopped, resumed to)
    assert load_checkpoint(list_checkpoints(root / "resumed")[0])["step"] == 4  # written at the stop
    # every rank returns from a stop only once rank 0's checkpoint (made 1 s slow) is on disk
    assert r0["on_disk_at_return"][-1] == r1["on_disk_at_return"][-1] == 4


def test_a_stop_with_slow_steps_is_agreed_at_the_next_step_not_the_next_log(
        two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    root, (r0, r1) = two_rank_runs
    assert r0["slow_stop"] == r1["slow_stop"] == (5, True)
    assert load_checkpoint(list_checkpoints(root / "slow-stop")[-1])["step"] == 5


def test_the_ranks_agree_about_every_few_seconds_of_the_slowest_ones_steps() -> None:
    from fastclr.pretraining.loop import STOP_WITHIN_S, agree_every

    assert STOP_WITHIN_S == 5.0
    assert [agree_every(step_s, 25) for step_s in (5.2, 2.5, 1.0, 0.3, 0.2, 0.01, 0.0)] == [1, 2, 5, 16, 25, 25, 25]
    assert agree_every(1.0, 3) == 3  # never past the log interval, where they agree anyway


def test_rank_0s_clock_decides_whether_a_time_budgets_first_fit_comes_early(
        two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    """Both ranks train the same steps, as many as rank 0's clock allows: past its first fit at step 15
    (rank 1's clock alone would have fitted at step 1 and ended at step 2)."""
    _, (r0, r1) = two_rank_runs
    assert r0["budget_steps"] == r1["budget_steps"] > 15


def test_width_auto_is_rank_0s_choice_on_every_rank(two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    """Rank 1's own answer was half the channels: both ranks trained rank 0's network (the cnn's
    full width on a CPU), and config.toml records that width."""
    from fastclr import config as config_mod
    from fastclr.models import build_encoder

    def shapes(width: float) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in build_encoder("cnn", 1, 28, width, "auto", "8|16|fc16").state_dict().items()}

    root, (r0, r1) = two_rank_runs
    assert r0["auto_width_shapes"] == r1["auto_width_shapes"] == shapes(1.0) != shapes(0.5)
    assert config_mod.read_toml(root / "auto-width" / "config.toml")["model.width"] == 1.0


def test_ranks_that_disagree_on_resuming_end_with_one_line_before_writing(
        two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    """A fresh rank 0 and a resuming rank 1 met in different collectives (a broadcast against an
    all-reduce): a hang until the timeout, or garbage. Now both say so and nothing is written."""
    root, (r0, r1) = two_rank_runs
    assert r0["mixed_error"] == r1["mixed_error"] == (
        "some ranks start the run afresh and others resume it from step 6 (a checkpoint some saw and others did not); "
        "the run directory must be on a filesystem that every node sees: run the same command again")
    assert not (root / "mixed").exists()


def test_ranks_given_other_settings_data_or_checkpoints_end_with_one_line_naming_it(
        two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    """Two nodes with a node-local --config or store at the same path, or a run directory that is
    not the same on both: every rank ends with the same line naming what differs, before writing."""
    root, (r0, r1) = two_rank_runs
    way = ("; every rank must run the same command on the same data (a store every node sees, or identical copies) "
           "and the same run directory")
    assert r0["given_other"] == r1["given_other"] == {
        "setting": "the ranks were not given the same run: rank 1 has --temperature 0.5 (rank 0: 0.2)" + way,
        # DistributedDataParallel compares the parameters' strides: a traceback on one rank, a lost peer on the other
        "layout": "the ranks were not given the same run: rank 1 has --channels-last False (rank 0: True)" + way,
        "images": "the ranks were not given the same run: rank 1's data differs from rank 0's (other images or labels)"
                  + way,
        "count": "the ranks were not given the same run: rank 1's data differs from rank 0's (64 images to rank 0's "
                 "96)" + way,
        "checkpoint": "the ranks were not given the same run: rank 1 read another checkpoint's content than rank 0 at "
                      "the same step (a run directory that is not the same on every node)" + way}
    assert not any((root / f"other-{case}").exists() for case in ("setting", "layout", "images", "count"))
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(root / "ck-a")] == [3, 6]  # nothing trained on


def test_data_one_rank_cannot_read_is_its_own_line_and_the_others_say_so(
        two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    root, (r0, r1) = two_rank_runs
    assert r0["unreadable_error"] == "rank 0: another rank could not read its data (its line says why)"
    assert "train-labels-idx1-ubyte.gz" in r1["unreadable_error"] and "rank 0" not in r1["unreadable_error"]
    assert not (root / "unreadable").exists()


def test_a_run_directory_rank_0_cannot_take_ends_every_rank_at_once(two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    """Rank 0 refused the lock (another process writes the run) and exited; rank 1 went on into the
    model's collectives and, under torchrun, was ended by SIGTERM with "writing a checkpoint" and
    "lost contact with another rank ... resume" lines that did not apply."""
    root, (r0, r1) = two_rank_runs
    assert r0["held_error"].startswith(f"{root / 'held'} is being written by PID ")
    assert r1["held_error"] == f"rank 1: rank 0 could not take {root / 'held'} for this run (its error says why)"
    assert r1["held_seconds"] < 15


def test_a_run_rank_0_cannot_record_on_resume_ends_every_rank_at_once(
        two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    root, (r0, r1) = two_rank_runs
    assert "metrics.jsonl" in r0["damaged_error"]
    assert r1["damaged_error"] == f"rank 1: rank 0 could not record the run in {root / 'damaged'} (its error says why)"
    assert r1["damaged_seconds"] < 15


def test_a_checkpoint_rank_0_cannot_write_ends_every_rank_at_once(two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    """Rank 0 raises its write error; rank 1 says rank 0 could not write, at once (it waited for
    rank 0 in the next step's collectives until the 30 s timeout, then blamed a lost peer)."""
    root, (r0, r1) = two_rank_runs
    assert r0["write_error"].startswith("OSError: [Errno 28] No space left on device")
    assert r1["write_error"] == (f"FastclrError: rank 1: rank 0 could not write the checkpoint of step 3 (its error says "
                                 f"why); the last complete checkpoint in {root / 'full'} is kept")
    assert r1["write_error_seconds"] < 15  # the collectives' timeout is 30 s
    assert list_checkpoints(root / "full") == []
    a, b = params(root / "straight"), params(root / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_on_one_rank_stops_both_at_the_same_step(two_rank_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    root, (r0, r1) = two_rank_runs
    # rank 1's 5th training forward is step 5
    assert r0["nan_error"] == r1["nan_error"] != ""
    assert r0["nan_error"].startswith("non-finite loss or gradient at step 5;")
    _, state = latest_valid_checkpoint(root / "nan")
    assert state["step"] == 4


def test_a_killed_rank_makes_the_other_exit_nonzero_within_the_timeout(tmp_path: Path) -> None:
    """SIGKILL rank 1 mid-run: rank 0 fails its next collective, exits 2 with a one-line error well
    within the timeout that names the run directory to resume (here one the run chose itself, under
    runs/), and the checkpoint it last wrote verifies."""
    env, port = cli_env(tmp_path), free_port()
    args = [sys.executable, "-m", "fastclr", "pretrain", "--data", "mnist", "--epochs", "50",
            *TINY, "--checkpoint-every", "1", "--monitor-every", "0", "--probe", "false", "--device", "cpu",
            "--threads", "1", "--dist-timeout", "20"]
    procs = [subprocess.Popen(args, env={**env, **rank_env(r, 2, port)}, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        end = time.monotonic() + 90
        while not list(tmp_path.glob("runs/*")) and time.monotonic() < end:
            time.sleep(0.05)
        run = next(tmp_path.glob("runs/*"))
        while len(list_checkpoints(run)) < 2 and time.monotonic() < end and procs[0].poll() is None:
            time.sleep(0.05)
        assert len(list_checkpoints(run)) >= 2, procs[0].stderr.read() if procs[0].poll() is not None else "too slow"
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    assert procs[0].returncode == 2 and waited < 25, (procs[0].returncode, waited, err)
    assert "rank 0 of 2: lost contact with another rank" in err and "Traceback" not in err
    assert f"--resume {run.relative_to(tmp_path)}" in err, err
    for p in list_checkpoints(run):
        load_checkpoint(p)
    assert latest_valid_checkpoint(run)[1]["step"] >= 2


def fetch_once(rank: int, world: int, fail: bool, seconds: float = 0.5, timeout_s: float = 30.0) -> dict[str, Any]:
    """Both ranks ask for a missing built-in dataset; the download is a stand-in that takes
    `seconds`, in a process group whose collectives time out after `timeout_s`."""
    import fastclr.pretraining.loop as loop
    from fastclr.config import DataConfig
    from fastclr.errors import FastclrError

    ctx = setup(torch.device("cpu"), timeout_s)
    calls: list[float] = []

    def ensure(name: str, root: Any = None, download: bool = True) -> Path:
        calls.append(time.perf_counter())
        time.sleep(seconds)
        calls.append(time.time())  # the download's end, on the clock both ranks share
        if fail:
            raise FastclrError("cannot download cifar10 (no route to host); check the network")
        return Path("/nowhere")
    loop.ensure = ensure  # type: ignore[assignment]
    began = time.perf_counter()
    try:
        loop._fetch_once_a_node(DataConfig(name="cifar10"), ctx, torch.device("cpu"))
        error = ""
    except FastclrError as e:
        error = str(e)
    # the ranks leave setup() at different moments, so each one's own wait is not the download's length
    return {"calls": len(calls) // 2, "done": calls[-1] if calls else None, "went_on": time.time(),
            "waited": time.perf_counter() - began, "error": error}


def decode_stl10(rank: int, world: int, root: str, download: bool) -> dict[str, Any]:
    """Both ranks start on a small STL-10 (found, not downloaded); each counts the files it writes."""
    import fastclr.data.decoded as decoded
    import fastclr.pretraining.loop as loop
    from fastclr.config import DataConfig
    from fastclr.data import load_builtin

    ctx = setup(torch.device("cpu"), 30.0)
    writes: list[int] = []
    write = decoded.atomic_write_all

    def counted(files: Any) -> None:
        writes.append(len(files))
        write(files)
    decoded.atomic_write_all = counted  # type: ignore[assignment]
    loop._fetch_once_a_node(DataConfig(name="stl10", root=root, download=download), ctx, torch.device("cpu"))
    images = load_builtin("stl10", root, download=False).pretrain.images
    return {"writes": writes, "mapped": str(getattr(images.base, "filename", "")), "sum": int(images.sum())}


@pytest.mark.parametrize("download", [True, False])
def test_a_node_decodes_stl10_once_and_its_ranks_map_the_one_file(tmp_path: Path, download: bool) -> None:
    """Each rank decoded the 3.0 GB of STL-10 into memory of its own: a node's first rank decodes it
    into one file while the others wait, then every rank maps that file (the same pixels); with
    downloads off too (compute nodes without a network), where no rank downloads."""
    from conftest import write_stl10

    imgs = write_stl10(tmp_path / "data")
    r0, r1 = run_ranks(decode_stl10, 2, tmp_path / "out", str(tmp_path / "data"), download, timeout=60)
    assert (r0["writes"], r1["writes"]) == ([2], [])  # the array and its record, by rank 0 alone
    assert r0["mapped"] == r1["mapped"] == str(tmp_path / "data" / "stl10_binary" / "fastclr-stl10-pretrain.npy")
    assert r0["sum"] == r1["sum"] == int(imgs["unlabeled"].sum()) + int(imgs["train"].sum())


@pytest.mark.parametrize("fail", [False, True])
def test_a_missing_dataset_is_downloaded_by_one_rank_a_node_while_the_others_wait(fail: bool, tmp_path: Path) -> None:
    """Every rank downloaded the same archives into the same folder; a failed download ends all."""
    r0, r1 = run_ranks(fetch_once, 2, tmp_path, fail, timeout=60)
    assert (r0["calls"], r1["calls"]) == (1, 0)
    assert r1["went_on"] >= r0["done"]  # rank 1 goes on only once rank 0's download is done
    if fail:
        assert r0["error"] == "cannot download cifar10 (no route to host); check the network"
        assert r1["error"] == ("rank 1: cifar10 could not be downloaded (the error of the rank that downloaded it "
                               "says why)")
    else:
        assert r0["error"] == r1["error"] == ""


def fetch_other_data(rank: int, world: int) -> tuple[str, float]:
    """Rank 1 names a dataset that is none (a typo on its node), rank 0 a built-in to download."""
    import fastclr.pretraining.loop as loop
    from fastclr.config import DataConfig
    from fastclr.errors import FastclrError

    ctx = setup(torch.device("cpu"), 30.0)
    loop.ensure = lambda *a, **kw: Path("/nowhere")  # type: ignore[assignment]
    began = time.perf_counter()
    try:
        loop._fetch_once_a_node(DataConfig(name="mnist" if rank == 0 else "mnst"), ctx, torch.device("cpu"))
        return "", time.perf_counter() - began
    except FastclrError as e:
        return str(e), time.perf_counter() - began


def test_ranks_given_other_data_agree_before_one_waits_for_the_others_download(tmp_path: Path) -> None:
    """A node given another --data (here a typo) skipped the download's group and went on alone to fail,
    while the other waited in that group for its 24 hours: both now end at once with one line."""
    (e0, t0), (e1, t1) = run_ranks(fetch_other_data, 2, tmp_path, timeout=60)
    assert e0 == ("rank 0: the ranks were given different data (here --data mnist, and another elsewhere); give "
                  "every node the same command") and e1.startswith("rank 1: the ranks were given different data (here "
                                                                   "--data mnst,")
    assert max(t0, t1) < 20


def test_a_download_may_outlast_the_collectives_timeout(tmp_path: Path) -> None:
    """A 3-s download under a 1-s --dist-timeout: the waiting rank's all-reduce timed out and it
    blamed a lost peer while the download went on (STL-10's 2.6 GB against the default 10 minutes)."""
    r0, r1 = run_ranks(fetch_once, 2, tmp_path, False, 3.0, 1.0, timeout=60)
    assert (r0["calls"], r1["calls"]) == (1, 0) and r0["error"] == r1["error"] == ""
    assert r1["went_on"] >= r0["done"] and r1["waited"] > 1.0  # past the collectives' timeout


def test_torchrun_end_to_end(tmp_path: Path) -> None:
    """`python -m torch.distributed.run --nproc_per_node=2 -m fastclr pretrain ...` on CPU."""
    env, run = cli_env(tmp_path), tmp_path / "run"
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                        str(free_port()), "-m", "fastclr", "pretrain", "--data", "mnist", "--epochs", "1",
                        "--run-dir", str(run), *TINY, "--probe", "false", "--device", "cpu"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("global batch 32 (2 processes x 16)") == 1  # rank 0 alone logs
    state = load_checkpoint(list_checkpoints(run)[-1])
    assert state["step"] == 8  # 256 images / global batch 32
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in records if "knn_acc" in r] == [8]  # the kNN monitor, on rank 0 alone


def test_a_lost_rank_is_told_what_survives(tmp_path: Path) -> None:
    """The line a surviving rank exits with told every run to resume from "the last checkpoint",
    also a run that had written none (lost in the first epoch: --resume then refuses) and one whose
    directory was not chosen yet ("--resume the run directory")."""
    from tiny import tiny_dataset, tiny_run
    from fastclr.pretraining.loop import _after_peer_loss

    run = tiny_run(tmp_path / "run", tiny_dataset(64))
    newest = list_checkpoints(run)[-1]
    assert _after_peer_loss(run) == (f"{newest.name} in {run} is kept; resume with --resume {run} under the same "
                                     "torchrun command")
    (tmp_path / "fresh").mkdir()
    assert _after_peer_loss(tmp_path / "fresh") == (f"no checkpoint of {tmp_path / 'fresh'} was written yet; start "
                                                    "the run again with the same command")
    assert _after_peer_loss(None) == ("it stopped before the run directory was chosen; start the run again with the "
                                      "same command")


def test_check_sync_is_refused_only_where_synchronised_batchnorm_must_wait(tmp_path: Path) -> None:
    """torch's SyncBatchNorm (global BN on several CUDA processes) drops empty shares' statistics by a
    boolean mask, a wait for the GPU in every layer: with --check-sync every step past the second
    failed with a traceback on every rank. Refused in one line there, and only there: one process,
    the CPU's own global BN, --sync-bn false and gradient caching (BatchNorm left local) keep it."""
    from tiny import tiny_config
    from fastclr.errors import FastclrError
    from fastclr.pretraining.setup import check_sync_checkable

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = tiny_config(tmp_path, train__check_sync=True)
    with pytest.raises(FastclrError, match=r"^--check-sync true with global BatchNorm over 2 processes: .* add "
                                           r"--sync-bn false to check the rest of the step, or drop --check-sync$"):
        check_sync_checkable(cfg, 2, cuda)
    for settings, world, device in (({}, 1, cuda), ({}, 2, cpu), ({"train__sync_bn": False}, 2, cuda),
                                    ({"train__grad_cache_chunk": 8}, 2, cuda), ({"train__check_sync": False}, 2, cuda)):
        check_sync_checkable(tiny_config(tmp_path, **{"train__check_sync": True, **settings}), world, device)
    # fp16 (auto's choice on 7.x GPUs) with an objective option or SGD reads the overflow flag on the host
    fp16: dict[str, Any] = {"train__check_sync": True, "train__precision": "fp16"}
    for settings, says in (({"train__queue": 64}, "--queue"), ({"train__learn_temperature": True}, "--learn-temperature"),
                           ({"optim__optimizer": "sgd"}, "--optimizer sgd")):
        with pytest.raises(FastclrError, match=rf"^--check-sync true with fp16 and {says}: the step reads the loss "
                                               r"scaler's overflow flag on the host"):
            check_sync_checkable(tiny_config(tmp_path, **fp16, **settings), 1, cuda)
    for settings in ({}, {"optim__optimizer": "lars"}, {"train__precision": "bf16", "train__queue": 64}):
        check_sync_checkable(tiny_config(tmp_path, **{**fp16, **settings}), 1, cuda)
    check_sync_checkable(tiny_config(tmp_path, **fp16, train__queue=64), 1, cpu)


def test_ranks_compute_in_the_precision_every_one_of_them_runs_natively(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """Rank 0's choice was sent to every rank: an A100 beside a V100 ran bf16 on the V100 (emulated,
    and the job at its pace), an AMX node beside an AVX2 one bf16 on the AVX2 node. Each rank's own
    choice is gathered; the common one is what all of them run natively, and the log says whose."""
    import fastclr.pretraining.loop as loop
    from fastclr.runtime import Precision, agree_precision
    from tiny import tiny_config

    bf16, fp16, fp32 = Precision("bf16", "A100"), Precision("fp16", "V100"), Precision("fp32", "AVX2 node")
    assert agree_precision([bf16, bf16]) == bf16
    assert agree_precision([bf16, fp16, bf16]) == Precision("fp16", "the one every rank runs natively: rank 1's V100")
    assert agree_precision([bf16, fp16, fp32]).name == "fp32" and agree_precision([fp32, bf16]).name == "fp32"
    assert agree_precision([fp16, bf16]).loss_scaling
    gathered = [("bf16", "A100"), ("fp16", "V100")]
    monkeypatch.setattr(loop, "gather_objects", lambda obj, ctx: gathered if ctx.active else [obj])
    lines: list[str] = []
    chosen = loop.run_precision(tiny_config(tmp_path), torch.device("cpu"), DistContext(rank=1, world_size=2), lines.append)
    assert chosen == Precision("fp16", "the one every rank runs natively: rank 1's V100")
    assert lines[-1] == "precision fp16: the one every rank runs natively: rank 1's V100"


@pytest.mark.parametrize("env, error", [
    ({"WORLD_SIZE": "abc"}, "error: WORLD_SIZE='abc' is not a whole number; start the processes with torchrun or "
                            "fastclr-torchrun, which set it, or unset WORLD_SIZE for one process"),
    ({"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0"},
     "error: RANK=5, LOCAL_RANK=0 and WORLD_SIZE=2 are not a process of the group (0 <= RANK < WORLD_SIZE); start the "
     "processes with torchrun or fastclr-torchrun, which set them, or unset them for one process"),
])
def test_a_process_environment_torchrun_would_not_set_is_one_line(env: dict[str, str], error: str,
                                                                 tmp_path: Path) -> None:
    """A traceback (int('abc')), or a wait for the collective timeout and 40 lines of c10d frames for a
    rank no group has, before: now one line and exit 2, before anything is written."""
    given = {k: v for k, v in cli_env(tmp_path).items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-m", "fastclr", "pretrain", "--data", "mnist", "--run-dir", str(tmp_path / "run"),
                        *TINY], env={**given, **env}, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, error + "\n")
    assert not (tmp_path / "run").exists()


def test_torchruns_environment_is_read_as_it_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastclr.scaleout.distributed import env_world

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert env_world() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert env_world() == (3, 4, 3)  # LOCAL_RANK unset: the rank (one node)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (3, 4, 1)



def test_a_rank_set_for_another_purpose_without_a_world_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """RANK exported for something else, WORLD_SIZE unset: one process, as before (no group is made)."""
    from fastclr.scaleout.distributed import env_world

    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")
    assert env_world()[1] == 1


def test_an_init_file_with_other_weights_on_a_rank_is_named() -> None:
    from fastclr.scaleout.same_run import _differences

    first = {"settings": {"train.seed": 0}, "data": "d", "size": 96, "checkpoint": "", "init": "a" * 64}
    assert _differences(first, dict(first), 1) == ""
    assert _differences(first, {**first, "init": "b" * 64}, 1) == (
        "rank 1's --init file holds other weights than rank 0's (or is not there)")


def test_under_nohup_the_launcher_and_its_ranks_keep_ignoring_sighup(tmp_path: Path) -> None:
    """torchrun handles SIGHUP (and SIGINT) whatever it finds (its --signals-to-handle), and stopped
    the ranks of a run started with nohup when the terminal closed. A real launcher, started with
    SIGHUP ignored, is sent SIGHUP while its rank runs: the rank (which still ignores it) finishes."""
    rank = tmp_path / "rank.py"
    rank.write_text(
        "import pathlib, signal, sys, time\n"
        f"here = pathlib.Path({str(tmp_path)!r})\n"
        "(here / 'seen').write_text(str(signal.getsignal(signal.SIGHUP) == signal.SIG_IGN))\n"
        "end = time.monotonic() + 60\n"
        "while not (here / 'go').exists() and time.monotonic() < end:\n"
        "    time.sleep(0.05)\n", encoding="utf-8")
    env = {**cli_env(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    p = subprocess.Popen([sys.executable, "-m", "fastclr.scaleout.launch", "--nproc_per_node=1", "--master_port",
                          str(free_port()), str(rank)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup starts it
    try:
        end = time.monotonic() + 60
        while not (tmp_path / "seen").exists() and time.monotonic() < end and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGHUP)  # the terminal closes
        time.sleep(1.0)
        (tmp_path / "go").touch()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    assert (tmp_path / "seen").read_text() == "True"
    assert p.returncode == 0, err[-2000:]


def test_the_signals_torchrun_handles_leave_out_those_started_ignored() -> None:
    from fastclr.scaleout.launch import signals_to_handle

    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGINT)}
    try:
        assert signals_to_handle("SIGTERM,SIGINT,SIGHUP,SIGQUIT") == "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert signals_to_handle("SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1") == "SIGTERM,SIGQUIT,SIGUSR1"
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_commands_that_run_as_one_process_are_refused_under_torchrun(tmp_path: Path) -> None:
    """`fastclr-torchrun ... -m fastclr evaluate RUN` ran the whole evaluation once a rank, each writing
    the same eval.json. Refused in one line; `info` (each node's own report) still runs."""
    from conftest import call_main

    env = {**cli_env(tmp_path), "TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    r = call_main(["evaluate", str(tmp_path / "run")], env, tmp_path)
    assert (r.returncode, r.stderr) == (2, "error: fastclr evaluate runs as one process, and torchrun started 2; run it "
                                           "without torchrun (only pretrain trains across processes)\n")
    assert call_main(["info", "--no-measure"], env, tmp_path).returncode == 0


def test_a_copy_of_a_builtin_dataset_with_any_image_changed_is_other_data_and_named_by_its_flag() -> None:
    """Two nodes' copies of MNIST, one with 5,000 of its 60,000 images inverted, none among the 64
    the digest sampled: both trained, each on its own data, without a word. Every pixel of a
    built-in's images counts now (a store's content identity already covers its pixels). A node
    given another dataset was named by `--preset`, a flag that refuses to choose a recipe."""
    import dataclasses

    from fastclr.data import Dataset, ImageSet
    from fastclr.scaleout.same_run import _differences, data_digest

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1000, 28, 28, 1), dtype=torch.uint8, generator=g).numpy()
    labels = (torch.arange(1000) % 10).numpy()
    train = ImageSet(images, labels)
    ds = Dataset("mnist", train, train, ImageSet(images[:100].copy(), labels[:100]), [str(i) for i in range(10)])
    changed = images.copy()
    changed[7] = 255 - changed[7]  # between the rows 64 evenly spaced samples read (0, 15, 31, ...)
    other = dataclasses.replace(ds, pretrain=ImageSet(changed, labels), train=ImageSet(changed, labels))
    assert data_digest(ds) == data_digest(dataclasses.replace(ds, pretrain=ImageSet(images.copy(), labels)))
    assert data_digest(other) != data_digest(ds)
    first = {"settings": {"data.preset": "mnist", "augment.flip_p": 0.0}, "data": "d", "size": 1000, "checkpoint": "",
             "init": ""}
    mine = {**first, "settings": {"data.preset": "fashion-mnist", "augment.flip_p": 0.5}}
    assert _differences(first, mine, 1) == ("rank 1 has --data 'fashion-mnist' (rank 0: 'mnist'), --flip-p 0.5 "
                                            "(rank 0: 0.0)")



def _ranks(tmp_path: Path, extra: dict[int, list[str]], world: int = 2, started: tuple[int, ...] = (0, 1),
           timeout: str = "60") -> tuple[list[subprocess.Popen[str]], int]:
    """`fastclr pretrain` as rank r of `world` for each r in `started`, with extra[r]'s flags; and the port."""
    env, port = cli_env(tmp_path), free_port()
    args = [sys.executable, "-m", "fastclr", "pretrain", "--data", "mnist", "--epochs", "1", *TINY, "--probe", "false",
            "--monitor-every", "0", "--device", "cpu", "--threads", "1", "--dist-timeout", timeout]
    return [subprocess.Popen([*args, *extra.get(r, [])], env={**env, **rank_env(r, world, port)}, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in started], port


def _ended(procs: list[subprocess.Popen[str]], within: float) -> list[str]:
    """Each process's stderr, once all have exited within `within` seconds (else they are killed)."""
    try:
        return [p.communicate(timeout=within)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_rank_that_stops_before_the_group_forms_ends_the_others_with_its_reason(tmp_path: Path, failing: int) -> None:
    """One rank's --config file is missing on its node: it stops before joining. The others waited in the
    group's forming for the whole --dist-timeout (here 60 s; 10 minutes by default), then blamed the
    network; now they end within seconds with its line, whichever rank it is (rank 0 serves the store
    outside torchrun, and stays until the others have read it)."""
    began = time.monotonic()
    procs, _ = _ranks(tmp_path, {failing: ["--config", str(tmp_path / "missing.toml")]})
    errs = _ended(procs, within=50)
    took, ok = time.monotonic() - began, 1 - failing
    assert [p.returncode for p in procs] == [2, 2] and took < 45, (took, errs)
    assert "missing.toml" in errs[failing] and "Traceback" not in errs[failing] + errs[ok], errs
    assert f"error: rank {ok}: rank {failing} stopped before training (" in errs[ok], errs[ok]
    assert "missing.toml" in errs[ok] and "start every rank again" in errs[ok], errs[ok]


def test_a_rank_that_never_starts_is_counted_when_the_timeout_ends(tmp_path: Path) -> None:
    """Rank 1 of 2 is never started: rank 0 waits --dist-timeout, then says how many ranks never came."""
    procs, _ = _ranks(tmp_path, {}, started=(0,), timeout="4")
    errs = _ended(procs, within=60)
    assert procs[0].returncode == 2 and "Traceback" not in errs[0], errs
    assert "error: rank 0: 1 of the 2 ranks did not start within 4 s (--dist-timeout)" in errs[0], errs


def test_a_rank_stopped_while_checking_in_is_told_to_the_others(tmp_path: Path) -> None:
    """Rank 0 is stopped while it waits for rank 1: it ends as a stop (75, which a scheduler requeues;
    before, the signal waited with it inside the group's forming), and rank 1, starting later, ends with
    that line at once, not inside the group's forming for all of --dist-timeout (rank 0 serves the
    store outside torchrun, and stays until rank 1 has read it)."""
    import socket

    procs, port = _ranks(tmp_path, {}, started=(0,), timeout="120")
    end = time.monotonic() + 60
    while time.monotonic() < end and procs[0].poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    time.sleep(1.0)
    procs[0].send_signal(signal.SIGTERM)  # rank 0 serves the store: it stays until rank 1 has read the line
    env = cli_env(tmp_path)
    began = time.monotonic()
    late = subprocess.run([sys.executable, "-m", "fastclr", "pretrain", "--data", "mnist", "--epochs", "1", *TINY,
                           "--probe", "false", "--device", "cpu", "--threads", "1", "--dist-timeout", "120"],
                          env={**env, **rank_env(1, 2, port)}, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    errs = _ended(procs, within=30)
    assert procs[0].returncode == 75 and late.returncode == 2 and time.monotonic() - began < 60, (errs, late.stderr)
    assert "error: rank 1: rank 0 was stopped before training (a stop signal); start every rank again" in late.stderr
    assert "stopped: rank 0: stopped while waiting for the other ranks to start; nothing was trained" in errs[0], errs


def test_ranks_torchrun_may_restart_join_without_a_check_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each node's agent counts its own restarts and the store outlives the rounds, so a check-in's
    keys could not tell one round from the next (a node's ranks passed on a stale count while the
    others waited out the timeout): with restarts possible, the ranks join as before."""
    import torch.distributed as dist

    from fastclr.scaleout import distributed, start

    joined: list[dict[str, Any]] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append(kw))
    monkeypatch.setattr(distributed, "job_store", lambda *args: pytest.fail("a check-in where ranks may restart"))
    for max_restarts, count in (("3", "0"), ("0", "1")):
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", max_restarts)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", count)
        assert start.restartable()
        distributed.setup(torch.device("cpu"), timeout_s=5.0)
    assert len(joined) == 2 and all("store" not in kw for kw in joined)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert not start.restartable()


def test_only_a_stop_signal_ends_the_check_in_not_a_callers_step_callback(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """`fastclr.pretrain(stop=lambda step: step % 1000 == 0)` under torchrun (a checkpoint every 1,000 steps)
    was asked stop(0) while the ranks checked in, and its True taken for a stop signal."""
    import fastclr.pretraining.loop as loop
    from fastclr.pretraining.loop import pretrain
    from fastclr.signals import StopFlag
    from tiny import tiny_config, tiny_dataset

    seen: list[Any] = []

    class Seen(Exception):
        pass

    def setup_seen(device: torch.device, timeout_s: float, stopping: Any = None) -> None:
        seen.append(stopping)
        raise Seen
    monkeypatch.setattr(loop, "setup", setup_seen)
    cfg = tiny_config(tmp_path / "run")
    flag = StopFlag()
    for stop in (lambda step: step % 1000 == 0, flag):
        with pytest.raises(Seen):
            pretrain(cfg, dataset=tiny_dataset(), stop=stop, progress=False, log=lambda s: None)
    assert seen[0] is None and seen[1] is not None and not seen[1]()
    flag.signal = signal.SIGTERM
    assert seen[1]()
