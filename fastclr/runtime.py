"""Runtime choices of one process, made from what the machine has: device, precision, compile
and the allocator (threads: fastclr.cpus). Training, evaluation, the report and ingestion all take
them from here.

Precision is the choice that depends most on the hardware. bf16 autocast halves the bytes and, on
CPUs with bf16 dot-product units (AVX512_BF16: Cooper Lake, Sapphire Rapids and later Xeons, AMD
Zen 4 and later; AMX-BF16: Sapphire Rapids and later), roughly doubles the matmul rate. On every
other CPU oneDNN emulates bf16 and the same matmul runs slower than fp32: 4.4x on a Xeon with AVX-512
and no bf16 units (60.9 against 270.6 GFLOP/s), about 100x with AVX2 alone (an AMD EPYC 9004 with
oneDNN capped at AVX2: 1.8 against 160 GFLOP/s; docs/benchmarks.md section 1).
`torch.ops.mkldnn._is_mkldnn_bf16_supported()` alone cannot tell the two apart: it answers True on
any AVX-512 CPU, with bf16 units or not, and the CPU flags describe the CPU, not a oneDNN whose ISA
the process caps (ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 makes it emulate bf16 on a CPU that has
the units). So the decision asks the CPU flags torch reads (cpuinfo) and oneDNN's cap first, and
times a matmul in both dtypes only where the flags and oneDNN disagree or say nothing.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastclr.cgroups import MEMORY, smallest_limit
from fastclr.config import parse_switch
from fastclr.cpus import gives_threads_back
from fastclr.errors import FastclrError, warn_stderr
from fastclr.host_memory import MEMINFO, os_available
from fastclr.progress import counted

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


# torch's table of which capabilities each sm code runs on (private; absent in other versions).
_TORCH_CODE_TABLE: dict[int, Any] = getattr(torch.cuda, "DEVICE_REQUIREMENT", None) or {}


def _runs_on(code: str, cc: int) -> bool:
    """Whether code built for `code` ("sm_86", "sm_90a", "compute_90", ...) runs on a GPU of
    capability `cc` (86 for 8.6). CUDA's rules: sm_XY machine code runs on the same major version
    from minor Y on (torch's own table, with its exceptions such as Jetson's 8.7 and Thor's sm_101
    on 11.0, where this torch has it), compute_XY PTX is compiled at load for anything from X.Y on;
    an "a" suffix (arch-specific) runs on X.Y only, an "f" one (family) on X.Y and later minors."""
    kind, _, number = code.partition("_")
    suffix = number[-1:] if number[-1:] in ("a", "f") else ""
    digits = number[:len(number) - len(suffix)]
    if kind not in ("sm", "compute") or not digits.isdigit():
        return False
    v = int(digits)
    if suffix == "a":
        return cc == v
    if kind == "sm" and not suffix and v in _TORCH_CODE_TABLE:
        return cc in _TORCH_CODE_TABLE[v]
    if kind == "sm" or suffix == "f":
        return cc // 10 == v // 10 and cc >= v
    return cc >= v


def missing_kernels(index: int = 0) -> str:
    """Why this torch build has no kernels GPU `index` can run, or "" when it has. CUDA wheels
    ship code for a list of architectures (`torch.cuda.get_arch_list()`, rules in `_runs_on`). A
    GPU the list misses (a Pascal P100 under wheels built without sm_60) still answers
    `is_available()`, and its first kernel fails. torch's own lazy-init warnings about the list are
    silenced here: this line says it once, and PTX it does not count may still run."""
    if not torch.cuda.is_available():  # no GPU to ask
        return ""
    if torch.version.hip is not None:
        return _missing_rocm_kernels(index)
    if torch.version.cuda is None:
        return ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        arch = torch.cuda.get_arch_list()
        major, minor = torch.cuda.get_device_capability(index)
    if not arch or any(_runs_on(a, 10 * major + minor) for a in arch):
        return ""
    return (f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) has no kernels in this "
            f"torch build, which carries {' '.join(arch)}")


# LLVM's generic AMDGPU targets and the processors each runs on (llvm.org/docs/AMDGPUUsage.html,
# "Generic Processors"); a generic target not listed here is given the benefit of the doubt.
_ROCM_GENERIC = {
    "gfx9-generic": ("gfx900", "gfx902", "gfx904", "gfx906", "gfx909", "gfx90c"),
    "gfx9-4-generic": ("gfx940", "gfx941", "gfx942", "gfx950"),
    "gfx10-1-generic": ("gfx1010", "gfx1011", "gfx1012", "gfx1013"),
    "gfx10-3-generic": ("gfx1030", "gfx1031", "gfx1032", "gfx1033", "gfx1034", "gfx1035", "gfx1036"),
    "gfx11-generic": ("gfx1100", "gfx1101", "gfx1102", "gfx1103", "gfx1150", "gfx1151", "gfx1152", "gfx1153"),
    "gfx12-generic": ("gfx1200", "gfx1201"),
}


def _rocm_covers(entry: str, arch: str) -> bool:
    """Whether ROCm code object `entry` of a build's arch list ("gfx90a", "gfx90a:xnack-",
    "gfx11-generic") runs on gfx `arch`: the same name, or one a generic target covers."""
    name = entry.split(":")[0]
    if name.endswith("-generic"):
        return arch in _ROCM_GENERIC.get(name, (arch,))
    return name == arch


def _missing_rocm_kernels(index: int) -> str:
    """`missing_kernels` on ROCm: the GPU's gfx name against the build's list (an RX 5700's gfx1010
    under a wheel built for gfx1030 and up answers `is_available()`, and its first kernel fails
    with "invalid device function"). HSA_OVERRIDE_GFX_VERSION makes the runtime load another gfx's
    code, which this cannot judge: it is taken as the user's word."""
    if os.environ.get("HSA_OVERRIDE_GFX_VERSION"):
        return ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        arch_list = torch.cuda.get_arch_list()
        arch = gfx_name(torch.cuda.get_device_properties(index))
    if not arch_list or not arch or any(_rocm_covers(a, arch) for a in arch_list):
        return ""
    return (f"{torch.cuda.get_device_name(index)} ({arch}) has no kernels in this torch build, which carries "
            f"{' '.join(arch_list)} (HSA_OVERRIDE_GFX_VERSION can make it run a listed one's)")


