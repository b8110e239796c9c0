"""Gradient caching: the full-batch gradient with the activation memory of one chunk; with
BatchNorm, ghost BatchNorm per chunk, identical in both passes, running statistics moved once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fastclr.scaleout.distributed import DistContext
from fastclr.scaleout.gradcache import chunk_rows, grad_cache_backward
from fastclr.models import ProjectionHead
from fastclr.pretraining.step import SimCLRNet, backward_step, contrastive_loss, project

ONE = DistContext()


def net_without_bn(dtype: torch.dtype = torch.float64) -> SimCLRNet:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return SimCLRNet(enc, ProjectionHead(24, 16, 8, 2, batch_norm=False)).to(dtype)


def net_with_bn() -> SimCLRNet:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return SimCLRNet(enc, ProjectionHead(24, 16, 8, 2, batch_norm=True))


def views(b: int, dtype: torch.dtype = torch.float64, side: int = 8) -> torch.Tensor:
    return torch.randn(2 * b, 1, side, side, dtype=dtype, generator=torch.Generator().manual_seed(b))


def grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def test_chunks_cover_the_batch_once() -> None:
    assert chunk_rows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_rows(8, 8) == [(0, 8)] and chunk_rows(3, 100) == [(0, 3)]


@pytest.mark.parametrize("chunk,block", [(1, 0), (3, 0), (4, 0), (10, 0), (3, 5)])
def test_equals_the_full_batch_step_for_a_batch_independent_encoder(chunk: int, block: int) -> None:
    v = views(10)
    full = net_without_bn()
    loss_full, m_full = backward_step(full, v, 0.2, None, 0, ONE)
    cached = net_without_bn()
    loss, m = backward_step(cached, v, 0.2, None, block, ONE, chunk)
    torch.testing.assert_close(loss, loss_full, rtol=1e-13, atol=1e-13)
    for a, b in zip(grads(cached), grads(full)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert all(torch.equal(m[k], m_full[k]) for k in m_full)


@pytest.mark.parametrize("chunk", [0, 3])
def test_under_loss_scaling_the_gradients_are_the_scaled_loss_and_the_loss_is_not(chunk: int) -> None:
    """fp16's GradScaler: the gradients that land in .grad are those of scale * loss (unscaled by
    the optimiser step later), the loss returned and logged is the loss itself, with and without
    gradient caching: both equal `scale` times, and once, the unscaled step's."""
    v = views(10)
    plain, scaled = net_without_bn(), net_without_bn()
    loss, _ = backward_step(plain, v, 0.2, None, 0, ONE)
    loss_scaled, _ = backward_step(scaled, v, 0.2, None, 0, ONE, chunk, scale=lambda x: x * 1024.0)
    torch.testing.assert_close(loss_scaled, loss, rtol=1e-13, atol=1e-13)
    for a, b in zip(grads(scaled), grads(plain)):
        torch.testing.assert_close(a, 1024.0 * b, rtol=1e-10, atol=1e-12)


def test_with_batchnorm_both_passes_of_a_chunk_see_the_same_z_and_it_is_ghost_batchnorm() -> None:
    chunk, b = 3, 7
    v = views(b, torch.float32)
    net = net_with_bn()
    seen: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = project(net, x, None)
        seen.append(z.detach().clone())
        return z

    grad_cache_backward(forward, v, chunk, lambda z: contrastive_loss(z, 0.2, 0, ONE), net)
    n = len(chunk_rows(b, chunk))
    assert len(seen) == 2 * n
    for k in range(n):  # pass 1 (no graph) and pass 2 (graph) of chunk k
        assert torch.equal(seen[k], seen[n + k])

    # Ghost BatchNorm: the same as embedding each chunk separately, with graph, then one loss.
    ghost = net_with_bn()
    zs = [ghost(torch.cat([v[s:e], v[b + s : b + e]])) for s, e in chunk_rows(b, chunk)]
    cuts = [e - s for s, e in chunk_rows(b, chunk)]
    z = torch.cat([z[:c] for z, c in zip(zs, cuts)] + [z[c:] for z, c in zip(zs, cuts)])
    contrastive_loss(z, 0.2, 0, ONE)[0].backward()
    for a, g in zip(grads(net), grads(ghost)):
        torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-6)


def net_with_dropout() -> SimCLRNet:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Dropout(0.5))
    return SimCLRNet(enc, ProjectionHead(24, 16, 8, 2, batch_norm=False)).to(torch.float64)


