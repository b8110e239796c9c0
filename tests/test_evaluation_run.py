"""`fastclr evaluate` end to end on a tiny run: what each protocol reports, that they share
subsets, that the encoder is untouched, and the one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import installs, sealed
from eval_fixtures import alter_encoder, one_thread, tiny_dataset, tiny_run, write_tiny_idx  # noqa: F401 (one_thread: autouse)
from fastclr.cli import main
from fastclr.data import Dataset, ImageSet
from fastclr.errors import FastclrError
from fastclr.evaluation.options import EvaluateOptions
import fastclr.evaluation.run as run_module
from fastclr.evaluation.reference import SMALL_LIFT, lift_summary, untrained_encoder
from fastclr.evaluation.run import evaluate
from fastclr.evaluation.table import footer_line, format_table
from fastclr.pretraining.model import build_model
from fastclr.evaluation.knn import knn_accuracy
from fastclr.pretrained import load_run
from fastclr.evaluation.probe import linear_probe
from fastclr.evaluation.features import extract_features, state_checksum

Run = tuple[Path, Dataset, dict[str, Any]]
SMALL = EvaluateOptions(labels_per_class=(2, 5), seeds=(0, 1), supervised_seeds=(0, 1), finetune_fractions=(0.1,),
                        steps=3, batch_size=16, quality_images=64, device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset, dict[str, Any]]:
    ds = tiny_dataset()
    run_dir = tiny_run(tmp_path_factory.mktemp("eval") / "run", ds)
    return run_dir, ds, evaluate(run_dir, SMALL, dataset=ds, log=lambda s: None)


def test_results_file_and_untouched_encoder(run: Run) -> None:
    run_dir, _, out = run
    assert json.loads((run_dir / "eval.json").read_text()) == json.loads(json.dumps(out))
    assert set(out["protocols"]) == {"linear", "knn", "fewshot", "supervised", "finetune", "quality"}
    assert out["encoder_unchanged"] and out["encoder_sha256"] == out["encoder_sha256_after"]
    assert out["encoder_sha256"] == state_checksum(load_run(run_dir).encoder)


def test_a_protocol_that_moves_the_encoder_fails_the_evaluation(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checksums before and after are really compared: a protocol that trains the run's own
    encoder (instead of a copy, as fine-tuning must) makes `evaluate` fail, writing nothing."""
    run_dir, ds, _ = run
    written = (run_dir / "eval.json").read_text()

    def careless(c: Any) -> dict[str, Any]:
        with torch.no_grad():
            next(c.run.encoder.parameters()).add_(1e-3)
        return {}

    monkeypatch.setitem(run_module.RUNNERS, "linear", careless)
    with pytest.raises(AssertionError, match="evaluation changed the encoder's weights"):
        evaluate(run_dir, EvaluateOptions(protocols=("linear",), device="cpu"), dataset=ds, log=lambda s: None)
    assert (run_dir / "eval.json").read_text() == written


def test_linear_and_knn_are_the_standard_protocols_on_frozen_features(run: Run) -> None:
    run_dir, ds, out = run
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    r = load_run(run_dir)
    kw: dict[str, Any] = dict(precision=r.precision, size=28)
    ytr, yte = torch.from_numpy(ds.train.labels), torch.from_numpy(ds.test.labels)
    untrained = untrained_encoder(r.spec, r.config.train.seed, torch.device("cpu"))
    for encoder, reported in ((r.encoder, out["protocols"]), (untrained, {
            "linear": out["protocols"]["linear"]["random_init"], "knn": out["protocols"]["knn"]["random_init"]})):
        ftr = extract_features(encoder, ds.train.images, r.mean, r.std, torch.device("cpu"), **kw)
        fte = extract_features(encoder, ds.test.images, r.mean, r.std, torch.device("cpu"), **kw)
        assert reported["linear"]["accuracy"] == pytest.approx(
            linear_probe(ftr, ytr, fte, yte, feature_dtype=r.precision.feature_dtype).accuracy)
        assert reported["knn"]["accuracy"] == pytest.approx(knn_accuracy(ftr, ytr, fte, yte, 20, 0.07, r.precision))
    assert out["protocols"]["knn"]["k"] == 20 and out["protocols"]["knn"]["tau"] == 0.07
    assert out["protocols"]["linear"]["accuracy"] > 0.5  # bars are linearly separable: well above 10% chance


def test_the_untrained_reference_is_the_runs_own_network_before_its_first_step(run: Run) -> None:
    """Same module tree, shapes and preprocessing as the trained encoder, and exactly the weights
    `pretrain` started from (rebuilt here the way pretrain builds them)."""
    run_dir, ds, _ = run
    r = load_run(run_dir)
    untrained = untrained_encoder(r.spec, r.config.train.seed, torch.device("cpu"))
    assert [(n, type(m).__name__) for n, m in untrained.named_modules()] == \
        [(n, type(m).__name__) for n, m in r.encoder.named_modules()]
    trained_state, untrained_state = r.encoder.state_dict(), untrained.state_dict()
    assert {k: v.shape for k, v in untrained_state.items()} == {k: v.shape for k, v in trained_state.items()}
    torch.manual_seed(r.config.train.seed)
    initial = build_model(r.config, ds, torch.device("cpu")).encoder.state_dict()
    for k, v in initial.items():
        assert torch.equal(untrained_state[k], v), k
    assert any(not torch.equal(trained_state[k], initial[k]) for k in initial if initial[k].is_floating_point())
    assert ds.test is not None  # both see the run's own standardisation and give h of the same shape
    h1 = extract_features(r.encoder, ds.test.images[:4], r.mean, r.std, torch.device("cpu"), size=28)
    h0 = extract_features(untrained, ds.test.images[:4], r.mean, r.std, torch.device("cpu"), size=28)
    assert h1.shape == h0.shape == (4, r.spec.feature_dim)


def test_lift_and_flag_come_from_the_reported_figures_of_one_extraction(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, ds, _ = run
    calls: list[int] = []
    real = run_module.features_of

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "features_of", counting)
    opts = EvaluateOptions(protocols=("linear", "knn", "fewshot"), labels_per_class=(2,), seeds=(0,), device="cpu")
    out = evaluate(run_dir, opts, dataset=ds, log=lambda s: None)
    assert calls == [600, 200, 600, 200]  # train and test h, trained then untrained: once each
    p, lift = out["protocols"], out["lift"]
    assert lift["linear"] == p["linear"]["accuracy"] - p["linear"]["random_init"]["accuracy"]
    assert lift["knn"] == p["knn"]["accuracy"] - p["knn"]["random_init"]["accuracy"]
    assert lift["fewshot"]["2"] == p["fewshot"]["curve"][0]["mean"] - p["fewshot"]["random_init_curve"][0]["mean"]
    assert lift["small"] == (lift["linear"] < SMALL_LIFT - 1e-6)
    table = format_table(out)
    assert ("FLAG: the linear probe is only" in table) == lift["small"]
    assert f"{100 * lift['linear']:+.2f} points" in table


def test_an_untrained_network_that_beats_the_trained_one_is_flagged() -> None:
    """A negative lift (pretraining made the probe worse) is a small lift too, not a large one."""
    from fastclr.evaluation.reference import small_lift

    assert small_lift(-0.10) and not small_lift(SMALL_LIFT + 0.01)
    lift = lift_summary({"linear": {"accuracy": 0.80, "random_init": {"accuracy": 0.90}}})
    assert lift is not None and lift["linear"] == pytest.approx(-0.10) and lift["small"]


