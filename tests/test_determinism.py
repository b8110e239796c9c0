"""The process-wide CUDA switches of a run: set for its length, restored after, and effective."""

from __future__ import annotations

import os

import pytest
import torch

from fastclr.config import Config, apply_overrides
from fastclr.determinism import deterministic_kernels, no_host_sync
from fastclr.errors import FastclrError
from fastclr.runtime import use_compile
from fastclr.scaleout.distributed import process_device


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


def test_deterministic_kernels_are_restored_when_the_run_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="boom"):
        with deterministic_kernels(True):
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's deterministic workspace
            raise RuntimeError("boom")
    assert torch.are_deterministic_algorithms_enabled() == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # it stayed set for the rest of the process
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own is used and kept
    with deterministic_kernels(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("name", ["mps", "xpu", "meta", "cpu:1", "garbage"])
def test_devices_fastclr_does_not_run_on_are_one_line(name: str) -> None:
    """mps, xpu and meta parsed as torch devices and failed later with a traceback (exit 1)."""
    from fastclr.runtime import select_device

    with pytest.raises(FastclrError, match=f"^unknown device '{name}'; use auto, cpu, cuda or cuda:N$"):
        select_device(name)


def test_a_gpu_index_past_the_last_gpu_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastclr.runtime import select_device

    monkeypatch.setattr(torch.version, "cuda", None)  # no capability to ask: no GPU is really there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(FastclrError, match="^device 'cuda:3' asked for but 1 GPU visible; use cuda:0 to cuda:0$"):
        select_device("cuda:3")


@pytest.mark.parametrize("capability, arch, runs", [
    ((6, 0), ["sm_75", "sm_80", "sm_90", "compute_90"], False),  # a P100 under a wheel without Pascal
    ((8, 6), ["sm_75", "sm_80", "sm_90"], True),                 # sm_80 code runs on 8.6
    ((8, 0), ["sm_75", "sm_86", "sm_90"], False),                # but sm_86 code does not run on 8.0
    ((12, 0), ["sm_80", "sm_90", "compute_90"], True),           # PTX compiled at load for a newer GPU
    ((9, 0), ["sm_80", "sm_90a"], True),
    ((10, 3), ["sm_90", "sm_100a"], False),                      # arch-specific code runs on 10.0 only
    ((12, 1), ["sm_90", "sm_120"], True),
    ((12, 0), ["sm_90", "sm_100"], False),                       # machine code does not cross majors
    ((11, 0), ["sm_90", "sm_101"], True),                        # Thor: sm_101 was renamed sm_110
    ((8, 7), ["sm_80", "sm_86"], False),                         # Jetson Orin runs only its own sm_87
    ((10, 3), ["sm_90", "sm_100f"], True),                       # family code runs on later minors
    ((12, 0), ["sm_90", "sm_100f"], False),                      # but not on the next major
])
def test_a_gpu_this_torch_build_has_no_kernels_for_is_not_chosen(
        monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], arch: list[str], runs: bool) -> None:
    """`is_available()` is True for a GPU the wheel carries no code for; its first kernel fails."""
    from fastclr.runtime import select_device

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla P100-PCIE-16GB")
    lines: list[str] = []
    assert select_device("auto", warn=lines.append) == (torch.device("cuda", 0) if runs else torch.device("cpu"))
    if runs:
        assert lines == [] and select_device("cuda") == torch.device("cuda", 0)
    else:
        name = f"Tesla P100-PCIE-16GB (compute capability {capability[0]}.{capability[1]}) has no kernels"
        assert len(lines) == 1 and name in lines[0] and "running on the CPU" in lines[0]
        with pytest.raises(FastclrError, match=r"^device 'cuda': Tesla P100.*or use --device cpu$"):
            select_device("cuda")
    # Under torchrun every rank agrees: auto is this rank's GPU only where it runs.
    assert process_device("auto", local_rank=0, world_size=2) == ("cuda:0" if runs else "cpu")
    # A rank without a GPU of its own (LOCAL_RANK 1, one GPU visible) is one line, not torch's AssertionError.
    for setting in ("auto", "cuda"):
        with pytest.raises(FastclrError, match=r"^LOCAL_RANK 1 has no GPU of its own: 1 visible to it; start at most "
                                               r"1 process a node \(--nproc_per_node\)"):
            process_device(setting, local_rank=1, world_size=2)


