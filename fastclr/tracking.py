"""Experiment trackers beside metrics.jsonl: MLflow and Weights & Biases (`--log mlflow,wandb`).

Each tracker receives what the run directory receives: the resolved config (as parameters, and
config.toml as a file), every metrics record at its step, the probe's and `fastclr evaluate`'s
numbers, and the exported encoder as an artifact. The run directory stays the record of truth:
a tracker that cannot be reached mid-run is a warning, never a lost run.

Where runs go is each tool's own setting, so users keep theirs: MLflow's MLFLOW_TRACKING_URI
(default: its local database) and MLFLOW_EXPERIMENT_NAME (default "fastclr"); W&B's WANDB_MODE
(offline needs no account), WANDB_PROJECT (default "fastclr") and WANDB_DIR (default: the run
directory). The tracker's run id is kept in RUN_DIR/tracking.json, so `--resume` and `fastclr
evaluate` add to the same tracked run.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from fastclr.errors import FastclrError
from fastclr.extras import install_command
from fastclr.files import read_json, write_text

TRACKING_FILE = "tracking.json"
EXTRAS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
"""Tracker name -> (module to import, the extra of pyproject.toml that installs it)."""


class Tracker(Protocol):
    """What `pretrain` and `evaluate` hand to a tracker."""

    run_id: str

    def metrics(self, values: Mapping[str, float], step: int) -> None: ...

    def results(self, values: Mapping[str, float], step: int) -> None: ...

    def artifact(self, path: Path, name: str) -> None: ...

    def close(self, status: str, stopping: Callable[[], bool] | None = None) -> None: ...


def _one_line(e: BaseException, limit: int = 400) -> str:
    """A tracker library's message on one line: MLflow's ran on for lines of SQL (a warning of three
    lines), and a cut at 200 characters hid the remedy it ends with ("set MLFLOW_ALLOW_FILE_STORE=true")."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def tracker_names(text: str) -> tuple[str, ...]:
    """'none', 'mlflow', 'wandb' or 'mlflow,wandb' -> the trackers named."""
    return tuple(n for n in text.split(",") if n and n != "none")


def _missing(name: str) -> str:
    """The install command of tracker `name`'s package where it cannot be imported, else ""."""
    module, extra = EXTRAS[name]
    try:
        __import__(module)
    except ImportError as e:
        if not (isinstance(e, ModuleNotFoundError) and e.name == module):  # installed, and broken: "satisfied" again
            return (f"it is installed but fails to import ({type(e).__name__}: {str(e)[:200]}); mend its install, "
                    f"e.g. {install_command(extra)} --force-reinstall")
        return install_command(extra)
    return ""


def require(names: tuple[str, ...]) -> None:
    """A one-line error, before anything is written, for a tracker whose package is missing (named
    by --log, or kept from the run a resume continues: --log none works for both)."""
    for name in names:
        install = _missing(name)
        if install:
            raise FastclrError(f"--log {name} needs the {EXTRAS[name][0]} package: {install} (or --log none)")


def importable(names: tuple[str, ...], run_dir: Path, warn: Callable[[str], None]) -> tuple[str, ...]:
    """The trackers of `names` whose packages import here; one warning for each other, whose
    results are then not filed there: a run tracked on another machine is evaluated all the same
    (a tracker's trouble is a warning, never lost work)."""
    kept = []
    for name in names:
        install = _missing(name)
        if install:
            warn(f"warning: {run_dir} is tracked with {name}, whose {EXTRAS[name][0]} package is missing here: these "
                 f"results are not filed there ({install} to file them)")
        else:
            kept.append(name)
    return tuple(kept)


def numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numeric leaves of a nested dict, keyed by their path ('linear/accuracy')."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def open_trackers(names: tuple[str, ...], run_dir: Path, params: Mapping[str, Any],
                  warn: Callable[[str], None],
                  going_on: str = "training goes on without it, and the run directory has everything") -> list[Tracker]:
    """Start (or, with an id in tracking.json, continue) one tracked run per name; `going_on`: what
    the warning of one that cannot be reached says of the work and its records."""
    if not names:
        return []
    require(names)
    saved = read_ids(run_dir)
    trackers: list[Tracker] = []
    for name in names:
        try:
            if name == "mlflow":
                t: Tracker = _within(OPEN_WAIT_S, name, functools.partial(_Mlflow, run_dir, params, saved.get(name)),
                                     warn)
            else:  # W&B's console capture sets a signal handler: main thread only (it has its own init_timeout)
                t = _Wandb(run_dir, params, saved.get(name))
        except Exception as e:  # noqa: BLE001 - a server down or refusing: the run goes on without it
            gone = (f"; if its run {saved[name]} is gone from the server, delete {run_dir / TRACKING_FILE} and a new "
                    "one is started") if name in saved else ""
            warn(f"warning: {name} could not {'continue' if gone else 'start'} a run ({type(e).__name__}: "
                 f"{_one_line(e)}); {going_on}{gone}")
            continue
        trackers.append(_Guarded(t, name, warn))
        saved[name] = t.run_id
    write_text(run_dir / TRACKING_FILE, json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return trackers


OPEN_WAIT_S = 20.0
"""How long a run waits for MLflow to open its tracked run before it trains without it: a server
that accepts connections and never answers held the start for 96 s in silence (MLFLOW_PATIENCE's
three 30-s tries of the first request, then the backoff), more where a later request hung. A
healthy server answers the four requests of an opening in well under a second."""

OPEN_NOTE_AFTER_S = 5.0
"""After how long an opening still waiting says so."""


def _within(limit_s: float, name: str, open_run: Callable[[], Tracker], warn: Callable[[str], None]) -> Tracker:
    """`open_run()` on a thread of its own, waited for `limit_s` at most (TimeoutError after); a
    tracked run it opens after that is ended FAILED there (not left RUNNING on the server)."""
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def work() -> None:
        try:
            opened = open_run()
        except Exception as e:  # noqa: BLE001 - handed to the caller, as its own
            with lock:
                box["error"] = e
            return
        with lock:
            box["tracker"] = opened
            late = box.get("abandoned", False)
        if late:
            try:
                opened.close("FAILED")
            except Exception:  # noqa: BLE001 - the server that was too slow may fail this too; nothing waits for it
                pass

    thread = threading.Thread(target=work, name=f"fastclr-{name}-open", daemon=True)
    thread.start()
    thread.join(min(OPEN_NOTE_AFTER_S, limit_s))
    if thread.is_alive():
        warn(f"note: waiting for {name} to open this run's record (at most {limit_s:.0f} s)")
        thread.join(max(0.0, limit_s - OPEN_NOTE_AFTER_S))
    with lock:
        if "tracker" not in box and "error" not in box:
            box["abandoned"] = True
            raise TimeoutError(f"no answer within {limit_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["tracker"]  # type: ignore[no-any-return]


def read_ids(run_dir: Path) -> dict[str, str]:
    """Tracker name -> its run id, from RUN_DIR/tracking.json ({} when there is none)."""
    path = run_dir / TRACKING_FILE
    if not path.exists():
        return {}
    ids = read_json(path, "delete it, and the trackers start new runs for this run directory")
    return {str(k): str(v) for k, v in ids.items() if v}  # an empty id names no run: a new one is started


@contextmanager
def tracked(names: tuple[str, ...], run_dir: Path, params: Mapping[str, Any],
            warn: Callable[[str], None]) -> Iterator[list[Tracker]]:
    """open_trackers for a command that files results into a run's tracked runs (`evaluate`); each
    is closed as it was found (a stopped run stays KILLED: filing an evaluation does not finish
    it), FINISHED where that cannot be read, or KILLED when the block raised."""
    # Opened once the results are written: the evaluation is done, only their filing is lost.
    trackers = open_trackers(names, run_dir, params, warn, going_on="the evaluation's results are in the run "
                                                                    "directory alone")
    status = "KILLED"
    try:
        yield trackers
        status = "FINISHED"
    finally:
        for t in trackers:
            found = getattr(t, "found_status", None)
            t.close(found if status == "FINISHED" and found in ENDED else status)


ENDED = frozenset({"FINISHED", "KILLED", "FAILED"})
"""MLflow's statuses of a run that has ended."""


FAILED_CLOSE_WAIT_S = 10.0
"""How long the end of a run waits for a tracker that failed earlier to end its run."""


CLOSE_WAIT_S = 120.0
"""How long the end of a finished run waits for a healthy tracker to receive what is queued."""

CLOSE_NOTE_AFTER_S = 5.0
"""After how long a close still sending says so."""

_CLOSE = "close its run"


class _Guarded:
    """A tracker whose calls are made in order on a thread of its own, so a slow or hung server
    never holds the training loop: MLflow's retries held each step's metrics call for up to 96 s,
    all of it counted against --time-budget (a 0.5-minute run was cut to 7 steps). Its failures (a
    server down, a full quota) become one warning each, said on the caller's thread, then silence:
    the run and its files go on."""

    def __init__(self, inner: Tracker, name: str, warn: Callable[[str], None]) -> None:
        self.inner, self.name, self.warn, self.broken = inner, name, warn, False
        self.run_id = inner.run_id
        self.found_status: str | None = getattr(inner, "found_status", None)
        self._calls: queue.SimpleQueue[tuple[str, Callable[[], None]] | None] = queue.SimpleQueue()
        self._said: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send, name=f"fastclr-{name}", daemon=True)
        self._sender.start()

    def _send(self) -> None:
        while (call := self._calls.get()) is not None:
            what, fn = call
            if self.broken and what != _CLOSE:
                continue
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - any failure of the tracker's library
                if not self.broken:  # after a failure (said once) its run is still ended if it can be, silently
                    self.broken = True
                    self._said.put(f"warning: {self.name} failed to {what} ({type(e).__name__}: {_one_line(e)}); it "
                                   "gets nothing more from this run but its end, and the run's files are complete")

    def _call(self, what: str, fn: Callable[[], None]) -> None:
        self._say()
        self._calls.put((what, fn))

    def _say(self) -> None:
        while not self._said.empty():
            self.warn(self._said.get())

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        self._call("log metrics", lambda: self.inner.metrics(values, step))

    def results(self, values: Mapping[str, float], step: int) -> None:
        self._call("log results", lambda: self.inner.results(values, step))

    def artifact(self, path: Path, name: str) -> None:
        self._call(f"store {path.name}", lambda: self.inner.artifact(path, name))

    def close(self, status: str, stopping: Callable[[], bool] | None = None) -> None:
        """Send what is left and end the tracked run; `stopping`: True once a stop was asked for,
        which ends the wait. A healthy tracker is waited for CLOSE_WAIT_S at
        most when the run finished (each request is bounded by the library's own timeouts,
        MLFLOW_PATIENCE, but a slow server's backlog is not), FAILED_CLOSE_WAIT_S when it was stopped
        or failed (a scheduler's grace period is short, and a stop signal only sets a flag here);
        after a failure, the end of its run (not left RUNNING for good after a network blip) is
        waited for FAILED_CLOSE_WAIT_S at most."""
        self._call(_CLOSE, lambda: self.inner.close(status))
        self._calls.put(None)
        limit = CLOSE_WAIT_S if status == "FINISHED" else FAILED_CLOSE_WAIT_S
        complete = "" if status == "FAILED" else " (the run's files are complete)"
        began, said = time.monotonic(), False
        # A stop asked for before the close (the one that stopped the run) is what FAILED_CLOSE_WAIT_S is
        # for: it ended the wait at once, and the run's end, unsent, left it RUNNING on the server.
        stopped_before = stopping is not None and stopping()
        while self._sender.is_alive() and not self.broken and time.monotonic() - began < limit:
            if stopping is not None and not stopped_before and stopping():  # a stop during the wait: no more of it
                break
            self._sender.join(0.1)
            if not said and time.monotonic() - began > CLOSE_NOTE_AFTER_S:
                said = True  # not a silent minute after the run's last line
                self.warn(f"note: waiting for {self.name} to receive this run's last records{complete}")
        if self.broken:
            self._sender.join(FAILED_CLOSE_WAIT_S)
        elif self._sender.is_alive():
            # queued: the calls not yet made and the sentinel, which stands for the one being made
            waited = time.monotonic() - began
            self.warn(f"warning: stopped waiting for {self.name} after {waited:.0f} s, with {self._calls.qsize()} of "
                      "this run's calls unsent (its end among them)"
                      + ("" if status == "FAILED" else "; the run's own files have every record"))
        self._say()


MLFLOW_PATIENCE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""How long an MLflow request may wait for its server in a fastclr process (unless set): 2 retries
after 2 and 4 s, 30 s each, so a server that is down is one warning line within seconds."""


class _Mlflow:
    """MLflow through its client API (no global active run: a library must not take the
    caller's), on the tracking URI of MLFLOW_TRACKING_URI or MLflow's default."""

    def __init__(self, run_dir: Path, params: Mapping[str, Any], run_id: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # MLflow's own defaults (7 retries, waits doubling from 2 s, 120 s timeout) kept an
        # unreachable server silent for 4 min 14 s before its first error; the user's settings win.
        for key, value in MLFLOW_PATIENCE.items():
            os.environ.setdefault(key, value)
        self.client = MlflowClient()
        self.found_status: str | None = None
        """A continued run's status when it was found (`tracked` gives it back)."""
        if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # its tracebacks (a read-only store) ran to 200 lines;
            logging.getLogger("mlflow").setLevel(logging.CRITICAL)  # each failure is one warning line of ours
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "fastclr"  # set empty: the default, not an error
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run = self.client.create_run(exp_id, run_name=run_dir.name,
                                         tags={"fastclr.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            try:
                self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
                self.client.log_artifact(self.run_id, str(run_dir / "config.toml"))
            except Exception:
                # Not left RUNNING and unnamed (each start made another): the run goes on without it.
                self.client.set_terminated(self.run_id, status="FAILED")
                raise
        else:
            self.run_id = run_id
            self.found_status = str(self.client.get_run(run_id).info.status)
            self.client.update_run(run_id, status="RUNNING")
            # The run's config as it is now (a resume may change settings; MLflow's params stay as first logged)
            self.client.log_artifact(run_id, str(run_dir / "config.toml"))

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def results(self, values: Mapping[str, float], step: int) -> None:
        self.metrics(values, step)

    def artifact(self, path: Path, name: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=name)

    def close(self, status: str, stopping: Callable[[], bool] | None = None) -> None:
        self.client.set_terminated(self.run_id, status=status)


class _Wandb:
    """A W&B run of its own (wandb.init returns it; the module-level run is not relied on)."""

    def __init__(self, run_dir: Path, params: Mapping[str, Any], run_id: str | None) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastclr"), name=run_dir.name,
                              id=run_id, resume="allow" if run_id else None, config=dict(params),
                              dir=os.environ.get("WANDB_DIR") or str(run_dir), reinit="create_new",
                              settings=wandb.Settings(quiet=True))  # the run's own lines say the rest
        self.run_id = self.run.id
        self.last_step = -1

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        # W&B keeps one history row per step, merges a second log at the same step (the kNN monitor
        # logs at the step its epoch ended on) and drops a step lower than one it has seen.
        if step >= self.last_step:
            self.run.log(dict(values), step=step)
            self.last_step = step

    def results(self, values: Mapping[str, float], step: int) -> None:
        self.run.summary.update(dict(values))

    def artifact(self, path: Path, name: str) -> None:
        art = self.wandb.Artifact(f"{name}-{self.run_id}", type="model")
        art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self, status: str, stopping: Callable[[], bool] | None = None) -> None:
        if status != "FINISHED":
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