def select_device(name: str, warn: Callable[[str], None] = warn_stderr) -> torch.device:
    """`auto` -> cuda when available and this torch build runs on it (else cpu, with one line
    saying why where a GPU is there); otherwise the named device, checked."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        missing = missing_kernels(torch.cuda.current_device())
        if missing:
            warn(f"warning: {missing}: running on the CPU; install a torch build for this GPU "
                 "(https://pytorch.org/get-started/locally/) to use it")
            return torch.device("cpu")
        # With its index: torch.cuda.set_device and DDP's device_ids refuse a bare "cuda".
        return torch.device("cuda", torch.cuda.current_device())
    try:
        dev: torch.device | None = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        # mps, xpu, meta...: torch names them, fastclr neither builds nor tests for them
        raise FastclrError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FastclrError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise FastclrError(f"device {name!r} asked for but {counted(count, 'GPU')} visible; use cuda:0 to "
                           f"cuda:{count - 1}")
    if dev.type == "cuda" and dev.index is None:
        # An explicit index: torch.cuda.set_device and DDP's device_ids need one.
        dev = torch.device("cuda", torch.cuda.current_device())
    missing = missing_kernels(dev.index) if dev.type == "cuda" and dev.index is not None else ""
    if missing:
        raise FastclrError(f"device {name!r}: {missing}; install a torch build for this GPU "
                           "(https://pytorch.org/get-started/locally/) or use --device cpu")
    return dev


def loading_device(device: torch.device | str) -> torch.device:
    """Where a Python call loads weights to: `select_device`'s checks for auto, cpu and cuda (a
    device named wrong blamed the file: "not a readable safetensors encoder (device gpu is
    invalid); export it again"), and any other device torch has (mps, xpu) as given."""
    try:
        dev = None if device == "auto" else torch.device(device)
    except (RuntimeError, TypeError):
        raise FastclrError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev is None or dev.type in ("cpu", "cuda"):
        return select_device(str(device))
    if dev.type == "meta":
        raise FastclrError("device 'meta' holds no weights; use auto, cpu, cuda or cuda:N")
    return dev


