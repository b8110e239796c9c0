"""What a run directory keeps around its weights across stops, crashes and failed starts: the
lock, the fp16 skip guard, the kNN record of an epoch end, unreadable checkpoints, temporaries,
the metrics log and what the trackers were sent."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fastclr.checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint
from fastclr.errors import FastclrError
from fastclr.pretraining.loop import pretrain
from fastclr.runs import MetricsLog, prepare_run_dir, read_metrics
from tiny import tiny_config, tiny_dataset

QUIET: dict[str, Any] = dict(progress=False, log=lambda s: None)


def test_a_start_that_fails_after_taking_the_lock_gives_it_back(tmp_path: Path) -> None:
    """A resume that failed on a damaged metrics.jsonl (or tracking.json) kept the run's lock for
    the rest of the process: mending the file, as the message said, and resuming again in the same
    Python (a notebook) was refused as "being written by" this very process."""
    ds, run = tiny_dataset(), tmp_path / "run"
    first = pretrain(tiny_config(run, train__epochs=1.0), dataset=ds, **QUIET)
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("{ damaged\n" + good)
    with pytest.raises(FastclrError, match="metrics.jsonl record 1 is not JSON"):
        pretrain(tiny_config(run, train__epochs=2.0), dataset=ds, resume=run, **QUIET)
    (run / "metrics.jsonl").write_text(good)
    res = pretrain(tiny_config(run, train__epochs=2.0), dataset=ds, resume=run, **QUIET)
    assert res.steps == 2 * first.steps


def test_an_epoch_ends_monitor_pass_is_run_by_the_resume_when_a_stop_skipped_it(tmp_path: Path) -> None:
    """Stopped at the end of epoch 1 (its checkpoint written, its kNN pass not), the resumed run
    never measured epoch 1: the straight run's records are at steps 6 and 12, the resumed one's at 12."""
    ds = tiny_dataset()

    def knn_steps(run: Path, stop: Callable[[int], bool] | None) -> list[int]:
        cfg = tiny_config(run, train__epochs=2.0, eval__monitor_every=1, eval__monitor_share=1.0)
        pretrain(cfg, dataset=ds, stop=stop, **QUIET)
        if stop is not None:
            pretrain(cfg, dataset=ds, resume=run, **QUIET)
        return [r["step"] for r in read_metrics(run) if "knn_acc" in r]

    assert knn_steps(tmp_path / "a", None) == knn_steps(tmp_path / "b", lambda step: step == 6) == [6, 12]


def test_the_fp16_skip_guard_counts_across_a_resume(tmp_path: Path) -> None:
    """The streak of skipped fp16 updates was not in the checkpoint: a run whose every update
    overflows ended at step 30 straight, but ran to its end when stopped every 20 steps."""
    from fastclr.pretraining.metrics import MAX_SKIP_STREAK, Health

    health = Health(torch.device("cpu"))
    health.skip_streak.fill_(MAX_SKIP_STREAK - 1)  # as restored from a checkpoint
    out = type("Out", (), {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(float("inf")),
                           "skipped": torch.tensor(1.0)})()
    health.update(out, 41)  # type: ignore[arg-type]
    assert int(health.first_bad) == 42  # the streak's 30th skip, counted from before the resume
    ds, run = tiny_dataset(), tmp_path / "run"
    pretrain(tiny_config(run, train__epochs=1.0), dataset=ds, **QUIET)
    saved = load_checkpoint(list_checkpoints(run)[-1])
    assert saved["skip_streak"] == 0


def test_a_finished_run_trained_on_gives_up_its_export_until_it_ends(tmp_path: Path) -> None:
    """A finished run (exported at step 6) resumed for another epoch and stopped at step 9:
    `evaluate`, `embed` and `neighbours` (`load_run`) read the step-6 export over step 9's checkpoint."""
    from fastclr.export import ENCODER_FILE
    from fastclr.pretrained import load_run

    ds, run = tiny_dataset(), tmp_path / "run"  # 6 steps an epoch
    pretrain(tiny_config(run, train__epochs=1.0), dataset=ds, **QUIET)
    assert (run / ENCODER_FILE).exists()
    lines: list[str] = []
    res = pretrain(tiny_config(run, train__epochs=2.0), resume=run, dataset=ds, progress=False, log=lines.append,
                   stop=lambda step: step == 9)
    assert res.stopped and not (run / ENCODER_FILE).exists()
    assert any(line.startswith(f"{ENCODER_FILE} removed: it held step 6") for line in lines), lines
    newest = load_checkpoint(list_checkpoints(run)[-1])
    assert newest["step"] == 9
    for k, v in load_run(run, log=lambda s: None).encoder.state_dict().items():
        assert torch.equal(v, newest["encoder"][k]), k
    pretrain(tiny_config(run, train__epochs=2.0), resume=run, dataset=ds, **QUIET)
    assert (run / ENCODER_FILE).exists()  # written again at the end
    pretrain(tiny_config(run, train__epochs=2.0), resume=run, dataset=ds, **QUIET)  # nothing to train: kept
    assert (run / ENCODER_FILE).exists()
    # The newest checkpoint damaged, the resume falls back to step 9: the export holds step 12's
    # weights, their only intact copy, and stays.
    final = (run / ENCODER_FILE).read_bytes()
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    res = pretrain(tiny_config(run, train__epochs=3.0), resume=run, dataset=ds, progress=False, log=lambda s: None,
                   stop=lambda step: step == 10)
    assert res.stopped and (run / ENCODER_FILE).read_bytes() == final


def test_a_run_kept_as_its_export_and_config_alone_loads_from_its_export(tmp_path: Path) -> None:
    """A finished run whose checkpoints were deleted to free space (encoder.safetensors and
    config.toml kept) loads from its export: the exported weights, no checkpoint step, no note."""
    from fastclr.export import ENCODER_FILE, load_encoder
    from fastclr.pretrained import load_run

    ds, run = tiny_dataset(), tmp_path / "run"
    pretrain(tiny_config(run, train__epochs=1.0), dataset=ds, **QUIET)
    for p in list_checkpoints(run):
        p.unlink()
    notes: list[str] = []
    loaded = load_run(run, log=notes.append)
    exported = load_encoder(run / ENCODER_FILE)[0].state_dict()
    assert loaded.checkpoint_step is None and notes == []
    assert loaded.encoder.state_dict().keys() == exported.keys()
    assert all(torch.equal(v, exported[k]) for k, v in loaded.encoder.state_dict().items())


def test_a_damaged_export_gives_way_to_the_checkpoints_and_without_them_says_what_can_be_done(tmp_path: Path) -> None:
    """A run whose encoder.safetensors was cut short: every command was refused with "export it
    again", which none can do (export read the same file and will not write over a run's own). The
    newest checkpoint (the trained weights, bit for bit) is used with a note; where the
    checkpoints were deleted too, the error says to train again."""
    from fastclr.export import ENCODER_FILE
    from fastclr.pretrained import load_run

    ds, run = tiny_dataset(), tmp_path / "run"
    pretrain(tiny_config(run, train__epochs=1.0), dataset=ds, **QUIET)
    trained = load_run(run, log=lambda s: None).encoder.state_dict()
    export = run / ENCODER_FILE
    with open(export, "r+b") as f:
        f.truncate(1000)
    notes: list[str] = []
    loaded = load_run(run, log=notes.append)
    assert loaded.checkpoint_step == 6 and all(torch.equal(v, trained[k]) for k, v in loaded.encoder.state_dict().items())
    assert notes[0].startswith(f"note: {export} is not a readable safetensors encoder (") and notes[0].endswith(
        ") (delete it, and the run's checkpoints are used without this note)")
    assert notes[1:] == [f"note: {run} has no readable {ENCODER_FILE}: using its newest checkpoint, step 6"]
    # damaged metadata: the path once, no "export it again" (the note read "X X's fastclr metadata ...")
    from safetensors.torch import load_file, save_file

    pretrain(tiny_config(tmp_path / "meta", train__epochs=1.0), dataset=ds, **QUIET)
    other = tmp_path / "meta" / ENCODER_FILE
    save_file(load_file(str(other)), str(other), metadata={"fastclr": "{not json"})
    notes.clear()
    load_run(tmp_path / "meta", log=notes.append)
    assert notes[0] == (f"note: {other} has fastclr metadata that is damaged or from a version this one cannot read "
                        "(JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)) "
                        "(delete it, and the run's checkpoints are used without this note)")
    for p in list_checkpoints(run):
        p.unlink()
    with pytest.raises(FastclrError, match=rf"^{re.escape(str(export))} is not a readable safetensors encoder \(.*\), "
                                           rf"and {re.escape(str(run))} keeps no checkpoint to use instead; train it "
                                           rf"again: fastclr pretrain --config {re.escape(str(run / 'config.toml'))} "
                                           r"--run-dir NEW$"):
        load_run(run, log=lambda s: None)


