"""Every setting of the config against its declared range: generated from the config itself, each
bad value from a flag and from a TOML file must end in one line naming the key, exit code 2, and
no run directory; every boundary value must be accepted."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from fastclr.cli import main
from fastclr.config import SECTIONS, Allowed, Config, apply_overrides, flag_table

FLAGS = {key: flag for flag, key in ((f, f"{s}.{n}") for f, (s, n) in flag_table().items())}


def declared() -> list[tuple[str, type, Allowed | None]]:
    """(section.field, type, allowed) of every setting."""
    out = []
    for section in SECTIONS:
        for f in fields(getattr(Config(), section)):
            out.append((f"{section}.{f.name}", type(getattr(getattr(Config(), section), f.name)), f.metadata.get("allowed")))
    return out


def bad_values(kind: type, allowed: Allowed | None) -> list[Any]:
    """Values the setting must refuse: outside its range, not finite, of another type."""
    out: list[Any] = []
    if kind is bool:
        return ["maybe"]
    if kind in (int, float):
        out.append("abc")
        if kind is float:
            out += [math.nan, math.inf, -math.inf]
        if allowed is not None and allowed.low is not None:
            out.append(allowed.low if allowed.above else allowed.low - 1)
        if allowed is not None and allowed.high is not None:
            out.append(allowed.high if allowed.below else allowed.high + 1)
    if kind is str and allowed is not None and allowed.choices:
        out.append("nonsense")
    return out


def boundary_values(kind: type, allowed: Allowed | None) -> list[Any]:
    """Values at the edges of the range that the setting must accept."""
    if allowed is None or allowed.choices or kind not in (int, float):
        return list(allowed.choices) if allowed is not None else []
    out = []
    if allowed.low is not None:
        out.append(allowed.low + (1 if kind is int else 1e-6) if allowed.above else allowed.low)
    if allowed.high is not None:
        out.append(allowed.high - 1e-6 if allowed.below else allowed.high)
    return [kind(v) for v in out]


CASES = [(key, v) for key, kind, allowed in declared() for v in bad_values(kind, allowed)]


def toml_literal(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return repr(value) if not isinstance(value, str) else f'"{value}"'


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_a_bad_setting_is_one_line_exit_2_and_writes_nothing(key: str, value: Any, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    section, name = key.split(".")
    toml = tmp_path / "bad.toml"
    toml.write_text(f"[{section}]\n{name} = {toml_literal(value)}\n")
    for how in ([f"--{FLAGS[key]}={value}"], ["--config", str(toml)]):
        assert main(["pretrain", "--run-dir", str(run), "--quiet", *how]) == 2, how
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], (how, err)
        assert not run.exists()


def test_every_numeric_and_choice_setting_declares_what_it_accepts() -> None:
    free = {"data.name", "data.root", "data.preset", "model.cnn_stages", "model.init", "model.init_sha256",
            "train.device", "train.run_dir"}
    for key, kind, allowed in declared():
        if kind is not bool and key not in free:
            assert allowed is not None, f"{key} declares no range or choices"


@pytest.mark.parametrize("key, kind, allowed", [d for d in declared() if d[2] is not None], ids=lambda v: str(v))
def test_boundary_values_are_accepted(key: str, kind: type, allowed: Allowed) -> None:
    for value in boundary_values(kind, allowed):
        extra = {}
        if key in ("augment.scale_min", "augment.local_scale_min"):
            extra = {key.replace("min", "max"): 1.0}
        if key == "augment.erase_scale_min":
            extra = {"augment.erase_scale_max": max(value, 0.5)}
        if key in ("augment.scale_max", "augment.local_scale_max", "augment.erase_scale_max"):
            extra = {key.replace("max", "min"): min(value, 0.01)}
        if key in ("augment.ratio_min", "augment.blur_sigma_min"):
            extra = {key.replace("min", "max"): max(value, 1e3)}
        if key in ("augment.ratio_max", "augment.blur_sigma_max"):
            extra = {key.replace("max", "min"): min(value, 1e-9) if value > 1e-9 else value}
        cfg = apply_overrides(Config(), {key: value, **extra})
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value


def test_related_settings_must_be_ordered(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for a, b, va, vb in (("scale-min", "scale-max", "0.9", "0.5"), ("ratio-min", "ratio-max", "2", "1"),
                         ("blur-sigma-min", "blur-sigma-max", "3", "1"), ("local-scale-min", "local-scale-max", "0.6", "0.3"),
                         ("erase-scale-min", "erase-scale-max", "0.5", "0.3")):
        assert main(["pretrain", "--run-dir", str(tmp_path / "r"), f"--{a}", va, f"--{b}", vb]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: augment.") and "is larger than" in err and not (tmp_path / "r").exists()
        assert err.endswith(f"(e.g. --{a} {float(vb)!r})")  # a value that holds (the default 0.8 > 0.5 did not)


@pytest.mark.parametrize("key, kind, allowed", [d for d in declared() if d[2] is not None and not d[2].choices],
                         ids=lambda v: str(v))
def test_what_a_refusal_says_is_allowed_is_what_is_allowed(key: str, kind: type, allowed: Allowed) -> None:
    """The range a refusal names ('> 0', '>= 2', 'in (0, 1]', 'in [0, 1)') includes an end exactly
    when the setting accepts a value there."""
    text = allowed.describe()
    if allowed.low is not None:
        assert (text.startswith(">=") or text.startswith("in [")) == allowed.admits(kind(allowed.low)), text
        assert not allowed.admits(kind(allowed.low) - 1)
    if allowed.high is not None:
        assert text.endswith("]") == allowed.admits(kind(allowed.high)), text
        assert not allowed.admits(kind(allowed.high) + 1)