def test_a_small_lift_is_flagged_in_the_table() -> None:
    protocols = {"linear": {"accuracy": 0.90, "labels": 10, "random_init": {"accuracy": 0.88}}}
    lift = lift_summary(protocols)
    assert lift["linear"] == pytest.approx(0.02) and lift["small"]
    out = {"run_dir": "r", "dataset": "d", "encoder": {"encoder": "cnn", "feature_dim": 8}, "protocols": protocols,
           "lift": lift, "total_seconds": 1.0}
    assert "FLAG: the linear probe is only +2.00 points above the same network untrained" in format_table(out)
    protocols["linear"]["accuracy"] = 0.3086  # below the untrained network: "only -57.14 points above" before
    out["lift"] = lift_summary(protocols)
    assert "FLAG: the linear probe is 57.14 points below the same network untrained" in format_table(out)
    assert not lift_summary({"linear": {"accuracy": 0.90, "random_init": {"accuracy": 0.80}}})["small"]


def test_the_lead_over_scratch_is_taken_on_the_label_subsets_both_used() -> None:
    """The probe ran on subsets a, b, c and the baseline on a and b only (evaluate's default until
    2026-12-06): the lead is the mean of the differences on a and b, 0.125, not the difference of
    the means (0.8 - 0.625 = 0.175), which adds subset c's ease to the gap."""
    from fastclr.evaluation.table import curve_rows

    def curve(accs: dict[str, float]) -> dict[str, Any]:
        mean = sum(accs.values()) / len(accs)
        return {"curve": [{"labels_per_class": 10, "mean": mean, "std": 0.0,
                           "runs": [{"subset": k, "accuracy": v} for k, v in accs.items()]}]}
    rows = curve_rows({"fewshot": curve({"a": 0.8, "b": 0.7, "c": 0.9}), "supervised": curve({"a": 0.6, "b": 0.65})})
    assert rows[0][-1] == "probe over scratch, same labels" and rows[1][-1] == "+12.50 points (2 subsets)"
    rows = curve_rows({"fewshot": curve({"c": 0.9}), "supervised": curve({"a": 0.6})})
    assert rows[1][-1] == "-"  # no subset in common: no gap
    d = EvaluateOptions()
    assert set(d.supervised_seeds) <= set(d.seeds)  # by default, every baseline subset has the probe too
    assert (len(d.seeds), len(d.supervised_seeds)) == (10, 3)  # the probe's mean over ten: ~1.1 points a subset
    ten = curve({str(k): 0.8 for k in range(10)})["curve"][0]
    rows = curve_rows({"fewshot": {"curve": [dict(ten, std=0.01)]}, "supervised": curve({"0": 0.7, "1": 0.7, "2": 0.7})})
    assert rows[1][1:] == ["80.00 ± 1.00% (10 seeds)", "70.00 ± 0.00% (3 seeds)", "+10.00 points (3 subsets)"]


def test_the_few_label_lift_is_trained_minus_untrained_where_both_were_measured() -> None:
    """The few-label lift is what pretraining added at each labels-per-class point: the trained
    probe's mean minus the untrained network's (0.8 - 0.6 = +0.2 at 5 labels; at 10, not measured
    untrained, there is no lift to give)."""
    lift = lift_summary({"fewshot": {"curve": [{"labels_per_class": 5, "mean": 0.8}, {"labels_per_class": 10, "mean": 0.9}],
                                     "random_init_curve": [{"labels_per_class": 5, "mean": 0.6}]}})
    assert lift == {"fewshot": {"5": pytest.approx(0.2)}}


def test_the_table_shows_each_figure_in_its_own_cell() -> None:
    """Every figure of the quality and fine-tuning blocks distinct, so that a cell showing another
    one is seen: the random-init column holds the random-init figures, and the fine-tuning row's
    linear-probe cell is the mean over its runs (0.2 and 0.6: 40.00%, not the best run's 60.00%)."""
    import re

    out = {"run_dir": "R", "dataset": "d", "total_seconds": 1.0, "encoder": {"encoder": "cnn", "feature_dim": 8},
           "protocols": {
               "quality": {"alignment": 0.1, "uniformity": -3.0, "effective_rank": 5.0, "feature_dim": 8,
                           "random_init": {"alignment": 0.9, "uniformity": -1.0, "effective_rank": 2.0}},
               "finetune": {"fractions": [{"fraction": 0.1, "labels_per_class": 2, "mean": 0.5, "std": 0.1,
                                           "scratch_mean": 0.3,
                                           "runs": [{"linear_accuracy": 0.2}, {"linear_accuracy": 0.6}]},
                                          {"fraction": 0.01, "label_fraction": 0.04, "labels_per_class": 1,
                                           "mean": 0.45, "std": 0.0, "runs": [{"linear_accuracy": 0.35}]}]}}}
    rows = [re.split(r"\s{2,}", line.strip()) for line in format_table(out).splitlines()]
    assert ["label fraction", "fine-tuned", "linear probe", "from scratch"] in rows
    assert ["10% (2/class)", "50.00 ± 10.00% (2 seeds)", "40.00%", "30.00%"] in rows  # saved before label_fraction
    assert ["4% (1/class)", "45.00% (1 seed)", "35.00%", "-"] in rows  # 1% asked, one label a class: 4% held
    assert ["label-free (no labels used)", "this encoder", "same net, random init"] in rows
    assert ["alignment (lower: views agree)", "0.100", "0.900"] in rows
    assert ["uniformity (lower: spread out)", "-3.000", "-1.000"] in rows
    assert ["effective rank", "5.0 / 8", "2.0"] in rows


def test_every_lift_shown_and_flagged_is_computed_once_from_the_figures_shown() -> None:
    """The few-label lift was in eval.json alone (the README promises it beside every probe figure),
    and a negative one went unremarked; the FLAG read the stored `lift` while the cells recomputed
    it, so an edited eval.json showed +2.00 beside no flag. Both now come from lift_summary of the
    figures the table shows."""
    def curve(accs: dict[int, float]) -> list[dict[str, Any]]:
        return [{"labels_per_class": n, "mean": a, "std": 0.0, "runs": [{"subset": f"s{n}", "accuracy": a}]}
                for n, a in accs.items()]

    protocols: dict[str, Any] = {
        "linear": {"accuracy": 0.90, "labels": 100, "random_init": {"accuracy": 0.88}},
        "knn": {"accuracy": 0.80, "k": 20, "random_init": {"accuracy": 0.83}},
        "fewshot": {"curve": curve({2: 0.40, 5: 0.70, 10: 0.75}),
                    "random_init_curve": curve({2: 0.45, 5: 0.60, 10: 0.80})},
    }
    stored = {"linear": 0.5, "knn": 0.5, "small": False, "threshold": SMALL_LIFT, "fewshot": {"2": 0.5}}  # edited
    out = {"run_dir": "R", "dataset": "d", "total_seconds": 1.0, "encoder": {"encoder": "cnn", "feature_dim": 8},
           "protocols": protocols, "lift": stored}
    table = format_table(out)
    rows = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()]
    assert ["linear probe on h", "all (100)", "90.00%", "88.00%", "+2.00 points"] in rows
    assert ["kNN on h (k=20)", "all", "80.00%", "83.00%", "-3.00 points"] in rows
    assert ["labels/class", "linear probe on h", "same net untrained", "lift", "supervised from scratch"] in rows
    assert ["2", "40.00% (1 seed)", "45.00% (1 seed)", "-5.00 points", "-"] in rows
    assert ["5", "70.00% (1 seed)", "60.00% (1 seed)", "+10.00 points", "-"] in rows
    flags = [line for line in table.splitlines() if line.startswith("FLAG")]
    assert flags == [
        "FLAG: the linear probe is only +2.00 points above the same network untrained (threshold 5 points): most of "
        "this accuracy is the architecture's, not what pretraining learned",
        "FLAG: kNN on h is 3.00 points below the same network untrained: for it, pretraining did not help",
        "FLAG: the few-label probe is below the same network untrained at 2 labels per class (5.00 points), 10 labels "
        "per class (5.00 points): there pretraining did not help"]
    assert table.index(flags[1]) < table.index("labels/class") < table.index(flags[2])


