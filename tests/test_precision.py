"""Precision `auto`: the decision from hardware capabilities, fp32 paths that never touch bf16,
fp16 with dynamic loss scaling (skip, halve, resume exactly), and `fastclr info --json`."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import synthetic_images
from fastclr.checkpoint import list_checkpoints, load_checkpoint
from fastclr.cli import main as cli_main
from fastclr.config import Config, TrainConfig, apply_overrides
from fastclr.presets import config_for
from fastclr.data import Dataset, ImageSet
from fastclr.errors import FastclrError
from fastclr.evaluation.classifier import LabelledSetup, TrainRecipe, fit_and_test
from fastclr.evaluation.features import encode
from fastclr.evaluation.knn import knn_accuracy
from fastclr.models import ProjectionHead, SmallCNN
from fastclr.pretraining.optim import build_optimizer
from fastclr.evaluation.probe import linear_probe
from fastclr.info import compile_reason
from fastclr.evaluation.features import extract_features
from fastclr.runtime import (FP32, CpuFeatures, Precision, cap_allows_bf16, check_precision, cpu_features, cpu_model,
                             decide_precision, onednn_isa_cap, precision_timer, resolve_precision, use_compile)
from fastclr.pretraining.step import SimCLRNet, TrainStep
from fastclr.pretraining.objective import Objective
from fastclr.pretraining.queue import KeyNetwork, RowQueue
from fastclr.pretraining.loop import pretrain

CPU = torch.device("cpu")


def cpu(avx512: bool = False, bf16: bool = False, amx: bool = False, arch: str = "x86_64",
        onednn: bool | None = None) -> CpuFeatures:
    # oneDNN reports bf16 kernels on any AVX-512 CPU, with bf16 units or not (the trap).
    return CpuFeatures("test cpu", arch, avx2=True, avx512=avx512 or bf16 or amx, avx512_bf16=bf16 or amx,
                       amx_bf16=amx, onednn_bf16=(avx512 or bf16 or amx) if onednn is None else onednn)


def never_timed(dtype: torch.dtype) -> float:
    raise AssertionError("the flags alone decide this case: no matmul may be timed")


@pytest.mark.parametrize("device_type, features, capability, expected, scaling", [
    ("cpu", cpu(), None, "fp32", False),                       # AVX2 only
    ("cpu", cpu(avx512=True), None, "fp32", False),            # AVX-512 without bf16 units
    ("cpu", cpu(amx=True), None, "bf16", False),               # AMX (Sapphire Rapids)
    ("cuda", None, (7, 0), "fp16", True),                      # V100
    ("cuda", None, (8, 0), "bf16", False),                     # A100
    ("cuda", None, (9, 0), "bf16", False),                     # H100
    ("cuda", None, (7, 5), "fp16", True),                      # T4
    ("cuda", None, (6, 1), "fp32", False),                     # GTX 1080: no tensor cores, fp16 at 1/64 rate
], ids=["avx2", "avx512", "amx", "cuda7.0", "cuda8.0", "cuda9.0", "cuda7.5", "cuda6.1"])
def test_auto_precision_table(device_type: str, features: CpuFeatures | None, capability: tuple[int, int] | None,
                              expected: str, scaling: bool) -> None:
    p = decide_precision("auto", device_type, features, capability, never_timed)
    assert (p.name, p.loss_scaling) == (expected, scaling)
    assert p.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[expected]


@pytest.mark.parametrize("fp32_s, bf16_s, expected", [(1.0, 0.5, "bf16"), (1.0, 0.95, "fp32"), (1.0, 30.0, "fp32")])
@pytest.mark.parametrize("features", [cpu(arch="aarch64"), cpu(bf16=True, onednn=False), cpu(bf16=True)],
                         ids=["arm", "isa-capped", "avx512_bf16"])
def test_uncertain_cpus_take_the_faster_measured_dtype(features: CpuFeatures, fp32_s: float, bf16_s: float,
                                                       expected: str) -> None:
    """Flags that say nothing (ARM), disagree with oneDNN (ONEDNN_MAX_CPU_ISA capped below
    AVX-512), or give bf16 units without AMX (AVX512_BF16: Cooper Lake, the EPYC Zen 4, a Xeon whose
    AMX oneDNN may not use, where bf16 measured slower than fp32) are settled by timing; bf16 must
    win by 10% to be taken."""
    asked: list[torch.dtype] = []

    def timer(dtype: torch.dtype) -> float:
        asked.append(dtype)
        return bf16_s if dtype == torch.bfloat16 else fp32_s

    assert decide_precision("auto", "cpu", features, None, timer).name == expected
    assert sorted(map(str, asked)) == ["torch.bfloat16", "torch.float32"]


@pytest.mark.parametrize("environ, cap, allows", [
    ({}, "", True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX2", False),
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, "AVX512_CORE", False),             # Skylake-SP's level
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, "AVX512_CORE_VNNI", False),  # Cascade Lake's
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "AVX512_CORE_BF16", True),   # Cooper Lake's, Zen 4's
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "AVX512_CORE_AMX", True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX10_1_512_AMX"}, "AVX10_1_512_AMX", True),
    ({"ONEDNN_MAX_CPU_ISA": "all"}, "ALL", True),
    ({"ONEDNN_MAX_CPU_ISA": " avx512_core "}, "", True),                      # oneDNN ignores what it cannot read
    ({"ONEDNN_MAX_CPU_ISA": "AVX512CORE"}, "", True),
    ({"DNNL_MAX_CPU_ISA": "AVX512_CORE"}, "AVX512_CORE", False),              # the older name
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "DNNL_MAX_CPU_ISA": "AVX2"}, "AVX512_CORE_BF16", True),
    ({"ONEDNN_MAX_CPU_ISA": "SOME_FUTURE_ISA"}, "", True),
])
def test_onednn_isa_cap_says_whether_bf16_runs_on_bf16_units(environ: dict[str, str], cap: str, allows: bool) -> None:
    """oneDNN's documented order: ... < AVX512_CORE < AVX512_CORE_VNNI < AVX512_CORE_BF16 < ...; only
    levels from AVX512_CORE_BF16 up dispatch bf16 dot products, ONEDNN_ beats DNNL_, case does not
    matter, and a value oneDNN cannot read leaves it uncapped."""
    assert onednn_isa_cap(environ) == cap
    assert cap_allows_bf16(cap) is allows


def test_an_avx512_cap_below_bf16_makes_auto_time_the_matmul_on_a_cpu_with_bf16_units(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's `_is_mkldnn_bf16_supported()` answers True under ONEDNN_MAX_CPU_ISA=AVX512_CORE, where
    oneDNN emulates bf16 (the step 2.4x slower than fp32 on the EPYC Zen 4): the cap must make the
    flags uncertain, and the timing decide."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    features = cpu_features()
    assert features.native_bf16 and not features.onednn_bf16 and features.onednn_isa_cap == "AVX512_CORE"
    p = decide_precision("auto", "cpu", features, None, lambda dt: 2.4 if dt == torch.bfloat16 else 1.0)
    assert p.name == "fp32" and "oneDNN capped at AVX512_CORE" in p.reason
    monkeypatch.setattr("fastclr.runtime.matmul_seconds",
                        lambda dtype, device, shape=(0, 0, 0), budget_s=0.0, threads=None: 1.2 if dtype == torch.bfloat16 else 0.5)
    lines: list[str] = []
    check_precision(Precision("bf16", "asked for"), CPU, features, lines.append)
    assert len(lines) == 1 and "(AVX512_BF16, oneDNN capped at AVX512_CORE): bf16 is emulated" in lines[0]
    assert "2.4x the fp32 time" in lines[0]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    faster = decide_precision("auto", "cpu", cpu_features(), None, lambda dt: 0.4 if dt == torch.bfloat16 else 1.0)
    assert faster.name == "bf16" and faster.reason.endswith("(AVX512_BF16) without AMX; measured matmul 1000.0 ms "
                                                            "fp32, 400.0 ms bf16")
    # With AMX, a cap at AVX512_CORE_BF16 leaves bf16 native but the tiles off: timed, as without AMX.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    slower = decide_precision("auto", "cpu", cpu_features(), None, lambda dt: 1.2 if dt == torch.bfloat16 else 1.0)
    assert slower.name == "fp32" and "(AVX512_BF16) without AMX" in slower.reason
    # Untimed (`info --no-measure`): it said "bf16: native bf16 (AVX512_BF16)" where every command, which
    # times it, ran fp32; the reason now says it was not measured and what the commands do
    untimed = decide_precision("auto", "cpu", cpu_features(), None, None)
    assert untimed.reason.endswith("(AVX512_BF16) without AMX; not measured: every command times bf16 against fp32 "
                                   "here and runs fp32 unless bf16 is at least 10% faster")
    # ... and `info --no-measure` named it "precision bf16:" still: the choice is the timing's
    from fastclr import info

    monkeypatch.setattr(info, "select_device", lambda name: CPU)
    report = info.machine_report(measure=False)
    assert report["precision"] == {"choice": "timed", "reason": untimed.reason}
    assert f"precision   timed: {untimed.reason}" in info.format_report(report).splitlines()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert decide_precision("auto", "cpu", cpu_features(), None, never_timed).reason.endswith("(AMX-BF16)")


@pytest.mark.parametrize(("cap", "warned"), [("", False), ("AVX512_CORE_AMX_FP16", False), ("AVX10_1_512_AMX_FP16", False),
                                             ("AVX10_2_512_AMX_2", False),  # AMX 2: fp16 tiles too
                                             ("AVX512_CORE_AMX", True), ("AVX512_CORE_BF16", True), ("AVX2", True)])
def test_an_explicit_fp16_on_amx_fp16_units_is_timed_where_onednn_is_capped_below_them(
        cap: str, warned: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's `_is_amx_fp16_supported()` reads the CPU, not oneDNN's cap: under a cap without AMX's
    fp16 tiles fp16 is emulated, so the matmul is timed and the warning names the cap."""
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: True)
    timed: list[torch.dtype] = []

    def matmul(dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int] = (0, 0, 0),
               budget_s: float = 0.0, threads: int | None = None) -> float:
        timed.append(dtype)
        return 3.0 if dtype == torch.float16 else 1.0

    monkeypatch.setattr("fastclr.runtime.matmul_seconds", matmul)
    features = dataclasses.replace(cpu(amx=True), onednn_isa_cap=cap)
    lines: list[str] = []
    check_precision(Precision("fp16", "asked for"), CPU, features, lines.append)
    assert bool(lines) == warned and bool(timed) == warned
    if warned:
        assert f"(AMX, oneDNN capped at {cap}): fp16 is emulated here, a matmul measured 3.0x" in lines[0]


