"""Process-wide CUDA switches the training loop turns on for the length of a run and then restores.

`deterministic_kernels`: cuDNN and cuBLAS pick deterministic algorithms, so that a run and its
stop-and-resume twin agree bit for bit on a GPU as they do on the CPU (where the kernels are
deterministic already). `no_host_sync`: torch's sync debug mode set to "error" around a region, so
that any hidden device-to-host wait (an `.item()`, a `bool(tensor)`, a copy to the CPU) raises
instead of silently stalling the GPU's queue.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from contextlib import contextmanager

import torch

# cuBLAS is deterministic only with a fixed workspace per stream (CUDA docs, "cuBLAS: results
# reproducibility"); PyTorch refuses deterministic mode without this setting.
_CUBLAS_WORKSPACE = ":4096:8"


@contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Deterministic cuDNN/cuBLAS kernels inside the block when `enabled`; previous settings after."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@contextmanager
def no_host_sync(device: torch.device, enabled: bool) -> Iterator[None]:
    """Raise on any host-device synchronisation inside the block (CUDA only; a no-op elsewhere)."""
    if not enabled or device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def generator_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The states of the generators a run's random layers draw from (a user's encoder's dropout:
    fastclr's own steps draw from their own generators): the CPU's, and on CUDA `device`'s, which
    `torch.manual_seed` at the start of a run also resets."""
    return {"torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}


def restore_generators(state: dict[str, Any], device: torch.device) -> None:
    """Put back what `generator_states` saved (a checkpoint from a CPU run resumed on a GPU, or one
    saved before the CUDA state was kept, leaves the GPU's generator as seeded)."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


@contextmanager
def replaying(state: dict[str, torch.Tensor], device: torch.device) -> Iterator[None]:
    """Draw from the generators' `state` (`generator_states`) inside; their own states come back
    after (`fork_rng`)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        restore_generators(state, device)
        yield