def test_an_export_whose_weights_changed_on_disk_is_refused_and_the_checkpoints_used(tmp_path: Path) -> None:
    """One exponent bit flipped in one weight of encoder.safetensors: the file still parses, and it
    loaded and gave wrong h with exit 0. Its record's checksum (transcribed here: SHA-256 over the
    sorted names, each name, dtype and shape, then the bytes) refuses it, as `load_encoder` and as
    `--init`; a run falls back to its checkpoint, the trained weights bit for bit. An export written
    before the checksum existed (no key) loads as before, and the checksum of one file's weights is
    not carried into the spec other weights are saved with."""
    import struct

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import hashlib

    from fastclr.export import ENCODER_FILE, UnreadableExport, load_encoder
    from fastclr.models.foreign import read_init
    from fastclr.pretrained import load_run

    run = tmp_path / "run"
    pretrain(tiny_config(run, train__epochs=1.0), dataset=tiny_dataset(), **QUIET)
    export = run / ENCODER_FILE
    trained = {k: v.clone() for k, v in load_file(str(export)).items()}  # (load_file maps the file: not after the flip)
    with safe_open(str(export), framework="pt") as f:
        meta = f.metadata()
    digest = hashlib.sha256()
    for name in sorted(trained):
        t = trained[name]
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode() + t.numpy().tobytes())
    assert json.loads(meta["fastclr"])["weights_sha256"] == digest.hexdigest()
    assert "weights_sha256" not in load_encoder(export)[1].to_dict()
    data = bytearray(export.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # the tensors' bytes follow the header
    data[start + 3] ^= 0x01  # one bit of the first tensor's bytes: the same size, still a safetensors file
    export.write_bytes(bytes(data))
    with pytest.raises(UnreadableExport, match=re.escape(f"{export} is damaged: its weights differ from the checksum "
                                                         "written with them; export it again from its run")):
        load_encoder(export)
    with pytest.raises(FastclrError, match=re.escape(f"init weights {export} are damaged: their weights differ from "
                                                     "the checksum written with them")):
        read_init(export, load_run(run, log=lambda s: None).encoder)
    notes: list[str] = []
    loaded = load_run(run, log=notes.append)
    assert loaded.checkpoint_step == 6 and notes[0].startswith(f"note: {export} is damaged: its weights differ")
    assert all(torch.equal(v, trained[k]) for k, v in loaded.encoder.state_dict().items())
    older = json.loads(meta["fastclr"])
    del older["weights_sha256"]
    save_file(trained, str(export), metadata={"fastclr": json.dumps(older)})
    assert all(torch.equal(v, trained[k]) for k, v in load_encoder(export)[0].state_dict().items())


def test_a_weights_file_of_another_run_put_in_a_runs_place_is_refused(tmp_path: Path) -> None:
    """Another run's encoder.safetensors (or checkpoints) copied into a run directory loaded, and
    `embed` or `export` computed that network's h under this run's name with exit 0. The record of
    the network (export metadata, checkpoint model_info) is held against config.toml: width,
    encoder (auto resolved at the record's side), the stage spec parsed, so a spelling that builds
    the same network passes."""
    import shutil

    from fastclr.export import ENCODER_FILE
    from fastclr.pretrained import load_run

    ds = tiny_dataset()
    for name, over in (("mine", {}), ("wider", {"model__width": 0.25}), ("stages", {"model__cnn_stages": "8|16|fc32"})):
        pretrain(tiny_config(tmp_path / name, train__epochs=1.0, **over), dataset=ds, **QUIET)
    mine = tmp_path / "mine"
    for other, said in (("wider", "width 0.25, not 0.125"), ("stages", "stages 8|16|fc32, not 32,32,32p|256p|fc512")):
        run = tmp_path / f"copy-{other}"
        shutil.copytree(mine, run)
        shutil.copy(tmp_path / other / ENCODER_FILE, run / ENCODER_FILE)
        with pytest.raises(FastclrError, match=re.escape(f"{run / ENCODER_FILE} is another network than "
                                                         f"{run / 'config.toml'} records ({said}): a file from another "
                                                         "run? Put the run's own file back, or delete it to use the "
                                                         "run's checkpoints, or use the run that file came from")):
            load_run(run, log=lambda s: None)
        (run / ENCODER_FILE).unlink()  # the checkpoints then: another run's too
        for p in list_checkpoints(run):
            p.unlink()
        for p in list_checkpoints(tmp_path / other):
            shutil.copy(p, run / "checkpoints" / p.name)
        with pytest.raises(FastclrError, match=re.escape(f"is another network than {run / 'config.toml'} records "
                                                         f"({said})")):
            load_run(run, log=lambda s: None)
    # what the record and a run's settings may say differently of the same network: width auto (0, as
    # earlier versions recorded it), encoder auto at the record's side, no cnn_stages key (earlier versions)
    from fastclr.config import Config, apply_overrides
    from fastclr.models import EncoderSpec
    from fastclr.pretrained import against_config

    cnn = EncoderSpec("cnn", 1, 28, 0.125, "n/a", 64, (0.5,), (0.25,), "8|16|fc32")
    resnet = EncoderSpec("resnet18", 3, 32, 0.25, "on", 128, (0.5,) * 3, (0.25,) * 3)
    assert against_config(cnn, apply_overrides(Config(), {"model.width": 0.0}), set()) == []
    assert against_config(resnet, apply_overrides(Config(), {"model.width": 0.0}), {"model.cnn_stages"}) == []
    assert against_config(resnet, apply_overrides(Config(), {"model.width": 0.25}), {"model.width"}) == []
    assert against_config(cnn, apply_overrides(Config(), {"model.encoder": "resnet18", "model.width": 1.0}), set()) == [
        "encoder cnn, not resnet18", "width 0.125, not 1"]
    # the same network written otherwise ("relu:" is the default activation) is the run's own
    cfg = run / "config.toml"
    cfg.write_text(cfg.read_text(encoding="utf-8").replace('cnn_stages = "32,32,32p|256p|fc512"',
                                                           'cnn_stages = "relu:8|16|fc32"'), encoding="utf-8")
    assert load_run(run, log=lambda s: None).spec.stages == "8|16|fc32"
    cfg.write_text("", encoding="utf-8")  # emptied: the checkpoint's own settings load it, as before the check
    assert load_run(run, log=lambda s: None).spec.stages == "8|16|fc32"


def test_a_runs_damaged_or_empty_config_is_named_by_the_commands_that_read_it(tmp_path: Path) -> None:
    """evaluate, report and export read a run's config.toml: a value out of range was told as
    "e.g. --temperature 0.2" (a flag none of them has) without naming the file, and an empty file
    rebuilt the defaults (Fashion-MNIST's recipe) without a word."""
    from fastclr.pretrained import load_run

    ds, run = tiny_dataset(), tmp_path / "run"
    pretrain(tiny_config(run, train__epochs=1.0), dataset=ds, **QUIET)
    config = run / "config.toml"
    text = config.read_text(encoding="utf-8")
    assert load_run(run, log=lambda s: None).config.train.temperature == tiny_config(run).train.temperature
    config.write_text(re.sub(r"(?m)^temperature = .*$", "temperature = -1.0", text), encoding="utf-8")
    with pytest.raises(FastclrError, match=rf"^{re.escape(str(config))}, the run's recorded settings, was edited or "
                                           r"damaged: train.temperature = -1.0 is not allowed: it must be >= 1e-06; correct "
                                           r"it there, or restore it from a copy of the run$"):
        load_run(run, log=lambda s: None)
    config.write_text("", encoding="utf-8")
    with pytest.raises(FastclrError, match=rf"^{re.escape(str(config))} records no setting \(it is empty\)"):
        load_run(run, log=lambda s: None)


def test_a_stopped_run_resumed_with_fewer_epochs_than_it_trained_says_it_ends_there(tmp_path: Path) -> None:
    """3 epochs of 6 steps, stopped at step 10, resumed with --epochs 1 (6 steps): it ended at step
    10 part way down its 18-step schedule, with config.toml saying 1 epoch, and nothing said."""
    ds, run = tiny_dataset(), tmp_path / "run"
    first = pretrain(tiny_config(run, train__epochs=3.0), dataset=ds, progress=False, log=lambda s: None,
                     stop=lambda step: step == 10)
    assert first.stopped and first.steps == 10
    lines: list[str] = []
    again = pretrain(tiny_config(run, train__epochs=1.0), dataset=ds, resume=run, progress=False, log=lines.append)
    assert again.steps == 10
    assert ("note: --epochs 1 ends at step 6, before step 10, which this run has reached: it ends there, part way "
            "down the learning rate of its 18-step schedule") in lines


def test_a_finished_run_resumed_with_nothing_to_train_keeps_its_export_and_probe(tmp_path: Path) -> None:
    """`--resume auto` run again on a finished run (a job script): it wrote the same encoder again and
    probed it again (37 s of a few-step run). Now it says the run is finished and returns its probe;
    a probe.json of another step (or none) is still made again."""
    from fastclr.export import ENCODER_FILE

    ds, run = tiny_dataset(), tmp_path / "run"
    first = pretrain(tiny_config(run, train__epochs=1.0, eval__probe=True), dataset=ds, **QUIET)
    files = {name: (run / name).stat().st_mtime_ns for name in (ENCODER_FILE, "probe.json")}
    lines: list[str] = []
    again = pretrain(tiny_config(run, train__epochs=1.0, eval__probe=True), dataset=ds, resume=run, progress=False,
                     log=lines.append)
    assert again.steps == first.steps == 6 and again.probe_accuracy == first.probe_accuracy is not None
    assert {name: (run / name).stat().st_mtime_ns for name in files} == files
    assert any("already finished its 6 steps: nothing to train, and its encoder and probe stand as they were" in line
               for line in lines), lines
    for damage in ("unlink", "truncate"):  # none, or one cut short: made again
        (run / "probe.json").unlink() if damage == "unlink" else (run / "probe.json").write_text("{", encoding="utf-8")
        again = pretrain(tiny_config(run, train__epochs=1.0, eval__probe=True), dataset=ds, resume=run, **QUIET)
        record = json.loads((run / "probe.json").read_text(encoding="utf-8"))
        assert record["steps"] == 6 and again.probe_accuracy == first.probe_accuracy == record["accuracy"]
    # an export of other weights (not the checkpoint's) is written again, probe or not
    export = run / ENCODER_FILE
    mine = export.read_bytes()
    pretrain(tiny_config(tmp_path / "other", train__epochs=1.0, train__seed=1), dataset=ds, **QUIET)
    export.write_bytes((tmp_path / "other" / ENCODER_FILE).read_bytes())
    pretrain(tiny_config(run, train__epochs=1.0), dataset=ds, resume=run, **QUIET)
    assert export.read_bytes() == mine


def test_a_resume_that_changes_the_gradient_cache_chunk_says_so(tmp_path: Path) -> None:
    """Each chunk is normalised by its own BatchNorm statistics, so another chunk trains another step;
    the resume's note left the chunk out as a memory saver of the same values (the row blocks are)."""
    ds = tiny_dataset()
    first = {}
    for chunk in (0, 8):  # the first step's loss, whole and in chunks of 8 of the 16 images
        pretrain(tiny_config(tmp_path / f"c{chunk}", train__epochs=2.0, train__log_every=1, train__grad_cache_chunk=chunk),
                 dataset=ds, stop=lambda step: step == 1, **QUIET)
        first[chunk] = next(r["loss"] for r in read_metrics(tmp_path / f"c{chunk}") if r.get("step") == 1)
    assert abs(first[0] - first[8]) > 1e-3, first
    run = tmp_path / "run"
    assert pretrain(tiny_config(run, train__epochs=2.0), dataset=ds, stop=lambda step: step == 3, **QUIET).stopped
    lines: list[str] = []
    pretrain(tiny_config(run, train__epochs=2.0, train__grad_cache_chunk=8), dataset=ds, resume=run, progress=False,
             log=lines.append)
    assert [line for line in lines if line.startswith("note:")] == [
        "note: resuming with train.grad_cache_chunk 0 -> 8: the steps from 4 on train with it, the 3 before with the "
        "run's earlier settings, and config.toml now records the new"]


def test_a_run_resumed_with_other_training_settings_names_each_change_and_the_steps_before_it(tmp_path: Path) -> None:
    """`--resume RUN --temperature 0.5 --lr 0.01` trained on with them without a word, and config.toml
    then recorded t = 0.5 for steps that ran at 0.2. The note names each change with both values
    and the steps that trained without it; how a process runs (threads) is no change of the run's."""
    ds, run = tiny_dataset(), tmp_path / "run"
    assert pretrain(tiny_config(run, train__epochs=2.0), dataset=ds, stop=lambda step: step == 3, **QUIET).stopped
    lines: list[str] = []  # resumed as it was (the network's spec written another way, the loss in blocks): no note
    assert pretrain(tiny_config(run, train__epochs=2.0, model__cnn_stages="relu:32,32,32p|256p|fc512", train__loss_block=8),
                    dataset=ds, resume=run, stop=lambda step: step == 5, progress=False, log=lines.append).stopped
    assert not [line for line in lines if line.startswith("note:")], lines
    pretrain(tiny_config(run, train__epochs=3.0, optim__lr=0.01, train__temperature=0.5, augment__scale_min=0.5,
                         train__threads=1), dataset=ds, resume=run, progress=False, log=lines.append)
    notes = [line for line in lines if line.startswith("note:")]
    assert notes[0] == (
        "note: resuming with augment.scale_min 0.8 -> 0.5, optim.lr 0.003 -> 0.01, train.temperature 0.2 -> 0.5: the "
        "steps from 6 on train with them, the 5 before with the run's earlier settings, and config.toml now records "
        "the new")
    # the run's length: its own note (it was silent), with the rates the run's metrics hold at those steps
    lr = {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    assert notes[1] == ("note: resuming with train.epochs 2 -> 3: the run now ends at step 18, not 12, and its learning "
                        f"rate follows the warm-up and cosine of a 3-epoch run: from {lr[5]:.3g} at step 5 to "
                        f"{lr[6]:.3g} at step 6") and len(notes) == 2
    assert "temperature = 0.5" in (run / "config.toml").read_text(encoding="utf-8")
    # resumed back to the first settings: the note said the steps before did not train with them, and the first
    # three had
    lines.clear()
    pretrain(tiny_config(run, train__epochs=4.0), dataset=ds, resume=run, progress=False, log=lines.append)
    noted = [line for line in lines if line.startswith("note:") and "train.epochs" not in line]
    assert len(noted) == 1 and "train.temperature 0.5 -> 0.2" in noted[0] and "did not" not in noted[0], noted


def test_a_run_whose_config_toml_is_gone_resumes_from_its_checkpoints_settings_and_records_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`rm RUN/config.toml; fastclr pretrain --resume RUN` was refused as "not a fastclr run directory"
    though every checkpoint holds the whole config: it resumes with the newest valid one's settings
    (the same as the run's, key for key), says so, and config.toml is written again, also by a
    finished run resumed to restore it."""
    from fastclr.cli import build_parser, resume_config
    from fastclr.config import read_toml, to_flat

    ds, run = tiny_dataset(), tmp_path / "run"
    cfg = tiny_config(run, train__epochs=1.0, train__temperature=0.3)
    assert pretrain(cfg, dataset=ds, stop=lambda step: step == 3, **QUIET).stopped
    written = read_toml(run / "config.toml")
    with_record = resume_config(run, build_parser().parse_args(["pretrain", "--resume", str(run)]))
    (run / "config.toml").unlink()
    restored = resume_config(run, build_parser().parse_args(["pretrain", "--resume", str(run)]))
    assert to_flat(restored) == to_flat(with_record) and restored.train.temperature == 0.3
    assert capsys.readouterr().out.startswith(f"note: {run} has no config.toml: resuming with the settings its "
                                              "checkpoint step-000000003.pt holds")
    pretrain(restored, dataset=ds, resume=run, **QUIET)
    assert read_toml(run / "config.toml") == written
    (run / "config.toml").unlink()  # a finished run: resumed only to restore its record
    pretrain(resume_config(run, build_parser().parse_args(["pretrain", "--resume", str(run)])), dataset=ds, resume=run,
             **QUIET)
    assert read_toml(run / "config.toml") == written
    shutil.rmtree(run / "checkpoints")
    (run / "config.toml").unlink()
    with pytest.raises(FastclrError, match="holds no config.toml; it is not a fastclr run directory"):
        resume_config(run, build_parser().parse_args(["pretrain", "--resume", str(run)]))


def test_a_finished_run_resumed_with_other_settings_keeps_its_record_and_says_so(tmp_path: Path) -> None:
    """`--resume RUN --lr 0.05` on a finished run trained nothing, yet rewrote config.toml and the
    final checkpoint with lr 0.05: a record of a learning rate the run never trained with (and a
    --config of that file trained at it). Now both stay byte for byte, and a note names what is unused."""
    ds, run = tiny_dataset(), tmp_path / "run"
    pretrain(tiny_config(run, train__epochs=1.0), dataset=ds, **QUIET)
    before = {p.name: p.read_bytes() for p in [run / "config.toml", *list_checkpoints(run)]}
    lines: list[str] = []
    again = pretrain(tiny_config(run, train__epochs=1.0, optim__lr=0.05, train__temperature=0.5, train__threads=1),
                     dataset=ds, resume=run, progress=False, log=lines.append)
    assert again.steps == 6
    assert {p.name: p.read_bytes() for p in [run / "config.toml", *list_checkpoints(run)]} == before
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == ["note: optim.lr, train.temperature differ from the run's, but it has nothing left to train: not "
                     "used, and its config.toml is kept as trained"]  # threads: how it runs, not what it trains
    lines.clear()  # more epochs train on, and are recorded
    more = pretrain(tiny_config(run, train__epochs=2.0, train__log_every=1), dataset=ds, resume=run, progress=False,
                    log=lines.append)
    assert more.steps == 12 and "epochs = 2.0" in (run / "config.toml").read_text(encoding="utf-8")
    lr = {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    assert [line for line in lines if line.startswith("note:")] == [
        "note: resuming with train.epochs 1 -> 2: the run now ends at step 12, not 6, and its learning rate follows "
        f"the warm-up and cosine of a 2-epoch run: from {lr[6]:.3g} at step 6 to {lr[7]:.3g} at step 7"]
    assert lr[7] > lr[6]  # the longer cosine: the rate rises, as the note shows
    from fastclr.export import ENCODER_FILE

    # A run stopped at step 9 of 18 that fewer epochs (6 steps) now end where it stands: the new
    # length is used (it ends the run), so it is recorded, and no note calls it unused.
    stopped = tmp_path / "stopped"
    res = pretrain(tiny_config(stopped, train__epochs=3.0), dataset=ds, progress=False, log=lambda s: None,
                   stop=lambda step: step == 9)
    assert res.stopped and res.steps == 9
    lines.clear()
    ended = pretrain(tiny_config(stopped, train__epochs=1.0), dataset=ds, resume=stopped, progress=False,
                     log=lines.append)
    assert ended.steps == 9 and not ended.stopped and (stopped / ENCODER_FILE).exists()
    assert "epochs = 1.0" in (stopped / "config.toml").read_text(encoding="utf-8")
    assert [line for line in lines if line.startswith("note:")] == [  # where it ends, not "unused"
        "note: --epochs 1 ends at step 6, before step 9, which this run has reached: it ends there, part way down "
        "the learning rate of its 18-step schedule"]


def test_the_logged_gradient_norm_is_the_mean_over_the_updates_applied() -> None:
    """fp16: two overflowed steps (norm inf, skipped) and one of norm 3 log grad_norm 3, not 1;
    a window of skipped steps only logs none."""
    from fastclr.pretraining.metrics import MetricsWindow
    from fastclr.scaleout.distributed import DistContext

    def out(norm: float, skipped: float) -> Any:
        return type("Out", (), {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(norm),
                                "skipped": torch.tensor(skipped), "metrics": {}})()

    window = MetricsWindow()
    for norm, skipped in ((float("inf"), 1.0), (float("inf"), 1.0), (3.0, 0.0)):
        window.add(out(norm, skipped))
    rec = window.close(DistContext())
    assert rec["skipped"] == 2 and rec["grad_norm"] == 3.0 and rec["loss"] == 1.0
    window.add(out(float("inf"), 1.0))
    rec = window.close(DistContext())
    assert rec["skipped"] == 1 and "grad_norm" not in rec


def test_an_unreadable_checkpoint_is_named_not_skipped_for_an_older_one(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A PermissionError was called "damaged or truncated" and the resume went back to the older
    checkpoint, dropping the steps since; it is one line saying to fix the permissions."""
    ds, run = tiny_dataset(), tmp_path / "run"
    pretrain(tiny_config(run, train__epochs=2.0), dataset=ds, **QUIET)
    newest = list_checkpoints(run)[-1]
    real = torch.load

    def refused(path: Any, *a: Any, **k: Any) -> Any:
        if Path(path) == newest:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(torch, "load", refused)
    with pytest.raises(FastclrError, match=f"cannot read checkpoint {newest} \\(Permission denied\\); fix its "
                                           "permissions"):
        latest_valid_checkpoint(run)
    monkeypatch.setattr(torch, "load", real)
    (run / "checkpoints" / "step-000000999.pt").mkdir()  # a folder under a checkpoint's name: skipped, as before
    warned: list[str] = []
    assert latest_valid_checkpoint(run, warn=warned.append)[0] == newest
    assert warned == [f"skipping step-000000999.pt: {run / 'checkpoints' / 'step-000000999.pt'} is not a checkpoint file"]


def test_temporaries_of_a_killed_write_are_the_runs_own_and_removed(tmp_path: Path) -> None:
    """A run killed while writing its first config.toml could not be started again ("files that are
    not a fastclr run"), and a half-written encoder temporary outlived every later run."""
    ds, run = tiny_dataset(), tmp_path / "run"
    run.mkdir()
    (run / ".config.toml.is7cpcsm.tmp").write_text("[train")
    prepare_run_dir(run)  # the run's own: accepted
    (run / ".config.toml.is7cpcsm.tmp").unlink()
    pretrain(tiny_config(run, train__epochs=1.0), dataset=ds, **QUIET)
    (run / ".encoder.safetensors.abcd1234.tmp").write_bytes(b"half")
    (run / ".notes.txt.abcd.tmp").write_bytes(b"not the run's")
    (run / ".eval.json.live1234.tmp").write_bytes(b"{")  # evaluate writes without the lock: maybe live
    pretrain(tiny_config(run, train__epochs=2.0), dataset=ds, resume=run, **QUIET)
    assert not (run / ".encoder.safetensors.abcd1234.tmp").exists() and (run / ".notes.txt.abcd.tmp").exists()
    assert (run / ".eval.json.live1234.tmp").exists()


def test_a_metrics_record_without_a_step_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n[3]\n')
    with pytest.raises(FastclrError, match=r"metrics.jsonl record 2 is not a record of a step"):
        read_metrics(tmp_path)


def test_a_last_metrics_line_cut_short_is_left_out_and_the_records_before_it_kept(tmp_path: Path) -> None:
    """The disk filled while a record was appended: the line has no newline and is not JSON. It is
    not a record, so the complete ones before it are returned; the same damage before the last
    line is the file damaged, and one line names the record."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(FastclrError, match=r"metrics.jsonl record 2 is not JSON"):
        read_metrics(tmp_path)


def test_a_run_stopped_before_its_first_checkpoint_is_a_run_whose_files_are_kept(tmp_path: Path) -> None:
    """A run stopped before its first checkpoint holds its config.toml and metrics.jsonl only: it is
    a run (a config.toml alone may be anyone's --config file), so an output given as its
    metrics.jsonl is refused before it replaces the run's log."""
    from fastclr.runs import is_run_dir, refuse_output

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("[train]\n", encoding="utf-8")
    assert not is_run_dir(run)
    refuse_output(run / "metrics.jsonl")  # not yet a run: allowed
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n', encoding="utf-8")
    assert is_run_dir(run)
    with pytest.raises(FastclrError, match=re.escape(f"--out {run / 'metrics.jsonl'} would replace the run's own "
                                                     "metrics.jsonl, which the run needs")):
        refuse_output(run / "metrics.jsonl")


def test_keeping_two_checkpoints_leaves_the_two_newest(tmp_path: Path) -> None:
    """save_checkpoint keeps the `keep` newest checkpoints: after steps 1 to 4 with keep=2, exactly
    steps 3 and 4 are left, and each holds its own state."""
    from fastclr.checkpoint import checkpoint_name, save_checkpoint

    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, {"step": step, "w": torch.full((2,), float(step))}, keep=2)
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == [checkpoint_name(3), checkpoint_name(4)]
    assert [float(load_checkpoint(p)["w"][0]) for p in kept] == [3.0, 4.0]


def test_steps_replayed_after_a_resume_are_not_sent_to_the_trackers_again(tmp_path: Path) -> None:
    """Killed after step 10, resumed from the checkpoint at 8: MLflow got steps 9 and 10 twice."""
    sent: list[int] = []

    class Sink:
        def metrics(self, values: dict[str, float], step: int) -> None:
            sent.append(step)

    log = MetricsLog(tmp_path)
    log.trackers = [Sink()]  # type: ignore[list-item]
    for step in range(1, 11):
        log.log({"step": step, "loss": 1.0})
    resumed = MetricsLog(tmp_path)
    resumed.trackers = [Sink()]  # type: ignore[list-item]
    resumed.keep_until(8)
    resumed.log({"step": 8, "knn_acc": 0.5})  # the epoch end's pass a stop at step 8 left undone: new
    for step in range(9, 13):
        resumed.log({"step": step, "loss": 1.0})
    assert sent == list(range(1, 11)) + [8] + list(range(11, 13))
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9)) + [8] + list(range(9, 13))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 12
    assert os.path.getsize(tmp_path / "metrics.jsonl") > 0


def monitored_epochs(every: int, share: float, enabled: bool = True, epochs: int = 10) -> list[int]:
    """The epochs whose end runs a kNN monitor pass, on a fake clock: 10 s of steps an epoch, 10 s
    a pass, the pass counted in the training time as the loop counts it."""
    from fastclr.pretraining.monitor import KnnMonitor

    ds = tiny_dataset()
    cfg = tiny_config(Path("unused"), eval__monitor_every=every, eval__monitor_share=share)
    now = [0.0]

    def measure(*args: Any) -> float:
        now[0] += 10.0
        return 0.5

    monitor = KnnMonitor(ds, None, torch.device("cpu"), cfg, None, enabled=enabled, measure=measure)  # type: ignore[arg-type]
    passes = []
    for epoch in range(1, epochs + 1):
        now[0] += 10.0
        if monitor.due(epoch, now[0]):
            assert monitor.seconds <= share * now[0]
            monitor(torch.nn.Identity(), lambda: now[0])
            passes.append(epoch)
    assert monitor.seconds == 10.0 * len(passes)  # every pass's seconds, added up
    return passes


def test_the_monitor_runs_every_nth_epoch_within_its_share_of_the_time_and_on_rank_0_only() -> None:
    """`eval.monitor_every` = 2: epochs 2, 4, 6 ... A pass is due while the passes so far took at
    most `monitor_share` of the training time (their own included): at 0.2, with passes as long as
    an epoch's steps, after the ones at epochs 1 and 4 the next is due at epoch 8 (20 s of 100 s).
    At share 0 the first pass (nothing spent so far) and no other. Ranks other than 0 never run one."""
    assert monitored_epochs(every=2, share=1.0) == [2, 4, 6, 8, 10]
    assert monitored_epochs(every=1, share=0.2) == [1, 4, 8]
    assert monitored_epochs(every=1, share=0.0) == [1]
    assert monitored_epochs(every=1, share=1.0, enabled=False) == []


def test_the_health_names_the_first_bad_step_and_a_skip_streak_ends_with_a_good_step() -> None:
    """Non-finite losses at steps 2 and 4 (1-based): the error names step 2. Under fp16, an update
    skipped every other step is loss scaling at work, never a run to stop: the streak restarts at
    each applied update, so 80 such steps never reach MAX_SKIP_STREAK."""
    from fastclr.pretraining.metrics import MAX_SKIP_STREAK, Health

    def out(loss: float, skipped: float) -> Any:
        return type("Out", (), {"loss": torch.tensor(loss), "grad_norm": torch.tensor(1.0 if not skipped else float("inf")),
                                "skipped": torch.tensor(skipped)})()

    health = Health(torch.device("cpu"))
    for step, loss in enumerate([1.0, float("nan"), 1.0, float("inf"), 1.0]):
        health.update(out(loss, 0.0), step)
    assert int(health.first_bad) == 2
    health = Health(torch.device("cpu"))
    for step in range(80):
        health.update(out(1.0, float(step % 2 == 0)), step)
        assert float(health.skip_streak) == float(step % 2 == 0) < MAX_SKIP_STREAK
    assert int(health.first_bad) == -1


def _run_state(run: Path, budget: float, total_steps: int, seed: int) -> Any:
    """A RunState at 7 steps an epoch over a small encoder and head, a learned temperature, an SGD
    optimiser, and a training step whose own state is a loss scale; weights drawn from `seed`."""
    from types import SimpleNamespace

    from fastclr.models import EncoderSpec
    from fastclr.pretraining.model import Model
    from fastclr.pretraining.objective import LearnedTemperature
    from fastclr.pretraining.state import RunState

    torch.manual_seed(seed)
    model = Model(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), EncoderSpec("custom", 1, 28, 1.0, "n/a", 4, (0.5,), (0.25,)),
                  LearnedTemperature(0.1 * seed))
    params = [*model.encoder.parameters(), *model.head.parameters(), *model.temperature.parameters()]  # type: ignore[union-attr]
    scaler = {"scale": float(seed)}
    step = SimpleNamespace(optimizer=torch.optim.SGD(params, lr=0.1, momentum=0.9), objective=None,
                           state_dict=lambda: dict(scaler), load_state_dict=scaler.update)
    return RunState(tiny_config(run, train__time_budget=budget), model, step, total_steps=total_steps,  # type: ignore[arg-type]
                    warmup_steps=10, steps_per_epoch=7)


