"""Run directories and their metrics log.

A run directory holds: config.toml (the resolved config), metrics.jsonl (one JSON object per
line), checkpoints/, encoder.safetensors (the encoder alone, exported at the end), probe.json
(linear-probe result), tb/ (TensorBoard events, when tensorboard is installed) and, with
`--log`, tracking.json (the experiment trackers' run ids).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from fastclr.checkpoint import is_run_temporary
from fastclr.config import Config, apply_overrides, read_toml, to_toml, toml_text
from fastclr.errors import FastclrError, warn_stderr
from fastclr.files import WriteFailed, unwritable, write_failure_reason, write_text
from fastclr.locks import LOCK_FILE
from fastclr.scaleout.once import resume_command
from fastclr.tracking import Tracker, numbers


def default_run_dir(cfg: Config) -> Path:
    """runs/<data>-<YYYYmmdd-HHMMSS> under the current directory."""
    stem = Path(cfg.data.name).name.replace("/", "-") or "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


CLAIM_TRIES = 1000
"""Names tried after the default one (`NAME-2` on): more runs than that in one second is a loop."""


def claim_new_dir(path: Path) -> Path:
    """`path`, or `path`-2, -3, ... where it exists, made now (one mkdir: of two runs started in the
    same second, each gets its own): for the default name, which only names the second. The parent
    is made first, so a parent that cannot be made (a link to a folder gone) is its own error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FastclrError(f"{path.parent} is not a folder (a file, or a link to a folder that is not there); make it "
                           "one, or give a --run-dir") from None
    for n in range(1, CLAIM_TRIES + 1):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if not (candidate.exists() or candidate.is_symlink()):
                raise
    raise FastclrError(f"{path} and {CLAIM_TRIES - 1} more names after it are taken; choose a --run-dir")