def x86_arch(arch: str) -> bool:
    """Whether `arch` (platform.machine()'s name) is an x86 CPU's."""
    return arch.lower() in ("x86_64", "amd64", "i686", "x86")


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for the choices below, as torch itself sees it."""

    model: str
    """The CPU's name from /proc/cpuinfo (or the platform's processor string)."""
    arch: str
    """platform.machine(): x86_64, aarch64, arm64, ..."""
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    """bf16 dot-product instructions (vdpbf16ps): native bf16 matmuls."""
    amx_bf16: bool
    """AMX tiles (Sapphire Rapids and later): native bf16 matmuls at several times the AVX-512 rate."""
    onednn_bf16: bool
    """oneDNN will run bf16 kernels on bf16 units: False when its ISA is capped below AVX512_CORE_BF16
    (`onednn_isa_cap`), or below AVX-512 (then torch's own query says so too)."""
    onednn_isa_cap: str = ""
    """oneDNN's ISA cap as this process set it (ONEDNN_MAX_CPU_ISA, else DNNL_MAX_CPU_ISA); "" for none."""

    @property
    def native_bf16(self) -> bool:
        """bf16 units in hardware (AVX512_BF16 or AMX-BF16)."""
        return self.avx512_bf16 or self.amx_bf16

    @property
    def is_x86(self) -> bool:
        """An x86-64 CPU, where the flags above are the whole answer."""
        return x86_arch(self.arch)

    @property
    def isa(self) -> str:
        """The highest level that matters here: AMX, AVX512_BF16, AVX512, AVX2 or baseline."""
        if self.amx_bf16:
            return "AMX"
        if self.avx512_bf16:
            return "AVX512_BF16"
        if self.avx512:
            return "AVX512"
        return "AVX2" if self.avx2 else "baseline"


def cpu_model(info: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name, e.g. 'Intel(R) Xeon(R) Platinum 8488C', with its x86 family and model
    numbers: virtual machines often show a bare 'AMD EPYC', and family 25 model 17 (Zen 4) is
    what tells whether it has bf16 units. ARM's cpuinfo names no model in the processor blocks:
    a board's 'Model' line comes after them, else the implementer and part numbers say it."""
    if not info.exists():
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}  # the first value of each key: the first processor's, then the trailer's
    for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Model")
    if not name and "CPU implementer" in fields and "CPU part" in fields:
        name = f"{platform.machine()} CPU (implementer {fields['CPU implementer']}, part {fields['CPU part']})"
    name = name or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _query(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


@functools.cache
def bf16_native_on(device_type: str) -> bool:
    """Whether bf16 matmuls run natively where tensors live: a CUDA device of a bf16 run (which
    `decide_precision` gave bf16 for its capability), or a CPU with bf16 units and oneDNN on them.
    Evaluation tensors come back to the CPU, whose answer can differ from the GPU's (an A100 on an
    AVX2 host: bf16 there is emulated, 10x slower than fp32 for kNN)."""
    if device_type != "cpu":
        return True
    cpu = cpu_features()
    return cpu.native_bf16 and cpu.onednn_bf16


# oneDNN's ISA levels (its CPU dispatcher control), in its partial order; the AVX10 names are
# aliases of the AVX512_CORE_FP16/AMX ones. Those from AVX512_CORE_BF16 on have the bf16 dot-product
# instructions, those with AMX its tiles; ALL and DEFAULT leave the CPU's own level.
_ONEDNN_BELOW_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                "AVX512_CORE_VNNI"})
_ONEDNN_BF16 = frozenset({"ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                          "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                          "AVX10_2_512", "AVX10_2_512_AMX_2"})


def onednn_isa_cap(environ: Mapping[str, str] = os.environ) -> str:
    """oneDNN's ISA cap for this process ("" for none), as oneDNN reads it: ONEDNN_MAX_CPU_ISA,
    else DNNL_MAX_CPU_ISA, in any case; a value it does not know (a typo, stray spaces) it ignores,
    and so does this."""
    value = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return value if value in _ONEDNN_BELOW_BF16 | _ONEDNN_BF16 else ""


def cap_allows_bf16(cap: str) -> bool:
    """Whether oneDNN capped at `cap` still runs bf16 on bf16 units. torch's
    `_is_mkldnn_bf16_supported()` says True under any cap from AVX512_CORE up, where oneDNN
    emulates bf16 (2.4x slower than fp32 for the training step on the EPYC Zen 4 capped at
    AVX512_CORE, docs/benchmarks.md section 1)."""
    return cap not in _ONEDNN_BELOW_BF16