@pytest.mark.parametrize("features, auto", [(cpu(), "fp32"), (cpu(bf16=True), "bf16"), (cpu(amx=True), "bf16")])
def test_the_emulated_precision_warning_names_what_auto_would_choose(
        features: CpuFeatures, auto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit fp16 where fp16 is emulated (no AMX-FP16): on a CPU with native bf16 the warning
    points to auto's bf16, not to fp32."""
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    monkeypatch.setattr("fastclr.runtime.matmul_seconds",
                        lambda dtype, device, shape=(0, 0, 0), budget_s=0.0, threads=None: 34.3 if dtype == torch.float16
                        else 0.4 if dtype == torch.bfloat16 else 1.0)  # (AVX512_BF16's bf16 is timed: faster here)
    lines: list[str] = []
    check_precision(Precision("fp16", "asked for"), CPU, features, lines.append)
    assert len(lines) == 1 and "fp16 is emulated here, a matmul measured 34.3x the fp32 time" in lines[0]
    assert lines[0].endswith(f"--precision auto would choose {auto}")


def test_an_explicit_fp16_without_amx_fp16_warns_even_where_its_matmul_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """AVX512_FP16 (a Xeon with AMX-BF16 only) runs an fp16 matmul as fast as fp32, so the timed
    check stayed silent, while oneDNN has no fp16 convolution there: the default step measured
    194x its fp32 time (26.8 s against 138 ms), 9 steps in the 9.5-minute budget, without a word."""
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    monkeypatch.setattr("fastclr.runtime.matmul_seconds",
                        lambda dtype, device, shape=(0, 0, 0), budget_s=0.0, threads=None: 0.87 if dtype == torch.float16
                        else 1.0)
    lines: list[str] = []
    check_precision(Precision("fp16", "asked for"), CPU, cpu(amx=True), lines.append)
    assert len(lines) == 1 and lines[0].endswith(
        "(AMX, no fp16 units): fp16 is emulated here, its convolutions run emulated (a matmul measured 0.9x the fp32 "
        "time, but a training step about 200x on a CPU with AVX512_FP16 and no AMX-FP16); --precision auto would "
        "choose bf16")
    lines.clear()
    check_precision(Precision("bf16", "asked for"), CPU, cpu(), lines.append)
    assert lines == []  # bf16 timed as fast (ARM's units, which no x86 flag names) stays silent
    check_precision(Precision("fp16", "asked for"), CPU, cpu(arch="aarch64"), lines.append)
    assert lines == []  # so does fp16 on ARM, whose fp16 units no flag here names: the 194x is x86's


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN's ISA cap is x86's")
def test_auto_under_a_real_avx512_core_cap_runs_fp32() -> None:
    """The cap as a user sets it, in a fresh process (oneDNN reads it once): whatever this x86 CPU
    has, oneDNN capped at AVX512_CORE has no bf16 dot products, so `auto` must not be bf16; on a CPU
    with bf16 units (where the flags alone said bf16) the choice must come from the timing."""
    code = ("import torch; from fastclr.runtime import resolve_precision; "
            "p = resolve_precision('auto', torch.device('cpu'), warn=lambda s: None); print(p.name); print(p.reason)")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-800:]
    name, reason = out.stdout.strip().split("\n", 1)
    assert name == "fp32"
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        assert "oneDNN capped at AVX512_CORE" in reason and "measured matmul" in reason