def test_the_table_names_the_run_as_given_and_says_when_it_measured_a_checkpoint() -> None:
    """A run moved since its evaluation (`cp -a base renamed`) was named by eval.json's old folder;
    results of a run stopped before its end (measured on its checkpoint) did not say so."""
    out = {"run_dir": "base", "dataset": "d", "total_seconds": 1.0, "encoder": {"encoder": "cnn", "feature_dim": 8},
           "protocols": {"knn": {"accuracy": 0.8, "k": 20}}}
    lines = format_table(out, run_dir="renamed").splitlines()
    assert lines[0] == "renamed: cnn encoder (h: 8-d) on d" and lines[-1] == "total 1 s; results in renamed/eval.json"
    assert format_table(out).splitlines()[0] == "base: cnn encoder (h: 8-d) on d"  # evaluate: the folder it was given
    lines = format_table({**out, "checkpoint_step": 4}).splitlines()
    assert lines[0] == ("base: cnn encoder (h: 8-d) on d, measured at the checkpoint of step 4 (the run has no exported "
                        "encoder: it stopped before its end, is still training, or its export is gone)")


def test_one_seed_is_shown_without_a_spread() -> None:
    from fastclr.evaluation.table import pct_spread

    one = {"mean": 0.8711, "std": 0.0, "runs": [{"accuracy": 0.8711}]}
    two = {"mean": 0.70, "std": 0.0042, "runs": [{"accuracy": 0.697}, {"accuracy": 0.703}]}
    assert pct_spread(one) == "87.11% (1 seed)" and pct_spread(two) == "70.00 ± 0.42% (2 seeds)"


def test_seeds_that_draw_the_same_images_are_said_to_be_fewer_subsets(tmp_path: Path) -> None:
    """`--labels-per-class 6000 --seeds 0,1` on Fashion-MNIST gave "76.60 ± 0.01% (2 seeds)": both
    seeds draw every image, so the spread is the fit's alone. The subsets drawn are counted."""
    from fastclr.evaluation.curve import label_sweep
    from fastclr.evaluation.table import pct_spread

    labels = np.repeat(np.arange(3), 4)  # 4 images of each of 3 classes
    said: list[str] = []
    curve = label_sweep(labels, [2, 4], [0, 1, 2], ["a", "b", "c"], lambda idx, seed: {"accuracy": 0.5 + seed / 100},
                        said.append, "probe")
    few, every = curve
    assert len({r["subset"] for r in few["runs"]}) == 3 and len({r["subset"] for r in every["runs"]}) == 1
    assert pct_spread(few) == "51.00 ± 1.00% (3 seeds)"
    assert pct_spread(every) == "51.00 ± 1.00% (3 seeds, 1 distinct subset)"
    assert said == ["probe 2/class: 51.00% over 3 seed(s)", "probe 4/class: 51.00% over 3 seed(s), 1 distinct subset"]
    old = {**every, "runs": [{k: v for k, v in r.items() if k != "subset"} for r in every["runs"]]}
    assert pct_spread(old) == "51.00 ± 1.00% (3 seeds)"  # recorded before subsets were: cannot tell


def test_a_lift_of_exactly_the_threshold_in_test_images_is_not_flagged() -> None:
    # accuracies are float32 means of test images: every lift of exactly 500 in 10,000 reaches
    # the 5-point threshold, although some differences of two such means fall below 0.05
    n = 10_000
    below = 0
    for right in range(8600, 9600, 7):
        trained = float((torch.arange(n) < right).float().mean())
        untrained = float((torch.arange(n) < right - 500).float().mean())
        below += trained - untrained < SMALL_LIFT
        assert not lift_summary({"linear": {"accuracy": trained, "random_init": {"accuracy": untrained}}})["small"]
        one_short = float((torch.arange(n) < right - 499).float().mean())  # 4.99 points
        assert lift_summary({"linear": {"accuracy": trained, "random_init": {"accuracy": one_short}}})["small"]
    assert below > 0  # the case that needs the tolerance occurs


def test_few_label_protocols_share_fixed_subsets(run: Run) -> None:
    p = run[2]["protocols"]
    few, sup = p["fewshot"]["curve"], p["supervised"]["curve"]
    assert [e["labels_per_class"] for e in few] == [2, 5] == [e["labels_per_class"] for e in sup]
    for f, s in zip(few, sup):
        assert [r["subset"] for r in f["runs"]] == [r["subset"] for r in s["runs"]]  # same images, same seed
        assert f["runs"][0]["subset"] != f["runs"][1]["subset"]  # seeds draw different subsets
        accs = [r["accuracy"] for r in f["runs"]]
        assert f["mean"] == pytest.approx(np.mean(accs)) and f["std"] == pytest.approx(np.std(accs, ddof=1))
    ft = p["finetune"]["fractions"][0]
    assert ft["fraction"] == 0.1 and ft["labels_per_class"] == 6  # 10% of 600 images over 10 classes
    assert {"accuracy", "linear_accuracy", "scratch_accuracy"} <= set(ft["runs"][0])
    q = p["quality"]
    assert q["images"] == 64 and 1 <= q["effective_rank"] <= q["feature_dim"] and -4 <= q["uniformity"] <= 0
    assert set(q["random_init"]) == {"alignment", "uniformity", "effective_rank", "feature_dim"}


def test_unlabelled_dataset_asked_for_labelled_protocols(run: Run) -> None:
    run_dir, ds, _ = run
    unlabelled = Dataset("my-photos", ds.pretrain, None, None, [])
    with pytest.raises(FastclrError, match=r"dataset my-photos has no labelled train and test splits, which protocols "
                                           rf"linear need; run `fastclr evaluate {re.escape(str(run_dir))} --protocols "
                                           "quality`"):
        evaluate(run_dir, EvaluateOptions(protocols=("linear",), device="cpu"), dataset=unlabelled, log=lambda s: None)
    quality_only = EvaluateOptions(protocols=("quality",), quality_images=32, device="cpu")
    out = evaluate(run_dir, quality_only, dataset=unlabelled, log=lambda s: None)
    assert set(out["protocols"]) == {"quality"}  # the label-free measures need no labels
    assert ds.test is not None
    no_test = Dataset("my-photos", ds.pretrain, ds.train, ImageSet(ds.test.images[:0], ds.test.labels[:0]), ds.classes)
    with pytest.raises(FastclrError, match=r"^dataset my-photos's labelled test split is empty, which protocols knn "
                                           rf"need; run `fastclr evaluate {re.escape(str(run_dir))} --protocols "
                                           "quality`"):
        evaluate(run_dir, EvaluateOptions(protocols=("knn",), device="cpu"), dataset=no_test, log=lambda s: None)