@pytest.mark.parametrize("budget", [0.0, 1.0])
def test_a_checkpoint_puts_back_every_counter_and_state_of_the_run(tmp_path: Path, budget: float) -> None:
    """`RunState.save`, then `restore` into a run built afresh: the weights (the learned temperature's
    too), the training step's state, the step, its offset in the data, the seconds trained and spent
    monitoring, the fp16 skip streak. Step 9 with offset -2 at 7 steps an epoch is data step 7, the end
    of epoch 1. A budgeted run keeps the length it fitted; one by epochs takes the length it has now."""
    saved = _run_state(tmp_path, budget, total_steps=100, seed=1)
    saved.step, saved.step_offset, saved.train_seconds, saved.monitor_seconds, saved.skip_streak = 9, -2, 12.5, 3.25, 7
    path = saved.save(tmp_path)
    fresh = _run_state(tmp_path, budget, total_steps=50, seed=2)
    fresh.restore(load_checkpoint(path), n_images=96)
    assert (fresh.step, fresh.start_step, fresh.step_offset, fresh.saved_steps_per_epoch) == (9, 9, -2, 7)
    assert (fresh.train_seconds, fresh.monitor_seconds, fresh.skip_streak) == (12.5, 3.25, 7)
    assert fresh.saved_at_epoch_end and fresh.total_steps == (100 if budget else 50)
    for part in ("encoder", "head", "temperature"):
        want = getattr(saved.model, part).state_dict()
        got = getattr(fresh.model, part).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part
    assert fresh.train_step.state_dict() == {"scale": 1.0}