@pytest.mark.parametrize("gfx, arch, runs", [
    ("gfx1010:xnack-", ["gfx900", "gfx906", "gfx908", "gfx90a", "gfx942", "gfx1030", "gfx1100"], False),  # RX 5700 XT
    ("gfx90a:sramecc+:xnack-", ["gfx90a:xnack-", "gfx942"], True),                                       # MI250X
    ("gfx1151", ["gfx942", "gfx11-generic"], True),                                                     # a family's generic code
    ("gfx1031", ["gfx942", "gfx10-3-generic"], True),
    ("gfx1031", ["gfx942", "gfx11-generic"], False),
    ("gfx90a", ["gfx1100", "gfx9-generic"], False),                                                    # not a gfx9-generic one
    ("gfx950", ["gfx1100", "gfx9-4-generic"], True),
])
def test_a_rocm_gpu_this_build_has_no_kernels_for_is_not_chosen(
        monkeypatch: pytest.MonkeyPatch, gfx: str, arch: list[str], runs: bool) -> None:
    """ROCm wheels carry code for a list of gfx targets too: a GPU outside it answers
    `is_available()` and fails at its first kernel ("HIP error: invalid device function"). It was
    never checked on ROCm; now as on CUDA, and HSA_OVERRIDE_GFX_VERSION is taken as the user's word."""
    from types import SimpleNamespace

    from fastclr.runtime import select_device

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: SimpleNamespace(gcnArchName=gfx))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "AMD Radeon")
    monkeypatch.delenv("HSA_OVERRIDE_GFX_VERSION", raising=False)
    lines: list[str] = []
    assert select_device("auto", warn=lines.append) == (torch.device("cuda", 0) if runs else torch.device("cpu"))
    if not runs:
        base = gfx.split(":")[0]
        assert len(lines) == 1 and f"AMD Radeon ({base}) has no kernels in this torch build" in lines[0]
        with pytest.raises(FastclrError, match=rf"^device 'cuda': AMD Radeon \({base}\) has no kernels"):
            select_device("cuda")
        monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION", "10.3.0")
        assert select_device("auto", warn=lines.append) == torch.device("cuda", 0)


def test_ranks_of_a_node_whose_gpus_differ_agree_or_stop_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """An RTX 3090 and a GTX 1080 under a wheel without Pascal: rank 0 took its GPU (NCCL) and rank 1
    the CPU (gloo), and both waited for each other until the timeout. Every rank now asks about every
    GPU of the node: all have kernels, all ranks on their GPUs; none, all on the CPU; some, one line."""
    caps = {0: (8, 6), 1: (6, 1)}
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: caps[index])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: {0: "RTX 3090", 1: "GTX 1080", 2: "GT 1030"}[index])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    for rank in (0, 1):
        for setting in ("auto", "cuda"):
            with pytest.raises(FastclrError, match=r"^GTX 1080 \(compute capability 6.1\) has no kernels .* other GPUs "
                                                   r"of this node have kernels: .*CUDA_VISIBLE_DEVICES"):
                process_device(setting, local_rank=rank, world_size=2)
    caps[1] = (8, 0)
    assert [process_device("auto", r, 2) for r in (0, 1)] == ["cuda:0", "cuda:1"]
    caps[0] = caps[1] = (6, 1)
    assert [process_device("auto", r, 2) for r in (0, 1)] == ["cpu", "cpu"]
    # A third GPU no rank uses (a display card): not asked, whatever it is
    caps.update({0: (8, 6), 1: (8, 6), 2: (6, 1)})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert [process_device("cuda", r, 2) for r in (0, 1)] == ["cuda:0", "cuda:1"]


def test_the_default_device_on_a_gpu_machine_is_one_set_device_accepts(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`pretrain` with train.device = auto on a machine with a GPU: torch's own set_device takes
    the chosen device (a bare "cuda" raised ValueError there, before anything was written)."""
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config, tiny_dataset

    class Reached(Exception):
        pass

    chosen: list[int] = []

    def set_device(index: int) -> None:  # torch's set_device has checked and resolved the index by now
        chosen.append(index)
        raise Reached

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    monkeypatch.setattr(torch._C, "_cuda_setDevice", set_device, raising=False)  # absent from CPU builds
    with pytest.raises(Reached):
        pretrain(tiny_config(tmp_path / "run", train__device="auto"), dataset=tiny_dataset(), progress=False,
                 log=lambda _: None)
    assert chosen == [1] and not (tmp_path / "run").exists()


def test_pretrain_gives_the_callers_thread_count_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`train.threads` is the run's: a notebook calling fastclr.pretrain kept 1 thread after it."""
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config, tiny_dataset

    before, seen = torch.get_num_threads(), []
    torch.set_num_threads(3)  # the caller's choice, whatever this machine's default
    try:
        pretrain(tiny_config(tmp_path, train__threads=1, train__epochs=0.2), dataset=tiny_dataset(), progress=False,
                 log=lambda s: seen.append(torch.get_num_threads()))
        assert 1 in seen and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


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


def test_compile_auto_means_cuda_only_and_bad_values_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fastclr.runtime.missing_compiler", lambda device_type: "")  # a host that builds
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