def test_cli_table_and_one_line_errors(run: Run, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, ds, _ = run
    write_tiny_idx(tmp_path / "data" / "fashion-mnist", ds)
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path / "data"))
    assert main(["evaluate", str(run_dir), "--protocols", "linear,knn", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    acc = json.loads((run_dir / "eval.json").read_text())["protocols"]["linear"]["accuracy"]
    assert f"linear probe on h  all (600)  {100 * acc:.2f}%" in printed and "same net untrained" in printed

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.toml").write_text((run_dir / "config.toml").read_text())
    cases = [
        ([str(run_dir), "--labels-per-class", "10,500"], "asked for 500 labels per class but class"),
        ([str(tmp_path / "empty")], "has no encoder.safetensors and no checkpoint: it stopped before its first checkpoint; "
                                    "start it again with the command that made it (its settings: "
                                    f"{tmp_path / 'empty' / 'config.toml'}), then evaluate it"),
        ([str(tmp_path)], f"{tmp_path} holds no config.toml; it is not a fastclr run directory"),
        ([str(run_dir), "--protocols", "linaer"], "unknown protocol linaer; choose from: linear, knn"),
        ([str(run_dir), "--seeds", "a,b"], "--seeds takes a comma-separated list of ints"),
        ([str(run_dir), "--steps", "0"], "--steps must be at least 1"),
        # BatchNorm cannot train on one image, uniformity needs two (both were tracebacks)
        ([str(run_dir), "--batch-size", "1"], "--batch-size must be at least 2, got 1"),
        ([str(run_dir), "--quality-images", "1"], "--quality-images must be at least 2, got 1"),
        # the same subset three times printed as "± 0.00% (3 seeds)"; a repeated count, two curve entries
        ([str(run_dir), "--seeds", "0,0,0"], "--seeds repeats 0: each value is one measurement; give distinct values"),
        ([str(run_dir), "--labels-per-class", "2,5,2"], "--labels-per-class repeats 2:"),
        ([str(run_dir), "--knn-tau", "0"], "--knn-tau must be a finite number above 0, got 0.0"),
        ([str(run_dir), "--lr", "0"], "--lr must be a finite number above 0, got 0.0"),  # it trained nothing, silently
    ]
    for args, message in cases:
        assert main(["evaluate", *args, "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err

    from fastclr.cli import build_parser
    from fastclr.evaluation.cli import options_from_args

    assert options_from_args(build_parser().parse_args(["evaluate", "RUN", "--knn-tau", "0.2"])).knn_tau == 0.2
    assert main(["report", str(run_dir), "--map", "pca", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run_dir / 'report.html'}"
    assert "Label efficiency" in (run_dir / "report.html").read_text()
    assert main(["report", str(tmp_path / "empty"), "--device", "cpu"]) == 2
    assert "stopped before its first checkpoint; start it again" in capsys.readouterr().err
    # a run its owner is still writing, before its first checkpoint: said, not "stopped" (nor "no checkpoint" to a resume)
    from fastclr.locks import RunLock

    lock = RunLock(tmp_path / "empty", log=lambda s: None)
    try:
        assert main(["evaluate", str(tmp_path / "empty"), "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by PID {os.getpid()} on" in err and "evaluate it after its first checkpoint" in err
        assert main(["pretrain", "--resume", str(tmp_path / "empty"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by PID {os.getpid()} on" in err and "has no checkpoint yet; wait for it" in err
        # every command that reads a run's encoder says the same (they said it "stopped before its first checkpoint")
        for argv, command in ((["embed", "--data", "mnist", "--out", str(tmp_path / "e.npy")], "embed"),
                              (["export", "--out", str(tmp_path / "e.safetensors")], "export"),
                              (["neighbours", "--data", "s", "--query", "q.png"], "search with"),
                              (["finetune", "--labels-per-class", "10"], "fine-tune")):
            assert main([argv[0], str(tmp_path / "empty"), *argv[1:]]) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0] == (f"error: {tmp_path / 'empty'} is being written by PID {os.getpid()} on "
                                                f"{socket.gethostname()} and has no checkpoint yet; {command} it after "
                                                "its first checkpoint"), err
    finally:
        lock.release()
    # a run in its first seconds: its owner holds the lock before writing config.toml
    (tmp_path / "young").mkdir()
    lock = RunLock(tmp_path / "young", log=lambda s: None)
    try:
        assert main(["embed", str(tmp_path / "young"), "--data", "mnist", "--out", str(tmp_path / "y.npy")]) == 2
        assert f"young is being written by PID {os.getpid()} on" in capsys.readouterr().err  # not "not a run"
    finally:
        lock.release()
    # export into a folder that does not exist yet: made, as embed and finetune make theirs
    assert main(["export", str(run_dir), "--format", "fastclr", "--out", str(tmp_path / "new" / "enc.safetensors")]) == 0
    made, own = load_file(str(tmp_path / "new" / "enc.safetensors")), load_file(str(run_dir / "encoder.safetensors"))
    assert made.keys() == own.keys() and all(torch.equal(made[k], own[k]) for k in own)


def test_evaluating_some_protocols_keeps_the_others_of_the_same_encoder(run: Run, tmp_path: Path) -> None:
    """`--protocols knn` after a full evaluation replaced eval.json with kNN alone, losing the
    curves; now the other protocols of the same encoder stay, each with the options it ran with,
    and the lift is recomputed over all. Results of another encoder are replaced whole."""
    import shutil

    run_dir, ds, full = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    full = json.loads((copy / "eval.json").read_text())  # as the module's other tests left it
    lines: list[str] = []
    evaluate(copy, EvaluateOptions(protocols=("knn",), knn_k=5, device="cpu"), dataset=ds, log=lines.append)
    saved = json.loads((copy / "eval.json").read_text())
    assert set(saved["protocols"]) == set(full["protocols"])
    assert {n: saved["protocols"][n] for n in full["protocols"] if n != "knn"} == \
        {n: v for n, v in full["protocols"].items() if n != "knn"}
    assert saved["protocols"]["knn"]["k"] == 5 and saved["options_of"]["knn"]["knn_k"] == 5
    assert saved["options_of"]["linear"] == full["options"] and saved["lift"] == lift_summary(saved["protocols"])
    assert any(line.startswith("kept from the earlier eval.json (the same encoder): ") for line in lines)
    kept = ", ".join(n for n in saved["protocols"] if n != "knn")  # the time is this call's, not theirs
    assert footer_line(saved).startswith(f"{saved['total_seconds']:.0f} s for knn ({kept} kept from an earlier evaluate); ")
    assert footer_line(full).startswith(f"total {full['total_seconds']:.0f} s; ")
    alter_encoder(copy, lambda w: w.add_(1e-3))
    evaluate(copy, EvaluateOptions(protocols=("knn",), device="cpu"), dataset=ds, log=lines.append)
    assert set(json.loads((copy / "eval.json").read_text())["protocols"]) == {"knn"}
    assert any(line.startswith("eval.json held results of another encoder") for line in lines)
    # the same encoder and store path, but the store prepared again (its content changed): replaced too
    knn, lin = EvaluateOptions(protocols=("knn",), device="cpu"), EvaluateOptions(protocols=("linear",), device="cpu")
    evaluate(copy, lin, dataset=dataclasses.replace(ds, content="a" * 64), log=lines.append)
    saved = json.loads((copy / "eval.json").read_text())
    # the kNN result before came from data without a content identity: not carried over as this data's
    assert saved["data_content"] == "a" * 64 and set(saved["protocols"]) == {"linear"}
    lines.clear()
    evaluate(copy, knn, dataset=dataclasses.replace(ds, content="b" * 64), log=lines.append)
    assert set(json.loads((copy / "eval.json").read_text())["protocols"]) == {"knn"}
    assert "eval.json held results of another encoder (the run trained on since) or data: replaced" in lines


def test_a_damaged_eval_json_is_kept_aside_by_the_next_evaluation_and_said(run: Run, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-edited eval.json (a string accuracy) made `evaluate --protocols knn` fail with a
    TypeError in the merge; a damaged one was replaced whole without a word, its results gone. It
    is kept as eval.json.damaged now (a second as eval.json.damaged-2), said in a note on stderr,
    which `--quiet` (a silent log) keeps."""
    import shutil

    run_dir, ds, _ = run
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    record = json.loads((copy / "eval.json").read_text())
    record["protocols"]["linear"]["accuracy"] = "0.9"
    edited = json.dumps(sealed(record))  # its checksum made again: the figures' own check, behind it
    (copy / "eval.json").write_text(edited)
    knn = EvaluateOptions(protocols=("knn",), device="cpu")
    capsys.readouterr()
    evaluate(copy, knn, dataset=ds, log=lambda s: None)
    assert (f"note: {copy / 'eval.json'} is damaged (a figure of another kind than an evaluation holds: unsupported "
            f"operand type(s) for -: 'str' and 'float'); kept as {copy / 'eval.json.damaged'}; this evaluation's "
            "results replace it\n") == capsys.readouterr().err
    assert (copy / "eval.json.damaged").read_text() == edited
    assert set(json.loads((copy / "eval.json").read_text())["protocols"]) == {"knn"}
    (copy / "eval.json").write_text("{}")
    evaluate(copy, knn, dataset=ds, log=lambda s: None)
    assert (f'note: {copy / "eval.json"} is damaged (no "protocols" object); kept as {copy / "eval.json.damaged-2"}; '
            "this evaluation's results replace it\n") == capsys.readouterr().err
    assert (copy / "eval.json.damaged").read_text() == edited and (copy / "eval.json.damaged-2").read_text() == "{}"
    assert set(json.loads((copy / "eval.json").read_text())["protocols"]) == {"knn"}


def test_an_eval_json_whose_figures_were_edited_is_kept_aside_not_carried_over(run: Run, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A kNN accuracy edited to 0.9999 (a number, where a figure is one) was kept by `evaluate
    --protocols quality` as this encoder's and shown with a lift of +21.75 by the report. eval.json
    holds a checksum of its contents now: an edited one is set aside as a damaged one is, said."""
    import shutil

    from fastclr.evaluation.run import read_eval

    run_dir, ds, _ = run
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    record = json.loads((copy / "eval.json").read_text())
    assert read_eval(copy) == record  # as written: its checksum holds
    record["protocols"]["knn"]["accuracy"] = 0.9999
    (copy / "eval.json").write_text(json.dumps(record))
    with pytest.raises(FastclrError, match="no longer matches its content_sha256"):
        read_eval(copy)  # the report's read: one line naming the file and evaluating again
    capsys.readouterr()
    evaluate(copy, EvaluateOptions(protocols=("linear",), device="cpu"), dataset=ds, log=lambda s: None)
    assert (f"note: {copy / 'eval.json'} no longer matches its content_sha256 (edited or damaged since `fastclr "
            f"evaluate` wrote it); kept as {copy / 'eval.json.damaged'}; this evaluation's results replace it\n"
            ) == capsys.readouterr().err
    assert set(json.loads((copy / "eval.json").read_text())["protocols"]) == {"linear"}
    del record["content_sha256"]  # and the key removed with the edit: not read either, nor carried
    (copy / "eval.json").write_text(json.dumps(record))
    evaluate(copy, EvaluateOptions(protocols=("knn",), device="cpu"), dataset=ds, log=lambda s: None)
    assert set(json.loads((copy / "eval.json").read_text())["protocols"]) == {"knn"}
    assert capsys.readouterr().err.startswith(f"note: {copy / 'eval.json'} holds no content_sha256")


def test_the_pixel_baseline_reads_a_stores_read_only_images_without_a_warning(run: Run, tmp_path: Path) -> None:
    """A store's images are a read-only memory map: `--protocols pixels` printed PyTorch's "The given
    NumPy array is not writable" warning with a source line, --quiet or not. The figures are those of
    the probe and kNN on the pixels in [0, 1]."""
    import shutil
    import warnings

    from fastclr.evaluation.run import pixel_rows

    run_dir, ds, _ = run
    assert ds.train is not None and ds.test is not None

    def read_only(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        x.flags.writeable = False
        return x

    frozen = dataclasses.replace(ds, train=ImageSet(read_only(ds.train.images), ds.train.labels),
                                 test=ImageSet(read_only(ds.test.images), ds.test.labels))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = evaluate(Path(shutil.copytree(run_dir, tmp_path / "run")), EvaluateOptions(protocols=("pixels",),
                       device="cpu"), dataset=frozen, log=lambda s: None)
    assert [str(w.message) for w in caught] == []
    rows = pixel_rows(frozen.train.images)
    assert torch.equal(rows, torch.tensor(ds.train.images).reshape(len(ds.train.images), -1).float() / 255)
    ytr, yte = torch.from_numpy(ds.train.labels), torch.from_numpy(ds.test.labels)
    xte = torch.tensor(ds.test.images).reshape(len(yte), -1).float() / 255
    assert out["protocols"]["pixels"]["linear_accuracy"] == linear_probe(rows, ytr, xte, yte).accuracy
    k = load_run(run_dir, log=lambda s: None).config.eval.knn_k
    assert out["protocols"]["pixels"]["knn_accuracy"] == knn_accuracy(rows, ytr, xte, yte, k, EvaluateOptions().knn_tau)


def test_knn_records_the_k_its_vote_used(run: Run, tmp_path: Path) -> None:
    """A --knn-k above the training images votes over all of them: the record and the table say
    that k, not the one asked for, and the figure is the one of k = N exactly."""
    import shutil

    run_dir, ds, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert ds.train is not None
    n = len(ds.train.images)
    lines: list[str] = []
    many = evaluate(copy, EvaluateOptions(protocols=("knn",), knn_k=10 * n, device="cpu"), dataset=ds,
                    log=lines.append)["protocols"]["knn"]
    exact = evaluate(copy, EvaluateOptions(protocols=("knn",), knn_k=n, device="cpu"), dataset=ds,
                     log=lambda s: None)["protocols"]["knn"]
    assert many["k"] == n and many == exact
    assert f"note: kNN with k = {n}, every training image: --knn-k {10 * n} is more than the {n} there are" in lines


def test_knn_votes_with_the_k_and_tau_it_is_given(run: Run, tmp_path: Path) -> None:
    """--knn-k and --knn-tau reach the vote, for the trained and the untrained network: with labels
    drawn apart from the images (on the bars every k scores the same), evaluate's figures are
    `knn_accuracy` at k = 3, tau = 0.5, which differ from those at the defaults (20, 0.07)."""
    import shutil

    run_dir, bars, _ = run
    assert bars.train is not None and bars.test is not None
    rng = np.random.default_rng(1)
    train = ImageSet(bars.train.images, rng.integers(0, 10, len(bars.train)))
    ds = Dataset(bars.name, train, train, ImageSet(bars.test.images, rng.integers(0, 10, len(bars.test))),
                 bars.classes)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    out = evaluate(copy, EvaluateOptions(protocols=("knn",), knn_k=3, knn_tau=0.5, device="cpu"), dataset=ds,
                   log=lambda s: None)["protocols"]["knn"]
    assert (out["k"], out["tau"]) == (3, 0.5)
    r, cpu = load_run(copy), torch.device("cpu")
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    ytr, yte = torch.from_numpy(ds.train.labels), torch.from_numpy(ds.test.labels)
    for encoder, reported in ((r.encoder, out["accuracy"]),
                              (untrained_encoder(r.spec, r.config.train.seed, cpu), out["random_init"]["accuracy"])):
        ftr = extract_features(encoder, ds.train.images, r.mean, r.std, cpu, precision=r.precision, size=28)
        fte = extract_features(encoder, ds.test.images, r.mean, r.std, cpu, precision=r.precision, size=28)
        asked = knn_accuracy(ftr, ytr, fte, yte, 3, 0.5, r.precision)
        assert reported == asked
        assert asked != knn_accuracy(ftr, ytr, fte, yte, 20, 0.07, r.precision)


def test_a_run_tracked_where_the_trackers_package_is_missing_is_evaluated_with_a_warning(
        run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run tracked with wandb, evaluated on a machine without it: evaluate refused, advising
    "drop --log", a flag evaluate does not have. Its results are computed and saved, and one line
    says they are not filed with the tracker."""
    import shutil
    import sys

    run_dir, ds, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "tracking.json").write_text('{"wandb": "abc123"}')
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    lines: list[str] = []
    out = evaluate(copy, EvaluateOptions(protocols=("knn",), device="cpu"), dataset=ds, log=lines.append)
    assert json.loads((copy / "eval.json").read_text())["protocols"]["knn"] == out["protocols"]["knn"]
    warned = [line for line in lines if line.startswith("warning:")]
    said = re.fullmatch(f"warning: {re.escape(str(copy))} is tracked with wandb, whose wandb package is missing here: "
                        r"these results are not filed there \((.+) to file them\)", warned[0])
    assert len(warned) == 1 and said is not None and installs(said.group(1), "wandb"), warned


def test_evaluating_an_encoder_that_gives_nan_is_one_line(run: Run, tmp_path: Path) -> None:
    """A diverged encoder's NaN features scored kNN and the probe at the share of class 0, silently."""
    import shutil

    run_dir, ds, _ = run
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    alter_encoder(bad, lambda w: w.fill_(float("nan")))
    before = (bad / "eval.json").read_text()
    with pytest.raises(FastclrError, match=f"the features of {bad}'s training images hold NaN or infinite values"):
        evaluate(bad, EvaluateOptions(protocols=("knn",), device="cpu"), dataset=ds, log=lambda s: None)
    assert (bad / "eval.json").read_text() == before


def test_evaluate_runs_with_its_threads_and_gives_the_callers_back(run: Run) -> None:
    """A notebook that calls `fastclr.evaluate` with threads=2 kept 2 threads after it."""
    run_dir, ds, _ = run
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        out = evaluate(run_dir, EvaluateOptions(protocols=("knn",), device="cpu", threads=1), dataset=ds,
                       log=lambda s: None)
        assert out["environment"]["threads"] == 1 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_the_default_few_label_points_a_class_cannot_reach_are_left_out_with_a_note(run: Run) -> None:
    """A small store of one's own photos (the smallest class here: its labelled training images)
    failed `fastclr evaluate RUN` outright on the default's 50-per-class point. The default points
    above the smallest class are left out, in one note, and so are fine-tuning's default label
    fractions; points and fractions the user asks for are still checked, naming their own flag."""
    from fastclr.evaluation.run import labelled_setup
    from fastclr.pretrained import load_run

    run_dir, ds, _ = run
    loaded = load_run(run_dir, "cpu", "fp32", log=lambda s: None)
    fewest = int(np.bincount(ds.train.labels).min())  # type: ignore[union-attr]
    default = EvaluateOptions(device="cpu")
    want = tuple(n for n in default.labels_per_class if n <= fewest)
    assert 0 < len(want) < len(default.labels_per_class)  # the tiny data reaches some points, not all
    notes: list[str] = []
    setup, options = labelled_setup(loaded, ds, default, torch.device("cpu"), ("fewshot",), notes.append)
    assert options.labels_per_class == want and len(notes) == 1
    assert notes[0].startswith(f"note: the smallest class has {fewest} labelled training images: few-label points "
                               f"{', '.join(map(str, want))} (the default's ")
    asked = dataclasses.replace(default, labels_per_class=(10, 500))
    with pytest.raises(FastclrError, match="asked for 500 labels per class"):
        labelled_setup(loaded, ds, asked, torch.device("cpu"), ("fewshot",), notes.append)
    _, same = labelled_setup(loaded, ds, default, torch.device("cpu"), ("linear",), notes.append)
    assert same == default  # no few-label protocol: nothing to leave out
    # fine-tuning's default fractions too: left out where they ask for more than the smallest class
    from fastclr.evaluation.subsets import fraction_per_class

    from fastclr.data.datasets import ImageSet

    train = ds.train
    assert train is not None and train.labels is not None
    keep = np.sort(np.concatenate([np.flatnonzero(train.labels != 0), np.flatnonzero(train.labels == 0)[:3]]))
    small = dataclasses.replace(ds, train=ImageSet(train.images[keep], train.labels[keep]))  # 3 images of class 0
    labels, k = small.train.labels, len(ds.classes)  # type: ignore[union-attr]
    fits = tuple(f for f in default.finetune_fractions if fraction_per_class(labels, f, k) <= 3)
    assert 0 < len(fits) < len(default.finetune_fractions)  # 1% reaches 3 per class, 10% does not
    notes.clear()
    _, tuned = labelled_setup(loaded, small, default, torch.device("cpu"), ("finetune",), notes.append)
    assert tuned.finetune_fractions == fits and len(notes) == 1 and notes[0].endswith("--finetune-fractions chooses")
    too_many = dataclasses.replace(default, finetune_fractions=(0.1,))
    with pytest.raises(FastclrError, match=f"--finetune-fractions 0.1 asks for {fraction_per_class(labels, 0.1, k)} "
                                           "labels per class but a class has only 3"):
        labelled_setup(loaded, small, too_many, torch.device("cpu"), ("finetune",), notes.append)


def test_a_run_directory_it_cannot_write_is_refused_before_any_protocol(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run on a read-only filesystem was evaluated for 6 minutes, then the write of eval.json failed
    and every result was lost (none printed). The directory is checked first; nothing is computed."""
    import fastclr.evaluation.run as evaluation

    run_dir, ds, _ = run
    real = os.access
    monkeypatch.setattr(evaluation.os, "access", lambda p, mode: False if Path(p) == run_dir else real(p, mode))
    monkeypatch.setattr(evaluation, "features_of", lambda *a, **k: pytest.fail("features computed"))
    with pytest.raises(FastclrError) as e:
        evaluation.evaluate(run_dir, EvaluateOptions(device="cpu"), dataset=ds, log=lambda s: None)
    assert str(e.value) == (f"{run_dir} is not writable, and evaluate saves its results there (eval.json); fix its "
                            f"permissions, or copy the run (`cp -r {run_dir} COPY`) and evaluate the copy")


def test_a_run_stopped_before_its_end_is_evaluated_from_its_checkpoint_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run stopped at step 3 of 9 (no exported encoder) was evaluated and exported from its last
    checkpoint without a word, and eval.json did not say which step it measured."""
    from fastclr.export import export_metadata
    from fastclr.models.foreign import safetensors_metadata
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config

    ds = tiny_dataset()
    cfg = tiny_config(tmp_path / "run", train__batch_size=64, train__epochs=1.0, train__device="cpu")
    total = len(ds.pretrain) // 64
    assert pretrain(cfg, dataset=ds, log=lambda s: None, progress=False, stop=lambda step: step == 3).stopped
    note = (f"note: {tmp_path / 'run'} has no encoder.safetensors: using its newest checkpoint, step 3 of {total} "
            "(the run stopped before its end)")
    lines: list[str] = []
    out = evaluate(tmp_path / "run", EvaluateOptions(protocols=("knn",), device="cpu"), dataset=ds, log=lines.append)
    assert note in lines and out["checkpoint_step"] == 3
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["checkpoint_step"] == 3
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "e.safetensors")]) == 0
    assert note in capsys.readouterr().out.splitlines()
    # the file passed on says it is step 3's weights, not a finished run's (it said nothing)
    assert safetensors_metadata(tmp_path / "e.safetensors")["fastclr"]["checkpoint_step"] == 3
    spec = load_run(tmp_path / "run", log=lambda s: None).spec
    assert export_metadata(spec, "", checkpoint_step=3)["checkpoint_step"] == "3"
    assert "checkpoint_step" not in export_metadata(spec, "")


def test_a_run_whose_newest_checkpoint_is_damaged_is_loaded_from_the_one_before_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped at step 3 with checkpoints at steps 2 and 3, the step-3 file damaged: the run was
    loaded from step 2 while the note said "its newest checkpoint". Now the damaged file is named
    and the note says the step used; the encoder is step 2's, weight for weight. The damaged file
    is a warning on stderr, which `evaluate --quiet` (a silent log) kept hidden before."""
    from fastclr.checkpoint import list_checkpoints, load_checkpoint
    from fastclr.pretrained import load_run
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config

    ds, run = tiny_dataset(), tmp_path / "run"
    cfg = tiny_config(run, train__batch_size=64, train__epochs=1.0, train__device="cpu", train__checkpoint_every=2)
    assert pretrain(cfg, dataset=ds, log=lambda s: None, progress=False, stop=lambda step: step == 3).stopped
    older, newest = list_checkpoints(run)[-2:]
    assert (load_checkpoint(older)["step"], load_checkpoint(newest)["step"]) == (2, 3)
    kept = load_checkpoint(older)["encoder"]
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a full disk
    lines: list[str] = []
    capsys.readouterr()
    loaded = load_run(run, "cpu", "fp32", log=lines.append, command="evaluate")
    assert capsys.readouterr().err.startswith(f"warning: skipping {newest.name}: ")
    assert any(line.startswith(f"note: {run} has no encoder.safetensors: using its newest valid checkpoint, step 2 ")
               for line in lines)
    assert loaded.checkpoint_step == 2
    for k, v in loaded.encoder.state_dict().items():
        assert torch.equal(v, kept[k]), k


def test_a_run_loaded_from_its_checkpoint_gives_its_encoder_in_eval_mode(tmp_path: Path) -> None:
    """A run stopped before its export is loaded from its newest checkpoint, its encoder rebuilt
    from the spec; like the export's, it comes in eval mode. In train mode its BatchNorm layers
    would normalise each batch by that batch's own statistics, so an image's h would depend on the
    images beside it: here h of one image alone equals its h within a batch of eight."""
    from fastclr.augment import normalize, to_float
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config

    ds = tiny_dataset()
    cfg = tiny_config(tmp_path / "run", train__batch_size=64, train__epochs=1.0, train__device="cpu")
    assert pretrain(cfg, dataset=ds, log=lambda s: None, progress=False, stop=lambda step: step == 2).stopped
    loaded = load_run(tmp_path / "run", precision="fp32", log=lambda s: None)
    assert loaded.checkpoint_step == 2 and not (tmp_path / "run" / "encoder.safetensors").exists()
    assert not any(m.training for m in loaded.encoder.modules())
    x = normalize(to_float(torch.from_numpy(ds.test.images[:8])), loaded.mean, loaded.std)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(x[:1]), loaded.encoder(x)[:1], rtol=1e-4, atol=1e-5)


def test_a_checkpoint_of_another_architecture_or_record_is_one_line(tmp_path: Path) -> None:
    """A stopped run's checkpoint from a version whose encoder had other names, or whose record this
    version cannot read: a KeyError, or torch's list of every missing and unexpected key, where the
    export path says in one line which version to use."""
    from fastclr.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config

    ds, run = tiny_dataset(), tmp_path / "run"
    cfg = tiny_config(run, train__batch_size=64, train__epochs=1.0, train__device="cpu")
    assert pretrain(cfg, dataset=ds, log=lambda s: None, progress=False, stop=lambda step: step == 2).stopped
    path = list_checkpoints(run)[-1]
    good = {k: v for k, v in load_checkpoint(path).items() if k not in ("format", "fastclr_version", "sha256")}
    renamed = {("trunk." + k if i == 0 else k): v for i, (k, v) in enumerate(good["encoder"].items())}
    for state, says in ((dict(good, encoder=renamed), "does not match the cnn architecture of this version"),
                        (dict(good, model_info={"encoder": "cnn"}), "records its encoder in a form this version cannot read")):
        assert save_checkpoint(run, state) == path
        with pytest.raises(FastclrError, match=re.escape(f"{path} (written by fastclr ") + r"[^)]+\) " + re.escape(says)):
            load_run(run, "cpu", "fp32", log=lambda s: None)


def test_fine_tuning_starts_from_the_probe_and_keeps_batchnorm_statistics() -> None:
    """LP-FT (Kumar et al. 2022) as `finetune` documents it: with a learning rate of zero nothing
    moves, so the fine-tuned network is the probe it starts from (the same test accuracy) and every
    BatchNorm statistic is as the probe's features were computed with. Labels are drawn apart from
    the images, so that the probe is not simply right everywhere."""
    from conftest import synthetic_images
    from fastclr.evaluation.classifier import LabelledSetup, TrainRecipe
    from fastclr.evaluation.fewshot import fewshot_fit
    from fastclr.evaluation.finetune import linear_head, probe_then_finetune
    from fastclr.models import SmallCNN
    from fastclr.runtime import FP32

    cpu, rng = torch.device("cpu"), np.random.default_rng(0)
    x, _ = synthetic_images(96, 28, seed=3)
    xt, _ = synthetic_images(64, 28, seed=4)
    y, yt = rng.integers(0, 4, 96), rng.integers(0, 4, 64)
    torch.manual_seed(0)
    enc = SmallCNN(1, 0.25, "32|64").eval()
    with torch.no_grad():  # statistics that a train-mode pass would move
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    mean, std = torch.tensor([0.2]), torch.tensor([0.3])
    setup = LabelledSetup(x, y, xt, yt, ["a", "b", "c", "d"], mean, std, 28, cpu, FP32,
                          TrainRecipe(steps=3, batch_size=16, lr=0.0, weight_decay=0.05, warmup_fraction=0.0,
                                      shift_fraction=0.07, flip_p=0.5))
    idx = np.arange(0, 96, 2)
    subset_x = extract_features(enc, x[idx], mean, std, cpu)
    test_x = extract_features(enc, xt, mean, std, cpu)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    head, out = probe_then_finetune(enc, subset_x, test_x, setup, idx, seed=0)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and running statistics alike
    assert 0.0 < out["linear_accuracy"] < 1.0 and out["accuracy"] == out["linear_accuracy"]
    # the head is the reported probe itself, not a second fit of it (which differed in the last digits)
    probe = fewshot_fit(subset_x, torch.from_numpy(y[idx]), test_x, torch.from_numpy(yt), 0)
    assert probe.model is not None and probe.accuracy == out["linear_accuracy"]
    start = linear_head(probe.model, cpu)
    torch.testing.assert_close(head.weight, start.weight, rtol=0, atol=0)
    torch.testing.assert_close(head.bias, start.bias, rtol=0, atol=0)
    correct = (start(test_x).argmax(1).numpy() == yt).mean()
    assert correct == pytest.approx(out["linear_accuracy"], abs=1e-9)


def test_the_tables_protocol_and_curve_rows_show_each_protocols_own_figures() -> None:
    """Every figure distinct, so a cell showing another one is seen: each protocol row its own
    accuracy, its untrained figure and its lift (trained minus untrained); the curve's untrained
    column the untrained curve; and a labels-per-class point only the baseline measured still a row."""
    import re

    from fastclr.evaluation.table import format_table

    def curve(accs: dict[int, float]) -> dict[str, Any]:
        return {"curve": [{"labels_per_class": n, "mean": a, "std": 0.0, "runs": [{"subset": f"s{n}", "accuracy": a}]}
                          for n, a in accs.items()]}

    protocols: dict[str, Any] = {
        "linear": {"accuracy": 0.91, "labels": 100, "random_init": {"accuracy": 0.62}},
        "knn": {"accuracy": 0.83, "k": 20, "random_init": {"accuracy": 0.41}},
        "pixels": {"linear_accuracy": 0.55, "knn_accuracy": 0.47},
        "fewshot": {**curve({2: 0.7}), "random_init_curve": curve({2: 0.3})["curve"]},
        "supervised": curve({2: 0.6, 5: 0.5}),
    }
    out = {"run_dir": "R", "dataset": "d", "total_seconds": 1.0, "encoder": {"encoder": "cnn", "feature_dim": 8},
           "protocols": protocols, "lift": lift_summary(protocols)}
    rows = [re.split(r"\s{2,}", line.strip()) for line in format_table(out).splitlines()]
    assert ["linear probe on h", "all (100)", "91.00%", "62.00%", "+29.00 points"] in rows
    assert ["kNN on h (k=20)", "all", "83.00%", "41.00%", "+42.00 points"] in rows
    assert ["linear probe on pixels", "all", "55.00%"] in rows and ["kNN on pixels", "all", "47.00%"] in rows
    assert ["labels/class", "linear probe on h", "same net untrained", "lift", "supervised from scratch",
            "probe over scratch, same labels"] in rows
    assert ["2", "70.00% (1 seed)", "30.00% (1 seed)", "+40.00 points", "60.00% (1 seed)", "+10.00 points (1 subset)"] \
        in rows
    assert ["5", "-", "-", "-", "50.00% (1 seed)", "-"] in rows
    assert not any(line.startswith("FLAG") for line in format_table(out).splitlines())


@pytest.mark.parametrize("change, message", [
    (dict(seeds=(0, 0, 0)), "--seeds repeats 0: each value is one measurement"),
    (dict(seeds=()), "--seeds is empty; give at least one value, e.g. --seeds 0,1,2"),
    (dict(protocols=("linear", "knnn")), "unknown protocol knnn; choose from: linear, knn"),
    (dict(protocols=()), "unknown protocol ''"),
    (dict(knn_tau=0.0), "--knn-tau must be a finite number above 0, got 0.0"),
    (dict(knn_k=-1), "--knn-k must be at least 1 (0: the run's own k), got -1"),
    (dict(steps=0), "--steps must be at least 1, got 0"),
    (dict(quality_images=1), "--quality-images must be at least 2, got 1"),
    (dict(lr=float("nan")), "--lr must be a finite number above 0, got nan"),
    (dict(labels_per_class=(10, 0)), "--labels-per-class takes counts of at least 1, got 10,0"),
    (dict(finetune_fractions=(0.1, 1.5)), "--finetune-fractions takes fractions above 0 and at most 1, got 0.1,1.5"),
    (dict(supervised_seeds=(-1,)), "--supervised-seeds takes seeds from 0 to"),
])
def test_evaluate_called_from_python_checks_its_options_before_any_feature(
        run: Run, monkeypatch: pytest.MonkeyPatch, change: dict[str, Any], message: str) -> None:
    """The command line checked these; `fastclr.evaluate` did not: "3 seeds" of one repeated seed
    were one subset shown as a spread of 0, tau 0 made kNN 1-NN silently, a misspelt protocol
    failed after the others had run. Each is now the command line's line, before any work."""
    run_dir, ds, _ = run
    monkeypatch.setattr(run_module, "features_of", lambda *a, **k: pytest.fail("features computed"))
    with pytest.raises(FastclrError, match=re.escape(message)) as e:
        evaluate(run_dir, dataclasses.replace(EvaluateOptions(device="cpu"), **change), dataset=ds, log=lambda s: None)
    assert "\n" not in str(e.value)


def test_protocols_given_empty_on_the_command_line_is_refused_not_the_defaults(
        run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    """`--protocols ""` ran the whole default evaluation (minutes), as if the flag were absent."""
    run_dir, _, _ = run
    assert main(["evaluate", str(run_dir), "--protocols", "", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown protocol ''; choose from: linear") and err.count("\n") == 1


def test_data_of_other_channels_than_the_encoders_is_one_line_before_any_work(run: Run) -> None:
    """A store prepared again with other --channels under the run's path: the first convolution's
    RuntimeError was a traceback, in evaluate, report, finetune and distill alike."""
    from fastclr.report.build import build_report

    run_dir, ds, _ = run
    assert ds.train is not None and ds.test is not None
    colour = Dataset(ds.name, ImageSet(np.repeat(ds.pretrain.images, 3, -1), ds.pretrain.labels),
                     ImageSet(np.repeat(ds.train.images, 3, -1), ds.train.labels),
                     ImageSet(np.repeat(ds.test.images, 3, -1), ds.test.labels), ds.classes)
    message = (f"{ds.name} holds images of 3 channels and the encoder of {run_dir} takes 1: it is not the data the "
               "run trained on")
    with pytest.raises(FastclrError, match=re.escape(message)):
        evaluate(run_dir, EvaluateOptions(protocols=("linear",), device="cpu"), dataset=colour, log=lambda s: None)
    with pytest.raises(FastclrError, match=re.escape(message)):
        build_report(run_dir, out=run_dir.parent / "r.html", device="cpu", dataset=colour)
    assert not (run_dir.parent / "r.html").exists()
    from fastclr.semisup.pipeline import FinetuneOptions, finetune_run

    with pytest.raises(FastclrError, match=re.escape(message)):
        finetune_run(run_dir, FinetuneOptions(labels_per_class=5, steps=1, device="cpu"), dataset=colour,
                     log=lambda s: None)


def test_a_report_map_other_than_tsne_or_pca_is_refused(run: Run) -> None:
    """Any other name drew a PCA map captioned with that name."""
    from fastclr.report.build import build_report

    run_dir, ds, _ = run
    with pytest.raises(FastclrError, match=re.escape("unknown map 'umap'; choose tsne or pca")):
        build_report(run_dir, out=run_dir.parent / "u.html", map_method="umap", device="cpu", dataset=ds)


def test_untrained_features_that_are_not_finite_are_not_blamed_on_the_run(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """The untrained reference overflowing (a deep network at its initial weights in fp16) was
    reported as the trained encoder's damage, with the advice to use another run."""
    run_dir, ds, _ = run
    real = run_module.untrained_encoder

    class Overflowing(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) + float("inf")  # every output +inf

    def overflowing(*a: Any, **k: Any) -> torch.nn.Module:
        return Overflowing(real(*a, **k))
    monkeypatch.setattr(run_module, "untrained_encoder", overflowing)
    with pytest.raises(FastclrError) as e:
        evaluate(run_dir, EvaluateOptions(protocols=("linear",), device="cpu", precision="fp32"), dataset=ds,
                 log=lambda s: None)
    assert str(e.value).startswith("the untrained network's features hold NaN or infinite values (")
    assert str(e.value).endswith("rows): the network at its initial weights gives them in fp32, not the trained one: "
                                 "this architecture is unstable at random initialisation, and its untrained reference "
                                 "cannot be measured")


def test_a_store_prepared_again_since_training_is_said_when_the_run_is_measured_on_it(tmp_path: Path) -> None:
    """The run's export (and, before it, its checkpoints) records the content identity of the data
    it trained on; evaluating it on that store after it was prepared again with other images said
    nothing. It is a note now, with the export as with a checkpoint; the same content says none."""
    from tiny import tiny_dataset, tiny_run
    from fastclr.export import ENCODER_FILE
    from fastclr.pretrained import load_run

    ds = dataclasses.replace(tiny_dataset(64), content="a" * 64)
    run_dir = tiny_run(tmp_path / "run", ds)
    knn = EvaluateOptions(protocols=("knn",), device="cpu")
    for source in ("export", "checkpoint"):
        if source == "checkpoint":
            (run_dir / ENCODER_FILE).unlink()
        assert load_run(run_dir, log=lambda s: None).data_content == "a" * 64, source
        lines: list[str] = []
        evaluate(run_dir, knn, dataset=ds, log=lines.append)
        assert not any("changed since" in line for line in lines), source
        evaluate(run_dir, knn, dataset=dataclasses.replace(ds, content="b" * 64), log=lines.append)
        assert (f"note: {ds.name} changed since {run_dir} trained on it (prepared again: its images, labels or splits "
                "differ); what follows is measured on it as it is now") in lines, source
    # `fastclr export --format fastclr` (here from the checkpoint) carries it as the run's own export does
    from fastclr.export import exported_data_content

    assert main(["export", str(run_dir), "--format", "fastclr", "--out", str(tmp_path / "e.safetensors")]) == 0
    assert exported_data_content(tmp_path / "e.safetensors") == "a" * 64