def test_a_resume_with_other_steps_per_epoch_keeps_its_place_in_the_data_to_half_a_step() -> None:
    """`data_offset`: a run at `step` with `offset` had reached (step + offset) / saved_steps_per_epoch
    epochs of its data; with the new steps per epoch it goes on from that place, to the nearest whole
    step (exact fractions here); with the same steps per epoch its offset is kept."""
    from fractions import Fraction

    from fastclr.pretraining.state import data_offset

    for saved_spe, spe in ((6, 3), (3, 6), (4, 5), (7, 3)):
        for step in range(25):
            for offset in range(-step, 6):
                place = Fraction(step + offset, saved_spe) * spe  # in the new steps
                assert abs(step + data_offset(step, offset, saved_spe, spe) - place) <= Fraction(1, 2), \
                    (saved_spe, spe, step, offset)
                assert data_offset(step, offset, spe, spe) == offset


def test_a_resume_whose_network_would_not_fit_the_checkpoint_is_refused_even_when_allowed(tmp_path: Path) -> None:
    """Each model setting whose change gives the encoder or the head other tensors (names or shapes)
    is refused on resume, --allow-config-change or not: the checkpoint's weights would not load."""
    from fastclr.pretraining.model import build_model
    from fastclr.pretraining.state import check_resume_config

    ds = tiny_dataset()

    def tensors(cfg: Any) -> dict[str, tuple[int, ...]]:
        model = build_model(cfg, ds, torch.device("cpu"))
        return {f"{part}.{k}": tuple(v.shape) for part, module in (("encoder", model.encoder), ("head", model.head))
                for k, v in module.state_dict().items()}

    saved = tiny_config(tmp_path)
    mine = tensors(saved)
    for key, value in (("encoder", "resnet18"), ("width", 0.25), ("cnn_stages", "16|32|fc64"), ("head_layers", 3),
                       ("head_hidden", 64), ("head_bn", False), ("proj_dim", 32)):
        wanted = tiny_config(tmp_path, **{f"model__{key}": value})
        assert tensors(wanted) != mine, key  # the checkpoint would not load into it
        with pytest.raises(FastclrError, match=f"cannot resume: model.{key} differs from the checkpoint's config"):
            check_resume_config(saved, wanted, allow_changes=True)