def prepare_run_dir(path: Path, resuming: bool = False) -> Path:
    """Create `path` if needed and check that it can be this run's directory; a one-line error
    otherwise. A directory is never written into when it holds someone else's files (files but no
    fastclr config.toml) or, for a new run, another run's checkpoints or encoder."""
    if path.exists() and not path.is_dir():
        raise FastclrError(f"--run-dir {path} is a file, not a directory; choose another --run-dir")
    refuse_inside_store(path, "--run-dir")  # its outputs (finetune, distill, features) would be refused there
    if path.is_dir() and not resuming:
        # The lock, the temporaries and the TensorBoard events of a run killed while writing its first
        # files are the run's own (its TensorBoard writer starts before config.toml is written).
        entries = [p.name for p in path.iterdir() if p.name != LOCK_FILE and not is_run_temporary(p.name)
                   and not _events_alone(p)]
        if entries and not (path / "config.toml").exists():
            raise FastclrError(f"--run-dir {path} holds files that are not a fastclr run ({', '.join(sorted(entries)[:3])}"
                               f"{', ...' if len(entries) > 3 else ''}); nothing was written: choose a new --run-dir")
        if (path / "encoder.safetensors").exists() or any((path / "checkpoints").glob("step-*.pt")):
            raise FastclrError(f"{path} already holds a run; continue it with {resume_command(path)}, or choose a "
                               "new --run-dir")
        if entries and not written_config(path / "config.toml"):
            # a config.toml of the user's own (a site's, an overrides file) made the folder pass for a run's,
            # and the run replaced it and wrote in beside their files
            raise FastclrError(f"--run-dir {path} holds a config.toml that is not a fastclr run's (it lacks the "
                               "settings a run records); nothing was written: choose a new --run-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastclrError(f"cannot create run directory {path} ({e.strerror}); choose another with --run-dir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        why, fix = unwritable(path)
        # A resume cannot be pointed elsewhere (--resume and --run-dir are one directory): a copy can.
        elsewhere = f"copy it to a writable place and resume the copy, or {fix}" if resuming else \
            f"choose another with --run-dir or {fix}"
        raise FastclrError(f"run directory {path} {why}; {elsewhere}")
    return path


RECORDED = frozenset({"data.name", "model.encoder", "optim.lr", "train.seed", "train.batch_size"})
"""Settings every run's config.toml records (`write_config` writes them all), and no overrides file
or other program's config.toml has together by chance."""


def written_config(path: Path) -> bool:
    """Whether `path` is a config.toml a run wrote: TOML holding every one of RECORDED."""
    try:
        return RECORDED <= set(read_toml(path))
    except (FastclrError, OSError):
        return False


def settings_alone(path: Path) -> bool:
    """Whether `path` holds nothing but settings, as a run of this version or an earlier one (fewer
    keys) writes them (`write_config`, RECORDED among them): replacing it with a run's own loses no
    comment, layout or choice of keys of the user's."""
    try:
        flat = read_toml(path)
        if not RECORDED <= set(flat):  # a user's short file of the same form: which keys they chose is theirs
            return False
        apply_overrides(Config(), flat)  # every name and value one this version knows
        sections: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
        return path.read_text(encoding="utf-8") == toml_text(sections)
    except (FastclrError, OSError, UnicodeDecodeError):
        return False


def _events_alone(p: Path) -> bool:
    """Whether `p` is a run's tb/ folder holding TensorBoard event files and nothing else."""
    return p.name == "tb" and p.is_dir() and all(q.name.startswith("events.out.tfevents.") for q in p.iterdir())


LOCK_HOLDER_FILES = frozenset({"config.toml", "encoder.safetensors", "metrics.jsonl", "probe.json", "tracking.json"})
"""What only the process holding a run's lock (pretraining) writes; eval.json, report.html and the
like are written by commands that read a run without its lock, possibly while it trains."""

RUN_FILES = LOCK_HOLDER_FILES | {"eval.json", "classifier.safetensors", "finetune.json", "distill.json", LOCK_FILE}
"""What a run directory (or a finetune/distill output in it) holds that a command's --out must not replace."""


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a fastclr run: its config.toml with an encoder, a metrics log or a
    checkpoint (a config.toml alone may be anyone's, such as a `--config` overrides file)."""
    return (path / "config.toml").is_file() and (
        (path / "encoder.safetensors").is_file() or (path / "metrics.jsonl").is_file()
        or any((path / "checkpoints").glob("step-*.pt")))


OUTPUT_MARKERS = ("finetune.json", "distill.json")
"""The record a finetune or distill output folder holds beside its classifier and encoder."""


def refuse_run_file(out: Path, flag: str = "--out") -> None:
    """One line when `out` would replace a file a run needs: one of RUN_FILES in a run directory,
    or in a finetune or distill output (which other commands read: distill its teacher's), or
    anything in a run's checkpoints/ folder."""
    path = out.resolve()
    folder = path.parent
    if path.name in RUN_FILES and is_run_dir(folder):
        raise FastclrError(f"{flag} {out} would replace the run's own {path.name}, which the run needs; "
                           f"choose another {flag}")
    if path.name in RUN_FILES and any((folder / m).is_file() for m in OUTPUT_MARKERS):
        raise FastclrError(f"{flag} {out} would replace {path.name} of the classifier in {folder}, which fastclr "
                           f"reads (distill, the report); choose another {flag}")
    if folder.name == "checkpoints" and is_run_dir(folder.parent):
        raise FastclrError(f"{flag} {out} is in the run's checkpoints folder, which holds its checkpoints alone; "
                           f"choose another {flag}")


def refuse_inside_store(path: Path, flag: str) -> None:
    """One line when `path`, given as `flag`, lies inside a prepared store: fastclr reads a store's
    files by name, so nothing else may be written there."""
    from fastclr.data.store import store_holding

    store = store_holding(path)
    if store is not None:
        raise FastclrError(f"{flag} {path} is inside the store {store}, whose files fastclr reads; choose a {flag} "
                           "outside it")


def refuse_output(out: Path, flag: str = "--out", *, kind: str = "", suffixes: tuple[str, ...] = (),
                  inputs: tuple[Path, ...] = ()) -> None:
    """One line, before any work, when writing `out` would destroy what the user has: a run's own
    files (`refuse_run_file`), anything in a store (fastclr reads its files by name: an embedding
    written as its manifest broke it), one of the command's `inputs` (a grid saved over its query
    image), or a file of another kind than this output (`kind`, named by `suffixes`: a report
    written over a JPEG)."""
    refuse_run_file(out, flag)
    refuse_inside_store(out, flag)
    path = out.resolve()
    taken = next((given for given in inputs if given.resolve() == path), None)
    if taken is not None:
        raise FastclrError(f"{flag} {out} is {taken}, which this command reads; choose another {flag}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise FastclrError(f"{flag} {out}: {kind} is written as {' or '.join(suffixes)}; give a name ending in "
                           f"{suffixes[0]}")


def refuse_nameless(out: Path, flag: str = "--out", example: str = "feats") -> None:
    """One line, before any work, when the file `out` is to be has no name of its own (`--out ""`,
    `.` or `/`, which Path cannot tell apart: a traceback from its suffix after all the work)."""
    if out.name in ("", ".", ".."):
        raise FastclrError(f"{flag} names no file; give a file name, e.g. {flag} {example}")


def refuse_uncreatable(folder: Path, flag: str = "--out", given: bool = True) -> None:
    """One line, before any work, when `folder` cannot be made where it is to be: the nearest part
    of its path that exists is a file, or a folder this process may not write into (finetune
    trained to its end, then failed to make its --out). `given`: False where `folder` is the
    command's default place, not one the user named with `flag` (which the line then offers)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    named = f"{flag} {folder}: " if given else ""
    instead = f"another {flag}" if given else f"{flag} elsewhere"
    if not existing.is_dir():
        raise FastclrError(f"{named}{existing} is a file, not a folder; give {instead}")
    if not os.access(existing, os.W_OK | os.X_OK):
        why, fix = unwritable(existing)
        raise FastclrError(f"{named}{existing} {why}; give {instead} or {fix}")


def refuse_unwritable_file(out: Path, flag: str = "--out", given: bool = True) -> None:
    """One line, before any work, when the file `out` cannot be written: a folder stands at its
    name, or its folder cannot be made or written into (export, report and neighbours' grid found
    out after minutes of work, with free space as the hint). `given` as in `refuse_uncreatable`."""
    if out.is_dir():
        raise FastclrError(f"{flag} {out} is a folder; give a file name (in it, or elsewhere)" if given else
                           f"{out} is a folder; give {flag} elsewhere")
    refuse_uncreatable(out.parent, flag, given)


def write_config(run_dir: Path, cfg: Config) -> Path:
    """Save the resolved config as run_dir/config.toml."""
    out = run_dir / "config.toml"
    write_text(out, to_toml(cfg))
    return out


def write_json(path: Path, obj: Any) -> None:
    """Write JSON whole or not at all (`atomic_write`)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


METRICS_MEND = "repair that line or delete it"
"""The way out `read_metrics` names for a damaged line (a resume and the trackers read the file too;
the report names its own)."""


def read_metrics(run_dir: Path, mend: str = METRICS_MEND) -> list[dict[str, Any]]:
    """All records of run_dir/metrics.jsonl. A last line cut short (a run killed, or a disk that
    filled, while it appended a record) is not a record and is left out (`metrics_cut_short` says
    whether one was); a whole last record without its newline is kept; a damaged line before the
    last is an error naming `mend`."""
    return read_metrics_and_cut(run_dir, mend)[0]


def metrics_cut_short(run_dir: Path) -> bool:
    """Whether run_dir/metrics.jsonl ends in a line cut short, which `read_metrics` leaves out: for
    a reader to say so."""
    try:
        return read_metrics_and_cut(run_dir, METRICS_MEND)[1]
    except (FastclrError, OSError):  # damage before the last line is read_metrics' to name
        return False


def read_metrics_and_cut(run_dir: Path, mend: str = METRICS_MEND) -> tuple[list[dict[str, Any]], bool]:
    """`read_metrics`' records, and whether a last line cut short was left out: one read for a
    reader that shows both (the report)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return [], False
    data = path.read_bytes()
    damaged = f"the file was edited or damaged: {mend}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # a resume, the report and the trackers all read it: one line for each
        at = data[:e.start].count(b"\n") + 1
        raise FastclrError(f"{path} line {at} is not UTF-8 text (byte {data[e.start]:#04x}); {damaged}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    unended = bool(text.rpartition("\n")[2].strip())  # the last line has no newline: a write may have stopped in it
    records: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            whole = isinstance(record, dict) and isinstance(record.get("step"), int)
        except json.JSONDecodeError as e:
            if n == len(lines) and unended:
                return records, True
            raise FastclrError(f"{path} record {n} is not JSON ({e.msg}); {damaged}") from None
        if not whole:
            if n == len(lines) and unended:
                return records, True
            raise FastclrError(f"{path} record {n} is not a record of a step (an object with an integer \"step\"); "
                               f"{damaged}")
        records.append(record)
    return records, False


def _values(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's finite numbers by their path, its step left out: what a tracker is sent."""
    return numbers({k: v for k, v in record.items() if k != "step"})


class MetricsLog:
    """Appends records to metrics.jsonl and, when tensorboard is importable, to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.trackers: list[Tracker] = []
        """Experiment trackers (fastclr.tracking) that receive every record's numbers too."""
        self.monitored: set[int] = set()
        """The steps whose kNN monitor record the kept metrics hold (`keep_until`)."""
        self.sent: set[tuple[int, bool]] = set()
        """(step, is a kNN record) of the records past the checkpoint TensorBoard and the trackers
        were sent before this process: a resumed run replays those steps, and they have them."""
        self._tb: Any = None
        # Opened at the first record, so that a run refused before it leaves no empty event file in tb/.
        self._tb_wanted = enabled and importlib.util.find_spec("tensorboard") is not None  # an optional dependency

    def _writer(self) -> Any:
        """TensorBoard's writer, opened once; None where tensorboard is absent or broken."""
        if self._tb_wanted and self._tb is None:
            self._tb_wanted = False
            tb = self.path.parent / "tb"
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tb))
            except Exception as e:  # noqa: BLE001 - installed but broken (a protobuf it cannot use): JSONL still works
                reason = (str(e).splitlines() or [""])[0]
                warn_stderr(f"warning: tensorboard is installed but its writer failed ({type(e).__name__}: {reason}): "
                            f"{tb} is not written, metrics.jsonl holds every record (pip install "
                            f"--upgrade tensorboard protobuf to mend it, or pip uninstall tensorboard)")
        return self._tb

    def keep_until(self, step: int) -> None:
        """Drop the records past `step`, the checkpoint a resumed run continues from: the steps after
        it are run again, and their records would be there twice."""
        if not self.enabled or not self.path.exists():
            return
        records = read_metrics(self.path.parent)  # a last line cut short is left out
        if step > 0:  # resumed (a fresh start over a first attempt that died sends everything anew)
            self.sent = {(r["step"], "knn_acc" in r) for r in records if r["step"] > step}
        self.monitored = {r["step"] for r in records if r["step"] <= step and "knn_acc" in r}
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records if r["step"] <= step)
        # Written anew also where it is a hard or a symbolic link (a run copied with `cp -al` or `cp -rs`, a
        # backup sharing files): appending in place wrote this run's records into the other's file.
        if len(text) != self.path.stat().st_size or self.path.stat().st_nlink > 1 or self.path.is_symlink():
            write_text(self.path, text)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold "step")."""
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as e:
            raise WriteFailed(self.path, write_failure_reason(e, self.path), e) from None
        if (record["step"], "knn_acc" in record) in self.sent:
            return  # replayed after a resume: the trackers hold this step's values already
        values = _values(record)
        if (tb := self._writer()) is not None:
            for k, v in values.items():
                tb.add_scalar(k, v, record["step"])
        for t in self.trackers:
            t.metrics(values, record["step"])

    def send_kept(self, trackers: list[Tracker]) -> None:
        """Every record metrics.jsonl keeps, sent to `trackers` (tracked runs a resume started: they
        began at its checkpoint's step, the steps before missing from them without a word)."""
        if not trackers or not self.enabled or not self.path.exists():
            return
        for record in read_metrics(self.path.parent):
            for t in trackers:
                t.metrics(_values(record), record["step"])

    def close(self) -> None:
        """Flush TensorBoard; a record after this opens no writer."""
        self._tb_wanted = False
        if self._tb is not None:
            self._tb.close()
