"""fastclr as a package: `python -m build` makes a wheel and an sdist, and the wheel, installed into
a fresh virtual environment, imports and runs without the source tree.

The fresh environment reuses this environment's torch, numpy, safetensors and Pillow through a
path file (they are the pinned dependencies, and installing torch again would take minutes), but
not fastclr: the path file adds a directory to sys.path, and the editable install's own path
file in that directory is not read, so `import fastclr` can only find the wheel's copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_TOP_LEVEL_OUTPUTS = {".venv", ".git", "runs", "stores", "data", "build", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def _not_source(folder: str, names: list[str]) -> set[str]:
    """What the copy leaves out: outputs at the top of the tree, caches and egg-info anywhere."""
    top = Path(folder) == REPO
    return {n for n in names if (top and n in _TOP_LEVEL_OUTPUTS) or n == "__pycache__" or n.endswith(".egg-info")}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (cmd, r.stdout[-1500:], r.stderr[-1500:])
    return r


def test_the_wheel_installs_into_a_fresh_environment_and_runs_without_the_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_not_source)  # the build writes egg-info beside the sources
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], tmp_path)
    wheel = next(dist.glob("fastclr-*.whl"))
    import tarfile

    with tarfile.open(next(dist.glob("fastclr-*.tar.gz"))) as sdist:  # its tests import benchmarks/, read recipes/
        inside = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"benchmarks/harness.py", "recipes/large-batch.toml", "tests/conftest.py", "Makefile"} <= inside, inside
    assert not [n for n in inside if n.startswith("benchmarks/runs/") or "__pycache__" in n]
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastclr/py.typed" in names and "fastclr/cli.py" in names
    assert "fastclr/report/interactive.js" in names  # read at run time by `fastclr report`
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    from fastclr.version import __version__

    # The licence its metadata names travels with it (MIT asks for its text), and the version is
    # fastclr/version.py's, the one checkpoints and exports record (pyproject.toml reads it there).
    assert f"fastclr-{__version__}.dist-info/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"fastclr-{__version__}.dist-info/METADATA").decode()
    assert f"\nVersion: {__version__}\n" in metadata and "\nRequires-Python: >=3.11\n" in metadata

    env = tmp_path / "env"
    _run([sys.executable, "-m", "venv", str(env)], tmp_path)
    site = Path(_run([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path).stdout.strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
         tmp_path)
    where = _run([str(env / "bin" / "python"), "-c", "import fastclr; print(fastclr.__file__)"], tmp_path).stdout
    assert Path(where.strip()).is_relative_to(site)  # the wheel's copy, not the source tree
    helped = _run([str(env / "bin" / "fastclr"), "--help"], tmp_path).stdout
    assert all(cmd in helped for cmd in ("pretrain", "evaluate", "export", "info"))
    assert _run([str(env / "bin" / "fastclr"), "--version"], tmp_path).stdout == f"fastclr {__version__}\n"


def test_the_readmes_python_example_type_checks_under_mypy_strict(tmp_path: Path) -> None:
    """A user's checker on the README's own example: `f.feature_dim` of a built encoder was
    `Tensor | Module` (build_encoder returned nn.Module), and `nt_xent(*z.chunk(2), temperature=...)`
    gave temperature twice. The example's lines that need a module of the user's are left out."""
    from mypy import api

    block = (REPO / "README.md").read_text(encoding="utf-8").split("## Python API", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    example = tmp_path / "example.py"
    example.write_text("\n".join(line for line in code.splitlines() if "my_module" not in line) + "\n", encoding="utf-8")
    # The repository's cache, which `make test`'s mypy step has just filled: 8 s instead of 55 s (torch's types).
    # Errors are reported for the example only, as for a user's code beside an installed fastclr (site-packages are
    # silent): fastclr's own modules are checked by `make test`'s mypy step under the project's settings, and
    # reported here they depended on what the cache held.
    out, err, status = api.run(["--strict", "--ignore-missing-imports", "--follow-imports", "silent",
                                "--cache-dir", str(REPO / ".mypy_cache"), str(example)])
    assert status == 0, out + err
