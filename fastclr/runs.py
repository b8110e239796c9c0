"""Run directories and their metrics log.

A run directory holds: config.toml (the resolved config), metrics.jsonl (one JSON object per
line), checkpoints/, encoder.safetensors (the encoder alone, exported at the end), probe.json
(linear-probe result) and tb/ (TensorBoard events, when tensorboard is installed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fastclr.config import Config, to_toml
from fastclr.errors import FastclrError


def default_run_dir(cfg: Config) -> Path:
    """runs/<data>-<YYYYmmdd-HHMMSS> under the current directory."""
    stem = Path(cfg.data.name).name.replace("/", "-") or "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(path: Path) -> Path:
    """Create `path` if needed and check that it is writable; a one-line error otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastclrError(f"cannot create run directory {path} ({e.strerror}); choose another with --run-dir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FastclrError(f"run directory {path} is not writable; choose another with --run-dir or fix its permissions")
    return path


def write_config(run_dir: Path, cfg: Config) -> Path:
    """Save the resolved config as run_dir/config.toml."""
    out = run_dir / "config.toml"
    out.write_text(to_toml(cfg))
    return out


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically enough for results files (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of run_dir/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends records to metrics.jsonl and, when tensorboard is importable, to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard missing or broken: JSONL still works
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold "step")."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._tb is not None:
            self._tb.close()