def test_explicit_choices_are_kept_and_unknown_ones_refused() -> None:
    for name in ("bf16", "fp16", "fp32"):
        assert decide_precision(name, "cpu", cpu(), None, never_timed).name == name
    with pytest.raises(Exception, match="unknown precision 'half'; choose one of: auto, bf16, fp16, fp32"):
        decide_precision("half", "cpu", cpu(), None, never_timed)


def test_explicit_bf16_without_bf16_units_warns_once_with_the_measured_slowdown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fastclr.runtime.cpu_features", lambda: cpu())
    monkeypatch.setattr("fastclr.runtime.matmul_seconds",
                        lambda dtype, device, shape=(0, 0, 0), budget_s=0.0, threads=None: 40.0 if dtype == torch.bfloat16 else 0.5)
    lines: list[str] = []
    p = resolve_precision("bf16", CPU, warn=lines.append)
    assert p.name == "bf16" and len(lines) == 1
    assert "test cpu (AVX2, no bf16 units)" in lines[0] and "80.0x the fp32 time" in lines[0]
    lines.clear()
    assert resolve_precision("auto", CPU, warn=lines.append).name == "fp32" and lines == []
    # a run started where bf16 is native, resumed here: its saved bf16 is kept, and said to be the run's
    p = resolve_precision("bf16", CPU, warn=lines.append, saved=True)
    assert p.name == "bf16" and "the precision this run was started with" in p.reason and len(lines) == 1
    assert lines[0].startswith("warning: this run's saved precision bf16 on test cpu (AVX2, no bf16 units)")
    assert lines[0].endswith("80.0x the fp32 time; resume with --precision auto to use fp32")


def test_explicit_low_precision_without_its_cuda_tensor_cores_warns() -> None:
    """On a GPU the capability decides: bf16 below 8.0 and fp16 below 7.0 are warned about, with
    what auto would choose; what the GPU has is not."""
    gpu = torch.device("cuda", 0)  # a device object only: nothing runs on it
    for name, cap, auto in (("bf16", (7, 0), "fp16"), ("bf16", (6, 1), "fp32"), ("fp16", (6, 1), "fp32")):
        lines: list[str] = []
        check_precision(decide_precision(name, "cuda"), gpu, None, lines.append, cuda_capability=cap)
        assert lines == [f"warning: --precision {name} on CUDA compute capability {cap[0]}.{cap[1]}: no {name} tensor "
                         f"cores, so {name} runs emulated or slow; --precision auto would choose {auto}"]
    for name, cap in (("bf16", (8, 0)), ("fp16", (7, 0)), ("fp16", (9, 0)), ("fp32", (6, 1))):
        lines = []
        check_precision(decide_precision(name, "cuda"), gpu, None, lines.append, cuda_capability=cap)
        assert lines == [], (name, cap)


def test_on_rocm_the_gfx_name_decides_not_its_number_read_as_a_cuda_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROCm answers get_device_capability with the gfx number: gfx906 (Vega 20, MI50) read as 9.0
    and got bf16 "tensor cores" it does not have. The gfx name decides: bf16 on CDNA and RDNA 3-4,
    fp32 elsewhere; an explicit bf16 there is warned about."""
    from fastclr.runtime import gpu_kind

    gpu = torch.device("cuda", 0)  # a device object only: nothing runs on it
    for arch, auto in (("gfx906", "fp32"), ("gfx803", "fp32"), ("gfx1030", "fp32"), ("gfx900", "fp32"),
                       ("gfx908", "bf16"), ("gfx90a:sramecc+:xnack-", "bf16"), ("gfx942", "bf16"), ("gfx950", "bf16"),
                       ("gfx1100", "bf16"), ("gfx1201", "bf16")):
        p = decide_precision("auto", "cuda", cuda_capability=(9, 0), rocm_arch=arch)
        assert p.name == auto, arch
        lines: list[str] = []
        check_precision(decide_precision("bf16", "cuda"), gpu, None, lines.append, rocm_arch=arch)
        assert lines == ([] if auto == "bf16" else [f"warning: --precision bf16 on AMD {arch}: no bf16 matrix units, "
                                                    "so bf16 runs emulated or slow; --precision auto would choose fp32"])
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(gcnArchName="gfx906:sramecc+"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 0))
    assert gpu_kind(gpu) == (None, "gfx906") and gpu_kind(torch.device("cpu")) == (None, "")
    monkeypatch.setattr(torch.version, "hip", None)
    assert gpu_kind(gpu) == ((9, 0), "")


def test_the_cpu_is_named_on_x86_and_on_arm(tmp_path: Path) -> None:
    """x86 names its model in every processor block (plus family and model numbers); ARM names none
    there: a board's 'Model' line follows the blocks, and a server's implementer and part say it."""
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                   "model name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\n")
    assert cpu_model(x86) == "AMD EPYC (family 25, model 17)"
    block = "processor\t: {}\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\n"
    pi = tmp_path / "pi"
    pi.write_text(block.format(0) + block.format(1) + "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    assert cpu_model(pi) == "Raspberry Pi 4 Model B Rev 1.4"
    server = tmp_path / "server"
    server.write_text(block.format(0) + block.format(1))
    assert cpu_model(server).endswith(" CPU (implementer 0x41, part 0xd08)")


class DtypeRecorder(TorchDispatchMode):
    """Every dtype an aten operator returns, seen below autograd and autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


