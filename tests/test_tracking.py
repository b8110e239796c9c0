"""`--log mlflow,wandb`: a tracked run holds what the run directory holds. MLflow is read back
through its client from a local SQLite store; W&B in offline mode is read back from the run file
it would sync (its records are W&B's own protobuf messages in a LevelDB-style log)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from conftest import call_main, cli_env, installs
from dist_helpers import free_port
from fastclr import config as config_mod
from fastclr.config import read_toml
from fastclr.errors import FastclrError
from tiny import TINY_FLAGS

# The tests through the real packages skip where they are not installed; the adapters' own tests
# (stand-in modules, below) run everywhere.


def tracked_env(tmp_path: Path) -> dict[str, str]:
    """The CLI environment with MLflow on a SQLite file and W&B offline, both inside tmp_path."""
    env = cli_env(tmp_path)
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_DIR", None)
    return env


def fastclr(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastclr", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=240)


def pretrain_args(run: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", "mnist", "--epochs", "2", "--run-dir", str(run), *TINY_FLAGS, "--device", "cpu",
            *extra]


def wandb_records(run_file: Path) -> list[Any]:
    """The records of a W&B offline run file: a 7-byte header (':W&B', magic 0xBEE1, version 0),
    then LevelDB log records in 32 KiB blocks (crc32c, length, type: full, first, middle, last)."""
    wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data = run_file.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def of_kind(records: list[Any], kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list[Any], key: str) -> dict[int, float]:
    """W&B history rows: {_step: value of `key`}."""
    rows = {}
    for h in of_kind(records, "history"):
        row = {item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json) for item in h.item}
        if key in row:
            rows[int(row["_step"])] = row[key]
    return rows


def summary(records: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in of_kind(records, "summary"):
        for item in s.update:
            out["/".join(item.nested_key) if item.nested_key else item.key] = json.loads(item.value_json)
    return out


def expected_params(run: Path) -> dict[str, str]:
    """The run's config.toml as flat keys, as MLflow stores parameters (strings)."""
    cfg = config_mod.apply_overrides(config_mod.Config(), read_toml(run / "config.toml"))
    return {k: str(v) for k, v in config_mod.to_flat(cfg).items()}


