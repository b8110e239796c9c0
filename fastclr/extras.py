"""The command that installs an optional feature's packages (an extra of pyproject.toml).

`pip install 'fastclr[mlflow]'` fails wherever fastclr was not installed from a package index (it is
not on PyPI): a clone's `make` set-up, a copy installed from its folder. So the hint names the
packages themselves, as this fastclr declares them, for the Python that runs it.
"""

from __future__ import annotations

import importlib.metadata
import shlex
import sys
from pathlib import Path


def extra_requirements(extra: str) -> list[str]:
    """The requirements fastclr's metadata lists for `extra` ([] where it has no metadata here)."""
    try:
        declared = importlib.metadata.requires("fastclr") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    marker = f'extra == "{extra}"'
    return [r.split(";")[0].strip() for r in declared if ";" in r and r.split(";", 1)[1].strip() == marker]


def install_command(extra: str) -> str:
    """`PYTHON -m pip install 'REQ' ...` for `extra`'s packages, PYTHON the interpreter running this."""
    python = shlex.quote(sys.executable or "python3")
    needed = extra_requirements(extra)
    if not needed:  # fastclr run from a source folder never installed: its own extra, from that folder, pasteable
        folder = shlex.quote(str(Path(__file__).resolve().parents[1]))
        return f"cd {folder} && {python} -m pip install -e '.[{extra}]'"
    return f"{python} -m pip install " + " ".join(shlex.quote(r) for r in needed)
