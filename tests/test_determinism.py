"""The process-wide CUDA switches of a run: set for its length, restored after, and effective."""

from __future__ import annotations

import pytest
import torch

from fastclr.config import Config, apply_overrides
from fastclr.determinism import deterministic_kernels, no_host_sync
from fastclr.errors import FastclrError
from fastclr.runtime import use_compile


def test_deterministic_kernels_are_on_inside_and_restored_after() -> None:
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    with deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
    with deterministic_kernels(False):
        assert torch.are_deterministic_algorithms_enabled() == before[0]


def test_deterministic_kernels_are_restored_when_the_run_fails() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with deterministic_kernels(True):
            raise RuntimeError("boom")
    assert torch.are_deterministic_algorithms_enabled() == before


def test_a_host_wait_inside_no_host_sync_is_an_error_on_cuda(device: torch.device) -> None:
    x = torch.ones(3, device=device)
    with no_host_sync(device, enabled=True):
        y = (x * 2).sum()  # device work alone: allowed everywhere
        if device.type == "cuda":
            with pytest.raises(RuntimeError):
                float(y)  # a device-to-host copy waits for the GPU
        else:
            assert float(y) == 6.0  # nothing to wait for on the CPU: a no-op there
    assert float(y) == 6.0  # outside the block the same read is allowed again
    if device.type == "cuda":
        assert torch.cuda.get_sync_debug_mode() == 0


def test_compile_auto_means_cuda_only_and_bad_values_are_one_line_errors() -> None:
    assert use_compile("auto", torch.device("cuda", 0)) is True
    assert use_compile("auto", torch.device("cpu")) is False
    assert use_compile("on", torch.device("cpu")) is True and use_compile("off", torch.device("cuda", 0)) is False
    with pytest.raises(FastclrError, match="auto, on or off"):
        use_compile("sometimes", torch.device("cpu"))


def test_boolean_values_of_auto_on_off_settings_become_on_and_off() -> None:
    # TOML `compile = true` and configs saved when compile was a boolean keep loading.
    assert apply_overrides(Config(), {"train.compile": True}).train.compile == "on"
    assert apply_overrides(Config(), {"train.compile": False}).train.compile == "off"
    assert apply_overrides(Config(), {"train.compile": "auto"}).train.compile == "auto"