def jsonl(run: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A tiny run with both trackers, then `fastclr evaluate` on it."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("tracked")
    env, run = tracked_env(tmp), tmp / "run"
    r = fastclr(env, tmp, *pretrain_args(run, "--log", "mlflow,wandb"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = call_main(["evaluate", str(run), "--protocols", "linear,knn"], env, tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, env


def test_mlflow_run_holds_config_metrics_results_and_the_encoder(tracked_run: tuple[Path, dict[str, str]],
                                                                 tmp_path: Path) -> None:
    run, env = tracked_run
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    ids = json.loads((run / "tracking.json").read_text())
    (found,) = client.search_runs([client.get_experiment_by_name("fastclr").experiment_id])
    assert found.info.run_id == ids["mlflow"] and found.info.status == "FINISHED"
    assert found.info.run_name == run.name
    assert found.data.params == expected_params(run)
    for key in ("loss", "lr", "top1", "knn_acc"):
        logged = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], key)}
        assert logged == jsonl(run, key), key
    probe = json.loads((run / "probe.json").read_text())
    assert found.data.metrics["probe/accuracy"] == probe["accuracy"]
    evaluation = json.loads((run / "eval.json").read_text())
    assert found.data.metrics["eval/protocols/knn/accuracy"] == evaluation["protocols"]["knn"]["accuracy"]
    got = Path(client.download_artifacts(ids["mlflow"], "encoder/encoder.safetensors", str(tmp_path)))
    assert got.read_bytes() == (run / "encoder.safetensors").read_bytes()
    got = Path(client.download_artifacts(ids["mlflow"], "config.toml", str(tmp_path)))
    assert got.read_text() == (run / "config.toml").read_text()


def test_wandb_offline_run_holds_config_metrics_results_and_the_encoder(
        tracked_run: tuple[Path, dict[str, str]]) -> None:
    run, _ = tracked_run
    run_id = json.loads((run / "tracking.json").read_text())["wandb"]
    files = sorted(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # pretrain, then evaluate continuing the same run id
    records = wandb_records(files[0])
    (start,) = of_kind(records, "run")
    config = {u.key: json.loads(u.value_json) for u in start.config.update if u.key != "_wandb"}
    assert {k: str(v) for k, v in config.items()} == expected_params(run)
    assert history(records, "loss") == pytest.approx(jsonl(run, "loss"), rel=1e-12)
    # the kNN monitor logs at the step of the window that ended its epoch: a second log at one step
    assert jsonl(run, "knn_acc") and history(records, "knn_acc") == pytest.approx(jsonl(run, "knn_acc"), rel=1e-12)
    assert summary(records)["probe/accuracy"] == json.loads((run / "probe.json").read_text())["accuracy"]
    (art,) = of_kind(records, "artifact")
    (entry,) = art.manifest.contents
    md5 = base64.b64encode(hashlib.md5((run / "encoder.safetensors").read_bytes()).digest()).decode()
    assert (art.type, art.name, entry.path, entry.digest) == ("model", f"encoder-{run_id}", "encoder.safetensors", md5)
    assert of_kind(records, "exit")[0].exit_code == 0
    later = wandb_records(files[1])
    evaluation = json.loads((run / "eval.json").read_text())
    assert summary(later)["eval/protocols/linear/accuracy"] == evaluation["protocols"]["linear"]["accuracy"]


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # as Python says of a package that is not there
    (shadow / "wandb.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n")
    env = tracked_env(tmp_path)
    env["PYTHONPATH"] = f"{shadow}{os.pathsep}{env['PYTHONPATH']}"
    r = fastclr(env, tmp_path, *pretrain_args(tmp_path / "run", "--log", "wandb"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # the packages pyproject.toml declares for the extra, for the Python that ran fastclr: `pip install
    # 'fastclr[wandb]'` failed wherever fastclr did not come from a package index (it is on none)
    last = r.stderr.strip().splitlines()[-1]
    command = re.fullmatch(r"error: --log wandb needs the wandb package: (.+) \(or --log none\)", last)
    assert command is not None and installs(command.group(1), "wandb"), last
    assert not (tmp_path / "run").exists()
    # installed but broken (a dependency it cannot import): "install it" got pip's "already satisfied", and the
    # import's own error was never shown
    (shadow / "wandb.py").write_text("raise ImportError('cannot import name Thing from protobuf')\n")
    r = fastclr(env, tmp_path, *pretrain_args(tmp_path / "run", "--log", "wandb"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "error: --log wandb needs the wandb package: it is installed but fails to import (ImportError: cannot import "
        "name Thing from protobuf); mend its install, e.g. "), r.stderr


def test_an_unreachable_tracker_is_a_warning_and_the_run_completes(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    env, run = tracked_env(tmp_path), tmp_path / "run"
    # fastclr's patience (MLFLOW_PATIENCE), not MLflow's defaults, which waited 4 min 14 s here
    env.update(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    env.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
    r = fastclr(env, tmp_path, *pretrain_args(run, "--log", "mlflow"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: mlflow could not start a run" in r.stdout + r.stderr
    assert (run / "encoder.safetensors").exists() and (run / "probe.json").exists()
    assert json.loads((run / "tracking.json").read_text()) == {}


@pytest.mark.parametrize("text", ['{"mlflow": "abc"', "[1, 2]", "\udcff"])
def test_a_damaged_tracking_json_is_a_one_line_error_naming_it(tmp_path: Path, text: str) -> None:
    from fastclr.tracking import TRACKING_FILE, read_ids

    (tmp_path / TRACKING_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(FastclrError, match=f"{TRACKING_FILE} is damaged .*; delete it"):
        read_ids(tmp_path)
    (tmp_path / TRACKING_FILE).write_text('{"mlflow": "abc"}')
    assert read_ids(tmp_path) == {"mlflow": "abc"}


def test_trackers_none_starts_nothing_and_writes_nothing(tmp_path: Path) -> None:
    """--log none (the default) names no tracker: none is started, no tracking.json is written;
    "mlflow,wandb" names both, in order."""
    from fastclr.tracking import TRACKING_FILE, open_trackers, tracker_names

    assert tracker_names("none") == () and tracker_names("mlflow,wandb") == ("mlflow", "wandb")
    assert open_trackers(tracker_names("none"), tmp_path, {}, warn=lambda s: None) == []
    assert not (tmp_path / TRACKING_FILE).exists()


def test_trackers_get_the_finite_numbers_of_a_record_by_their_path() -> None:
    """What a tracker is sent of a record: its finite numbers (integers as floats), nested ones
    keyed by their path; true/false, text and NaN are not numbers to plot."""
    from fastclr.tracking import numbers

    record = {"loss": 1.5, "skipped": True, "grad_norm": float("nan"), "images": 3, "note": "x",
              "protocols": {"linear": {"accuracy": 0.9, "converged": False}, "knn": {"acc": float("inf")}}}
    assert numbers(record) == {"loss": 1.5, "images": 3.0, "protocols/linear/accuracy": 0.9}
    assert all(type(v) is float for v in numbers(record).values())


class _Recorder:
    """A tracker that records what it is given, and fails every call once told to."""

    run_id = "r1"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.failing = False

    def _record(self, what: str, value: Any) -> None:
        self.calls.append((what, value))
        if self.failing:
            raise ConnectionError("server gone")

    def metrics(self, values: Any, step: int) -> None:
        self._record("metrics", step)

    def results(self, values: Any, step: int) -> None:
        self._record("results", step)

    def artifact(self, path: Path, name: str) -> None:
        self._record("artifact", name)

    def close(self, status: str) -> None:
        self._record("close", status)


class _Slow(_Recorder):
    """A tracker whose metrics calls each wait until `release` is set (a slow or hung server)."""

    def __init__(self, release: Any) -> None:
        super().__init__()
        self.release = release

    def metrics(self, values: Any, step: int) -> None:
        super().metrics(values, step)
        self.release.wait(30)


def test_a_failing_tracker_warns_once_and_is_then_left_alone() -> None:
    """A tracker whose library fails (a server down, a full quota) costs one warning line; it is
    not called again, so a long run does not repeat the warning, or wait on it, at every step,
    except to end its run (an MLflow run was left RUNNING for good after a blip), silently."""
    from fastclr.tracking import _Guarded

    class FailsFromStep2(_Recorder):
        def metrics(self, values: Any, step: int) -> None:
            self.failing = step >= 2
            super().metrics(values, step)

    inner, warned = FailsFromStep2(), []
    guarded = _Guarded(inner, "mlflow", warned.append)
    for step in (1, 2, 3, 4):
        guarded.metrics({"loss": 1.0}, step)
    guarded.close("FINISHED")
    assert inner.calls == [("metrics", 1), ("metrics", 2), ("close", "FINISHED")]
    assert len(warned) == 1
    assert warned[0].startswith("warning: mlflow failed to log metrics (ConnectionError: server gone)")


def test_a_failed_trackers_closing_does_not_hold_the_end_of_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracker that failed is still asked to end its run, but a server still down (MLflow retries
    for up to 96 s) is waited for FAILED_CLOSE_WAIT_S at most."""
    import threading
    import time

    import fastclr.tracking as tracking

    release = threading.Event()

    class Hanging(_Recorder):
        def metrics(self, values: Any, step: int) -> None:
            self.failing = True
            super().metrics(values, step)

        def close(self, status: str) -> None:
            self.failing = False
            super().close(status)
            release.wait(30)

    monkeypatch.setattr(tracking, "FAILED_CLOSE_WAIT_S", 0.2)
    inner = Hanging()
    guarded = tracking._Guarded(inner, "mlflow", lambda s: None)
    guarded.metrics({"loss": 1.0}, 1)
    t0 = time.perf_counter()
    guarded.close("FINISHED")
    waited = time.perf_counter() - t0
    release.set()
    assert 0.15 < waited < 5 and inner.calls[-1] == ("close", "FINISHED")


def test_a_tracker_that_hangs_does_not_hold_the_caller_and_gets_everything_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts a request and then does not answer held the training loop for as
    long as MLflow retried (about 96 s per call, counted against --time-budget). Calls return at
    once; the sender makes them in order; a healthy tracker's close waits until all are sent,
    and says so when that takes a while."""
    import threading

    import fastclr.tracking as tracking

    entered, release = threading.Event(), threading.Event()

    class Stalls(_Recorder):
        def metrics(self, values: Any, step: int) -> None:
            super().metrics(values, step)
            if step == 1:
                entered.set()
                release.wait(20)

    def said(line: str) -> None:
        assert threading.current_thread() is threading.main_thread()  # the caller's thread, as its other lines
        warned.append(line)
        release.set()  # the server answers once the wait is said

    monkeypatch.setattr(tracking, "CLOSE_NOTE_AFTER_S", 0.05)
    inner, warned = Stalls(), []
    guarded = tracking._Guarded(inner, "mlflow", said)
    guarded.metrics({"loss": 1.0}, 1)
    assert entered.wait(20)  # the first call is with the server now, and hangs there
    guarded.metrics({"loss": 0.5}, 2)
    guarded.results({"probe/accuracy": 0.9}, 2)
    guarded.artifact(Path("encoder.safetensors"), "encoder")
    assert not release.is_set() and inner.calls == [("metrics", 1)]  # all returned while the server hangs
    guarded.close("FINISHED")
    assert inner.calls == [("metrics", 1), ("metrics", 2), ("results", 2), ("artifact", "encoder"),
                           ("close", "FINISHED")]
    assert warned == ["note: waiting for mlflow to receive this run's last records (the run's files are complete)"]


@pytest.mark.parametrize("status", ["FINISHED", "KILLED", "FAILED"])
def test_the_end_of_a_run_waits_for_a_healthy_tracker_a_bounded_time(status: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow server that still answers builds a backlog: the end of the run waited for all of it,
    unbounded, also when a scheduler's SIGTERM had stopped the run (the stop only sets a flag
    then). A finished run waits CLOSE_WAIT_S, a stopped or failed one FAILED_CLOSE_WAIT_S, then says
    what was left unsent; the note does not call a failed run's files complete."""
    import threading
    import time

    import fastclr.tracking as tracking

    release = threading.Event()

    monkeypatch.setattr(tracking, "CLOSE_WAIT_S", 0.6)
    monkeypatch.setattr(tracking, "FAILED_CLOSE_WAIT_S", 0.3)
    monkeypatch.setattr(tracking, "CLOSE_NOTE_AFTER_S", 0.1)
    warned: list[str] = []
    guarded = tracking._Guarded(_Slow(release), "mlflow", warned.append)
    for step in (1, 2, 3):
        guarded.metrics({"loss": 1.0}, step)
    t0 = time.perf_counter()
    guarded.close(status)
    waited = time.perf_counter() - t0
    release.set()
    limit = 0.6 if status == "FINISHED" else 0.3
    assert limit <= waited < limit + 3
    complete = "" if status == "FAILED" else " (the run's files are complete)"
    every = "" if status == "FAILED" else "; the run's own files have every record"  # a failed run's may not
    assert len(warned) == 2 and warned[0] == f"note: waiting for mlflow to receive this run's last records{complete}"
    assert re.fullmatch(rf"warning: stopped waiting for mlflow after \d+ s, with 4 of this run's calls unsent \(its end "
                        rf"among them\){re.escape(every)}", warned[1])


def test_a_stop_asked_for_while_the_end_of_a_run_waits_for_a_tracker_ends_the_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C or a scheduler's SIGTERM while a finished run waited for a slow tracker only set the
    stop flag: the wait went on to its 120 s, past a scheduler's grace period."""
    import threading
    import time

    import fastclr.tracking as tracking

    release = threading.Event()

    monkeypatch.setattr(tracking, "CLOSE_NOTE_AFTER_S", 100.0)
    warned: list[str] = []
    guarded = tracking._Guarded(_Slow(release), "mlflow", warned.append)
    guarded.metrics({"loss": 1.0}, 1)
    asked = time.monotonic() + 0.3
    t0 = time.perf_counter()
    guarded.close("FINISHED", stopping=lambda: time.monotonic() > asked)
    waited = time.perf_counter() - t0
    release.set()
    assert 0.25 < waited < 3 and len(warned) == 1 and warned[0].startswith("warning: stopped waiting for mlflow after ")


def test_the_end_of_a_run_a_stop_ended_is_still_sent_within_its_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop that ended the run was already asked for when the end was sent: the wait ended at
    once, the process exited, and 3 of 5 runs stopped with SIGTERM stayed RUNNING in MLflow (a later
    `evaluate` then marked them FINISHED). A stop asked before the close no longer ends its wait."""
    import threading

    import fastclr.tracking as tracking

    gate = threading.Event()
    threading.Timer(0.3, gate.set).start()  # the backlog of a healthy server: cleared in 0.3 s
    inner = _Slow(gate)
    warned: list[str] = []
    guarded = tracking._Guarded(inner, "mlflow", warned.append)
    guarded.metrics({"loss": 1.0}, 1)
    guarded.close("KILLED", stopping=lambda: True)
    assert inner.calls[-1] == ("close", "KILLED") and warned == []


@pytest.mark.parametrize("fails", [False, True])
def test_tracked_runs_are_closed_finished_or_killed_as_the_block_ended(fails: bool, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`tracked` closes each tracker FINISHED when its block returns, KILLED when it raises (the
    error then passes on)."""
    import fastclr.tracking as tracking

    inner = _Recorder()
    monkeypatch.setattr(tracking, "open_trackers", lambda names, run_dir, params, warn, going_on: [inner])
    try:
        with tracking.tracked(("mlflow",), tmp_path, {}, warn=lambda s: None):
            if fails:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        assert fails
    assert inner.calls == [("close", "KILLED" if fails else "FINISHED")]


def stand_in_modules(monkeypatch: pytest.MonkeyPatch, **modules: dict[str, Any]) -> None:
    """Put modules made of `modules` ({dotted name: attributes}) in place of the real ones."""
    for name, attrs in modules.items():
        module = ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def mlflow_server(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """MLflow's client API (the calls fastclr makes) over an in-memory server, read back by the
    tests: {"experiments": {name: id}, "runs": {id: run}, "refuse": whether log_batch raises}."""
    from collections import namedtuple

    server: dict[str, Any] = {"experiments": {}, "runs": {}, "refuse": False, "answer": threading.Event()}
    server["answer"].set()

    class Client:
        def get_experiment_by_name(self, name: str) -> Any:
            server["answer"].wait()  # cleared: a server that takes the connection and does not answer
            found = server["experiments"].get(name)
            return None if found is None else SimpleNamespace(experiment_id=found)

        def create_experiment(self, name: str) -> str:
            if name in server["experiments"]:  # as MLflow refuses a second experiment of one name
                raise ValueError(f"experiment {name!r} already exists")
            server["experiments"][name] = str(len(server["experiments"]))
            return server["experiments"][name]

        def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> Any:
            run_id = f"run{len(server['runs'])}"
            server["runs"][run_id] = {"experiment": experiment_id, "name": run_name, "tags": tags, "status": "RUNNING",
                                      "params": {}, "metrics": [], "artifacts": []}
            return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

        def log_batch(self, run_id: str, metrics: Any = (), params: Any = ()) -> None:
            if server["refuse"]:
                raise ConnectionError("server gone")
            server["runs"][run_id]["params"].update({p.key: p.value for p in params})
            server["runs"][run_id]["metrics"] += [(m.key, m.value, m.step) for m in metrics]

        def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
            server["runs"][run_id]["artifacts"].append((artifact_path, Path(local_path).name))

        def set_terminated(self, run_id: str, status: str) -> None:
            server["runs"][run_id]["status"] = status

        def update_run(self, run_id: str, status: str) -> None:
            server["runs"][run_id]["status"] = status

        def get_run(self, run_id: str) -> Any:
            return SimpleNamespace(info=SimpleNamespace(status=server["runs"][run_id]["status"]))

    stand_in_modules(monkeypatch, mlflow={}, **{"mlflow.tracking": {"MlflowClient": Client}, "mlflow.entities": {
        "Param": namedtuple("Param", "key value"), "Metric": namedtuple("Metric", "key value timestamp step")}})
    for key in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)  # unset now, and unset again afterwards whatever the tracker sets
    return server


def test_an_mlflow_run_gets_params_metrics_by_step_and_files_and_is_continued_by_its_id(
        mlflow_server: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new run: in the experiment MLFLOW_EXPERIMENT_NAME names (made once, then joined by later
    runs), named after the run directory, with every parameter as text and config.toml; metrics at
    the step given; files under the name given. The run's id is kept in tracking.json: a second
    start continues that run, running again, and closes it with the status given. The user's own
    MLflow request settings win over fastclr's patience."""
    from fastclr.tracking import MLFLOW_PATIENCE, open_trackers

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    run, other = tmp_path / "run", tmp_path / "other"
    for d in (run, other):
        d.mkdir()
        (d / "config.toml").write_text("[train]\n", encoding="utf-8")
    (t,) = open_trackers(("mlflow",), run, {"train.lr": 0.5, "data.name": "mnist"}, warn=pytest.fail)
    t.metrics({"loss": 2.5, "lr": 0.1}, 7)
    t.results({"probe/accuracy": 0.75}, 9)
    t.artifact(run / "config.toml", "encoder")
    t.close("KILLED")
    first = mlflow_server["runs"]["run0"]
    assert json.loads((run / "tracking.json").read_text()) == {"mlflow": "run0"}
    assert (first["experiment"], first["name"], first["status"]) == ("0", "run", "KILLED")
    assert first["params"] == {"train.lr": "0.5", "data.name": "mnist"}
    assert first["metrics"] == [("loss", 2.5, 7), ("lr", 0.1, 7), ("probe/accuracy", 0.75, 9)]
    assert first["artifacts"] == [(None, "config.toml"), ("encoder", "config.toml")]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == MLFLOW_PATIENCE["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    (again,) = open_trackers(("mlflow",), run, {}, warn=pytest.fail)
    assert again.run_id == "run0" and first["status"] == "RUNNING" and len(mlflow_server["runs"]) == 1
    again.close("FINISHED")
    open_trackers(("mlflow",), other, {}, warn=pytest.fail)
    assert mlflow_server["experiments"] == {"mine": "0"} and mlflow_server["runs"]["run1"]["experiment"] == "0"
    assert first["status"] == "FINISHED"


def test_an_mlflow_run_that_cannot_be_filled_at_its_start_is_closed_failed(
        mlflow_server: dict[str, Any], tmp_path: Path) -> None:
    """A run made but refused its parameters is not left RUNNING (each start made another): it is
    closed FAILED, the start is one warning, and no id is kept for a later start to continue."""
    from fastclr.tracking import open_trackers

    (tmp_path / "config.toml").write_text("[train]\n", encoding="utf-8")
    mlflow_server["refuse"] = True
    warned: list[str] = []
    assert open_trackers(("mlflow",), tmp_path, {"train.lr": 0.5}, warn=warned.append) == []
    assert [r["status"] for r in mlflow_server["runs"].values()] == ["FAILED"]
    assert len(warned) == 1 and warned[0].startswith("warning: mlflow could not start a run (ConnectionError: server gone)")
    assert json.loads((tmp_path / "tracking.json").read_text()) == {}


def test_an_mlflow_server_that_does_not_answer_is_left_after_a_bounded_wait_and_its_run_closed(
        mlflow_server: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that takes the connection and never answers held the run's start for 96 s in silence
    (three 30-s tries, then the backoff) before training began: the start says it waits, gives up at
    OPEN_WAIT_S with one warning and trains; a run the server makes after that is closed FAILED, not
    left RUNNING, and no id is kept for a resume to continue."""
    import fastclr.tracking as tracking

    monkeypatch.setattr(tracking, "OPEN_WAIT_S", 1.5)
    monkeypatch.setattr(tracking, "OPEN_NOTE_AFTER_S", 0.3)
    (tmp_path / "config.toml").write_text("[train]\n", encoding="utf-8")
    mlflow_server["answer"].clear()
    warned: list[str] = []
    began = time.monotonic()
    assert tracking.open_trackers(("mlflow",), tmp_path, {"train.lr": 0.5}, warn=warned.append) == []
    assert 1.4 < time.monotonic() - began < 5
    assert warned[0] == "note: waiting for mlflow to open this run's record (at most 2 s)"
    assert len(warned) == 2 and warned[1].startswith("warning: mlflow could not start a run (TimeoutError: no answer "
                                                     "within 2 s); training goes on without it")
    assert json.loads((tmp_path / "tracking.json").read_text()) == {}
    mlflow_server["answer"].set()  # the server answers at last: the run it makes is ended
    end = time.monotonic() + 10
    while [r["status"] for r in mlflow_server["runs"].values()] != ["FAILED"] and time.monotonic() < end:
        time.sleep(0.02)
    assert [r["status"] for r in mlflow_server["runs"].values()] == ["FAILED"]
    # `evaluate` opens its trackers once eval.json is written: the evaluation does not "go on" without them
    mlflow_server["answer"].clear()
    warned.clear()
    with tracking.tracked(("mlflow",), tmp_path, {}, warn=warned.append) as sinks:
        assert sinks == []
    assert warned[1] == ("warning: mlflow could not start a run (TimeoutError: no answer within 2 s); the "
                         "evaluation's results are in the run directory alone")
    mlflow_server["answer"].set()
    while len(mlflow_server["runs"]) < 2 and time.monotonic() < end + 10:
        time.sleep(0.02)
    # a server that answers in time: no note, no warning
    warned.clear()
    (t,) = tracking.open_trackers(("mlflow",), tmp_path, {}, warn=warned.append)
    assert warned == [] and json.loads((tmp_path / "tracking.json").read_text()) == {"mlflow": t.run_id}
    t.close("FINISHED")


def test_a_saved_mlflow_run_the_server_no_longer_has_is_a_warning_naming_the_fix(
        mlflow_server: dict[str, Any], tmp_path: Path) -> None:
    """tracking.json names a run deleted on the server (or made against another ./mlruns): each
    resume failed to continue it with a warning that did not say how to start afresh."""
    from fastclr.tracking import open_trackers

    (tmp_path / "config.toml").write_text("[train]\n", encoding="utf-8")
    (tmp_path / "tracking.json").write_text(json.dumps({"mlflow": "gone"}))
    warned: list[str] = []
    assert open_trackers(("mlflow",), tmp_path, {}, warn=warned.append) == []
    assert len(warned) == 1 and warned[0].startswith("warning: mlflow could not continue a run (KeyError: ")
    assert warned[0].endswith(f"; if its run gone is gone from the server, delete {tmp_path / 'tracking.json'} and "
                              "a new one is started")
    (tmp_path / "tracking.json").unlink()
    (t,) = open_trackers(("mlflow",), tmp_path, {}, warn=pytest.fail)
    assert t.run_id in mlflow_server["runs"]


@pytest.fixture
def wandb_runs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """wandb's init, Settings and Artifact (the calls fastclr makes): each init's arguments and the
    run it returns, which records its log calls, summary, artifacts and how it finished."""
    runs: list[Any] = []

    def init(**kw: Any) -> Any:
        run = SimpleNamespace(init=kw, id=kw["id"] or f"new{len(runs)}", logged=[], summary={}, artifacts=[],
                              ended=[])
        run.log = lambda values, step: run.logged.append((step, values))
        run.log_artifact = run.artifacts.append
        run.mark_preempting = lambda: run.ended.append("preempting")
        run.finish = lambda exit_code: run.ended.append(exit_code)
        runs.append(run)
        return run

    def artifact(name: str, type: str) -> Any:
        art = SimpleNamespace(name=name, type=type, files=[])
        art.add_file = art.files.append
        return art

    stand_in_modules(monkeypatch, wandb={"init": init, "Settings": SimpleNamespace, "Artifact": artifact})
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return runs


def test_a_wandb_run_gets_no_step_below_one_it_has_and_is_continued_by_its_id(
        wandb_runs: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B keeps one history row per step: a second log at a step is passed on (merged into its
    row), one at a lower step is not (W&B would drop it with a warning). Results go to the run's
    summary, the encoder is a model artifact named after the run. A second start passes the kept
    id with resume allowed; W&B's files go to WANDB_DIR when set, else into the run directory; a
    run closed KILLED is marked preempted and finishes with exit code 1."""
    from fastclr.tracking import open_trackers

    (t,) = open_trackers(("wandb",), tmp_path, {"train.lr": 0.5}, warn=pytest.fail)
    for step, loss in ((1, 3.0), (2, 2.0), (2, 1.5), (1, 9.0), (3, 1.0)):
        t.metrics({"loss": loss}, step)
    t.results({"probe/accuracy": 0.75}, 3)
    t.artifact(tmp_path / "encoder.safetensors", "encoder")
    t.close("FINISHED")
    first = wandb_runs[0]
    assert first.logged == [(1, {"loss": 3.0}), (2, {"loss": 2.0}), (2, {"loss": 1.5}), (3, {"loss": 1.0})]
    assert first.summary == {"probe/accuracy": 0.75} and first.ended == [0]
    (art,) = first.artifacts
    assert (art.name, art.type, art.files) == ("encoder-new0", "model", [str(tmp_path / "encoder.safetensors")])
    assert {k: first.init[k] for k in ("project", "name", "id", "resume", "config", "dir")} == {
        "project": "fastclr", "name": tmp_path.name, "id": None, "resume": None, "config": {"train.lr": 0.5},
        "dir": str(tmp_path)}
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    (again,) = open_trackers(("wandb",), tmp_path, {}, warn=pytest.fail)
    assert (wandb_runs[1].init["id"], wandb_runs[1].init["resume"], wandb_runs[1].init["dir"]) == (
        "new0", "allow", str(tmp_path / "elsewhere"))
    again.close("KILLED")
    assert wandb_runs[1].ended == ["preempting", 1]


def test_a_runs_tensorboard_events_hold_its_metrics_jsonl(tracked_run: tuple[Path, dict[str, str]]) -> None:
    """The events `fastclr pretrain` writes to RUN/tb, read back with tensorboard's own reader:
    metrics.jsonl's numbers at their steps, each step's loss once (an epoch's end writes its epoch
    again beside its kNN monitor pass, with the same value)."""
    pytest.importorskip("tensorboard")
    from test_tensorboard import expected, tb_scalars

    run, _ = tracked_run
    got = tb_scalars(run / "tb")
    assert {k: set(v) for k, v in got.items()} == {k: set(v) for k, v in expected(run).items()}
    losses = {step: v for (tag, step), v in got.items() if tag == "loss"}
    assert len(losses) == len(jsonl(run, "loss")) > 1 and all(len(v) == 1 for v in losses.values())


def test_a_new_run_where_a_first_attempt_died_is_tracked_afresh_and_a_resume_files_its_config_again(
        mlflow_server: dict[str, Any], tmp_path: Path) -> None:
    """A first attempt killed before its first checkpoint left config.toml, tracking.json and
    TensorBoard events: the new run started in that directory continued the dead attempt's tracked
    run (its parameters, its steps) and TensorBoard showed both. Now it is a run of its own. A
    resume files config.toml again (MLflow's parameters stay as first logged); a resume given a
    damaged tracking.json is refused before config.toml records settings nothing trained with."""
    from fastclr.pretraining import pretrain
    from fastclr.runs import write_config
    from tiny import tiny_config, tiny_dataset

    ds, run = tiny_dataset(), tmp_path / "run"
    run.mkdir()
    write_config(run, tiny_config(run, optim__lr=0.5))
    mlflow_server["runs"]["run0"] = {"status": "KILLED", "params": {"optim.lr": "0.5"}, "metrics": [("loss", 9.0, 10)],
                                     "artifacts": []}
    (run / "tracking.json").write_text('{"mlflow": "run0"}')
    (run / "tb").mkdir()
    (run / "tb" / "events.out.tfevents.1.dead").write_bytes(b"")
    assert pretrain(tiny_config(run, train__trackers="mlflow", train__epochs=2.0), dataset=ds,
                    stop=lambda step: step == 3, progress=False, log=lambda s: None).stopped
    assert json.loads((run / "tracking.json").read_text()) == {"mlflow": "run1"}
    assert mlflow_server["runs"]["run0"]["metrics"] == [("loss", 9.0, 10)] and mlflow_server["runs"]["run1"]["metrics"]
    assert not (run / "tb" / "events.out.tfevents.1.dead").exists()
    before = (run / "config.toml").read_bytes()
    (run / "tracking.json").write_text("{damaged")
    with pytest.raises(FastclrError, match="tracking.json is damaged"):
        pretrain(tiny_config(run, train__trackers="mlflow", train__epochs=2.0, optim__lr=0.02), dataset=ds, resume=run,
                 progress=False, log=lambda s: None)
    assert (run / "config.toml").read_bytes() == before
    (run / "tracking.json").write_text('{"mlflow": "run1"}')
    pretrain(tiny_config(run, train__trackers="mlflow", train__epochs=2.0, optim__lr=0.02), dataset=ds, resume=run,
             progress=False, log=lambda s: None)
    assert mlflow_server["runs"]["run1"]["artifacts"].count((None, "config.toml")) == 2  # at its start, at the resume
    assert "lr = 0.02" in (run / "config.toml").read_text()


def test_a_tracked_run_a_resume_starts_gets_the_records_kept_before_its_checkpoint(
        mlflow_server: dict[str, Any], tmp_path: Path) -> None:
    """A tracker down at the start and up at the resume, or a tracking.json deleted between them: the
    new tracked run began at the checkpoint's step, every step before it missing without a word."""
    from fastclr.pretraining import pretrain
    from fastclr.runs import read_metrics
    from tiny import tiny_config, tiny_dataset

    ds, run = tiny_dataset(), tmp_path / "run"
    assert pretrain(tiny_config(run, train__epochs=2.0), dataset=ds, stop=lambda step: step == 4, progress=False,
                    log=lambda s: None).stopped  # no tracker reached
    pretrain(tiny_config(run, train__trackers="mlflow", train__epochs=2.0), dataset=ds, resume=run, progress=False,
             log=lambda s: None)
    (tracked,) = mlflow_server["runs"].values()
    losses = [step for key, _, step in tracked["metrics"] if key == "loss"]
    assert losses == [r["step"] for r in read_metrics(run) if "loss" in r] and losses[0] <= 4


@pytest.mark.parametrize("finished", [False, True])
def test_an_evaluation_is_filed_at_the_step_of_the_weights_it_measured(mlflow_server: dict[str, Any], tmp_path: Path,
                                                                     finished: bool) -> None:
    """`evaluate` filed its results at probe.json's step, and at step 0 without one: a stopped run
    (measured on its checkpoint of step 3) and a finished run trained with --probe false (12 steps)."""
    from fastclr.evaluation.run import EvaluateOptions, evaluate
    from fastclr.pretraining import pretrain
    from tiny import tiny_config, tiny_dataset

    ds, run = tiny_dataset(), tmp_path / "run"
    pretrain(tiny_config(run, train__trackers="mlflow", train__epochs=2.0), dataset=ds,
             stop=None if finished else (lambda step: step == 3), progress=False, log=lambda s: None)
    assert not (run / "probe.json").exists()  # tiny_config trains with the probe off
    evaluate(run, EvaluateOptions(protocols=("knn",), device="cpu"), dataset=ds, log=lambda s: None)
    filed = {step for key, _, step in mlflow_server["runs"]["run0"]["metrics"] if key.startswith("eval/")}
    assert filed == {12 if finished else 3}
    # and the run is left as it was found: filing an evaluation does not finish a stopped run
    assert mlflow_server["runs"]["run0"]["status"] == ("FINISHED" if finished else "KILLED")




def test_the_hint_from_a_source_folder_never_installed_is_a_command_a_shell_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fastclr's metadata (run from a folder, never installed) the hint ended "in fastclr's folder":
    pasted, the apostrophe was a shell syntax error. It is `cd FOLDER && PYTHON -m pip install -e '.[X]'`."""
    import importlib.metadata
    import shlex

    from conftest import REPO
    from fastclr.extras import install_command

    def none(name: str) -> list[str]:
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "requires", none)
    assert shlex.split(install_command("mlflow")) == ["cd", str(REPO), "&&", sys.executable, "-m", "pip", "install",
                                                      "-e", ".[mlflow]"]


def test_a_trackers_message_is_quoted_on_one_line_with_its_remedy(tmp_path: Path) -> None:
    """MLflow's read-only store error ran on for lines of SQL (a warning of three lines), and the cut
    at 200 characters hid the remedy its file-store error ends with; an empty run id in
    tracking.json named no run ('if its run  is gone')."""
    from fastclr.tracking import _one_line, read_ids

    sql = Exception("(sqlite3.OperationalError) attempt to write a readonly database\n[SQL: INSERT INTO metrics]\n"
                    "(Background on this error at: https://sqlalche.me/e/20/e3q8)")
    assert _one_line(sql) == ("(sqlite3.OperationalError) attempt to write a readonly database [SQL: INSERT INTO "
                              "metrics] (Background on this error at: https://sqlalche.me/e/20/e3q8)")
    remedy = Exception("The filesystem tracking backend is in maintenance mode " + "and more words " * 12 +
                       "; set MLFLOW_ALLOW_FILE_STORE=true to use it")
    assert _one_line(remedy).endswith("set MLFLOW_ALLOW_FILE_STORE=true to use it")
    long = _one_line(Exception("word " * 200))
    assert long.endswith(" ...") and len(long) <= 404 and "\n" not in long
    (tmp_path / "tracking.json").write_text('{"mlflow": "", "wandb": "abc"}', encoding="utf-8")
    assert read_ids(tmp_path) == {"wandb": "abc"}


def test_trackers_may_be_named_in_either_order() -> None:
    from fastclr.config import apply_overrides, Config
    from fastclr.tracking import tracker_names

    cfg = apply_overrides(Config(), {"train.trackers": "wandb,mlflow"})
    assert tracker_names(cfg.train.trackers) == ("wandb", "mlflow")