def cap_allows_amx(cap: str) -> bool:
    """Whether oneDNN capped at `cap` may use AMX tiles (its AMX levels, or no cap)."""
    return cap in ("", "ALL", "DEFAULT") or "AMX" in cap


def cap_allows_amx_fp16(cap: str) -> bool:
    """Whether oneDNN capped at `cap` may use AMX's fp16 tiles (the levels that name them, or no cap):
    torch's `_is_amx_fp16_supported()` reads the CPU, not the cap."""
    return cap in ("", "ALL", "DEFAULT", "AVX10_2_512_AMX_2") or "AMX_FP16" in cap


def cpu_features() -> CpuFeatures:
    """This process's CPU, through torch's own capability queries and oneDNN's ISA cap."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    cap = onednn_isa_cap()
    return CpuFeatures(model=cpu_model(), arch=platform.machine(), avx2=_query("_is_avx2_supported"),
                       avx512=_query("_is_avx512_supported"), avx512_bf16=_query("_is_avx512_bf16_supported"),
                       amx_bf16=_query("_is_amx_tile_supported"), onednn_bf16=onednn and cap_allows_bf16(cap),
                       onednn_isa_cap=cap)


@dataclass(frozen=True)
class Precision:
    """The resolved precision of one run or command, and why it was chosen."""

    name: str
    """bf16, fp16 or fp32."""
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype of encoder and head; None for fp32 (no autocast)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def loss_scaling(self) -> bool:
        """fp16 gradients underflow without it: dynamic loss scaling (torch.amp.GradScaler)."""
        return self.name == "fp16"

    @property
    def feature_dtype(self) -> torch.dtype:
        """How the probe stores frozen features: bf16 where bf16 is native (its L-BFGS passes are
        memory-bound, 147 -> 55 s on a 3136-d encoder, same accuracy), fp32 everywhere else. The
        probe runs on the CPU whatever device trained, and a CUDA bf16 run keeps bf16 there even on
        a host that emulates bf16: the probe's thin (N, D) x (D, K) products stay memory-bound, and
        under the EPYC Zen 4's AVX2 cap the probe took 11.4 s in bf16 against 20.9 s in fp32
        (docs/benchmarks.md section 1), unlike kNN's square products (`bf16_native_on`)."""
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self, device: torch.device) -> AbstractContextManager[object]:
        """Autocast to this precision on `device` (disabled for fp32)."""
        return torch.autocast(device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)


FP32 = Precision("fp32", "asked for")

MatmulTimer = Callable[[torch.dtype], float]
"""Seconds of one matmul of the run's shapes in a dtype (the tie-breaker where flags are not enough)."""


ROCM_BF16 = ("gfx908", "gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")
"""AMD GPUs with bf16 matrix instructions: CDNA 1-4 (MI100, MI200, MI300, MI350: MFMA) and RDNA
3-4 (WMMA). Vega (gfx900/906), RDNA 1-2 (gfx10) and earlier have none."""


def rocm_has_bf16(arch: str) -> bool:
    """Whether the AMD GPU `arch` ("gfx90a", or with its features: "gfx90a:sramecc+:xnack-") has bf16
    matrix units."""
    return arch.split(":")[0].startswith(ROCM_BF16)


def gfx_name(properties: Any) -> str:
    """The gfx name in a ROCm GPU's properties ("gfx90a:sramecc+:xnack-" -> "gfx90a"); "" without one."""
    return str(getattr(properties, "gcnArchName", "")).split(":")[0]


def rocm_arch(device: torch.device) -> str:
    """The gfx name of ROCm GPU `device` ("gfx90a"); "" on CUDA builds and other devices."""
    if device.type != "cuda" or torch.version.hip is None:
        return ""
    return gfx_name(torch.cuda.get_device_properties(device))


def gpu_kind(device: torch.device) -> tuple[tuple[int, int] | None, str]:
    """(CUDA compute capability, ROCm gfx name) of `device`: the capability only on CUDA builds (on
    ROCm it is the gfx number, not a CUDA generation), the gfx name only on ROCm."""
    if device.type != "cuda":
        return None, ""
    arch = rocm_arch(device)
    return (None, arch) if arch else (torch.cuda.get_device_capability(device), "")