def _feature_paths(precision: Precision) -> set[torch.dtype]:
    """Run features, probe, kNN, view encoding and classifier training under `precision`."""
    x, y = synthetic_images(64, 28)
    xt, yt = synthetic_images(32, 28, seed=5)
    torch.manual_seed(0)
    enc = SmallCNN(1, 0.25, "32|64")
    mean, std = torch.tensor([0.2]), torch.tensor([0.3])
    setup = LabelledSetup(x, y, xt, yt, ["a", "b", "c", "d"], mean, std, 28, CPU, precision,
                          TrainRecipe(steps=2, batch_size=16, lr=1e-3, weight_decay=0.0, warmup_fraction=0.0,
                                      shift_fraction=0.07, flip_p=0.5))
    with DtypeRecorder() as rec:
        ftr = extract_features(enc, x, mean, std, CPU, precision=precision)
        fte = extract_features(enc, xt, mean, std, CPU, precision=precision)
        linear_probe(ftr, torch.from_numpy(y), fte, torch.from_numpy(yt), l2_grid=(1e-2,), max_iter=5,
                     feature_dtype=precision.feature_dtype)
        knn_accuracy(ftr, torch.from_numpy(y), fte, torch.from_numpy(yt), k=5, precision=precision)
        encode(enc, torch.randn(8, 1, 28, 28), precision)
        fit_and_test(enc, nn.Linear(enc.feature_dim, 4), setup, np.arange(32), seed=0)
    return rec.dtypes


def test_fp32_feature_probe_knn_and_classifier_paths_never_create_bf16() -> None:
    assert torch.bfloat16 not in _feature_paths(FP32)
    # The recorder does see bf16 when it is used: the assertion above is not vacuous.
    assert torch.bfloat16 in _feature_paths(Precision("bf16", "test"))


@pytest.mark.parametrize("capability, triton, auto, explicit", [
    ((6, 1), True, False, "below the 7.0 Triton needs"),   # GTX 1080: torch raises GPUTooOldForTriton
    ((7, 0), False, False, "Triton is not installed"),      # Windows: no Triton
    ((8, 0), True, True, None),
])
def test_compile_auto_is_on_only_where_triton_runs_and_an_explicit_on_elsewhere_is_refused(
        monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], triton: bool, auto: bool,
        explicit: str | None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr("torch.utils._triton.has_triton_package", lambda: triton)
    monkeypatch.setattr("fastclr.runtime.missing_compiler", lambda device_type: "")  # a host that builds (tested below)
    gpu = torch.device("cuda", 0)
    assert use_compile("auto", gpu) is auto
    assert use_compile("false", gpu) is False
    if explicit is None:
        assert use_compile("on", gpu) is True and compile_reason(gpu) == "fused augmentation and model kernels on CUDA"
    else:
        with pytest.raises(FastclrError, match=explicit):
            use_compile("on", gpu)
        assert explicit in compile_reason(gpu) and not compile_reason(gpu).startswith(("on", "off"))  # said once
    assert use_compile("auto", CPU) is False and use_compile("on", CPU) is True  # the CPU compiles without Triton


def test_compile_needs_a_host_compiler_and_says_which(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A GPU whose Triton runs, in an image without gcc or clang (a CUDA runtime or slim Python
    image): compile was on by default and the first compiled step failed with Triton's "Failed to
    find C compiler" traceback, after the run directory was written. auto is eager there, an
    explicit on is refused in one line; the CPU's explicit on needs a C++ compiler likewise. CC or
    CXX, where set, names the one compiler used."""
    import shutil

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr("torch.utils._triton.has_triton_package", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    installed: set[str] = set()
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in installed else None)
    gpu = torch.device("cuda", 0)
    assert use_compile("auto", gpu) is False
    with pytest.raises(FastclrError, match=r"^--compile on for cuda:0: the C compiler Triton builds its launcher with "
                                           r"is missing \(gcc, clang: none found\); install gcc; use --compile auto"):
        use_compile("on", gpu)
    assert "the C compiler Triton builds its launcher with is missing" in compile_reason(gpu)
    with pytest.raises(FastclrError, match=r"the C\+\+ compiler torch.compile's CPU backend builds its kernels with is "
                                           r"missing \(g\+\+: none found\); install g\+\+"):
        use_compile("on", CPU)
    assert use_compile("auto", CPU) is False  # eager on CPUs whatever is installed
    installed.update({"clang", "clang++", "c++"})  # on Linux torch 2.13's CPU backend looks for g++ alone
    assert use_compile("auto", gpu) is True
    with pytest.raises(FastclrError, match=r"\(g\+\+: none found\)"):
        use_compile("on", CPU)
    installed.add("g++")
    assert use_compile("on", CPU) is True
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"include": str(tmp_path)})  # no Python.h there
    assert use_compile("auto", gpu) is False
    with pytest.raises(FastclrError, match=r"Python's headers, which Triton builds its launcher with, are missing"):
        use_compile("on", gpu)
    (tmp_path / "Python.h").write_text("")
    assert use_compile("auto", gpu) is True
    monkeypatch.setenv("CC", "/opt/cc-that-is-not-there")  # the compiler named is the one Triton takes
    with pytest.raises(FastclrError, match=r"\(/opt/cc-that-is-not-there: none found\)"):
        use_compile("on", gpu)


def test_auto_choosing_bf16_where_only_timing_can_tell_does_not_warn_about_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On ARM (Graviton 3: bf16 instructions no x86 flag names) `auto` times bf16 faster and takes it;
    no warning may call that choice emulated, nor an explicit bf16 that the timing shows is not."""
    monkeypatch.setattr("fastclr.runtime.cpu_features", lambda: cpu(arch="aarch64"))
    timed: list[tuple[torch.dtype, int | None]] = []

    def matmul(dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int] = (0, 0, 0),
               budget_s: float = 0.0, threads: int | None = None) -> float:
        timed.append((dtype, threads))
        return 0.5 if dtype == torch.bfloat16 else 1.0

    monkeypatch.setattr("fastclr.runtime.matmul_seconds", matmul)
    lines: list[str] = []
    assert resolve_precision("auto", CPU, warn=lines.append).name == "bf16"
    # the decision's two timings, on one thread (`precision_timer`), and no check of its own choice
    assert timed == [(torch.float32, 1), (torch.bfloat16, 1)]
    assert resolve_precision("bf16", CPU, warn=lines.append).name == "bf16"
    assert lines == []