def test_a_stage_spec_written_another_way_for_the_same_network_resumes_exactly(tmp_path: Path) -> None:
    """"relu:S" and "S" build one network (ReLU is the activation a spec without one uses), so a run
    started with one resumes with the other and ends bit-equal to the run left alone; "silu:S" has
    the same tensors but computes otherwise, and is refused naming the key."""
    ds, stages = tiny_dataset(), tiny_config(tmp_path).model.cnn_stages
    assert not stages.startswith("relu:")  # the default is written without its activation
    pretrain(tiny_config(tmp_path / "a"), dataset=ds, **QUIET)
    assert pretrain(tiny_config(tmp_path / "b"), dataset=ds, stop=lambda step: step == 5, **QUIET).stopped
    with pytest.raises(FastclrError, match="cannot resume: model.cnn_stages differs from the checkpoint's config"):
        pretrain(tiny_config(tmp_path / "b", model__cnn_stages=f"silu:{stages}"), resume=tmp_path / "b", dataset=ds,
                 **QUIET)
    pretrain(tiny_config(tmp_path / "b", model__cnn_stages=f"relu:{stages}"), resume=tmp_path / "b", dataset=ds,
             **QUIET)
    straight, resumed = (load_checkpoint(list_checkpoints(tmp_path / run)[-1]) for run in ("a", "b"))
    assert straight["step"] == resumed["step"] == 12
    for part in ("encoder", "head"):
        assert straight[part].keys() == resumed[part].keys()
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"


def test_a_run_saved_with_encoder_auto_resumes_with_the_encoder_auto_built_named(tmp_path: Path) -> None:
    """A run started with `--encoder auto` (the default) built the cnn for its 28 px images; resumed
    with `--encoder cnn` it is the same network and ends bit-equal to the run left alone (it was
    refused as a changed encoder). Another encoder is still refused naming the key."""
    ds = tiny_dataset()
    assert tiny_config(tmp_path / "a").model.encoder == "auto"
    pretrain(tiny_config(tmp_path / "a"), dataset=ds, **QUIET)
    assert pretrain(tiny_config(tmp_path / "b"), dataset=ds, stop=lambda step: step == 5, **QUIET).stopped
    with pytest.raises(FastclrError, match="cannot resume: model.encoder differs from the checkpoint's config"):
        pretrain(tiny_config(tmp_path / "b", model__encoder="resnet18"), resume=tmp_path / "b", dataset=ds, **QUIET)
    pretrain(tiny_config(tmp_path / "b", model__encoder="cnn"), resume=tmp_path / "b", dataset=ds, **QUIET)
    straight, resumed = (load_checkpoint(list_checkpoints(tmp_path / run)[-1]) for run in ("a", "b"))
    assert straight["step"] == resumed["step"] == 12 and resumed["model_info"]["encoder"] == "cnn"
    for part in ("encoder", "head"):
        assert straight[part].keys() == resumed[part].keys()
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"


@pytest.mark.parametrize("key, value", [("train__views", 3), ("train__batch_size", 32)])
def test_a_resume_with_another_batch_or_views_is_refused_unless_allowed(tmp_path: Path, key: str, value: int) -> None:
    """README: resuming with a different batch size or number of views is refused naming the key, and
    --allow-config-change permits it."""
    from fastclr.pretraining.state import check_resume_config

    saved, wanted = tiny_config(tmp_path), tiny_config(tmp_path, **{key: value})
    name = key.replace("__", ".")
    was = getattr(saved.train, name.split(".")[1])
    flag = {"train.views": "--views", "train.batch_size": "--batch-size"}[name]
    # both values and the way back: the difference may be config.toml's (an earlier resume rewrote it), not a flag's
    with pytest.raises(FastclrError, match=f"^cannot resume: {name} \\({value} here, {was} in the checkpoint\\) differs "
                                           f"from the checkpoint's config; give its value \\({flag} {was}\\), or pass "
                                           "--allow-config-change to change it deliberately$"):
        check_resume_config(saved, wanted, allow_changes=False)
    check_resume_config(saved, wanted, allow_changes=True)


def test_a_directory_holding_only_a_dead_runs_lock_can_start_a_run(tmp_path: Path) -> None:
    """A run killed before it wrote anything leaves only its .lock: the directory is still empty of
    anyone's files, so a new run may start there; the user's own files there are refused, the
    first three named."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("PID 1 on elsewhere", encoding="utf-8")
    assert prepare_run_dir(run) == run
    for name in ("a.txt", "b.txt", "c.txt"):
        (run / name).write_text("mine", encoding="utf-8")
    with pytest.raises(FastclrError, match=r"holds files that are not a fastclr run \(a.txt, b.txt, c.txt\); nothing"):
        prepare_run_dir(run)  # three named: all of them
    (run / "d.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FastclrError, match=r"not a fastclr run \(a.txt, b.txt, c.txt, ...\); nothing"):
        prepare_run_dir(run)  # more: the first three, and the rest said to be there


def test_a_run_killed_before_its_config_was_written_can_start_again_in_its_directory(tmp_path: Path) -> None:
    """Killed (or out of disk) between starting its TensorBoard writer and writing config.toml, a run
    left .lock and tb/ alone: the same command, `--resume auto` too, was refused as "files that are
    not a fastclr run (tb)", until the user deleted the folder. Its events are its own; a tb/
    holding anything else is still the user's."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("PID 1 on elsewhere", encoding="utf-8")
    SummaryWriter(str(run / "tb")).close()  # what build_run started before config.toml until 2026-12-07
    assert [p.name for p in (run / "tb").iterdir()][0].startswith("events.out.tfevents.")
    res = pretrain(tiny_config(run, train__epochs=1.0), dataset=tiny_dataset(), **QUIET)
    assert res.steps == 6 and (run / "config.toml").is_file()
    other = tmp_path / "other"
    (other / "tb").mkdir(parents=True)
    (other / "tb" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FastclrError, match=r"holds files that are not a fastclr run \(tb\); nothing"):
        prepare_run_dir(other)