def decide_precision(
    requested: str,
    device_type: str,
    cpu: CpuFeatures | None = None,
    cuda_capability: tuple[int, int] | None = None,
    timer: MatmulTimer | None = None,
    rocm_arch: str = "",
) -> Precision:
    """The precision for `requested` (auto, bf16, fp16, fp32) on a device with these capabilities.

    auto on CUDA: bf16 from compute capability 8.0 (Ampere) on, fp16 with loss scaling on 7.x
    (Volta, Turing), fp32 before (no tensor cores). On ROCm (`rocm_arch`, the gfx name: its
    "capability" is that number, gfx906 reading as 9.0): bf16 where the GPU has bf16 matrix
    units (`ROCM_BF16`), fp32 elsewhere.
    auto on CPU: bf16 with AMX that oneDNN uses, fp32 on x86 CPUs without bf16 units; otherwise
    (AVX512_BF16 without AMX, ARM, or flags and oneDNN disagreeing) the faster of the two in
    `timer`, bf16 only when at least 10% faster (bf16 untimed, for AVX512_BF16, without a timer). Explicit choices are kept (checked by `check_precision`)."""
    if requested not in PRECISIONS:
        raise FastclrError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)} (e.g. --precision auto)")
    if requested != "auto":
        return Precision(requested, "asked for")
    if device_type == "cuda" and rocm_arch:
        if rocm_has_bf16(rocm_arch):
            return Precision("bf16", f"AMD {rocm_arch} has bf16 matrix units")
        return Precision("fp32", f"AMD {rocm_arch} has no bf16 matrix units")
    if device_type == "cuda":
        major, minor = cuda_capability or (0, 0)
        if major >= 8:
            return Precision("bf16", f"CUDA compute capability {major}.{minor} has bf16 tensor cores")
        if major >= 7:
            return Precision("fp16", f"CUDA compute capability {major}.{minor} has fp16 but no bf16 tensor cores: "
                                     "fp16 with dynamic loss scaling")
        # Before Volta there are no tensor cores, and consumer Pascal (6.1) runs fp16 at 1/64 of fp32.
        return Precision("fp32", f"CUDA compute capability {major}.{minor} has no tensor cores")
    if device_type != "cpu" or cpu is None:
        return Precision("fp32", f"no mixed-precision rule for device {device_type}")
    if cpu.native_bf16 and cpu.onednn_bf16:
        if cpu.amx_bf16 and cap_allows_amx(cpu.onednn_isa_cap):
            return Precision("bf16", f"{cpu.model} has native bf16 (AMX-BF16)")
        if timer is None:  # `info --no-measure`: what the commands then do is said, not hidden
            return Precision("bf16", f"{cpu.model} has native bf16 (AVX512_BF16) without AMX; not measured: "
                                     "every command times bf16 against fp32 here and runs fp32 unless bf16 is at least "
                                     "10% faster")
        # AVX512_BF16's dot products without AMX: bf16 matmuls 2.4x fp32's rate on the EPYC Zen 4, but
        # 0.57x on the Xeon with AMX that oneDNN was told not to use, its step 1.3x fp32's
        # (docs/benchmarks.md section 1): timed.
        said = f"{cpu.model} has native bf16 (AVX512_BF16) without AMX"
    elif cpu.is_x86 and not cpu.native_bf16:
        return Precision("fp32", f"{cpu.model} ({cpu.isa}) has no bf16 units: bf16 would be emulated, far slower than fp32")
    else:
        uncertain = f"bf16 support uncertain (oneDNN capped at {cpu.onednn_isa_cap})" if cpu.onednn_isa_cap else \
            "bf16 support uncertain"
        if timer is None:
            return Precision("fp32", f"{cpu.model}: {uncertain} and not measured")
        said = f"{cpu.model}: {uncertain}"
    fp32_s, bf16_s = timer(torch.float32), timer(torch.bfloat16)
    return Precision("bf16" if bf16_s < 0.9 * fp32_s else "fp32",
                     f"{said}; measured matmul {fp32_s * 1e3:.1f} ms fp32, {bf16_s * 1e3:.1f} ms bf16")