def _tiny_net(seed: int = 0, optimizer: str = "adamw") -> tuple[SimCLRNet, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    enc = SmallCNN(1, 0.125, "32|64")
    net = SimCLRNet(enc, ProjectionHead(enc.feature_dim, 16, 8))
    return net, build_optimizer(optimizer, [net.encoder, net.head], 1e-3, 5e-4)


class Overflow:
    """A backward hook that turns one chosen step's gradient into inf (an fp16 overflow)."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.step = at_step, 0

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf") if self.step == self.at_step else grad


def test_fp16_overflow_skips_the_update_halves_the_scale_and_leaves_parameters_untouched() -> None:
    net, opt = _tiny_net()
    step = TrainStep(net, opt, Precision("fp16", "test"), CPU, temperature=0.5)
    boom = Overflow(at_step=-1)
    next(net.encoder.parameters()).register_hook(boom)
    views = torch.randn(16, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    # From 2^16 the scale first halves until this model's gradients fit in fp16.
    scales = []
    for _ in range(30):
        scales.append(step.loss_scale())
        if float(step(views).skipped) == 0.0 and len(scales) > 1 and step.loss_scale() == scales[-1]:
            break
    assert all(b == a / 2 for a, b in zip(scales, scales[1:]))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    scale = step.loss_scale()
    boom.step = boom.at_step  # this step's gradient overflows
    out = step(views)
    assert float(out.skipped) == 1.0 and not torch.isfinite(out.grad_norm)
    assert step.loss_scale() == scale / 2
    for k, p in net.named_parameters():
        assert torch.equal(p.detach(), before[k]), k  # no update and no weight decay
    for p in opt.state:
        for k, v in opt.state[p].items():
            assert torch.equal(v, moments[id(p)][k]), k  # AdamW's moments and step count untouched
    boom.step = 0
    out = step(views)
    assert float(out.skipped) == 0.0 and torch.isfinite(out.grad_norm)
    assert not torch.equal(next(net.encoder.parameters()).detach(), before[next(iter(dict(net.named_parameters())))])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_a_skipped_first_step_leaves_every_optimiser_as_if_it_had_not_happened(optimizer: str) -> None:
    # The first fp16 step at the starting scale often overflows. Afterwards the run must equal
    # one that starts at the halved scale (a power of two: unscaled gradients are the same bits).
    # Memory dirtied first: an optimiser state left uninitialised shows as garbage.
    views = torch.randn(16, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    net, opt = _tiny_net(optimizer=optimizer)
    junk = [torch.full_like(p, 1e30) for p in net.parameters() for _ in range(4)]
    del junk
    step = TrainStep(net, opt, Precision("fp16", "test"), CPU, temperature=0.5)
    step.load_state_dict(dict(step.state_dict(), scale=16.0))  # low enough for no real overflow
    boom = Overflow(at_step=0)
    next(net.encoder.parameters()).register_hook(boom)
    assert float(step(views).skipped) == 1.0
    boom.step = 1
    assert float(step(views).skipped) == 0.0
    ref_net, ref_opt = _tiny_net(optimizer=optimizer)
    ref = TrainStep(ref_net, ref_opt, Precision("fp16", "test"), CPU, temperature=0.5)
    ref.load_state_dict(dict(step.state_dict(), scale=8.0))
    assert float(ref(views).skipped) == 0.0
    for (k, p), q in zip(net.named_parameters(), ref_net.parameters()):
        assert torch.equal(p.detach(), q.detach()), k


def test_a_skipped_step_moves_neither_the_key_network_nor_the_queue_nor_the_support_set() -> None:
    net, opt = _tiny_net()
    cfg = TrainConfig(queue=40, nn_support=24, temperature=0.2)
    keys = KeyNetwork(net, 0.9)
    queue, support = RowQueue(40, 8, CPU), RowQueue(24, 8, CPU)
    objective = Objective(cfg, None, CPU, None, keys, queue, support)
    step = TrainStep(net, opt, Precision("fp16", "test"), CPU, temperature=0.2, objective=objective)
    step.load_state_dict(dict(step.state_dict(), scale=1.0))  # no overflow from the starting scale
    boom = Overflow(at_step=3)
    next(net.encoder.parameters()).register_hook(boom)
    g = torch.Generator().manual_seed(1)
    idx = torch.arange(8)
    for i in range(3):
        boom.step = i
        assert float(step(torch.randn(16, 1, 28, 28, generator=g), objective.groups(idx)).skipped) == 0.0
    def snapshot(state: dict[str, Any]) -> dict[str, Any]:
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}

    before = (snapshot(keys.net.state_dict()), snapshot(queue.state_dict()), snapshot(support.state_dict()))
    boom.step = 3
    assert float(step(torch.randn(16, 1, 28, 28, generator=g), objective.groups(idx)).skipped) == 1.0
    for k, v in keys.net.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    for saved, now in ((before[1], queue.state_dict()), (before[2], support.state_dict())):
        assert saved.keys() == now.keys()
        for k in saved:
            assert torch.equal(torch.as_tensor(saved[k]), torch.as_tensor(now[k])), k
    boom.step = 4
    step(torch.randn(16, 1, 28, 28, generator=g), objective.groups(idx))
    assert not torch.equal(queue.state_dict()["rows"], before[1]["rows"])  # a real step enqueues again


def test_loss_scaling_is_off_for_bf16_and_fp32() -> None:
    for name in ("bf16", "fp32"):
        net, opt = _tiny_net()
        step = TrainStep(net, opt, Precision(name, "test"), CPU, temperature=0.5)
        out = step(torch.randn(8, 1, 28, 28))
        assert step.loss_scale() == 1.0 and step.state_dict() == {} and float(out.skipped) == 0.0


class OverflowingEncoder(nn.Module):
    """A SmallCNN whose gradient overflows at one global step, wherever a run resumes."""

    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.inner = SmallCNN(1, 0.125, "32|64")
        self.feature_dim = self.inner.feature_dim
        self.boom = Overflow(at_step)
        next(self.inner.parameters()).register_hook(self.boom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _fp16_config(run_dir: Path, log_every: int = 1) -> Config:
    return config_for(None, {
        "model.head_hidden": 16, "model.proj_dim": 8, "train.batch_size": 16, "train.epochs": 2.0,
        "train.run_dir": str(run_dir), "train.log_every": log_every, "train.precision": "fp16", "eval.monitor_every": 0,
        "eval.probe": False, "augment.blur_p": 0.0})


def _run(run_dir: Path, ds: Dataset, resume: bool, stop_at: int | None, log_every: int = 1) -> Any:
    torch.manual_seed(0)  # the same initial encoder in every run (pretrain seeds only the head)
    enc = OverflowingEncoder(at_step=3)
    if resume:
        enc.boom.step = int(load_checkpoint(list_checkpoints(run_dir)[-1])["step"])

    def stop(step: int) -> bool:
        enc.boom.step = step  # the next step to run
        return stop_at is not None and step == stop_at

    return pretrain(_fp16_config(run_dir, log_every), encoder=enc, dataset=ds, resume=run_dir if resume else None,
                    progress=False, log=lambda s: None, stop=stop)


def test_fp16_stop_and_resume_through_a_skipped_step_is_exact(tmp_path: Path) -> None:
    x, y = synthetic_images(96, 28)
    ds = Dataset("tiny", ImageSet(x, y), None, None, [])  # 6 steps per epoch, 12 in all
    straight = _run(tmp_path / "a", ds, resume=False, stop_at=None)
    assert straight.steps == 12
    recs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped"] for r in recs if "skipped" in r}
    assert skipped[4] == 1  # step index 3 is the 4th step; the log counts steps from 1
    assert sum(skipped.values()) >= 1 and all(r["loss_scale"] > 0 for r in recs if "loss_scale" in r)
    first = _run(tmp_path / "b", ds, resume=False, stop_at=5)  # stops after the skipped step
    assert first.stopped and first.steps == 5
    second = _run(tmp_path / "b", ds, resume=True, stop_at=None)
    assert second.steps == 12
    a = load_checkpoint(list_checkpoints(tmp_path / "a")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    assert a["loss_scaler"] == b["loss_scaler"] and a["loss_scaler"]["scale"] < 2.0**16
    for part in ("encoder", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["config"]["train"]["precision"] == "fp16"


def test_a_stop_between_log_steps_loses_no_step_of_the_metrics(tmp_path: Path) -> None:
    # log every 4 steps, epochs of 6, the overflow at step 4, a stop after step 5: every step is in
    # exactly one record, and the skipped step is counted once, as in the run that did not stop
    x, y = synthetic_images(96, 28)
    ds = Dataset("tiny", ImageSet(x, y), None, None, [])

    def windows(run_dir: Path) -> list[tuple[int, int, int, float]]:
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "loss" in r]
        starts = [0] + [r["step"] for r in steps[:-1]]
        return [(a, r["step"], r["skipped"], r["loss"] * (r["step"] - a)) for a, r in zip(starts, steps)]

    _run(tmp_path / "a", ds, resume=False, stop_at=None, log_every=4)
    assert _run(tmp_path / "b", ds, resume=False, stop_at=5, log_every=4).stopped
    _run(tmp_path / "b", ds, resume=True, stop_at=None, log_every=4)
    straight, resumed = windows(tmp_path / "a"), windows(tmp_path / "b")
    for w in (straight, resumed):
        assert sum(b - a for a, b, _, _ in w) == 12 and all(b > a for a, b, _, _ in w)  # each step once
    assert [b for _, b, _, _ in resumed] == [4, 5, 6, 8, 12]  # log steps, the stop, the checkpoints (epochs)
    assert sum(s for *_, s, _ in resumed) == sum(s for *_, s, _ in straight) >= 1
    assert sum(t for *_, t in resumed) == pytest.approx(sum(t for *_, t in straight), rel=1e-5)  # the same losses


@pytest.mark.parametrize("device, largest", [(torch.device("cpu"), 2048), (torch.device("cuda", 0), 8192)])
def test_info_grows_the_timed_matmul_to_20_ms_up_to_a_side_each_device_can_fill(
        monkeypatch: pytest.MonkeyPatch, device: torch.device, largest: int) -> None:
    """A fast device's matmul never reaches 20 ms: the side stops at its ceiling, and the rate is
    2 n^3 flops over the time of that side (here 1 us per side step, so GFLOP/s = 2 n^3 / 1e3)."""
    from fastclr import info

    sides: list[int] = []

    def seconds(dtype: torch.dtype, dev: torch.device, shape: tuple[int, int, int], budget_s: float = 0.0) -> float:
        sides.append(shape[0])
        return 1e-6

    monkeypatch.setattr(info, "matmul_seconds", seconds)
    rate = info.matmul_rate(torch.float32, device)
    assert sides[-1] == largest and max(sides) == largest
    assert rate == pytest.approx(2 * largest**3 / 1e-6 / 1e9)


def test_info_json_names_the_precision_pretrain_would_choose() -> None:
    resolved = resolve_precision("auto", CPU, warn=lambda s: None)
    for measure in ([], ["--no-measure"]):
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert cli_main(["info", "--json", *measure]) == 0
        report = json.loads(buf.getvalue())
        # unmeasured where `auto` times bf16 against fp32 here (AVX512_BF16 without AMX), it says so
        timed = measure and "measured matmul" in resolved.reason
        assert report["precision"]["choice"] == ("timed" if timed else resolved.name)
    assert report["cpu"]["isa"] in ("AMX", "AVX512_BF16", "AVX512", "AVX2", "baseline")
    assert report["torch"] == torch.__version__ and report["device"] == "cpu"
    assert set(report["datasets"]) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "stl10"}


def test_pretrain_records_the_resolved_precision(tmp_path: Path) -> None:
    x, y = synthetic_images(32, 28)
    cfg = apply_overrides(_fp16_config(tmp_path), {"train.precision": "auto", "train.epochs": 1.0})
    lines: list[str] = []
    pretrain(cfg, dataset=Dataset("tiny", ImageSet(x, y), None, None, []), progress=False, log=lines.append)
    expected = resolve_precision("auto", CPU, warn=lambda s: None)
    assert f'precision = "{expected.name}"' in (tmp_path / "config.toml").read_text()
    assert lines[0] == f"precision {expected.name}: {expected.reason}"


def test_a_compile_refusal_comes_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile on` where Triton cannot run is bad input: one line, and no run directory left."""
    def refuse(setting: str | bool, device: torch.device) -> bool:
        raise FastclrError("--compile on for cuda:0: CUDA compute capability 6.1 is below the 7.0 Triton needs")

    monkeypatch.setattr("fastclr.pretraining.loop.use_compile", refuse)
    x, y = synthetic_images(32, 28)
    cfg = apply_overrides(_fp16_config(tmp_path / "new" / "run"), {"train.precision": "auto", "train.epochs": 1.0})
    with pytest.raises(FastclrError, match="below the 7.0"):
        pretrain(cfg, dataset=Dataset("tiny", ImageSet(x, y), None, None, []), progress=False, log=lambda s: None)
    assert not (tmp_path / "new").exists()


def test_the_precision_timing_runs_on_one_thread_and_gives_the_threads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads sharing the CPU with another busy process turned the fp32 / bf16 ratio round
    (fp32 12-16 ms against bf16 7.6-8.0 ms on the EPYC Zen 4 capped at AVX512_CORE, where bf16 makes
    the step 2.4x slower); one thread keeps the quiet machine's ratio, so the matmul is timed there."""
    seen: list[int] = []
    real_mm = torch.Tensor.__matmul__

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return real_mm(a, b)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch.Tensor, "__matmul__", mm)
        seconds = precision_timer(CPU, (8, 8, 8))(torch.float32)
        assert torch.get_num_threads() == 2 and seconds > 0 and set(seen) == {1}
    finally:
        torch.set_num_threads(before)