def test_a_lock_taken_over_names_only_its_new_owner(tmp_path: Path) -> None:
    """The lock file left by a dead owner with a longer name than this process's is rewritten whole:
    what another process then reads as the owner is this process, with nothing of the old text."""
    import socket

    from fastclr.locks import RunLock, locked_by_another

    dead = "PID 4194303 on a-much-longer-host-name-than-this-one.example.org"
    (tmp_path / ".lock").write_text(dead, encoding="utf-8")
    said: list[str] = []
    lock = RunLock(tmp_path, log=said.append)
    try:
        assert said == [f"took over {tmp_path / '.lock'} from {dead}, which is no longer running"]
        assert locked_by_another(tmp_path) == f"PID {os.getpid()} on {socket.gethostname()}"
    finally:
        lock.release()
    assert locked_by_another(tmp_path) == ""


def test_a_lock_owner_written_with_a_newline_or_an_escape_is_named_on_one_line(tmp_path: Path) -> None:
    """Whoever can write the lock file chooses its text: the refusal and the take-over stay one line
    each, the control characters written as escapes."""
    import fcntl

    from fastclr.locks import RunLock

    odd = "PID 7 on host\n\x1b[2Jrm -rf ~"
    (tmp_path / ".lock").write_text(odd, encoding="utf-8")
    said: list[str] = []
    RunLock(tmp_path, log=said.append).release()
    assert said == [f"took over {tmp_path / '.lock'} from PID 7 on host\\n\\x1b[2Jrm -rf ~, which is no longer running"]
    (tmp_path / ".lock").write_text(odd, encoding="utf-8")
    with open(tmp_path / ".lock", "rb") as held:  # a live owner: its own open file description holds the lock
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(FastclrError) as e:
            RunLock(tmp_path, log=said.append)
    assert str(e.value).startswith(f"{tmp_path} is being written by PID 7 on host\\n\\x1b[2Jrm -rf ~; wait for it")


def test_a_resume_knows_the_monitor_passes_and_the_sent_records_around_its_checkpoint(tmp_path: Path) -> None:
    """keep_until(step) keeps the records up to the checkpoint's step, the step included (a kNN pass
    at that epoch end is done and not run again), and counts as sent to the trackers exactly the
    records past it, which the resumed run replays."""
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
    records += [{"step": 3, "knn_acc": 0.5}, {"step": 6, "knn_acc": 0.6}]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["step"]))
    (tmp_path / "metrics.jsonl").write_text(text, encoding="utf-8")
    log = MetricsLog(tmp_path)
    try:
        log.keep_until(3)
        assert log.monitored == {3}
        assert log.sent == {(4, False), (5, False), (6, False), (6, True)}
        assert [(r["step"], "knn_acc" in r) for r in read_metrics(tmp_path)] == [(1, False), (2, False), (3, False),
                                                                                 (3, True)]
    finally:
        log.close()


def test_outputs_are_refused_in_a_runs_checkpoints_folder_and_over_an_input_spelled_otherwise(tmp_path: Path) -> None:
    """refuse_output: anything in a run's checkpoints/ folder; an input of the command however the
    path is spelled (the same file); another kind of file than the output's, whatever the case of
    its suffix."""
    from fastclr.runs import refuse_output

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text("[train]\n", encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    with pytest.raises(FastclrError, match="is in the run's checkpoints folder"):
        refuse_output(run / "checkpoints" / "mine.safetensors")
    query = tmp_path / "q.jpg"
    with pytest.raises(FastclrError, match=re.escape(f"is {query}, which this command reads")):
        refuse_output(tmp_path / "run" / ".." / "q.jpg", inputs=(query,))
    refuse_output(tmp_path / "REPORT.HTML", kind="a report", suffixes=(".html",))
    with pytest.raises(FastclrError, match=r"a report is written as .html; give a name ending in .html"):
        refuse_output(tmp_path / "q.jpg", kind="a report", suffixes=(".html",))


def test_a_default_run_directory_is_named_after_the_datasets_last_path_part() -> None:
    """runs/<data>-<YYYYmmdd-HHMMSS>: a store given as a path is named by its folder."""
    from fastclr.presets import config_for
    from fastclr.runs import default_run_dir

    for data, stem in (("fashion-mnist", "fashion-mnist"), ("/data/stores/photos", "photos"),
                       ("stores/photos/", "photos")):
        path = default_run_dir(config_for(data))
        assert path.parent == Path("runs") and re.fullmatch(rf"{stem}-\d{{8}}-\d{{6}}", path.name), path


def test_a_run_whose_every_update_overflows_ends_at_the_same_step_when_stopped_and_resumed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 with every gradient infinite, so that every update is skipped: the streak reaches
    MAX_SKIP_STREAK (4 here) at step 4, and the run ends there naming it. Stopped at step 3 and
    resumed, it ends at the same step: the checkpoint carries the streak and the resume puts it back
    (from 0 it went on to step 7)."""
    from torch import nn

    from fastclr.pretraining.metrics import NonFiniteLoss

    monkeypatch.setattr("fastclr.pretraining.metrics.MAX_SKIP_STREAK", 4)

    def overflowing() -> nn.Module:
        conv = nn.Conv2d(1, 8, 3, 2)
        conv.weight.register_hook(lambda g: g * float("inf"))
        return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    ds, run = tiny_dataset(), tmp_path / "run"
    cfg = tiny_config(run, train__precision="fp16", train__device="cpu")
    assert pretrain(cfg, dataset=ds, encoder=overflowing(), stop=lambda step: step == 3, **QUIET).stopped
    assert load_checkpoint(list_checkpoints(run)[-1])["skip_streak"] == 3
    with pytest.raises(NonFiniteLoss, match="non-finite loss or gradient at step 4;"):
        pretrain(cfg, dataset=ds, encoder=overflowing(), resume=run, **QUIET)


def test_a_checkpoint_from_before_steps_per_epoch_were_kept_stands_for_full_batches(tmp_path: Path) -> None:
    """A checkpoint without "steps_per_epoch" was written at the steps per epoch of its batch size on
    the data: full batches only (100 images at batch 16: 6, the last 4 images dropped), so a resume at
    7 steps per epoch goes on from step 9's place in the data, 9 / 6 epochs, at 7 * 9 / 6 = 10.5
    of its steps: 10 (round half to even)."""
    saved = _run_state(tmp_path, 0.0, total_steps=100, seed=1)
    saved.step = 9
    state = load_checkpoint(saved.save(tmp_path))
    del state["steps_per_epoch"], state["step_offset"]
    assert state["config"]["train"]["batch_size"] == 16
    fresh = _run_state(tmp_path, 0.0, total_steps=100, seed=2)
    fresh.restore(state, n_images=100)
    assert fresh.saved_steps_per_epoch == 6 and fresh.step + fresh.step_offset == 10


@pytest.mark.parametrize("key, value", [("train__local_views", 2), ("train__supcon", True), ("train__queue", 64),
                                        ("train__nn_support", 64), ("data__name", "mnist"), ("train__seed", 7),
                                        ("augment__crop_size", 24), ("augment__local_size", 12)])
def test_a_resume_that_changes_the_views_objective_or_carried_state_is_refused_unless_allowed(
        tmp_path: Path, key: str, value: object) -> None:
    """Small views, labels as positives, a queue or a support set change what each step trains on or
    what the checkpoint carries (a queue or support set newly on starts empty), and another dataset
    is other data: each is refused on resume naming the key, and --allow-config-change permits it."""
    from fastclr.pretraining.state import check_resume_config

    saved, wanted = tiny_config(tmp_path), tiny_config(tmp_path, **{key: value})
    name = key.replace("__", ".")
    with pytest.raises(FastclrError, match=f"cannot resume: {name} \\(.* here, .* in the checkpoint\\) differs from "
                                           "the checkpoint's config"):
        check_resume_config(saved, wanted, allow_changes=False)
    check_resume_config(saved, wanted, allow_changes=True)


def test_a_run_resumed_from_an_epoch_ends_checkpoint_after_a_crash_measures_that_epoch_once(tmp_path: Path) -> None:
    """By epochs (train.checkpoint_every 0) a checkpoint is written at every epoch end: steps 6 and 12
    of a 2-epoch run. A crash that lost the one of step 12, and a resume from step 6: that epoch end's
    kNN pass is in metrics.jsonl already and is not run again, so the kNN records are the
    uninterrupted run's, one at step 6 and one at step 12."""
    ds, run = tiny_dataset(), tmp_path / "run"
    cfg = tiny_config(run, train__epochs=2.0, eval__monitor_every=1, eval__monitor_share=1.0)
    pretrain(cfg, dataset=ds, **QUIET)
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(run)] == [6, 12]
    list_checkpoints(run)[-1].unlink()
    pretrain(cfg, dataset=ds, resume=run, **QUIET)
    assert [r["step"] for r in read_metrics(run) if "knn_acc" in r] == [6, 12]