def matmul_seconds(dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int] = (512, 1024, 256),
                   budget_s: float = 0.15, threads: int | None = None) -> float:
    """Best time of (m, k) @ (k, n) in `dtype` on `device` over up to `budget_s` seconds, on the
    CPU with `threads` threads (None: as set)."""
    if device.type == "cpu" and threads is not None and threads != torch.get_num_threads():
        return _matmul_on_threads(threads, dtype, device, shape, budget_s)
    m, k, n = shape
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=g).to(dtype)
    b = torch.randn(k, n, device=device, generator=g).to(dtype)
    best, start = float("inf"), time.perf_counter()
    for i in range(50):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:  # the first call pays for kernel selection and page faults
            best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and i > 1:
            break
    return best


@gives_threads_back
def _matmul_on_threads(threads: int, dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int],
                       budget_s: float) -> float:
    torch.set_num_threads(threads)
    return matmul_seconds(dtype, device, shape, budget_s)


def precision_timer(device: torch.device, shape: tuple[int, int, int] = (512, 1024, 256)
                    ) -> Callable[[torch.dtype], float]:
    """The matmul timing that precision decisions compare dtypes by: on the CPU on one thread, whose
    bf16 / fp32 ratio was the two-thread ratio of a quiet machine (2.68-2.75 against 2.64-2.73 on
    the 2-CPU EPYC Zen 4 capped at AVX512_CORE; 0.46-0.47 against 0.46-0.48 uncapped), while two
    threads sharing the CPU with another busy process gave 0.50-5.91 and once chose the bf16 that
    makes the step 2.4x slower there (docs/benchmarks.md section 1). Measured on 2 CPUs only."""
    return lambda dtype: matmul_seconds(dtype, device, shape, threads=1)


def agree_precision(choices: list[Precision]) -> Precision:
    """The precision every rank of a run computes in, from each rank's own choice (rank order): the
    one they all chose, else what all of them run natively: fp16 where some chose bf16 and others
    fp16 (GPUs of 7.x beside 8.0 and up), fp32 where any chose it. An A100's bf16 sent to a V100
    rank ran emulated there, and the whole run at its pace."""
    names = {c.name for c in choices}
    if len(names) == 1:
        return choices[0]
    common = "fp32" if "fp32" in names else "fp16"
    rank = next(i for i, c in enumerate(choices) if c.name == common)
    return Precision(common, f"the one every rank runs natively: rank {rank}'s {choices[rank].reason}")


def resolve_precision(requested: str, device: torch.device, shape: tuple[int, int, int] = (512, 1024, 256),
                      warn: Callable[[str], None] = print, saved: bool = False) -> Precision:
    """`decide_precision` with this machine's capabilities; warns (one line) when an explicit
    bf16 will be emulated, and refuses what cannot run. `saved`: `requested` is what a resumed
    run's config recorded (resolved where it started), not a flag given now."""
    cpu = cpu_features() if device.type == "cpu" else None
    cap, arch = gpu_kind(device)
    prec = decide_precision(requested, device.type, cpu, cap, precision_timer(device, shape), rocm_arch=arch)
    if saved and requested != "auto":
        prec = Precision(prec.name, "the precision this run was started with (its config.toml), kept so that it "
                                    "continues as it ran; --precision auto re-decides for this machine")
    if requested != "auto":  # auto's own choice is the fast one by construction (ARM's bf16 is timed faster)
        check_precision(prec, device, cpu, warn, shape, cap, saved=saved, rocm_arch=arch)
    return prec


