"""Checkpoints: written atomically, verified by checksum, loaded without unpickling code.

Write: `torch.save` into a temporary file in the same directory, flush, fsync, `os.replace` onto
the final name, fsync the directory; older checkpoints are deleted only after that. A crash at
any moment leaves either the old or the new file complete, never a half-written one under a
checkpoint's name.

Read: `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers (a
crafted pickle cannot run code), then the SHA-256 of the content is recomputed and compared with
the one stored at write time, and the format version is checked.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import warnings
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastclr.errors import FastclrError, out_of_memory
from fastclr.tensor_file import raw_bytes
from fastclr.files import WriteFailed, atomic_write, fsync_path
from fastclr.version import __version__
from fastclr.scaleout.once import resume_command

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointWriteFailed(FastclrError):
    """A checkpoint not written (disk full, permissions); `reason` says why, the message what is kept."""

    def __init__(self, path: Path, reason: str, kept: str) -> None:
        self.path, self.reason, self.kept = path, reason, kept
        super().__init__(f"cannot write checkpoint {path} ({reason}); {kept}")

    def __reduce__(self) -> tuple[type, tuple[Path, str, str]]:  # (a process pool's pickle of it)
        return type(self), (self.path, self.reason, self.kept)


class CheckpointError(FastclrError):
    """A checkpoint that cannot be trusted: unreadable, truncated, tampered with or not ours."""


def _digest(obj: Any, h: "hashlib._Hash") -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(raw_bytes(t))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def content_sha256(state: dict[str, Any]) -> str:
    """SHA-256 over every key, tensor (dtype, shape, bytes) and scalar of `state`."""
    h = hashlib.sha256()
    _digest(state, h)
    return h.hexdigest()


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint taken after `step` optimiser steps."""
    return f"step-{step:09d}.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` (which must hold an int "step") as the newest checkpoint of `run_dir` (`atomic_write`).

    Adds format, library version and checksum. Keeps the `keep` newest checkpoints up to its step
    (a damaged later one, skipped by a resume, is overwritten when the run reaches it). A failed
    write (disk full, permissions) raises a one-line error and leaves existing checkpoints intact.
    """
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_path(run_dir)  # the new folder's entry survives a power loss with the checkpoint in it
    payload = dict(state, format=FORMAT, fastclr_version=__version__)
    payload["sha256"] = content_sha256(payload)
    path = folder / checkpoint_name(int(state["step"]))
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except WriteFailed as e:
        raise CheckpointWriteFailed(path, e.reason, what_is_kept(run_dir)) from None
    # The `keep` newest up to this step; later ones are left: only a damaged newer checkpoint that the
    # resume skipped can be there, and rotating it in would have deleted the good ones below it.
    for old in [p for p in list_checkpoints(run_dir) if p.name <= path.name][:-keep]:
        old.unlink(missing_ok=True)
    return path


def what_is_kept(run_dir: Path) -> str:
    """After a failed write during a run: which checkpoint survives and how to go on."""
    kept = list_checkpoints(run_dir)
    if not kept:  # `--resume` would find nothing to resume from
        return ("no earlier checkpoint exists; free disk space or fix permissions, then run the same command again "
                "(the run starts over)")
    return (f"the checkpoint {kept[-1].name} written before is intact; free disk space or fix permissions, then "
            f"resume with {resume_command(run_dir)}")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete temporary files left by a writer that was killed mid-write (a checkpoint, the
    encoder, config.toml, metrics.jsonl, probe.json, tracking.json: `atomic_write`'s
    `.NAME.*.tmp`); returns them. Call holding the run's lock: no other writer of those is then at
    work (`evaluate` and `report` write theirs without the lock, and theirs are left alone)."""
    folder = run_dir / CHECKPOINT_DIR
    stale = [p for p in folder.glob(".step-*.tmp")] if folder.is_dir() else []
    stale += [p for p in run_dir.glob(".*.tmp") if is_run_temporary(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def is_run_temporary(name: str) -> bool:
    """Whether `name` is `atomic_write`'s temporary of a file only the run's lock holder writes."""
    from fastclr.runs import LOCK_HOLDER_FILES  # (runs imports the trackers; checkpoint is imported before them)

    return any(name.startswith(f".{own}.") and name.endswith(".tmp") for own in LOCK_HOLDER_FILES)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first (by step)."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _unpickling_reason(e: Exception) -> str:
    """The line of torch's refusal that names what the file holds ("Trying to load unsupported
    GLOBAL posix.system ...", "Unsupported operand 149"), not its paragraph about the default."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    return (named or lines or [type(e).__name__])[0]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify one checkpoint file; raises `CheckpointError` with the reason."""
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
        with warnings.catch_warnings():  # torch's note on a foreign pickle protocol: the refusal below says more
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it is not a plain-tensor checkpoint "
                              f"({_unpickling_reason(e)[:160]})") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"{path} is not a checkpoint file") from None
    except OSError as e:  # unreadable, not damaged: never skipped for an older one (its steps would be lost)
        raise FastclrError(f"cannot read checkpoint {path} ({e.strerror or e}); fix its permissions (or the disk) "
                           "and run the same command again") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for damaged zips
        if out_of_memory(e) is not None:  # this machine's memory: the file is not damaged, nor to be passed over
            raise
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "sha256" not in state:
        raise CheckpointError(f"{path} is not a fastclr checkpoint of format {FORMAT}")
    stored = state.pop("sha256")
    if content_sha256(state) != stored:
        raise CheckpointError(f"checkpoint {path} fails its checksum: its content was altered or damaged")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:  # every checkpoint is of a step (save_checkpoint)
        raise CheckpointError(f"{path} records no step ({step!r}): not a checkpoint fastclr wrote")
    return state


