"""TensorBoard events (written when tensorboard is installed): read back with tensorboard's own
event reader, they hold what metrics.jsonl holds, each (tag, step) once across a resume."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from fastclr.runs import MetricsLog, read_metrics
from fastclr.tracking import numbers

pytest.importorskip("tensorboard")


def tb_scalars(tb: Path) -> dict[tuple[str, int], list[float]]:
    """Every scalar of the event files in `tb`, by (tag, step): a value per time it was written."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    out: dict[tuple[str, int], list[float]] = {}
    for path in tb.glob("events.out.tfevents.*"):
        for raw in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(raw)
            for v in event.summary.value:
                out.setdefault((v.tag, event.step), []).append(v.simple_value)
    return out


def expected(run: Path) -> dict[tuple[str, int], list[float]]:
    """metrics.jsonl's finite numbers by (path, step), as the float32 TensorBoard stores."""
    return {(k, r["step"]): [float(np.float32(v))] for r in read_metrics(run)
            for k, v in numbers({k: v for k, v in r.items() if k != "step"}).items()}


def test_events_hold_every_record_once_across_a_resume(tmp_path: Path) -> None:
    """Killed after step 10, resumed from its checkpoint at 8: the resumed process replays 9 and 10,
    which the first one had written; the events hold each step once, with metrics.jsonl's values
    (nested results by their path, flags and NaN left out as for the trackers)."""
    def record(step: int) -> dict[str, object]:
        return {"step": step, "loss": 5.0 / step, "lr": 1e-3 * step, "skipped": False, "grad_norm": float("nan")}

    first = MetricsLog(tmp_path)
    for step in range(1, 11):
        first.log(record(step))
        if step == 5:
            first.log({"step": 5, "knn_acc": 0.625, "probe": {"linear": 0.75}})
    first.close()
    resumed = MetricsLog(tmp_path)
    resumed.keep_until(8)
    resumed.log({"step": 8, "knn_acc": 0.6875})  # the pass a stop at step 8 left undone: new
    for step in range(9, 13):
        resumed.log(record(step))
    resumed.close()
    got, want = tb_scalars(tmp_path / "tb"), expected(tmp_path)
    assert got == want
    assert {step for tag, step in got if tag == "loss"} == set(range(1, 13))
    assert got[("probe/linear", 5)] == [0.75] and got[("knn_acc", 8)] == [0.6875]


def test_a_broken_tensorboard_is_one_warning_and_the_metrics_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Installed but failing to start (a protobuf it cannot use, say): one warning line naming tb/
    and the fix, and metrics.jsonl still gets every record; not installed: nothing said, no tb/."""
    import torch.utils.tensorboard

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("Descriptors cannot be created directly.\nIf this call came from a _pb2.py file ...")

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", broken)
    log = MetricsLog(tmp_path / "a")
    (tmp_path / "a").mkdir()
    log.log({"step": 1, "loss": 2.0})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TypeError: Descriptors cannot be created directly." in err
    assert str(tmp_path / "a" / "tb") in err and "pip install --upgrade tensorboard protobuf to mend it, or pip uninstall tensorboard" in err
    assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [2.0]

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    (tmp_path / "b").mkdir()
    MetricsLog(tmp_path / "b").log({"step": 1, "loss": 2.0})
    assert capsys.readouterr().err == "" and not (tmp_path / "b" / "tb").exists()
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text())["loss"] == 2.0


def test_a_refused_resume_leaves_no_event_file(tmp_path: Path) -> None:
    """A resume refused before its first step (its metrics.jsonl damaged mid-file) wrote an empty
    event file into tb/ beside the run's own: TensorBoard listed it as one more, empty, run part."""
    from fastclr.errors import FastclrError
    from fastclr.pretraining import pretrain
    from tiny import tiny_config, tiny_dataset

    ds, run = tiny_dataset(), tmp_path / "run"
    assert pretrain(tiny_config(run, train__epochs=2.0), dataset=ds, stop=lambda step: step == 3, progress=False,
                    log=lambda s: None).stopped
    before = sorted(p.name for p in (run / "tb").iterdir())
    assert len(before) == 1
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join([lines[0], "{damaged\n", *lines[1:]]), encoding="utf-8")
    with pytest.raises(FastclrError, match="metrics.jsonl"):
        pretrain(tiny_config(run, train__epochs=2.0), dataset=ds, resume=run, progress=False,
                 log=lambda s: None)
    assert sorted(p.name for p in (run / "tb").iterdir()) == before