def test_a_finished_runs_probe_of_an_earlier_step_is_made_again(tmp_path: Path) -> None:
    """A run probed at step 6, trained on to step 12 without a probe (exported, probe.json still of
    step 6), then resumed with the probe on and nothing to train: its export stands, but the probe of
    step 6 is not the final encoder's, so it is made again and probe.json names step 12."""
    ds, run = tiny_dataset(), tmp_path / "run"
    pretrain(tiny_config(run, train__epochs=1.0, eval__probe=True), dataset=ds, **QUIET)
    pretrain(tiny_config(run, train__epochs=2.0), dataset=ds, resume=run, **QUIET)
    assert json.loads((run / "probe.json").read_text(encoding="utf-8"))["steps"] == 6
    res = pretrain(tiny_config(run, train__epochs=2.0, eval__probe=True), dataset=ds, resume=run, **QUIET)
    record = json.loads((run / "probe.json").read_text(encoding="utf-8"))
    assert res.steps == record["steps"] == 12 and res.probe_accuracy == record["accuracy"]


def test_a_stop_asked_at_the_last_step_lets_the_run_finish(tmp_path: Path) -> None:
    """`stop` asks to end a run that has steps left: asked at the last step (12), there is nothing
    left to resume, so the run ends finished, its encoder exported, not stopped."""
    from fastclr.export import ENCODER_FILE

    ds, run = tiny_dataset(), tmp_path / "run"
    res = pretrain(tiny_config(run), dataset=ds, stop=lambda step: step == 12, **QUIET)
    assert res.steps == 12 and not res.stopped and (run / ENCODER_FILE).exists()


def test_a_resume_whose_data_or_side_the_checkpoint_does_not_fit_is_one_line_even_when_allowed(tmp_path: Path) -> None:
    """--crop-size 32 on a 28 px run, allowed: `auto` then builds a ResNet-18 with the CIFAR stem,
    not the cnn, and load_state_dict's missing keys were a traceback. Now one line naming what
    changed, before config.toml or anything else is written."""
    ds, run = tiny_dataset(), tmp_path / "run"
    assert pretrain(tiny_config(run), dataset=ds, stop=lambda step: step == 5, **QUIET).stopped
    config, checkpoints = (run / "config.toml").read_bytes(), [p.name for p in list_checkpoints(run)]
    with pytest.raises(FastclrError) as e:
        pretrain(tiny_config(run, augment__crop_size=32), resume=run, dataset=ds, allow_config_change=True, **QUIET)
    assert str(e.value) == ("cannot resume: the checkpoint's encoder does not fit the network these settings build "
                            "(encoder cnn -> resnet18; image_size 28 -> 32; cifar_stem n/a -> on); resume with the data and --crop-size the run trained with, or start "
                            "a new run")
    assert (run / "config.toml").read_bytes() == config and [p.name for p in list_checkpoints(run)] == checkpoints
    res = pretrain(tiny_config(run), resume=run, dataset=ds, **QUIET)  # the run itself is untouched
    assert res.steps == 12


def test_a_checkpoint_keeps_the_gpus_generator_as_well(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.manual_seed at a run's start resets the GPU's generator too, and only the CPU's state
    was kept: on CUDA a user's dropout drew the first steps' masks again after a resume. The CUDA
    state of the run's device is saved beside the CPU's and put back; a CPU run keeps none, and a
    CPU checkpoint resumed on a GPU leaves its generator as seeded."""
    from fastclr.pretraining.state import generator_states, restore_generators

    gpu_state = {"now": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    put: list[tuple[list[int], torch.device]] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpu_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: put.append((state.tolist(), device)))
    gpu = torch.device("cuda", 1)
    saved = generator_states(gpu)
    assert saved["cuda_rng"].tolist() == [1, 2, 3] and torch.equal(saved["torch_rng"], torch.get_rng_state())
    torch.manual_seed(99)
    restore_generators(saved, gpu)
    assert put == [([1, 2, 3], gpu)] and torch.equal(torch.get_rng_state(), saved["torch_rng"])
    cpu_saved = generator_states(torch.device("cpu"))
    assert set(cpu_saved) == {"torch_rng"}
    restore_generators(cpu_saved, gpu)
    assert len(put) == 1


def test_allow_config_changes_help_names_every_setting_it_allows() -> None:
    """Each of RESUME_KEYS in --allow-config-change's help, in its words or its flag: a key added
    there without its help (augment.local_size was missing) fails here."""
    import argparse

    from fastclr.cli import build_parser
    from fastclr.pretraining.state import RESUME_KEYS

    words = {"data.name": "dataset", "train.batch_size": "batch size", "train.views": "views",
             "train.local_views": "small views", "train.supcon": "--supcon", "train.queue": "queue",
             "train.nn_support": "support set", "train.seed": "seed", "augment.crop_size": "--crop-size",
             "augment.local_size": "--local-size"}
    assert set(words) == set(RESUME_KEYS)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(next(a.help or "" for a in sub.choices["pretrain"]._actions
                         if "--allow-config-change" in a.option_strings).split())
    assert [k for k, w in words.items() if w not in text] == []


def test_a_runs_checkpoint_carries_and_a_resume_restores_its_gpus_generator(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's own save and restore, as on a GPU (its device and CUDA's generator stood in for):
    the checkpoint holds the GPU generator's state, and the resume puts exactly that back."""
    from tiny import tiny_config, tiny_dataset
    from fastclr.pretraining.state import RunState

    states = iter(torch.tensor([i, 7], dtype=torch.uint8) for i in range(1000))
    put: list[list[int]] = []
    monkeypatch.setattr(RunState, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: next(states))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: put.append(state.tolist()))
    ds, quiet = tiny_dataset(), dict(progress=False, log=lambda s: None)
    assert pretrain(tiny_config(tmp_path), dataset=ds, stop=lambda step: step == 5, **quiet).stopped
    saved = load_checkpoint(list_checkpoints(tmp_path)[-1])["cuda_rng"].tolist()
    assert saved[1] == 7
    pretrain(tiny_config(tmp_path), resume=tmp_path, dataset=ds, stop=lambda step: step == 6, **quiet)
    assert put == [saved]


def test_runs_started_in_the_same_second_under_the_default_name_each_get_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default name `runs/DATA-YYYYmmdd-HHMMSS` names the second: the second of two seeds started
    together was refused as "being written by PID ...". It now takes the name with -2, and a run
    given its directory is never renamed."""
    from fastclr.presets import config_for
    from fastclr.runs import claim_new_dir
    from tiny import TINY

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fastclr.runs.time.strftime", lambda fmt, *a: "20261206-235959")
    ds = tiny_dataset()
    runs = [pretrain(config_for(None, {**TINY, "train.seed": seed}), dataset=ds, **QUIET).run_dir for seed in (0, 1)]
    assert [str(r) for r in runs] == ["runs/fashion-mnist-20261206-235959", "runs/fashion-mnist-20261206-235959-2"]
    assert [load_checkpoint(list_checkpoints(r)[-1])["config"]["train"]["seed"] for r in runs] == [0, 1]
    assert claim_new_dir(Path("runs/fashion-mnist-20261206-235959")) == Path("runs/fashion-mnist-20261206-235959-3")
    with pytest.raises(FastclrError, match="files that are not a fastclr run|not a fastclr run"):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("x")
        pretrain(tiny_config(tmp_path / "mine"), dataset=ds, **QUIET)


def test_an_encoder_whose_weights_alone_would_not_fit_is_refused_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--width 100` grew the process until the kernel killed it (and others with it): the weights,
    their gradients and AdamW's two moments, counted on the meta device, are checked against the
    memory available first."""
    from fastclr.pretraining.model import named_encoder

    cfg, ds = tiny_config(tmp_path / "run", model__width=2.0), tiny_dataset()
    with torch.device("meta"):
        weights = sum(p.numel() for p in named_encoder(cfg, ds.image_shape, "cpu")[0].parameters())
    monkeypatch.setattr("fastclr.runtime.available_memory", lambda: int(4 * weights * 4 / 0.9) - 1000)
    with pytest.raises(FastclrError, match=rf"^the encoder at width 2 \({weights / 1e6:,.0f} million weights\) needs "
                                           r"about .* GiB but .* GiB are available; give a smaller --width, or run where "
                                           r"there is more memory$"):
        pretrain(cfg, dataset=ds, **QUIET)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr("fastclr.runtime.available_memory", lambda: int(4 * weights * 4 / 0.9) + 1000)
    monkeypatch.setattr("fastclr.pretraining.loop.require_step_memory", lambda *a, **kw: None)  # (its own test)
    assert pretrain(cfg, dataset=ds, **QUIET).steps == 12


def test_a_default_run_folder_under_a_link_to_nothing_is_one_error_not_a_loop(tmp_path: Path) -> None:
    """`runs` a link to a scratch folder purged: every name's mkdir failed with "exists" from its
    parent, and the search for a free name never ended (100% CPU, other ranks waiting for the timeout)."""
    from fastclr.runs import claim_new_dir

    (tmp_path / "runs").symlink_to(tmp_path / "purged")
    with pytest.raises(FastclrError, match=rf"^{tmp_path / 'runs'} is not a folder \(a file, or a link to a folder "
                                           r"that is not there\); make it one, or give a --run-dir$"):
        claim_new_dir(tmp_path / "runs" / "fashion-mnist-20261206-235959")
    assert not (tmp_path / "purged").exists()