_RUN_PARTS = ("config", "encoder", "head", "optimizer", "torch_rng", "total_steps")
"""What every run's checkpoint holds (`RunState.save`), whatever version wrote it."""
_COUNTS = ("total_steps", "steps_per_epoch", "step_offset", "warmup_steps", "skip_streak", "first_fit_at")
_SECONDS = ("train_seconds", "monitor_seconds")
_PAIRS = ("decay_anchor", "ramp_anchor", "pace_mark")


def _number(value: Any, whole: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return False
    return whole or math.isfinite(value)


def _tensors(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in value.items())


def check_run_parts(path: Path, state: dict[str, Any]) -> None:
    """A `CheckpointError` naming the parts of a run's checkpoint that are missing, or not of the form
    `RunState.save` writes or hold what no run writes (a place before the data's start). The checksum is not keyed: a file edited, or crafted, to pass it
    reaches here, and without this check a resume or `evaluate` ended in a traceback. (The settings'
    form is checked where they are read, which names the version that can read them.)"""
    missing = [k for k in _RUN_PARTS if k not in state]
    bad: list[str] = [k for k in ("encoder", "head", "temperature") if k in state and not _tensors(state[k])]
    if "head" not in bad and state.get("head") == {}:  # every head has weights (an encoder of a user's may not)
        bad.append("head")
    if "temperature" in state and "temperature" not in bad and not (
            isinstance(state["temperature"].get("log_t"), torch.Tensor) and state["temperature"]["log_t"].shape == (1,)):
        bad.append("temperature")
    settings = state.get("config")
    if isinstance(settings, dict) and not (isinstance(settings.get("data"), dict) and "name" in settings["data"]):
        bad.append("config")  # (its other forms are read, and named, where they are read)
    optimizer = state.get("optimizer")
    if "optimizer" in state and not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
                                     and isinstance(optimizer.get("param_groups"), list)
                                     and all(isinstance(g, dict) for g in optimizer["param_groups"])):
        bad.append("optimizer")
    for key in ("model_info", "loss_scaler"):
        if key in state and not isinstance(state[key], dict):
            bad.append(key)
    for key in ("torch_rng", "cuda_rng"):
        rng = state.get(key)
        if key in state and not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.dim() == 1
                                 and (key != "torch_rng" or rng.numel() == torch.get_rng_state().numel())):
            bad.append(key)
    bad += [k for k in _COUNTS if k in state and not _number(state[k], whole=True)]
    bad += [k for k in _SECONDS if k in state and not _number(state[k], whole=False)]
    bad += [k for k in _PAIRS if k in state and not (
        isinstance(state[k], (list, tuple)) and len(state[k]) == 2 and all(_number(v, whole=False) for v in state[k]))]
    step, offset, per_epoch = (state.get(k) for k in ("step", "step_offset", "steps_per_epoch"))
    if isinstance(step, int) and isinstance(offset, int) and step + offset < 0:  # a place before the data's start
        bad.append("step_offset")
    if isinstance(per_epoch, int) and per_epoch < 1:
        bad.append("steps_per_epoch")
    bad += [k for k in ("total_steps", "warmup_steps", "skip_streak") if _number(state.get(k), whole=True) and state[k] < 0]
    if missing or bad:
        what = "lacks " + ", ".join(missing) if missing else "holds " + ", ".join(bad) + " in a form fastclr does not write"
        raise CheckpointError(f"{path} {what}: not a run's checkpoint as fastclr writes it (edited, or written by "
                              "another program)")


def latest_valid_checkpoint(run_dir: Path, warn: Any = None,
                            check: Callable[[Path, dict[str, Any]], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of `run_dir` that verifies (and passes `check(path, state)`, which raises
    `CheckpointError`: `check_run_parts` for a run's); damaged newer ones are reported via
    `warn(message)` and skipped. Raises FastclrError when none verifies."""
    found = list_checkpoints(run_dir)
    if not found:
        raise FastclrError(
            f"{run_dir} holds no checkpoint (looked in {run_dir / CHECKPOINT_DIR}); "
            "give the directory of a run that saved one, or start a new run without --resume"
        )
    errors = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
            if check is not None:
                check(path, state)
            return path, state
        except CheckpointError as e:
            errors.append(str(e))
            if warn is not None:
                warn(f"skipping {path.name}: {e}")
    raise FastclrError(f"no checkpoint in {run_dir} verifies ({'; '.join(errors)}); start a new run with another "
                       f"--run-dir (this one is refused while it holds them), or move {run_dir / 'checkpoints'} away")
