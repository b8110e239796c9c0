"""The data order: a pure function of (seed, step), epoch by epoch, split between ranks without overlap."""

from __future__ import annotations

import torch

from fastclr.data.loader import BatchSampler, epoch_permutation, steps_per_epoch


def permutation(n: int, epoch: int, seed: int, device: torch.device) -> torch.Tensor:
    """Transcription of the documented order: epoch e is torch.randperm from a CPU generator seeded
    with seed * 1_000_003 + e (mod 2**64), moved to the training device (a CUDA generator would draw
    another order: a run resumed on the other kind of device would repeat some images of its epoch
    and skip others)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    return torch.randperm(n, generator=g).to(device)


def test_step_s_takes_slice_s_mod_steps_of_epoch_s_div_steps(device: torch.device) -> None:
    """Step s of a run is slice s % steps_per_epoch of epoch s // steps_per_epoch's permutation: the
    steps of epoch 1 take epoch 1's order, which is not epoch 0's (a new order every epoch), and
    epoch 2 follows epoch 1."""
    n, b, seed = 50, 8, 3
    sampler = BatchSampler(n, b, seed, device)
    spe = sampler.steps_per_epoch
    assert spe == 6 == steps_per_epoch(n, b)
    for epoch in range(3):
        perm = permutation(n, epoch, seed, device)
        assert torch.equal(perm, epoch_permutation(n, epoch, seed).to(device))
        for i in range(spe):
            got = sampler.indices(epoch * spe + i)
            assert got.dtype == torch.int64 and got.device.type == device.type
            assert torch.equal(got, perm[i * b : (i + 1) * b]), (epoch, i)
    first, second = permutation(n, 0, seed, device), permutation(n, 1, seed, device)
    for i in range(spe):
        assert not torch.equal(sampler.indices(spe + i), first[i * b : (i + 1) * b]), i
        assert torch.equal(sampler.indices(spe + i), second[i * b : (i + 1) * b]), i


def test_any_step_is_the_same_batch_whatever_came_before(device: torch.device) -> None:
    """Resuming at any step, mid-epoch included, replays the same batch: a fresh sampler asked for
    step s alone gives what a sampler walking back and forth across epochs gives at s."""
    n, b, seed = 37, 5, 11
    walker = BatchSampler(n, b, seed, device)
    for step in (9, 0, 15, 7, 8, 1, 22, 6):  # 7 steps an epoch: epochs 1, 0, 2, 1, 1, 0, 3, 0
        assert torch.equal(walker.indices(step), BatchSampler(n, b, seed, device).indices(step)), step


def test_each_epoch_takes_every_index_at_most_once_and_drops_only_the_remainder(device: torch.device) -> None:
    """The batches of one epoch are disjoint and together hold n - (n mod batch) distinct indices of
    [0, n): every image once, but the last incomplete batch, which is dropped."""
    n, b = 50, 8
    sampler = BatchSampler(n, b, 5, device)
    for epoch in range(3):
        batches = [sampler.indices(epoch * sampler.steps_per_epoch + i).tolist() for i in range(sampler.steps_per_epoch)]
        assert all(len(batch) == b for batch in batches)
        seen = [j for batch in batches for j in batch]
        assert len(seen) == len(set(seen)) == n - n % b
        assert set(seen) <= set(range(n))


def test_ranks_split_the_global_batch_of_one_process_into_disjoint_contiguous_slices(device: torch.device) -> None:
    """Under DDP (world size 2, 4 images a rank) rank r takes contiguous slice r of the global batch
    of 8 that one process would take at the same step, so the ranks' shares are disjoint and together
    are exactly that batch; an epoch is n // 8 steps, the same as the single process's, and its
    steps cover n - (n mod 8) distinct images."""
    n, b, world, seed = 45, 4, 2, 9
    one = BatchSampler(n, b * world, seed, device)
    ranks = [BatchSampler(n, b, seed, device, rank=r, world_size=world) for r in range(world)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == one.steps_per_epoch == 5
    for step in range(12):  # across two epoch boundaries
        parts = [r.indices(step) for r in ranks]
        assert torch.equal(torch.cat(parts), one.indices(step)), step
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        epoch, i = divmod(step, 5)
        perm = permutation(n, epoch, seed, device)
        for r in range(world):
            assert torch.equal(parts[r], perm[(i * world + r) * b : (i * world + r + 1) * b]), (step, r)
    covered = {j for step in range(5) for r in ranks for j in r.indices(step).tolist()}
    assert len(covered) == n - n % (b * world)
