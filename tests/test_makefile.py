"""The Makefile's set-up: done again, from an emptied .venv, when what it installs from changes."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO


def _dry(*assignments: str) -> str:
    return subprocess.run(["make", "-n", "-s", "setup", *assignments], cwd=REPO, capture_output=True, text=True,
                          check=True, timeout=60).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_another_torch_index_sets_up_an_emptied_venv_with_torch_from_it() -> None:
    """TORCH_INDEX was left out of the set-up's key: a CPU set-up asked for CUDA's index said "Nothing
    to be done" (and pip, given it, keeps 2.13.0+cpu as torch==2.13.0); a new Python was run over the
    old one's .venv, whose `python` still linked the old interpreter."""
    if _dry().strip():
        pytest.skip(".venv is not set up for this Makefile (run through make test)")
    index = "https://example.invalid/whl/cu126"
    again = _dry(f"TORCH_INDEX={index}")
    assert "-m venv --clear .venv" in again and f"torch==2.13.0 --index-url {index}" in again, again
    assert f"echo '{index}' > .venv/.torch-index" in again  # kept: a later plain `make test` keeps that build
