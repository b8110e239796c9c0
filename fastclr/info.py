"""`fastclr info`: what this machine is and what fastclr would do on it, for a bug report.

Versions (fastclr, torch and its build, Python, OS), the CPU (model, cores, threads in use, ISA
level), every GPU (compute capability, memory), the precision and compile choices with their
reasons, fp32 and bf16 matmul rates measured in about two seconds, and where each built-in
dataset was found. `--json` prints the same as one JSON object.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from fastclr.data.datasets import REGISTRY, download_root, locate, search_roots
from fastclr.errors import FastclrError
from fastclr.cpus import cgroup_cpu_limit, default_threads, gives_threads_back, set_threads, usable_cpus
from fastclr.models import CPU_WIDTH_WHY, resolve_width
from fastclr.runtime import (CpuFeatures, available_memory, compile_blocker, cpu_features, decide_precision, gpu_kind,
                             matmul_seconds, gfx_name, missing_kernels, precision_timer, select_device, use_compile,
                             x86_arch)
from fastclr.version import __version__


def matmul_rate(dtype: torch.dtype, device: torch.device, budget_s: float = 0.5) -> float:
    """GFLOP/s of a square matmul in `dtype`, its side grown (256 to 2048, 8192 on a GPU) until one
    takes ~20 ms, so an emulated dtype (a few GFLOP/s) costs as little time as a native one. On a
    GPU a side of 2048 takes tens of microseconds, which the launch and the waits around it rival."""
    n, largest = 256, 8192 if device.type == "cuda" else 2048
    while n < largest and matmul_seconds(dtype, device, (n, n, n), budget_s=0.0) < 0.02:
        n *= 2
    return 2 * n**3 / matmul_seconds(dtype, device, (n, n, n), budget_s) / 1e9


def gpus() -> list[dict[str, Any]]:
    """Name, kind and memory of every visible GPU: its CUDA compute capability, or on ROCm its gfx
    name (where torch's capability is the gfx number, 9.4 for an MI300X's gfx942, not a CUDA one)."""
    out = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        arch = gfx_name(p) if torch.version.hip is not None else ""
        out.append({"index": i, "name": p.name, "compute_capability": None if arch else f"{p.major}.{p.minor}",
                    **({"gfx": arch} if arch else {}), "memory_gib": round(p.total_memory / 2**30, 1)})
    return out


def gpu_line(g: dict[str, Any]) -> str:
    """One GPU of `gpus()` as `info` prints it."""
    kind = f"AMD {g['gfx']}" if g.get("gfx") else f"compute capability {g['compute_capability']}"
    return f"gpu {g['index']}       {g['name']}, {kind}, {g['memory_gib']} GiB"


def compile_reason(device: torch.device) -> str:
    """Why `--compile auto` is on or off on `device`, for the report (which says on or off before it)."""
    if device.type != "cuda":
        return "eager on CPUs, where the compiled step measured 1.36x slower"
    blocker = compile_blocker(device)
    return blocker or "fused augmentation and model kernels on CUDA"


def width_reason(device: torch.device) -> str:
    """Why `--width auto` gives a ResNet the width it does on `device`, for the report."""
    if device.type == "cpu":
        return f"a quarter on a CPU ({CPU_WIDTH_WHY})"
    return "the full network on a GPU"


def _chosen_by_timing(device_type: str, cpu: CpuFeatures | None, cap: tuple[int, int] | None, arch: str) -> bool:
    """Whether `auto` here chooses between bf16 and fp32 by timing them (AVX512_BF16 without AMX,
    support uncertain): it then chooses differently as bf16 is timed faster or slower."""
    def timer(bf16_s: float) -> Callable[[torch.dtype], float]:
        return lambda dtype: bf16_s if dtype == torch.bfloat16 else 1.0

    picks = {decide_precision("auto", device_type, cpu, cap, timer(bf16_s), rocm_arch=arch).name for bf16_s in (0.5, 2.0)}
    return len(picks) > 1


def machine_report(measure: bool = True) -> dict[str, Any]:
    """Everything `fastclr info` prints, as plain data."""
    cpu = cpu_features()
    device = select_device("auto")
    cap, arch = gpu_kind(device)
    timer = precision_timer(device) if measure else None
    precision = decide_precision("auto", device.type, cpu, cap, timer, rocm_arch=arch)
    # Unmeasured where the commands time bf16 against fp32: neither name is what they will run
    choice = "timed" if timer is None and _chosen_by_timing(device.type, cpu, cap, arch) else precision.name
    roots = search_roots()
    rates: dict[str, float] = {}
    if measure:
        t0 = time.perf_counter()
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rates[f"{device.type}_{name}_gflops"] = round(matmul_rate(dtype, device), 1)
        rates["seconds"] = round(time.perf_counter() - t0, 2)
    quota = cgroup_cpu_limit()
    usable = usable_cpus(quota)
    free = available_memory()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else ("ROCm " + str(torch.version.hip)
                                                                      if torch.version.hip else "CPU")
    return {
        "fastclr": __version__,
        "torch": torch.__version__,
        "torch_build": build,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": {**asdict(cpu), "isa": cpu.isa, "native_bf16": cpu.native_bf16, "cores_usable": usable,
                "cgroup_cpu_quota": quota,
                "torch_threads": default_threads(usable),  # what fastclr's commands run with unless --threads
                "torch_capability": torch.backends.cpu.get_cpu_capability()},
        # MemAvailable, or less where a cgroup memory limit (a container's) leaves less
        "memory_available_gib": None if free is None else round(free / 2**30, 1),
        "gpus": gpus(),
        "device": str(device),
        "device_note": missing_kernels(),  # why auto is on the CPU although a GPU is there ("" otherwise)
        "precision": {"choice": choice, "reason": precision.reason},
        "compile": {"choice": use_compile("auto", device), "reason": compile_reason(device)},
        "resnet_width": {"choice": resolve_width(0.0, "resnet18", device.type), "reason": width_reason(device)},
        "matmul": rates,
        "datasets": {name: _found(name) for name in REGISTRY},
        "data_roots": [str(r) for r in roots],
        "data_roots_absent": [str(r) for r in roots if not r.is_dir()],
        "data_download_to": _download_to(),
    }


def _kernels(c: dict[str, Any]) -> str:
    """oneDNN's bf16 query, qualified where it says yes without the units: it answers yes on any
    AVX-512 CPU, where oneDNN then emulates bf16."""
    if not c["onednn_bf16"]:
        return "no"
    return "yes" if c["native_bf16"] or not x86_arch(str(c["arch"])) else "yes, emulated (no bf16 units)"


def format_report(r: dict[str, Any]) -> str:
    """The report as aligned text lines."""
    c = r["cpu"]
    quota = f" (cgroup CPU quota {c['cgroup_cpu_quota']:g})" if c.get("cgroup_cpu_quota") else ""
    flags = ", ".join(k for k in ("avx2", "avx512", "avx512_bf16", "amx_bf16") if c[k]) or "none of AVX2/AVX-512"
    lines = [
        f"fastclr     {r['fastclr']}",
        f"torch       {r['torch']} ({r['torch_build']} build)",
        f"python      {r['python']} on {r['os']}",
        f"cpu         {c['model']} ({c['arch']}), {c['cores_usable']} usable cores{quota}, {c['torch_threads']} torch threads",
        f"memory      {'unknown' if r['memory_available_gib'] is None else str(r['memory_available_gib']) + ' GiB'} available",
        f"isa         {c['isa']} (flags: {flags}; oneDNN bf16 kernels: {_kernels(c)}"
        f"{'; oneDNN capped at ' + c['onednn_isa_cap'] if c.get('onednn_isa_cap') else ''})",
    ]
    lines += [gpu_line(g) for g in r["gpus"]] or ["gpu         none visible"]
    lines += [
        f"device      {r['device']}",
        f"precision   {r['precision']['choice']}: {r['precision']['reason']}",
        f"compile     {'on' if r['compile']['choice'] else 'off'}: {r['compile']['reason']}",
        f"width       {r['resnet_width']['choice']:g} for ResNets: {r['resnet_width']['reason']}",
    ]
    m = r["matmul"]
    if m:
        rates = ", ".join(f"{k.split('_')[1]} {v:g} GFLOP/s" for k, v in m.items() if k.endswith("gflops"))
        lines.append(f"matmul      {rates} (measured in {m['seconds']:g} s)")
    into = f" puts it in {r['data_download_to']}" if r["data_download_to"] else ""
    for name, where in r["datasets"].items():
        lines.append(f"data        {name}: {where or f'not found (fastclr download {name}{into})'}")
    absent = set(r["data_roots_absent"])
    lines.append("data roots  " + ", ".join(_root_text(d) if d in absent else d for d in r["data_roots"]))
    return "\n".join(lines)


def _root_text(root: str) -> str:
    return f"{root} ({'a file, not a folder' if Path(root).exists() else 'absent'})"


def _download_to() -> str:
    """The folder `fastclr download` puts a dataset in ("" where there is none: no home and no
    $FASTCLR_DATA, or a $FASTCLR_DATA that is a file, which the data roots' line names)."""
    try:
        root = download_root()
    except FastclrError:
        return ""
    return "" if root.exists() and not root.is_dir() else str(root)


def _found(name: str) -> str:
    """Where built-in `name` is found whole ("" where nowhere; a folder holding part of it, the
    download's to complete, is not found, and neither is anything under a $FASTCLR_DATA that is a file)."""
    try:
        return str(locate(name, partial_ok=True, note=False) or "")
    except FastclrError:
        return ""


@gives_threads_back
def main(as_json: bool, measure: bool = True) -> int:
    """Print the report; exit code 0. The rates are measured at the threads the other commands use
    (one per usable CPU: a cgroup's quota respected), not at PyTorch's own count."""
    set_threads(0)
    r = machine_report(measure)
    sys.stdout.write((json.dumps(r, indent=2) if as_json else format_report(r)) + "\n")
    return 0