def check_precision(prec: Precision, device: torch.device, cpu: CpuFeatures | None, warn: Callable[[str], None],
                    shape: tuple[int, int, int] = (512, 1024, 256),
                    cuda_capability: tuple[int, int] | None = None, saved: bool = False, rocm_arch: str = "") -> None:
    """A one-line warning for an explicit bf16 or fp16 the hardware emulates (on a CPU with the
    measured cost); for a resumed run's `saved` precision, worded as such. Silent where the
    matmul is less than 10% slower than fp32 (but for fp16 on an x86 CPU without AMX-FP16, whose
    convolutions are emulated however fast its matmul), the margin `decide_precision` asks of bf16: ARM's
    bf16 instructions have no x86 flag, and emulation costs far more (the step 2.4x under an
    AVX512_CORE cap, the matmul about 70x under an AVX2 cap, docs/benchmarks.md section 1)."""
    asked = f"this run's saved precision {prec.name}" if saved else f"--precision {prec.name}"
    switch = "resume with --precision auto to use" if saved else "--precision auto would choose"
    if device.type == "cuda" and rocm_arch and prec.name == "bf16" and not rocm_has_bf16(rocm_arch):
        warn(f"warning: {asked} on AMD {rocm_arch}: no bf16 matrix units, so bf16 runs emulated or slow; {switch} fp32")
        return
    if device.type == "cuda" and cuda_capability is not None and prec.name != "fp32":
        major, minor = cuda_capability
        if (prec.name == "bf16" and major < 8) or (prec.name == "fp16" and major < 7):
            warn(f"warning: {asked} on CUDA compute capability {major}.{minor}: no {prec.name} "
                 f"tensor cores, so {prec.name} runs emulated or slow; {switch} "
                 f"{decide_precision('auto', 'cuda', cuda_capability=cuda_capability).name}")
        return
    if device.type != "cpu" or cpu is None or prec.name == "fp32":
        return
    if prec.name == "bf16" and cpu.native_bf16 and cpu.onednn_bf16:
        if cpu.amx_bf16 and cap_allows_amx(cpu.onednn_isa_cap):
            return
        # AVX512_BF16 alone: native, yet slower than fp32 on some CPUs (`decide_precision` times it too)
        timed = precision_timer(device, shape)
        slower = timed(torch.bfloat16) / timed(torch.float32)
        if slower >= 1.1:
            warn(f"warning: {asked} on {cpu.model} (AVX512_BF16 without AMX): bf16 is slower than fp32 here, a matmul "
                 f"measured {slower:.1f}x the fp32 time; {switch} fp32")
        return
    has_units = cpu.native_bf16 if prec.name == "bf16" else _query("_is_amx_fp16_supported")
    if prec.name == "fp16" and has_units and cap_allows_amx_fp16(cpu.onednn_isa_cap):
        return
    timer = functools.cache(precision_timer(device, shape))  # auto's choice below times the same matmuls
    slow = timer(prec.dtype or torch.float32) / timer(torch.float32)
    # fp16 without AMX-FP16 warns whatever its matmul: AVX512_FP16 makes the matmul as fast as fp32,
    # but oneDNN has no fp16 convolution there, and the default step measured 194x its fp32 time on
    # a Xeon with AVX512_FP16 (docs/benchmarks.md section 1).
    if slow < 1.1 and (prec.name == "bf16" or not cpu.is_x86):  # not emulated after all (ARM's units, which no x86 flag names)
        return
    units = "bf16" if prec.name == "bf16" else "fp16"
    why = f"oneDNN capped at {cpu.onednn_isa_cap}" if has_units and cpu.onednn_isa_cap else f"no {units} units"
    auto = decide_precision("auto", "cpu", cpu, None, timer).name  # bf16 where fp16 alone is emulated
    measured = (f"a matmul measured {slow:.1f}x the fp32 time" if slow >= 1.1 else
                f"its convolutions run emulated (a matmul measured {slow:.1f}x the fp32 time, but a training step about "
                "200x on a CPU with AVX512_FP16 and no AMX-FP16)")
    warn(f"warning: {asked} on {cpu.model} ({cpu.isa}, {why}): {prec.name} is emulated here, {measured}; {switch} {auto}")


def missing_compiler(device_type: str) -> str:
    """Why torch.compile cannot build code for `device_type` on this host, or "". Triton builds its
    launcher with a C compiler (CC, else gcc, else clang: "Failed to find C compiler" at the first
    compiled step) and Python's headers; the CPU backend builds its kernels with CXX, else g++ (torch
    2.13 looks for no other on Linux; clang++ on macOS, cl on Windows). CUDA runtime and slim
    Python images have neither compiler, and a system Python without its -dev package no headers."""
    if device_type == "cuda":
        named, found, install = "CC", [os.environ.get("CC", ""), "gcc", "clang"], "install gcc"
        what = "the C compiler Triton builds its launcher with"
    else:
        default = {"win32": "cl", "darwin": "clang++"}.get(sys.platform, "g++")
        named, found, install = "CXX", [os.environ.get("CXX", ""), default], f"install {default}"
        what = "the C++ compiler torch.compile's CPU backend builds its kernels with"
    if os.environ.get(named):  # the one named is the one used
        found = found[:1]
    if not any(c and shutil.which(c) for c in found):
        return f"{what} is missing ({', '.join(c for c in found if c)}: none found); {install}"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if device_type == "cuda" and not headers.is_file():
        return f"Python's headers, which Triton builds its launcher with, are missing ({headers}); install python3-dev"
    return ""


