"""fastclr as a package: `python -m build` makes a wheel and an sdist, and the wheel, installed into
a fresh virtual environment, imports and runs without the source tree.

The fresh environment reuses this environment's torch, numpy, safetensors and Pillow through a
path file (they are the pinned dependencies, and installing torch again would take minutes), but
not fastclr: the path file adds a directory to sys.path, and the editable install's own path
file in that directory is not read, so `import fastclr` can only find the wheel's copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

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


# mypy's --strict, as per-module settings, so that torch and fastclr keep the project's settings and are
# read from the cache `make test`'s mypy step has just filled (--strict itself changed every module's
# settings: 39 s, against 1 s). Its global-only checks (warn_unused_configs, warn_redundant_casts)
# are left out: set globally they change every module's settings too.
STRICT = {name: True for name in ("disallow_any_generics", "disallow_subclassing_any", "disallow_untyped_calls",
                                  "disallow_untyped_defs", "disallow_incomplete_defs", "check_untyped_defs",
                                  "disallow_untyped_decorators", "warn_unused_ignores", "warn_return_any",
                                  "strict_equality", "extra_checks")} | {"implicit_reexport": False}


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def test_the_readmes_python_example_type_checks_under_mypy_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's checker on the README's own example: `f.feature_dim` of a built encoder was
    `Tensor | Module` (build_encoder returned nn.Module), and `nt_xent(*z.chunk(2), temperature=...)`
    gave temperature twice. The example's lines that need a module of the user's are left out.
    A misspelt name imported from fastclr is an error: a module-level __getattr__ seen by the checker
    made every name of fastclr `Any`, and such an import passed."""
    import tomllib

    from mypy import api

    block = (REPO / "README.md").read_text(encoding="utf-8").split("## Python API", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.py").write_text("\n".join(line for line in code.splitlines() if "my_module" not in line) + "\n",
                                         encoding="utf-8")
    (tmp_path / "misspelt.py").write_text("import fastclr\nfrom fastclr import nt_xnet\n\nfastclr.linear_prob\n",
                                          encoding="utf-8")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    overrides = [*project.pop("overrides", []), {"module": ["example", "misspelt"], **STRICT}]
    project.pop("files")
    lines = ["[tool.mypy]", *(f"{k} = {_toml(v)}" for k, v in project.items())]
    for o in overrides:
        lines += ["[[tool.mypy.overrides]]", *(f"{k} = {_toml(v)}" for k, v in o.items())]
    (tmp_path / "mypy.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.chdir(REPO)  # fastclr found as the project's own mypy step finds it
    out, err, status = api.run(["--config-file", str(tmp_path / "mypy.toml"), "--cache-dir", str(REPO / ".mypy_cache"),
                                str(tmp_path / "example.py"), str(tmp_path / "misspelt.py")])
    errors = [line for line in out.splitlines() if ": error: " in line]
    assert status == 1 and [(Path(e.split(":")[0]).name, e.split(":")[1]) for e in errors] == [
        ("misspelt.py", "2"), ("misspelt.py", "4")], out + err
    assert 'has no attribute "nt_xnet"' in errors[0] and 'has no attribute "linear_prob"' in errors[1], out