def test_a_default_run_folder_claimed_for_a_run_that_fails_to_start_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A network that cannot be built (here a module failing its first forward, as a distributed
    mismatch or a compile error would fail later in the start) left the claimed runs/NAME empty."""
    from torch import nn

    from fastclr.presets import config_for
    from tiny import TINY

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise FastclrError("this module cannot run")

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FastclrError, match="this module cannot run"):
        pretrain(config_for(None, dict(TINY)), dataset=tiny_dataset(), encoder=Broken(), **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_an_encoder_named_on_resume_is_compared_with_the_network_the_checkpoint_holds(tmp_path: Path) -> None:
    """A run trained (from Python) on a module of its own records `auto` and built "custom": `--encoder
    cnn` is not its network and is refused here, not later by the checkpoint's tensors."""
    from fastclr.pretraining.state import check_resume_config

    saved, wanted = tiny_config(tmp_path), tiny_config(tmp_path, model__encoder="cnn")
    with pytest.raises(FastclrError, match="cannot resume: model.encoder differs from the checkpoint's config"):
        check_resume_config(saved, wanted, allow_changes=False, built={"encoder": "custom", "image_size": 28})
    check_resume_config(saved, wanted, allow_changes=False, built={"encoder": "cnn", "image_size": 28})


def test_a_network_for_a_gpu_is_counted_against_the_host_its_weights_are_drawn_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights are drawn on the host before they move to a GPU (the gradients are made there): one
    float32 copy counts against the host's memory for a GPU, the weights and gradients for a CPU."""
    from torch import nn

    from fastclr.runtime import on_meta, require_model_memory

    weights = 1000 * 1000 + 1000
    monkeypatch.setattr("fastclr.runtime.available_memory", lambda: int(1.5 * weights * 4 / 0.9))
    require_model_memory(on_meta(lambda: nn.Linear(1000, 1000)), torch.device("cuda"), "a layer", "")  # no GPU is touched
    with pytest.raises(FastclrError, match=r"^a layer \(1 million weights\) needs about"):
        require_model_memory(on_meta(lambda: nn.Linear(1000, 1000)), torch.device("cpu"), "a layer", "")
    monkeypatch.setattr("fastclr.runtime.available_memory", lambda: int(0.9 * weights * 4 / 0.9))
    with pytest.raises(FastclrError, match=r"^a layer \(1 million weights\) needs about"):
        require_model_memory(on_meta(lambda: nn.Linear(1000, 1000)), torch.device("cuda"), "a layer", "")


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_a_linked_copy_of_a_run_resumed_leaves_the_originals_metrics_alone(tmp_path: Path, link: str) -> None:
    """`cp -al a b` (or `cp -rs a b`) then a resume of b appended b's records into a's metrics.jsonl (one
    file, two names): a's curves then showed steps it never trained. Every other file was written anew,
    and is now."""
    import shutil

    ds = tiny_dataset()
    pretrain(tiny_config(tmp_path / "a"), dataset=ds, **QUIET)
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=os.link if link == "hard" else os.symlink)
    before = (tmp_path / "a" / "metrics.jsonl").read_bytes()
    pretrain(tiny_config(tmp_path / "b", train__epochs=3.0), resume=tmp_path / "b", dataset=ds, **QUIET)
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == before
    assert max(r["step"] for r in read_metrics(tmp_path / "b")) == 18 > max(r["step"] for r in read_metrics(tmp_path / "a"))
    assert not (tmp_path / "b" / "metrics.jsonl").is_symlink()


@pytest.mark.parametrize(("change", "said"), [
    ({"step": "abc"}, "records no step ('abc'): not a checkpoint fastclr wrote"),
    ({"config": ["not", "a", "record"]}, "records its settings in a form this version cannot read (AttributeError"),
    ({"config": None}, "records its settings in a form this version cannot read ("),
])
def test_a_checkpoint_crafted_to_pass_its_checksum_with_fields_of_another_kind_is_one_line(
        tmp_path: Path, change: dict[str, Any], said: str) -> None:
    """The checksum is no signature: anyone can recompute it. A step that is not a number, settings that
    are not a record: tracebacks (ValueError, AttributeError) from `evaluate`, `embed`, `--resume`."""
    from fastclr.checkpoint import FORMAT, content_sha256
    from fastclr.pretrained import load_run

    run = tmp_path / "run"
    pretrain(tiny_config(run, train__epochs=1.0, train__checkpoint_every=1), dataset=tiny_dataset(), progress=False,
             log=lambda s: None)
    (run / "encoder.safetensors").unlink()  # the checkpoint is what is read
    for old in list_checkpoints(run)[:-1]:
        old.unlink()
    path = list_checkpoints(run)[-1]
    state = {**load_checkpoint(path), **change, "format": FORMAT}
    torch.save({**state, "sha256": content_sha256(state)}, path)
    with pytest.raises(FastclrError) as e:
        load_run(run, "cpu", "fp32", log=lambda s: None)
    assert said in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(("change", "said"), [
    ({"encoder": None}, "lacks encoder"),
    ({"head": {"0.weight": "abc"}}, "holds head in a form fastclr does not write"),
    ({"torch_rng": torch.zeros(3, dtype=torch.uint8)}, "holds torch_rng in a form fastclr does not write"),
    ({"total_steps": "abc", "pace_mark": [1]}, "holds total_steps, pace_mark in a form fastclr does not write"),
    ({"optimizer": {"state": {}, "param_groups": []}}, "cannot resume RUN: its checkpoint holds state this run's "
                                                        "network and optimiser cannot take (ValueError: "),
    # found by a regression tester: forms right, contents no run writes
    ({"step_offset": -100000, "steps_per_epoch": 0}, "holds step_offset, steps_per_epoch in a form fastclr does not"),
    ({"head": {}, "config": {}}, "holds head, config in a form fastclr does not write"),
    ({"temperature": {"log_t": torch.tensor(0.1)}}, "holds temperature in a form fastclr does not write"),
    ({"config": "batch_size -3"}, "records its settings in a form this version cannot read (FastclrError: "
                                  "train.batch_size = -3 is not allowed"),
    ({"queue": "pointer -5"}, "cannot resume RUN: its checkpoint holds state this run's network and optimiser cannot "
                              "take (ValueError: a queue of 64 rows at row -5 with 64 filled)"),
])
def test_a_checkpoint_crafted_to_pass_its_checksum_without_a_part_of_a_run_is_one_line(
        tmp_path: Path, change: dict[str, Any], said: str) -> None:
    """A checkpoint without its encoder, or with a generator state, step count or optimiser state fastclr
    never writes, passed its unkeyed checksum into tracebacks (KeyError, RuntimeError from torch's
    generator, ValueError) from `--resume` and `evaluate`; the checkpoint is left as it was. Of the
    right form but impossible: a place before the data's start trained at a negative learning rate
    and rotated the good checkpoints away; an empty record of settings evaluated another dataset."""
    from fastclr.checkpoint import FORMAT, content_sha256
    from fastclr.pretrained import load_run

    run = tmp_path / "run"
    queue = {"train__queue": 64} if "queue" in change else {}
    pretrain(tiny_config(run, train__epochs=1.0, train__checkpoint_every=1, **queue), dataset=tiny_dataset(), **QUIET)
    (run / "encoder.safetensors").unlink()  # the checkpoint is what is read
    for old in list_checkpoints(run)[:-1]:
        old.unlink()
    path = list_checkpoints(run)[-1]
    state = load_checkpoint(path)
    if change.get("config") == "batch_size -3":
        change = {"config": {**state["config"], "train": {**state["config"]["train"], "batch_size": -3}}}
    elif "queue" in change:
        change = {"queue": {**state["queue"], "pointer": -5}}
    state = {k: v for k, v in {**state, **change, "format": FORMAT}.items() if v is not None}
    torch.save({**state, "sha256": content_sha256(state)}, path)
    crafted = path.read_bytes()
    said = said.replace("RUN", str(run))
    calls = [lambda: pretrain(tiny_config(run, train__epochs=2.0, **queue), resume=run, dataset=tiny_dataset(), **QUIET)]
    if "optimizer" not in change and "queue" not in change:  # the optimiser's and queue's states are a resume's alone
        calls.append(lambda: load_run(run, "cpu", "fp32", log=lambda s: None))
    for call in calls:
        with pytest.raises(FastclrError) as e:
            call()
        assert said in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert list_checkpoints(run) == [path] and path.read_bytes() == crafted


def test_the_checkpoint_checksum_is_the_one_earlier_checkpoints_carry() -> None:
    """SHA-256 over keys, tensors (dtype, shape, bytes) and scalars, transcribed: hashing a tensor in place
    (not a copy of its bytes: a copy of every tensor ran a checkpoint out of memory) must give the digest
    checkpoints already on disk were written with, or they would all read as damaged."""
    import hashlib

    from fastclr.checkpoint import content_sha256

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # not contiguous: hashed as its contiguous copy
    h = hashlib.sha256()
    for part in (b"D2", repr("step").encode(), b"Vint:7", repr("w").encode(), b"Ttorch.float32(3, 2)",
                 w.contiguous().numpy().tobytes()):
        h.update(part)
    assert content_sha256({"w": w, "step": 7}) == h.hexdigest()


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. "
                                   "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes.")])
def test_a_checkpoint_that_memory_cannot_hold_is_not_called_damaged_nor_passed_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Out of memory while reading the newest checkpoint said it was damaged, and a resume passed over
    it to the one before and wrote over the newer steps; the error now reaches the command, which
    says out of memory in one line."""
    import fastclr.checkpoint
    from fastclr.checkpoint import save_checkpoint

    for step in (1, 2):
        save_checkpoint(tmp_path, {"step": step, "w": torch.ones(3) * step})
    real = torch.load

    def short_of_memory(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("000000002.pt"):
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fastclr.checkpoint.torch, "load", short_of_memory)
    warned: list[str] = []
    with pytest.raises(type(error)):
        latest_valid_checkpoint(tmp_path, warn=warned.append)
    assert warned == []