def compile_blocker(device: torch.device) -> str:
    """Why torch.compile cannot run on `device`, or "" when it can. CUDA: Triton needs compute
    capability 7.0 (torch raises GPUTooOldForTriton below it), its package, which Windows wheels
    lack, and a C compiler; the CPU: a C++ compiler (`missing_compiler`)."""
    if device.type != "cuda":
        return missing_compiler("cpu")
    if not torch.cuda.is_available():  # no GPU to ask: select_device refuses the run
        return ""
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7 and torch.version.hip is None:  # ROCm's capability is its gfx number, not CUDA's
        return f"CUDA compute capability {major}.{minor} is below the 7.0 Triton needs"
    try:
        from torch.utils._triton import has_triton_package
    except ImportError:  # a torch without the helper: let compile itself say
        return missing_compiler("cuda")
    if not has_triton_package():
        return "Triton is not installed (torch.compile's GPU backend; Windows has none)"
    return missing_compiler("cuda")


def use_compile(setting: str | bool, device: torch.device) -> bool:
    """Resolve `train.compile`: auto -> on for CUDA where Triton runs (`compile_blocker`), off
    elsewhere; an explicit on where Triton cannot run is refused in one line.

    Measured (docs/benchmarks.md): on an H100, compiling model, loss and the augmentation's pixel
    work took the ResNet-18 step from 51k to 71k images/s; on a 2-core CPU the compiled step
    was 1.36x slower than eager."""
    on = parse_switch(setting, "compile")
    blocker = compile_blocker(device)
    if on and blocker:
        raise FastclrError(f"--compile on for {device}: {blocker}; use --compile auto (eager there)")
    return device.type == "cuda" and not blocker if on is None else on


def available_memory(meminfo: Path = MEMINFO) -> int | None:
    """Bytes that can be allocated without swapping or being killed: what the operating system
    counts as available (`host_memory.os_available`), and no more than a cgroup memory limit
    leaves (a container's: MemAvailable there is the host's); None where neither is known."""
    known = [room for room in (os_available(meminfo), smallest_limit(MEMORY)) if room is not None]
    return int(min(known)) if known else None


def require_memory(needed: int, what: str, fix: str) -> None:
    """A one-line error before a large allocation that would not fit in available memory (the
    kernel would kill the process instead, losing whatever was not yet written)."""
    free = available_memory()
    if free is not None and needed > 0.9 * free:
        raise FastclrError(f"{what} needs about {needed / 2**30:.1f} GiB but {free / 2**30:.1f} GiB are available; {fix}")


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The network `build` makes, on the meta device: shapes without memory, and without a draw
    from the random generators (the run's own draws start from its seed, later)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build()


def require_model_memory(module: torch.nn.Module, device: torch.device, what: str, fix: str,
                         optimiser_copies: int = 0, held: int = 0) -> None:
    """A one-line error before a network is built whose weights and (on a CPU) their gradients and
    the optimiser's `optimiser_copies` tensors of their size (AdamW's two moments: a lower bound of
    what training it asks, no activations) would not fit in the host's available memory. `module`
    is that network `on_meta`: `--student-width 100` for 1.0 grew the process until the kernel
    killed it (and other processes with it), never failing an allocation the error could have named.
    `held`: bytes already in memory that the run takes over (a resumed checkpoint's)."""
    params = sum(p.numel() for p in module.parameters())
    # On a GPU the gradients are there, but the weights are drawn on the host first (seeded as on a CPU).
    copies = 2 + optimiser_copies if device.type == "cpu" else 1
    require_memory(copies * params * 4 - held, f"{what} ({params / 1e6:,.0f} million weights)", fix)


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with its 4-D parameters in channels_last memory format (in place, returned)."""
    # Module.to takes memory_format at run time; torch's typed overloads leave it out.
    return module.to(memory_format=torch.channels_last)  # type: ignore[call-overload, no-any-return]