def test_amx_tiles_are_native_bf16_and_a_cap_at_an_amx_level_keeps_them() -> None:
    """`native_bf16` is AVX512_BF16 or AMX-BF16, either alone; oneDNN capped at one of its AMX levels
    still runs bf16 on the tiles, and the reason names them."""
    amx_only = CpuFeatures("test cpu", "x86_64", avx2=True, avx512=True, avx512_bf16=False, amx_bf16=True,
                           onednn_bf16=True)
    assert amx_only.native_bf16
    p = decide_precision("auto", "cpu", amx_only, None, never_timed)
    assert p.name == "bf16" and p.reason.endswith("(AMX-BF16)")
    for cap in ("AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16"):
        p = decide_precision("auto", "cpu", dataclasses.replace(cpu(amx=True), onednn_isa_cap=cap), None, never_timed)
        assert p.name == "bf16" and p.reason.endswith("(AMX-BF16)"), cap


@pytest.mark.parametrize("slowdown, warned", [(1.05, False), (1.5, True)])
def test_an_explicit_bf16_measured_less_than_ten_percent_slower_is_not_called_emulated(
        slowdown: float, warned: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning's margin is the one `auto` asks of bf16: on a CPU whose flags say nothing (ARM), a
    bf16 matmul 5% slower than fp32 is not emulation (no warning), one 50% slower is."""
    monkeypatch.setattr("fastclr.runtime.matmul_seconds",
                        lambda dtype, device, shape=(0, 0, 0), budget_s=0.0, threads=None:
                        slowdown if dtype == torch.bfloat16 else 1.0)
    lines: list[str] = []
    check_precision(Precision("bf16", "asked for"), CPU, cpu(arch="aarch64"), lines.append)
    assert bool(lines) == warned
    if warned:
        assert "a matmul measured 1.5x the fp32 time" in lines[0]


def test_each_precision_autocasts_to_its_own_dtype() -> None:
    """fp16 runs its matmuls in float16 (with loss scaling, not bf16), bf16 in bfloat16, fp32 untouched."""
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with Precision(name, "test").autocast(CPU):
            assert (a @ b).dtype == dtype, name


def test_a_saved_auto_is_decided_again_with_its_own_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only an explicit saved precision is kept "as the run was started"; a saved auto re-decides for
    this machine and says why as a fresh auto does."""
    monkeypatch.setattr("fastclr.runtime.cpu_features", lambda: cpu(amx=True))
    fresh = resolve_precision("auto", CPU, warn=lambda s: None)
    resumed = resolve_precision("auto", CPU, warn=lambda s: None, saved=True)
    assert (resumed.name, resumed.reason) == (fresh.name, fresh.reason)
    assert fresh == Precision("bf16", "test cpu has native bf16 (AMX-BF16)")


def test_info_names_each_gpus_capability_and_memory_in_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Major.minor as CUDA writes it, and GiB (2^30 bytes), to one decimal."""
    from types import SimpleNamespace

    from fastclr import info

    props = [SimpleNamespace(name="NVIDIA A100-SXM4-40GB", major=8, minor=0, total_memory=40 * 2**30 + 300 * 2**20),
             SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15 * 2**30)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    assert info.gpus() == [
        {"index": 0, "name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0", "memory_gib": 40.3},
        {"index": 1, "name": "Tesla T4", "compute_capability": "7.5", "memory_gib": 15.0}]
    # ROCm: torch's capability is the gfx number (an MI300X's 9.4 is gfx942), not a CUDA generation
    props = [SimpleNamespace(name="AMD Instinct MI300X", major=9, minor=4, total_memory=192 * 2**30,
                             gcnArchName="gfx942:sramecc+:xnack-")]
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    (gpu,) = info.gpus()
    assert gpu == {"index": 0, "name": "AMD Instinct MI300X", "compute_capability": None, "gfx": "gfx942",
                   "memory_gib": 192.0}
    assert info.gpu_line(gpu) == "gpu 0       AMD Instinct MI300X, AMD gfx942, 192.0 GiB"


def test_info_labels_each_measured_rate_and_gives_the_precision_with_its_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU only timing can settle (ARM): each dtype's rate is 2 n^3 over that dtype's own time,
    the precision and its reason are `decide_precision`'s with the same timing (not measured: fp32,
    saying so), the CPU's flags are its own, and torch_threads is what fastclr runs with: PyTorch's
    count, at most the usable CPUs."""
    from fastclr import info

    seconds = {torch.float32: 0.04, torch.bfloat16: 0.025}
    arm = cpu(arch="aarch64")
    monkeypatch.setattr(info, "cpu_features", lambda: arm)
    monkeypatch.setattr(info, "select_device", lambda name: CPU)
    monkeypatch.setattr(info, "matmul_seconds", lambda dtype, device, shape, budget_s=0.0: seconds[dtype])
    monkeypatch.setattr(info, "precision_timer", lambda device: lambda dtype: seconds[dtype])
    monkeypatch.setattr(info, "usable_cpus", lambda quota=None: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measured, unmeasured = info.machine_report(measure=True), info.machine_report(measure=False)
    finally:
        torch.set_num_threads(before)
    side = 256  # each of these times is over 20 ms already at the first side
    assert measured["matmul"]["cpu_fp32_gflops"] == round(2 * side**3 / 0.04 / 1e9, 1)
    assert measured["matmul"]["cpu_bf16_gflops"] == round(2 * side**3 / 0.025 / 1e9, 1)
    timed = decide_precision("auto", "cpu", arm, None, lambda dtype: seconds[dtype])
    assert timed.name == "bf16" and measured["precision"] == {"choice": "bf16", "reason": timed.reason}
    untimed = decide_precision("auto", "cpu", arm, None, None)
    # unmeasured, the choice is the timing's: every command times bf16 against fp32 on this CPU
    assert untimed.name == "fp32" and unmeasured["precision"] == {"choice": "timed", "reason": untimed.reason}
    assert measured["cpu"]["cores_usable"] == 2 and measured["cpu"]["torch_threads"] == 1
    monkeypatch.setattr(info, "cpu_features", lambda: CpuFeatures("test cpu", "x86_64", avx2=True, avx512=True,
                                                                  avx512_bf16=False, amx_bf16=True, onednn_bf16=True))
    flags = info.machine_report(measure=False)["cpu"]
    assert (flags["avx512_bf16"], flags["amx_bf16"], flags["native_bf16"], flags["isa"]) == (False, True, True, "AMX")


def test_info_measures_its_rates_at_the_threads_the_commands_use(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A container whose CPU quota is 1 of the machine's 2 CPUs: `info` printed torch_threads 1 but
    timed its matmuls at PyTorch's own 2 threads, rates no command gets there. It times them at the
    commands' count, and gives the caller's count back."""
    import fastclr.cpus as cpus
    from fastclr import info

    seen: list[int] = []

    def rate(dtype: torch.dtype, device: torch.device, budget_s: float = 0.5) -> float:
        seen.append(torch.get_num_threads())
        return 1.0
    monkeypatch.setattr(info, "matmul_rate", rate)
    monkeypatch.setattr(info, "precision_timer", lambda device: lambda dtype: 1.0)
    monkeypatch.setattr(cpus, "usable_cpus", lambda quota=None: 1)
    monkeypatch.setattr(info, "usable_cpus", lambda quota=None: 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert info.main(as_json=True) == 0
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert json.loads(capsys.readouterr().out)["cpu"]["torch_threads"] == 1


@pytest.mark.parametrize("bf16_s, warned", [(1.6, True), (0.4, False)])
def test_an_explicit_or_resumed_bf16_on_avx512_bf16_alone_warns_where_it_is_slower(
        bf16_s: float, warned: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` times bf16 where its units are AVX512_BF16 alone; an explicit `--precision bf16`, and a
    run started before that change (its config.toml holds the resolved bf16, kept on resume), ran
    at the slower rate without a word. Warned where the matmul is 10% slower; with AMX, untimed."""
    monkeypatch.setattr("fastclr.runtime.matmul_seconds",
                        lambda dtype, device, shape=(0, 0, 0), budget_s=0.0, threads=None: bf16_s
                        if dtype == torch.bfloat16 else 1.0)
    for saved in (False, True):
        lines: list[str] = []
        check_precision(Precision("bf16", "asked for"), CPU, cpu(bf16=True), lines.append, saved=saved)
        assert bool(lines) == warned
        if warned:
            asked = "this run's saved precision bf16" if saved else "--precision bf16"
            switch = "resume with --precision auto to use" if saved else "--precision auto would choose"
            assert lines == [f"warning: {asked} on test cpu (AVX512_BF16 without AMX): bf16 is slower than fp32 here, a "
                             f"matmul measured 1.6x the fp32 time; {switch} fp32"]
    monkeypatch.setattr("fastclr.runtime.matmul_seconds", lambda *a, **kw: never_timed(torch.float32))
    lines = []
    check_precision(Precision("bf16", "asked for"), CPU, cpu(amx=True), lines.append)
    assert lines == []


def test_an_emulated_explicit_precision_warns_on_stderr_once_also_when_quiet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], data_root: Path) -> None:
    """`evaluate --precision bf16 --quiet` on a CPU without bf16 units said nothing (the warning went to
    the log --quiet silences), and without --quiet it went to stdout, into `> table.txt`; info called
    oneDNN's bf16 kernels there a plain yes. A run trained in bf16 that auto evaluates in fp32 is noted."""
    from fastclr import info
    from fastclr.pretrained import load_run
    from tiny import tiny_dataset, tiny_run

    run = tiny_run(tmp_path / "run", tiny_dataset(64))  # then recorded as trained in bf16 (emulated here: slow)
    recorded = (run / "config.toml").read_text(encoding="utf-8")
    assert 'precision = "fp32"' in recorded
    (run / "config.toml").write_text(recorded.replace('precision = "fp32"', 'precision = "bf16"'), encoding="utf-8")
    monkeypatch.setattr("fastclr.runtime.cpu_features", lambda: cpu(avx512=True))
    monkeypatch.setattr("fastclr.runtime.matmul_seconds",
                        lambda dtype, device, shape=(0, 0, 0), budget_s=0.0, threads=None: 2.0 if dtype == torch.bfloat16 else 0.5)
    capsys.readouterr()
    for quiet in ([], ["--quiet"]):
        assert cli_main(["evaluate", str(run), "--protocols", "knn", "--precision", "bf16", "--device", "cpu", *quiet]) == 0
        out, err = capsys.readouterr()
        warned = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert len(warned) == 1 and "(AVX512, no bf16 units): bf16 is emulated here, a matmul measured 4.0x" in warned[0]
        assert "warning" not in out
    lines: list[str] = []
    assert load_run(run, "cpu", "auto", log=lines.append).precision.name == "fp32"
    assert lines == [f"note: computing in fp32 (test cpu (AVX512) has no bf16 units: bf16 would be emulated, far slower "
                     f"than fp32); {run} trained in bf16, so figures computed here can differ in their last digits from "
                     "those its training printed"]
    monkeypatch.setattr(info, "cpu_features", lambda: cpu(avx512=True))
    monkeypatch.setattr(info, "select_device", lambda name: CPU)
    isa = next(line for line in info.format_report(info.machine_report(measure=False)).splitlines() if line.startswith("isa"))
    assert isa.endswith("(flags: avx2, avx512; oneDNN bf16 kernels: yes, emulated (no bf16 units))")
    monkeypatch.setattr(info, "cpu_features", lambda: cpu(amx=True))
    isa = next(line for line in info.format_report(info.machine_report(measure=False)).splitlines() if line.startswith("isa"))
    assert isa.endswith("oneDNN bf16 kernels: yes)")
