"""Memory the operating system can still give this process without swapping, on each platform:
the number the checks before large allocations compare with (`runtime.available_memory`)."""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from pathlib import Path

MEMINFO = Path("/proc/meminfo")


def os_available(meminfo: Path = MEMINFO) -> int | None:
    """Bytes available to new allocations as the operating system counts them: Linux's MemAvailable,
    macOS's free, speculative and inactive pages (as `psutil` and Activity Monitor count them),
    Windows' available physical memory; None where it cannot be read."""
    if sys.platform == "darwin":
        return _darwin_available()
    if sys.platform == "win32":
        return _windows_available()
    return _meminfo_available(meminfo)


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _darwin_available() -> int | None:
    try:
        text = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_vm_stat(text)


def parse_vm_stat(text: str) -> int | None:
    """The available bytes in macOS `vm_stat` output: free, speculative (free pages the kernel has
    read ahead into, which `vm_stat` leaves out of "Pages free") and inactive pages, as psutil's
    `virtual_memory().available` counts them (inactive + the kernel's free count)."""
    size = re.search(r"page size of (\d+) bytes", text)
    pages = dict(re.findall(r'^"?(Pages [a-z ]+)"?:\s+(\d+)\.', text, flags=re.MULTILINE))
    wanted = ("Pages free", "Pages speculative", "Pages inactive")
    if size is None or any(name not in pages for name in wanted):
        return None
    return int(size.group(1)) * sum(int(pages[name]) for name in wanted)


class MemoryStatus(ctypes.Structure):
    """Windows' MEMORYSTATUSEX (sysinfoapi.h), 64 bytes."""

    _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),
                ("ullTotalPhys", ctypes.c_uint64), ("ullAvailPhys", ctypes.c_uint64),
                ("ullTotalPageFile", ctypes.c_uint64), ("ullAvailPageFile", ctypes.c_uint64),
                ("ullTotalVirtual", ctypes.c_uint64), ("ullAvailVirtual", ctypes.c_uint64),
                ("ullAvailExtendedVirtual", ctypes.c_uint64)]


def _windows_available() -> int | None:
    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    try:
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]  # only on Windows
        if not kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return None
    except (AttributeError, OSError):
        return None
    return int(status.ullAvailPhys)
