"""`--log mlflow,wandb`: a tracked run holds what the run directory holds. MLflow is read back
through its client from a local SQLite store; W&B in offline mode is read back from the run file
it would sync (its records are W&B's own protobuf messages in a LevelDB-style log)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import call_main, cli_env
from dist_helpers import free_port
from fastclr import config as config_mod
from fastclr.config import read_toml
from fastclr.errors import FastclrError
from tiny import TINY_FLAGS

mlflow = pytest.importorskip("mlflow")
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")


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
    (shadow / "wandb.py").write_text("raise ImportError('not installed')\n")
    env = tracked_env(tmp_path)
    env["PYTHONPATH"] = f"{shadow}{os.pathsep}{env['PYTHONPATH']}"
    r = fastclr(env, tmp_path, *pretrain_args(tmp_path / "run", "--log", "wandb"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: --log wandb needs the wandb package: pip install "
                                                 "'fastclr[wandb]' (or drop --log)")
    assert not (tmp_path / "run").exists()


def test_an_unreachable_tracker_is_a_warning_and_the_run_completes(tmp_path: Path) -> None:
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


def test_a_failing_tracker_warns_once_and_is_then_left_alone() -> None:
    """A tracker whose library fails (a server down, a full quota) costs one warning line; it is
    not called again, so a long run does not repeat the warning, or wait on it, at every step."""
    from fastclr.tracking import _Guarded

    inner, warned = _Recorder(), []
    guarded = _Guarded(inner, "mlflow", warned.append)
    guarded.metrics({"loss": 1.0}, 1)
    inner.failing = True
    for step in (2, 3, 4):
        guarded.metrics({"loss": 1.0}, step)
    guarded.close("FINISHED")
    assert inner.calls == [("metrics", 1), ("metrics", 2)]
    assert len(warned) == 1
    assert warned[0].startswith("warning: mlflow failed to log metrics (ConnectionError: server gone)")


@pytest.mark.parametrize("fails", [False, True])
def test_tracked_runs_are_closed_finished_or_killed_as_the_block_ended(fails: bool, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`tracked` closes each tracker FINISHED when its block returns, KILLED when it raises (the
    error then passes on)."""
    import fastclr.tracking as tracking

    inner = _Recorder()
    monkeypatch.setattr(tracking, "open_trackers", lambda names, run_dir, params, warn: [inner])
    try:
        with tracking.tracked(("mlflow",), tmp_path, {}, warn=lambda s: None):
            if fails:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        assert fails
    assert inner.calls == [("close", "KILLED" if fails else "FINISHED")]
