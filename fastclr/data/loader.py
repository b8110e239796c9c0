"""Batches as index tensors, images gathered on the training device.

The data order is a pure function of (seed, step): epoch e uses the permutation drawn from a
generator seeded with (seed, e), and step s takes slice s % steps_per_epoch of it. Resuming at
any step, mid-epoch included, therefore replays exactly the same batches, with no loader state to
save. The permutation is drawn on the CPU whatever the training device (a CUDA generator draws
another order from the same seed), so a run stopped on a GPU and resumed on a CPU, or the reverse,
finishes the epoch it was in on the images it had not yet seen. Under DDP each rank takes its own contiguous slice r of global batch s of the same
permutation, so ranks see disjoint data and together cover exactly the global batch one process
would take at the same step.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fastclr.errors import FastclrError


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches per epoch; the incomplete last batch is dropped so every step has
    the same number of negatives."""
    return n // (batch_size * world_size)


def epoch_permutation(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The data order of one epoch: int64 (n,) on the CPU, the same for the same (seed, epoch) on
    every machine."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) % 2**64)  # any seed torch takes: the product may pass 2**64
    return torch.randperm(n, generator=g)


class BatchSampler:
    """Index batches for step s: `indices(s)` -> int64 (batch_size,) on `device`."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = steps_per_epoch(n, batch_size, world_size)
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        """Indices of this rank's share of global step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            perm = epoch_permutation(self.n, epoch, self.seed)
            # From pinned memory, without waiting: a pageable copy makes the host wait for the GPU
            # (and `--check-sync` refuses any such wait inside the step).
            self._perm = perm.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
                else perm.to(self.device)
            self._epoch = epoch
        start = (i * self.world_size + self.rank) * self.batch_size
        return self._perm[start : start + self.batch_size]


def fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` of stored images are copied to `device` once: a GPU with four times that
    free (the rest is the step's: activations, views, optimiser state). Never the CPU, where a
    memory-mapped store stays mapped (copying would double its memory)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return 4 * nbytes <= free


def copy_to_device(images: np.ndarray, device: torch.device, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """uint8 (N, H, W, C) on `device`, read from `images` (a memory map too) a few rows at a time,
    so the host holds at most `chunk_bytes` of it beyond the map's pages."""
    out = torch.empty(tuple(images.shape), dtype=torch.uint8, device=device)
    rows = max(1, chunk_bytes // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(images), rows):
        out[start : start + rows].copy_(torch.from_numpy(np.array(images[start : start + rows])))  # a writable copy
    return out


def check_stored(images: np.ndarray | torch.Tensor, what: str = "the images") -> None:
    """One line for images not in the stored form every path takes, uint8 (N, H, W, C) with C 1 or 3.
    Floats in [0, 1] (torchvision's ToTensor) were divided by 255 again: near-black views and a
    wrong h, without a word; (N, C, H, W) or a single image failed deep inside torch."""
    dtype, shape = str(images.dtype).removeprefix("torch."), tuple(int(s) for s in images.shape)
    if dtype != "uint8":
        raise FastclrError(f"{what} are {dtype}; fastclr takes them as stored, uint8 (N, H, W, C) in 0-255: for "
                           "floats in [0, 1], give (x * 255).round() as uint8")
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise FastclrError(f"{what} have shape {shape}; fastclr takes uint8 (N, H, W, C) with C 1 or 3: one image "
                           "is x[None], a grey (N, H, W) batch x[..., None], and (N, C, H, W) is x.permute(0, 2, 3, 1)")


class ImageSource:
    """Stored uint8 images (N, H, W, C), gathered by index onto the training device.

    An in-memory array is copied to the device once (the whole of Fashion-MNIST is 47 MB), so a
    batch is a single gather there; so is a memory-mapped store on a GPU with room for it
    (`fits_on_gpu`), since reading a batch's rows from the map needs the indices on the host, which
    waits for the GPU at every step. Otherwise a memory-mapped array (a store larger than RAM)
    stays on disk; a batch reads just its rows from the map and is copied over.
    """

    def __init__(self, images: np.ndarray, device: torch.device):
        check_stored(images)
        self.device = device
        self.shape = tuple(int(s) for s in images.shape)
        self._mmap: np.ndarray | None = None
        self._resident: torch.Tensor | None = None
        if not isinstance(images, np.memmap):
            with warnings.catch_warnings():  # a read-only array (a store's rows, read whole): only ever read here
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self._resident = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # on the CPU: no copy
        elif fits_on_gpu(images.nbytes, device):
            self._resident = copy_to_device(images, device)
        else:
            self._mmap = images

    def __len__(self) -> int:
        return self.shape[0]

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) on the device for the int64 indices `idx`."""
        if self._resident is not None:
            return self._resident[idx.to(self._resident.device)]
        assert self._mmap is not None
        rows = np.asarray(self._mmap[idx.cpu().numpy()])
        out = torch.from_numpy(rows)
        if self.device.type == "cuda":
            out = out.pin_memory().to(self.device, non_blocking=True)
        return out.to(self.device)
