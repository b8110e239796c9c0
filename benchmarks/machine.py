"""What every benchmark prints with its numbers: the command and the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any


def describe() -> str:
    """e.g. 'AMD EPYC (family 25, model 17) [AVX512_BF16; oneDNN bf16 on] x 2 CPUs, Linux, Python
    3.11.7, torch 2.13.0+cpu, no GPU': the CPU with its ISA level, which decides whether bf16 is
    native, and whether oneDNN's ISA was capped (ONEDNN_MAX_CPU_ISA) for an emulated machine class."""
    import torch

    from fastclr.runtime import cpu_features, usable_cpus

    c = cpu_features()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    isa = f"{c.isa}; oneDNN bf16 {'on' if c.onednn_bf16 else 'off'}" + (f"; ISA capped to {cap}" if cap else "")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{c.model} [{isa}] x {usable_cpus()} CPUs, {platform.system()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {gpu}")


def report(benchmark: str, fields: dict[str, Any]) -> None:
    """Print one JSON line: the benchmark's name, the exact command, the machine, then `fields`."""
    print(json.dumps({"benchmark": benchmark, "command": " ".join([sys.executable, *sys.argv]), "machine": describe(),
                      **fields}))
