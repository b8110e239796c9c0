"""Multi-crop (--local-views): small views drawn after the full ones, read by the same encoder,
every view of an image a positive of the others, and a run that resumes exactly."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from dist_helpers import run_ranks

from fastclr import pretrain
from fastclr.augment import local_config
from fastclr.config import AugmentConfig, TrainConfig
from fastclr.errors import FastclrError
from fastclr.models.cnn import FlattenHWC, SmallCNN
from fastclr.pretraining.multi_positive import multi_positive_loss
from fastclr.pretraining.objective import Objective
from fastclr.pretraining.step import SimCLRNet, backward_step
from fastclr.pretraining.views import ViewMaker
from fastclr.scaleout.distributed import DistContext, all_reduce, setup
from test_distributed import small_net
from tiny import straight_and_resumed, tiny_config, tiny_dataset

CPU = torch.device("cpu")
IMAGES = 6
# No randomness but the crop: whole-image crops (scale and ratio 1), no flip, colour or solarisation.
STILL = AugmentConfig(scale_min=1.0, ratio_min=1.0, ratio_max=1.0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                      solarize_p=0.0, erase_p=0.0, local_scale_min=1.0, local_scale_max=1.0)


def make_views(cfg: AugmentConfig, images: torch.Tensor, local: int, step: int = 7) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    maker = ViewMaker(cfg, torch.tensor([0.0]), torch.tensor([1.0]), CPU, seed=3, channels_last=False,
                      global_batch=images.shape[0], local_views=local)
    return maker(images, step)


def test_small_views_follow_the_full_views_and_leave_them_unchanged() -> None:
    """The full views are the same with or without small views (drawn first from the same
    generator); the L small views of B images are (L * B) at half the side, and the same again
    for the same step."""
    images = torch.randint(0, 256, (IMAGES, 28, 28, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig()
    alone = make_views(cfg, images, 0)
    full, small = make_views(cfg, images, 3)
    assert isinstance(alone, torch.Tensor) and torch.equal(full, alone)
    assert small.shape == (3 * IMAGES, 1, 14, 14)
    again = make_views(cfg, images, 3)
    assert torch.equal(again[1], small)
    assert not torch.equal(make_views(cfg, images, 3, step=8)[1], small)


def test_a_rank_renders_its_images_rows_of_the_single_process_small_views() -> None:
    """Under two processes each rank draws the global batch's parameters and keeps its rows, for
    the small views as for the full ones: its views equal one process's rows for its images."""
    images = torch.randint(0, 256, (8, 28, 28, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    mean, std = torch.tensor([0.0]), torch.tensor([1.0])
    one = ViewMaker(AugmentConfig(), mean, std, CPU, seed=5, channels_last=False, global_batch=8, local_views=3)(images, 4)
    for rank in range(2):
        mine = ViewMaker(AugmentConfig(), mean, std, CPU, seed=5, channels_last=False, global_batch=8, rank=rank,
                         world_size=2, local_views=3)(images[4 * rank:4 * rank + 4], 4)
        for part, k in ((0, 2), (1, 3)):
            rows = torch.cat([torch.arange(4 * rank, 4 * rank + 4) + v * 8 for v in range(k)])
            assert torch.equal(mine[part], one[part][rows])


def test_a_whole_image_small_view_is_the_image_shrunk_by_half() -> None:
    """With whole-image crops, a small view of a horizontal ramp v(x) = 3x + 5 is the ramp sampled at
    the output pixels' centres, u_j = 2j + 0.5 (a symmetric filter keeps a linear function), away
    from the edges where the filter is cut."""
    ramp = (3 * torch.arange(28.0) + 5).expand(28, 28)
    images = ramp[None, :, :, None].expand(IMAGES, 28, 28, 1).to(torch.uint8)
    _, small = make_views(STILL, images, 2)
    expected = (3 * (2 * torch.arange(14.0) + 0.5) + 5) / 255
    torch.testing.assert_close(small[:, 0, :, 1:-1], expected[1:-1].expand(2 * IMAGES, 14, 12), rtol=0, atol=1e-5)


def test_the_small_views_recipe_is_the_full_one_with_its_own_crops() -> None:
    cfg = AugmentConfig(solarize_p=0.3, local_scale_min=0.1, local_scale_max=0.4)
    assert local_config(cfg, 28) == dataclasses.replace(cfg, crop_size=14, scale_min=0.1, scale_max=0.4)
    assert local_config(dataclasses.replace(cfg, crop_size=96), 200).crop_size == 48  # half the view, not the image
    assert local_config(dataclasses.replace(cfg, local_size=10), 28).crop_size == 10


@pytest.mark.parametrize("stages", ["32|256|fc512", "32p|256p|fc512"])
def test_the_fc_readout_reads_a_half_size_view_without_its_pool(stages: str) -> None:
    """The cnn's last conv gives 7 x 7 for a 28 px view, max-pooled 2x2 to 3 x 3 before the linear
    layer (in the readout, or before the last BatchNorm with 'p'); for a 14 px view it gives 3 x 3,
    which goes to the same linear layer as it is."""
    torch.manual_seed(0)
    net = SmallCNN(width=0.25, stages=stages).eval()
    linear, bn = net.pool[2], net.pool[3]
    pools_in_features = stages.endswith("p|fc512")
    for side, pooled in ((28, not pools_in_features), (14, False)):
        x = torch.randn(4, 1, side, side)
        m = net.features(x)
        assert m.shape[-1] == (7 if pooled else 3)
        m = torch.nn.functional.max_pool2d(m, 2) if pooled else m
        expected = torch.relu(bn(linear(FlattenHWC()(m))))
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)


def test_the_step_loss_makes_every_view_of_an_image_a_positive() -> None:
    """Two full and three small views of 4 images: the step's loss equals a float64 transcription
    of multi-positive NT-Xent over all 20 rows of z, each row's positives the 4 other views of its
    image (z rows: full view 1 of every image, full view 2, small views 1, 2, 3)."""
    torch.manual_seed(1)
    b, local, t = 4, 3, 0.2
    net = SimCLRNet(SmallCNN(width=0.25), torch.nn.Linear(128, 8))
    full, small = torch.randn(2 * b, 1, 28, 28), torch.randn(local * b, 1, 14, 14)
    obj = Objective(TrainConfig(local_views=local, temperature=t), None, CPU, None)
    idx = torch.tensor([5, 2, 9, 0])
    groups = obj.groups(idx)
    assert groups.tolist() == idx.tolist() * (2 + local)
    loss, _ = backward_step(net, (full, small), t, None, 0, DistContext(), objective=obj, groups=groups)
    with torch.no_grad():
        z = net((full, small)).double()  # train mode: the same batch statistics as the step's forward
    z = z / z.norm(dim=1, keepdim=True)
    n = z.shape[0]
    terms = []
    for i in range(n):
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        for p in range(n):
            if p != i and p % b == i % b:
                terms.append((i, -math.log(math.exp(float(z[i] @ z[p]) / t) / denom)))
    per_anchor = [sum(v for a, v in terms if a == i) / (2 + local - 1) for i in range(n)]
    assert float(loss) == pytest.approx(sum(per_anchor) / n, rel=1e-5)


def share(rank: int, world: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Rank r's images of a global batch of 8 and their views: 2 full (8 px) and 3 small (5 px) each."""
    g = torch.Generator().manual_seed(1)
    full, small = torch.randn(2 * 8, 1, 8, 8, generator=g), torch.randn(3 * 8, 1, 5, 5, generator=g)
    b = 8 // world
    idx = torch.arange(rank * b, (rank + 1) * b)
    return idx, (full[torch.cat([idx + v * 8 for v in range(2)])], small[torch.cat([idx + v * 8 for v in range(3)])])


def multicrop_step(rank: int, world: int) -> dict[str, Any]:
    """Loss (averaged over ranks) and gradients of one multi-crop step on this rank's share."""
    ctx = setup(CPU, 30.0)
    net = small_net(True)
    ddp = DistributedDataParallel(net, forward_sync_buffers=False)
    obj = Objective(TrainConfig(local_views=3, temperature=0.3), None, CPU, None)
    idx, views = share(rank, world)
    loss, _ = backward_step(ddp, views, 0.3, None, 0, ctx, objective=obj, groups=obj.groups(idx))
    return {"loss": all_reduce(loss, ctx) / world, "grads": {n: p.grad for n, p in net.named_parameters()}}


def test_two_ranks_give_the_multicrop_loss_and_gradients_of_one_process(tmp_path: Path) -> None:
    """Each rank embeds its images' full and small views in one DDP forward; gathered rows and DDP's
    averaging give one process's loss and gradients over all 40 views (1e-5, fp32), BatchNorm per
    rank's share."""
    ranks = run_ranks(multicrop_step, 2, tmp_path, timeout=120)
    net = small_net(True)
    obj = Objective(TrainConfig(local_views=3, temperature=0.3), None, CPU, None)
    shares = [share(r, 2) for r in range(2)]
    z = [net(views) for _, views in shares]
    groups = [obj.groups(idx) for idx, _ in shares]
    everything, all_groups = torch.cat(z), torch.cat(groups)
    mean = torch.stack([multi_positive_loss(z[r], groups[r], 0.3, candidates=everything, candidate_groups=all_groups,
                                            offset=r * len(groups[r]))[0] for r in range(2)]).mean()
    mean.backward()
    for got in ranks:
        torch.testing.assert_close(got["loss"], mean.detach(), rtol=0, atol=1e-5)
        for n, p in net.named_parameters():
            torch.testing.assert_close(got["grads"][n], p.grad, rtol=0, atol=1e-5, msg=n)


def test_an_encoder_that_cannot_read_small_views_is_refused(tmp_path: Path) -> None:
    """Attention pooling holds a position embedding for the 7 x 7 map only: one line naming the
    option and the fix, before anything is written."""
    cfg = tiny_config(tmp_path / "run", model__cnn_stages="32|256|attn64", train__local_views=2)
    # not "set --local-size": 14 px already is half the side, and no smaller side fits either
    with pytest.raises(FastclrError, match=r"^--local-views: the cnn's attention pooling reads only the full view's map, "
                                           r"not 14 px small views \(.*\); use another readout \(fcN, or gap\)"):
        pretrain(cfg, dataset=tiny_dataset(), progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made (it was left empty)
    # a readout of the whole map (flat): another side may fit, so the hint names --local-size
    cfg = tiny_config(tmp_path / "flat", model__cnn_stages="32|256|flat0", train__local_views=2)
    with pytest.raises(FastclrError, match=r"^--local-views: the encoder cannot read h off 14 px small views .*--local-size"):
        pretrain(cfg, dataset=tiny_dataset(), progress=False, log=lambda s: None)
    assert not (tmp_path / "flat").exists()


@pytest.mark.parametrize("crop, small", [(0, 30), (24, 26)])
def test_small_views_larger_than_the_views_are_refused(crop: int, small: int, tmp_path: Path) -> None:
    """They trained, larger than the "full" views, without a word."""
    cfg = tiny_config(tmp_path / "run", train__local_views=2, augment__local_size=small, augment__crop_size=crop)
    side = crop or 28
    with pytest.raises(FastclrError, match=rf"^--local-size {small} is larger than the views \({side} px\), .*; give "
                                           rf"--local-size {side} or less \(0: half the side\)$"):
        pretrain(cfg, dataset=tiny_dataset(), progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_stop_and_resume_with_small_views_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    over: dict[str, object] = {"train__local_views": 2, "train__precision": "fp32", "train__device": "cpu"}
    a, b = straight_and_resumed(tmp_path, **over)
    assert a["step"] == b["step"] == 12
    for part in ("encoder", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
