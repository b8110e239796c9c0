"""What every benchmark prints with its numbers: the command and the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def describe() -> str:
    """e.g. 'Intel(R) Xeon(R) ... x 2 CPUs, Linux, Python 3.11.7, torch 2.13.0+cpu, no GPU'."""
    import torch

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu} x {n} CPUs, {platform.system()}, Python {platform.python_version()}, torch {torch.__version__}, {gpu}"


def report(benchmark: str, fields: dict[str, Any]) -> None:
    """Print one JSON line: the benchmark's name, the exact command, the machine, then `fields`."""
    print(json.dumps({"benchmark": benchmark, "command": " ".join([sys.executable, *sys.argv]), "machine": describe(),
                      **fields}))