@pytest.mark.parametrize("chunk", [10, 3])
def test_a_random_layer_draws_the_same_masks_in_both_passes(chunk: int) -> None:
    """Dropout draws in both passes of a chunk; the second replays the first's random state, so
    the gradients are those of the loss that was computed: one chunk is the plain step exactly,
    more chunks are the chunks embedded one after another with a graph, then one loss. Without
    the replay the one-chunk gradients were off by up to 3.7."""
    b, v = 10, views(10)
    cached = net_with_dropout()
    torch.manual_seed(5)
    loss, _ = backward_step(cached, v, 0.2, None, 0, ONE, chunk)
    after = torch.get_rng_state()
    ref = net_with_dropout()
    torch.manual_seed(5)
    zs = [project(ref, torch.cat([v[s:e], v[b + s : b + e]]), None) for s, e in chunk_rows(b, chunk)]
    cuts = [e - s for s, e in chunk_rows(b, chunk)]
    z = torch.cat([z[:c] for z, c in zip(zs, cuts)] + [z[c:] for z, c in zip(zs, cuts)])
    loss_ref = contrastive_loss(z, 0.2, 0, ONE)[0]
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-13, atol=1e-13)
    for a, g in zip(grads(cached), grads(ref)):
        torch.testing.assert_close(a, g, rtol=1e-10, atol=1e-13)
    assert torch.equal(after, torch.get_rng_state())  # the generator goes on from the first pass's draws


def test_batchnorm_running_statistics_move_once_per_chunk() -> None:
    chunk, b = 3, 7
    v = views(b, torch.float32)
    net = net_with_bn()
    backward_step(net, v, 0.2, None, 0, ONE, chunk)
    once = net_with_bn()
    with torch.no_grad():  # one forward per chunk, as a single pass would do
        for s, e in chunk_rows(b, chunk):
            once(torch.cat([v[s:e], v[b + s : b + e]]))
    for (name, a), (_, want) in zip(net.named_buffers(), once.named_buffers()):
        torch.testing.assert_close(a, want, rtol=0, atol=0, msg=name)
    assert int(net.encoder[1].num_batches_tracked) == 3  # 3 chunks, not 6


class _Held:
    """A tensor saved for backward, counted while the graph keeps it."""

    def __init__(self, t: torch.Tensor, alive: list[int]):
        self.t, self.bytes, self.alive = t, t.numel() * t.element_size(), alive
        alive[0] += self.bytes
        alive[1] = max(alive[1], alive[0])

    def __del__(self) -> None:
        self.alive[0] -= self.bytes


def peak_saved_bytes(step: Callable[[], object]) -> int:
    """The most bytes autograd held for backward at any moment during `step()`."""
    alive = [0, 0]  # now, peak
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(t, alive), lambda h: h.t):
        step()
    return alive[1]


def test_activation_memory_is_that_of_one_chunk() -> None:
    """A batch of 64 in chunks of 8 holds what a plain step on 8 images holds (plus z), an eighth
    of the plain step on 64."""
    b, chunk = 64, 8
    big, small = views(b, torch.float32, 16), views(chunk, torch.float32, 16)
    full = peak_saved_bytes(lambda: backward_step(net_without_bn(torch.float32), big, 0.2, None, 0, ONE))
    one_chunk = peak_saved_bytes(lambda: backward_step(net_without_bn(torch.float32), small, 0.2, None, 0, ONE))
    cached = peak_saved_bytes(lambda: backward_step(net_without_bn(torch.float32), big, 0.2, None, 0, ONE, chunk))
    z_bytes = 2 * b * 8 * 4 * 4  # z and a few (2B, D) float32 copies saved by the loss over all of z
    assert cached <= one_chunk + z_bytes
    assert cached < full / 6


def test_the_large_batch_recipe_is_lars_with_the_square_root_rule() -> None:
    from pathlib import Path

    from fastclr.config import Config, apply_overrides, read_toml
    from fastclr.pretraining.schedule import scaled_lr

    cfg = apply_overrides(Config(), read_toml(Path(__file__).resolve().parents[1] / "recipes" / "large-batch.toml"))
    assert (cfg.optim.optimizer, cfg.optim.lr_scaling, cfg.train.batch_size) == ("lars", "sqrt", 4096)
    assert scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling) == pytest.approx(4.8)  # 0.075 * 64
    assert cfg.optim.weight_decay == 1e-6 and cfg.optim.warmup_epochs == 10 and cfg.train.loss_block > 0
