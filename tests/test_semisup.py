"""SimCLRv2's semi-supervised steps: the distillation loss against its formula, the classifier cut
from the projection head, `fastclr finetune` / `fastclr distill` on a tiny run, what they write and
what they may read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastclr
from eval_fixtures import one_thread, tiny_dataset, tiny_run  # noqa: F401 (one_thread: autouse)
from fastclr.cli import main
from fastclr.data import Dataset, ImageSet
from fastclr.errors import FastclrError
from fastclr.evaluation.classifier import LabelledSetup, TrainRecipe
from fastclr.evaluation.features import extract_features, prepare_images, state_checksum
from fastclr.evaluation.subsets import stratified_subset, subset_id
from fastclr.models import EncoderSpec, ProjectionHead, encoder_from_spec
from fastclr.pretrained import load_run
from fastclr.semisup.distill import (distill, distillation_loss, distillation_objective, known_labels,
                                     soft_target_loss)
from fastclr.semisup.network import Classifier, empty_neck, load_classifier, neck_of, save_classifier
from fastclr.evaluation.options import EvaluateOptions
from fastclr.semisup.pipeline import (DistillOptions, FinetuneOptions, distill_run, finetune_run, labelled_splits,
                                      student_for, with_unlabelled)


def _soft_loop(s: torch.Tensor, t: torch.Tensor, temp: float) -> list[float]:
    """-sum_y P_T(y) log P_S(y) per image, written out with float64 loops."""
    out = []
    for i in range(s.shape[0]):
        zt = sum(np.exp(float(t[i, c]) / temp) for c in range(t.shape[1]))
        zs = sum(np.exp(float(s[i, c]) / temp) for c in range(s.shape[1]))
        out.append(-sum(np.exp(float(t[i, c]) / temp) / zt * (float(s[i, c]) / temp - np.log(zs))
                        for c in range(s.shape[1])))
    return out


@pytest.mark.parametrize("temp", [0.5, 1.0, 4.0])
def test_soft_target_loss_is_the_cross_entropy_with_the_teachers_softened_distribution(temp: float) -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    got = soft_target_loss(s.float(), t.float(), temp)
    assert got.tolist() == pytest.approx(_soft_loop(s, t, temp), rel=1e-5, abs=1e-5)
    # gradient of the batch mean in the student's logits: (softmax(s/t) - softmax(t/t)) / (t B)
    sv = s.float().clone().requires_grad_(True)
    soft_target_loss(sv, t.float(), temp).mean().backward()
    closed = (F.softmax(s / temp, 1) - F.softmax(t / temp, 1)) / (temp * s.shape[0])
    assert sv.grad is not None
    torch.testing.assert_close(sv.grad.double(), closed, rtol=1e-4, atol=1e-6)


def test_distillation_loss_mixes_soft_targets_and_the_labelled_images_cross_entropy() -> None:
    """Equation 3 of SimCLRv2 per image: (1 - w) soft + w [labelled] CE, averaged over the batch."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    labels = torch.tensor([2, -1, -1, 0, -1, 3, -1, -1])
    for w in (0.0, 0.3, 1.0):
        soft = _soft_loop(s.double(), t.double(), 2.0)
        want = []
        for i in range(8):
            ce = 0.0
            if labels[i] >= 0:
                ce = -float(s[i, labels[i]]) + float(np.log(np.exp(s[i].double().numpy()).sum()))
            want.append((1 - w) * soft[i] + w * ce)
        assert float(distillation_loss(s, t, labels, 2.0, w)) == pytest.approx(float(np.mean(want)), rel=1e-5)
    # a certain teacher at t = 1 makes the soft term the cross-entropy with its labels
    y = torch.tensor([1, 0, 3, 2, 2, 1, 0, 3])
    onehot = F.one_hot(y, 4).float() * 1e4
    assert float(distillation_loss(s, onehot, labels, 1.0, 0.0)) == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-5)


def test_known_labels_hold_the_subsets_labels_and_minus_one_elsewhere() -> None:
    got = known_labels(6, np.array([1, 4]), np.array([7, 3]))
    assert got.tolist() == [-1, 7, -1, -1, 3, -1]


@pytest.mark.parametrize("batch_norm", [True, False])
def test_the_neck_is_the_heads_first_layers_and_survives_save_and_load(tmp_path: Path, batch_norm: bool) -> None:
    torch.manual_seed(0)
    head = ProjectionHead(12, 10, out_dim=6, layers=3, batch_norm=batch_norm).eval()
    if batch_norm:  # running statistics that are not the identity, so that keeping them matters
        head.net[1].running_mean.uniform_(-1, 1)
        head.net[1].running_var.uniform_(0.5, 2)
    hidden: list[torch.Tensor] = []
    relus = [m for m in head.net if isinstance(m, torch.nn.ReLU)]
    for layers in (1, 2):
        hook = relus[layers - 1].register_forward_hook(lambda m, i, o: hidden.append(o.clone()))
        h = torch.randn(5, 12)
        head(h)
        hook.remove()
        torch.testing.assert_close(neck_of(head, layers).eval()(h), hidden[-1])
    with pytest.raises(FastclrError, match="0 \\(h\\) to 2"):
        neck_of(head, 3)

    spec = EncoderSpec("cnn", 1, 28, 0.125, "off", 64, (0.5,), (0.25,), "32|256|fc512")
    enc = encoder_from_spec(spec)
    head = ProjectionHead(spec.feature_dim, 16, 8, layers=2, batch_norm=batch_norm)
    for layers in (0, 1):
        neck = neck_of(head, layers)
        width = 16 if layers else spec.feature_dim
        model = Classifier(enc, neck, torch.nn.Linear(width, 3)).eval()
        path = save_classifier(tmp_path / f"c{layers}{batch_norm}.safetensors", model, spec, ["a", "b", "c"])
        back, spec2, info = load_classifier(path)
        x = torch.randn(4, 1, 28, 28)
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
        assert spec2 == spec and info["classes"] == ["a", "b", "c"] and info["neck"] == ([16] if layers else [])
    assert len(empty_neck([], 4, True)) == 0


def test_a_damaged_or_foreign_classifier_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "classifier.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(FastclrError, match="not a readable classifier"):
        load_classifier(tmp_path)


Run = tuple[Path, Dataset]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    ds = tiny_dataset()
    return tiny_run(tmp_path_factory.mktemp("semisup") / "run", ds), ds


FT = FinetuneOptions(labels_per_class=5, steps=4, batch_size=16, device="cpu", baseline=True, from_head_layer=1)
DS = DistillOptions(steps=5, batch_size=32, device="cpu", label_weight=0.5)


def _accuracy(model: Classifier, spec: Any, ds: Dataset, run_dir: Path) -> float:
    """Test accuracy of a loaded classifier: its features under the precision the commands chose
    (bf16 where the CPU has it), its linear layer in fp32, as the commands measure (a barely trained
    classifier has near-ties that another rounding breaks otherwise)."""
    assert ds.test is not None and ds.test.labels is not None
    h = extract_features(model.backbone(), ds.test.images, spec.mean_tensor(), spec.std_tensor(),
                         torch.device("cpu"), precision=load_run(run_dir).precision)
    with torch.no_grad():
        x = model.fc(h)
    return float((x.argmax(1) == torch.from_numpy(ds.test.labels)).float().mean())


@pytest.fixture(scope="module")
def finetuned(run: Run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir, ds = run
    return finetune_run(run_dir, FT, dataset=ds, log=lambda s: None)


def test_finetune_writes_a_classifier_and_an_encoder_that_load_and_give_its_accuracy(run: Run,
                                                                                       finetuned: dict[str, Any]) -> None:
    run_dir, ds = run
    out = Path(finetuned["out"])
    assert out == run_dir / "finetune" / "5-per-class-seed0-head1"
    record = json.loads((out / "finetune.json").read_text())
    assert record["accuracy"] == finetuned["accuracy"] and record["labels"] == 50 and record["from_head_layer"] == 1
    assert record["feature_dim"] == 32  # the tiny head's hidden width: the classifier reads layer 1 of g
    model, spec, info = fastclr.load_classifier(out)
    assert _accuracy(model, spec, ds, run_dir) == pytest.approx(record["accuracy"])  # logits argmax == the recorded figure
    enc, enc_spec = fastclr.load_encoder(out / "encoder.safetensors")
    assert enc_spec == spec and state_checksum(enc) == state_checksum(model.encoder)
    assert state_checksum(load_run(run_dir).encoder) == record["run_encoder_sha256"]  # the run's own encoder untouched
    assert state_checksum(model.encoder) != record["run_encoder_sha256"]  # ... and the copy was trained
    assert ds.train is not None and ds.train.labels is not None
    idx = stratified_subset(ds.train.labels, 5, 0)
    assert record["subset"] == subset_id(idx)  # the subset `evaluate` uses for this seed
    assert 0 <= record["baseline_accuracy"] <= 1


def test_finetune_from_h_reads_the_encoders_output(run: Run, tmp_path: Path) -> None:
    run_dir, ds = run
    r = finetune_run(run_dir, dataclasses.replace(FT, from_head_layer=0, baseline=False), out=tmp_path / "h",
                     dataset=ds, log=lambda s: None)
    model, spec, info = load_classifier(tmp_path / "h")
    assert r["feature_dim"] == spec.feature_dim and info["neck"] == [] and len(model.neck) == 0


def test_distill_trains_a_student_whose_exports_load(run: Run, finetuned: dict[str, Any]) -> None:
    run_dir, ds = run
    teacher = Path(finetuned["out"])
    before = (teacher / "classifier.safetensors").read_bytes()
    r = distill_run(teacher, DS, dataset=ds, log=lambda s: None)
    out = Path(r["out"])
    assert out == run_dir / "distill" / teacher.name
    assert (teacher / "classifier.safetensors").read_bytes() == before  # the teacher is read, never written
    assert r["teacher_accuracy"] == pytest.approx(finetuned["accuracy"])
    model, spec, _ = fastclr.load_classifier(out)
    assert _accuracy(model, spec, ds, run_dir) == pytest.approx(r["accuracy"])
    enc, enc_spec = fastclr.load_encoder(out / "encoder.safetensors")
    assert enc_spec == spec and state_checksum(enc) == state_checksum(model.encoder)
    assert r["student_init"] == "pretrained" and json.loads((out / "distill.json").read_text())["subset"] == r["subset"]
    with pytest.raises(FastclrError, match="already holds a distilled classifier"):
        distill_run(teacher, DS, dataset=ds, log=lambda s: None)


def test_the_student_never_sees_test_labels_or_the_unlabelled_images_labels(run: Run,
                                                                             finetuned: dict[str, Any]) -> None:
    """Two datasets that differ only in the labels distillation may not read (every test label, every
    training label outside the labelled subset) give bit-identical students."""
    run_dir, ds = run
    assert ds.train is not None and ds.test is not None and ds.train.labels is not None and ds.test.labels is not None
    labelled = stratified_subset(ds.train.labels, 5, 0)
    rng = np.random.default_rng(0)
    other_train = rng.integers(0, 10, len(ds.train.labels))
    other_train[labelled] = ds.train.labels[labelled]
    other = Dataset(ds.name, ds.pretrain, ImageSet(ds.train.images, other_train),
                    ImageSet(ds.test.images, rng.permutation(ds.test.labels)), ds.classes)
    teacher, _, _ = load_classifier(finetuned["out"])
    r = load_run(run_dir)
    recipe = TrainRecipe(steps=4, batch_size=32, lr=1e-3, weight_decay=5e-4, warmup_fraction=0.1, shift_fraction=0.07,
                         flip_p=0.5)
    states = []
    for data in (ds, other):
        setup = labelled_splits(r, data, torch.device("cpu"), recipe)
        student, _, _ = student_for(r, DistillOptions(), 10, 0, torch.device("cpu"))
        distill(teacher, student, setup, labelled, temperature=2.0, label_weight=0.5, seed=0)
        states.append(state_checksum(student))
    assert states[0] == states[1]
    # ... while the labels of the labelled subset do change it (they are read, with weight 0.5)
    flipped = ds.train.labels.copy()
    flipped[labelled] = (flipped[labelled] + 1) % 10
    setup = labelled_splits(r, Dataset(ds.name, ds.pretrain, ImageSet(ds.train.images, flipped), ds.test, ds.classes),
                            torch.device("cpu"), recipe)
    student, _, _ = student_for(r, DistillOptions(), 10, 0, torch.device("cpu"))
    distill(teacher, student, setup, labelled, temperature=2.0, label_weight=0.5, seed=0)
    assert state_checksum(student) != states[0]


def test_distillation_trains_on_the_unlabelled_images_too(run: Run, finetuned: dict[str, Any], tmp_path: Path) -> None:
    """With images in no labelled split (STL-10's unlabeled, a store's unlabeled rows) the student
    trains on them as well as on the train split, the README's "every training image, labelled or
    not" (it saw the train split only); their labels are never read (-1), and no copy is made."""
    run_dir, ds = run
    assert ds.train is not None
    extra = np.ascontiguousarray(ds.train.images[:150, :, ::-1])  # 150 more images, in no labelled split
    pool = Dataset(ds.name, ImageSet(np.concatenate([extra, ds.train.images]), None), ds.train, ds.test, ds.classes,
                   unlabelled=len(extra))
    setup = labelled_splits(load_run(run_dir), pool, torch.device("cpu"), EvaluateOptions().recipe(0.5))
    wider, offset = with_unlabelled(pool, setup)
    assert offset == 150 and wider.train_images is pool.pretrain.images
    assert (wider.train_labels[:150] == -1).all() and np.array_equal(wider.train_labels[150:], setup.train_labels)
    r = distill_run(Path(finetuned["out"]), DS, out=tmp_path / "student", dataset=pool, log=lambda s: None)
    assert (r["images"], r["unlabelled_images"], r["labels"]) == (len(ds.train.images) + 150, 150, finetuned["labels"])


def test_a_teacher_on_clean_images_gives_the_targets_it_gives_on_that_batch(run: Run,
                                                                           finetuned: dict[str, Any]) -> None:
    """teacher_views "clean" looks the teacher's logits up from one pass over the un-augmented images;
    on an un-augmented batch that is what "same" computes from the batch itself."""
    run_dir, ds = run
    assert ds.train is not None and ds.train.labels is not None
    r = load_run(run_dir, precision="fp32")
    teacher, _, _ = load_classifier(finetuned["out"])
    setup = labelled_splits(r, ds, torch.device("cpu"), TrainRecipe(1, 8, 1e-3, 0.0, 0.0, 0.0, 0.0))
    known = known_labels(len(ds.train.labels), np.array([3, 40]), ds.train.labels[[3, 40]])
    b = torch.tensor([3, 17, 40, 599, 250])
    x = prepare_images(torch.from_numpy(ds.train.images[b.numpy()]), r.mean, r.std, 28)
    logits = torch.randn(5, 10)
    same = distillation_objective(teacher, known, 2.0, 0.3, setup, "same")(x, logits, b)
    clean = distillation_objective(teacher, known, 2.0, 0.3, setup, "clean")(x + 100, logits, b)  # x is not read
    assert float(clean) == pytest.approx(float(same), rel=1e-5)
    with pytest.raises(FastclrError, match="--teacher-views 'noisy'"):
        distillation_objective(teacher, known, 2.0, 0.3, setup, "noisy")


def test_a_smaller_student_starts_at_random(run: Run) -> None:
    r = load_run(run[0])
    student, spec, init = student_for(r, DistillOptions(student_width=0.0625), 10, 0, torch.device("cpu"))
    assert init == "random" and spec.width == 0.0625 and spec.feature_dim < r.spec.feature_dim
    assert student.fc.in_features == spec.feature_dim
    with pytest.raises(FastclrError, match="needs the run's width"):
        student_for(r, DistillOptions(student_width=0.0625, student_init="pretrained"), 10, 0, torch.device("cpu"))


def test_a_student_whose_weights_alone_would_not_fit_is_refused_before_it_is_built(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--student-width 100` for 1.0 grew the process until the kernel killed it. The student's weights
    and gradients (float32), counted on the meta device, against 0.9 of the memory available."""
    from fastclr.models import encoder_from_spec

    r = load_run(run[0])
    wide = dataclasses.replace(r.spec, width=4.0)
    weights = sum(p.numel() for p in encoder_from_spec(wide).parameters())
    monkeypatch.setattr("fastclr.runtime.available_memory", lambda: int(2 * weights * 4 / 0.9) - 1000)
    with pytest.raises(FastclrError, match=rf"^a student of width 4 \({weights / 1e6:,.0f} million weights\) needs about "
                                           r".* GiB are available; give a smaller --student-width \(the run's own width "
                                           rf"is {r.spec.width:g}\)$"):
        student_for(r, DistillOptions(student_width=4.0), 10, 0, torch.device("cpu"))
    monkeypatch.setattr("fastclr.runtime.available_memory", lambda: int(2 * weights * 4 / 0.9) + 1000)
    student, spec, _ = student_for(r, DistillOptions(student_width=4.0), 10, 0, torch.device("cpu"))
    assert spec.width == 4.0
    from fastclr.runtime import on_meta, require_model_memory

    state = torch.get_rng_state()
    require_model_memory(on_meta(lambda: encoder_from_spec(wide)), torch.device("cpu"), "a student", "")
    assert torch.equal(torch.get_rng_state(), state)  # the count draws nothing: a seeded build after it is the same


def test_a_student_wider_than_the_run_is_said_to_be(run: Run, finetuned: dict[str, Any], tmp_path: Path) -> None:
    """--student-width is the student's own channel multiplier: 0.5 of a run at 0.25 is twice its width,
    which a user asking for "half" did not expect; the log line says it is wider."""
    run_dir, ds = run
    width = load_run(run_dir).spec.width
    for factor, wider in ((2.0, True), (0.5, False)):
        lines: list[str] = []
        distill_run(Path(finetuned["out"]), dataclasses.replace(DS, steps=1, student_width=width * factor),
                    out=tmp_path / str(factor), dataset=ds, log=lines.append)
        said = next(line for line in lines if line.startswith("distilling "))
        assert (f"student of width {width * factor:g} (wider than the run's {width:g})" in said) == wider, said


def test_a_fine_tuned_classifier_exports_to_onnx_from_python_as_the_readme_shows(
        finetuned: dict[str, Any], tmp_path: Path) -> None:
    """README: `fastclr export` takes a pretraining run; a classifier goes through
    `fastclr.export_encoder(model, spec, "", "onnx", path)`, whose output is its logits."""
    import onnxruntime

    model, spec, _ = fastclr.load_classifier(Path(finetuned["out"]))
    out = tmp_path / "clf.onnx"
    fastclr.export_encoder(model, spec, "", "onnx", out)
    x = torch.randn(4, spec.in_channels, spec.image_size, spec.image_size)
    runtime = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model.eval()(x)
    assert want.shape == (4, model.fc.out_features)
    torch.testing.assert_close(torch.from_numpy(runtime.run(None, {"x": x.numpy()})[0]), want, rtol=1e-4, atol=1e-4)


def test_command_line_errors_are_one_line(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = run
    assert main(["distill", str(run_dir)]) == 2
    assert "holds no classifier.safetensors and finetune.json" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "nope")]) == 2  # was "holds no classifier.safetensors ..." too
    assert capsys.readouterr().err == (f"error: {tmp_path / 'nope'} does not exist; give the directory `fastclr "
                                       "finetune` wrote\n")
    with pytest.raises(SystemExit) as e:  # argparse: exactly one of the two
        main(["finetune", str(run_dir), "--labels-per-class", "5", "--label-fraction", "0.1"])
    assert e.value.code == 2
    assert main(["finetune", str(tmp_path / "nope"), "--labels-per-class", "5"]) == 2
    assert f"{tmp_path / 'nope'} does not exist; give the directory of" in capsys.readouterr().err  # "is not a directory"
    (tmp_path / "afile").write_text("")
    assert main(["finetune", str(tmp_path / "afile"), "--labels-per-class", "5"]) == 2
    assert f"{tmp_path / 'afile'} is a file, not a directory; give" in capsys.readouterr().err
    assert main(["finetune", str(run_dir), "--labels-per-class", "5", "--from-head-layer", "2", "--device", "cpu"]) == 2
    assert "--from-head-layer 2: the run's projection head has 2 linear layers" in capsys.readouterr().err
    assert main(["finetune", str(run_dir), "--labels-per-class", "5", "--from-head-layer", "-1"]) == 2
    assert "--from-head-layer must be a finite number of at least 0, got -1" in capsys.readouterr().err
    assert main(["distill", str(run_dir), "--steps", "0"]) == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command, flags, said", [
    ("finetune", ["--seed", "-1"], "--seed takes 0 to 18446744073709551615, got -1"),
    ("finetune", ["--seed", str(10**23)], "--seed takes 0 to 18446744073709551615, got 1000"),
    ("distill", ["--seed", str(10**23)], "--seed takes 0 to 18446744073709551615, got 1000"),
    ("finetune", ["--lr", "inf"], "--lr must be a finite number above 0, got inf"),
    ("finetune", ["--batch-size", "1", "--baseline"], "--batch-size must be at least 2 (BatchNorm trains on batch"),
    ("distill", ["--batch-size", "1"], "--batch-size must be at least 2"),
    ("distill", ["--student-width", "nan"], "--student-width must be a finite number of at least 0, got nan"),
    ("distill", ["--student-width", "inf"], "--student-width must be a finite number of at least 0, got inf"),
    ("distill", ["--temperature", "inf"], "--temperature must be a finite number above 0, got inf"),
    ("distill", ["--label-weight", "2"], "--label-weight must be in [0, 1], got 2.0"),
    ("finetune", ["--labels-per-class", "0"], "--labels-per-class must be at least 1, got 0"),  # not "give one of"
    ("distill", ["--temperature", "0"], "--temperature must be a finite number above 0, got 0.0"),
    ("distill", ["--shift", "0.5"], "--shift 0.5 must be in [0, 0.5)"),
])
def test_bad_settings_are_one_line_before_anything_is_read_or_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, flags: list[str], said: str) -> None:
    """Each was a traceback (seeds, widths, a batch of 1 in BatchNorm) or, for the distillation's
    settings, a refusal only after the run, the teacher and the data were read and --out was made."""
    target = tmp_path / "nowhere"  # a teacher or run that does not exist: the setting is refused first
    extra = ["--labels-per-class", "5"] if command == "finetune" else []
    assert main([command, str(target), *extra, *flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_out_over_a_run_directory_is_refused_and_its_encoder_kept(run: Run, finetuned: dict[str, Any]) -> None:
    """`--out RUN_DIR` replaced the run's pretrained encoder.safetensors with the classifier's."""
    run_dir, ds = run
    before = (run_dir / "encoder.safetensors").read_bytes()
    with pytest.raises(FastclrError, match="already holds a run's files, which this fine-tuned classifier would"):
        finetune_run(run_dir, dataclasses.replace(FT, steps=1, baseline=False), out=run_dir, dataset=ds,
                     log=lambda s: None)
    with pytest.raises(FastclrError, match="already holds a run's files, which this distilled classifier would"):
        distill_run(Path(finetuned["out"]), dataclasses.replace(DS, steps=1), out=run_dir, dataset=ds,
                    log=lambda s: None)
    assert (run_dir / "encoder.safetensors").read_bytes() == before


def test_out_is_a_new_or_empty_folder(run: Run, finetuned: dict[str, Any], tmp_path: Path) -> None:
    """A folder of the user's own files (a class folder of images), a file, or a fine-tuned
    classifier given to distil are refused before any work; they took the classifier's files, or
    were told they held "a distilled classifier"."""
    run_dir, ds = run
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"jpeg")
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    one = dataclasses.replace(FT, steps=1, baseline=False)
    with pytest.raises(FastclrError, match=f"--out {photos} already holds other files [(]cat.jpg[)]; give a new or "
                                           "empty folder"):
        finetune_run(run_dir, one, out=photos, dataset=ds, log=lambda s: None)
    with pytest.raises(FastclrError, match="is a file; the fine-tuned classifier is written as a folder"):
        finetune_run(run_dir, one, out=tmp_path / "notes.txt", dataset=ds, log=lambda s: None)
    with pytest.raises(FastclrError, match="already holds a fine-tuned classifier, which this distilled classifier"):
        distill_run(Path(finetuned["out"]), dataclasses.replace(DS, steps=1), out=Path(finetuned["out"]), dataset=ds,
                    log=lambda s: None)
    assert sorted(p.name for p in photos.iterdir()) == ["cat.jpg"]
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
    with pytest.raises(FastclrError, match=f"--out {tmp_path / 'notes.txt' / 'ft'}: {tmp_path / 'notes.txt'} is a "
                                           "file, not a folder"):  # refused before training, not after it
        finetune_run(run_dir, one, out=tmp_path / "notes.txt" / "ft", dataset=ds, log=lambda s: None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"Finder's")  # still empty to its user
    assert Path(finetune_run(run_dir, one, out=tmp_path / "empty", dataset=ds, log=lambda s: None)["out"]) == \
        tmp_path / "empty"


def test_a_failed_write_of_the_results_leaves_no_half_output(run: Run, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder written, then the classifier's write failed (a full disk, a stop): the folder
    held encoder.safetensors alone, and the rerun was refused as "already holds" it."""
    import fastclr.semisup.pipeline as pipeline

    run_dir, ds = run
    one = dataclasses.replace(FT, steps=1, baseline=False)

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "save_classifier", full_disk)
    with pytest.raises(OSError, match="No space left"):
        finetune_run(run_dir, one, out=tmp_path / "ft", dataset=ds, log=lambda s: None)
    assert not (tmp_path / "ft").exists()
    monkeypatch.undo()
    assert Path(finetune_run(run_dir, one, out=tmp_path / "ft", dataset=ds, log=lambda s: None)["out"]) == tmp_path / "ft"


def test_a_diverging_fine_tune_is_refused_and_writes_nothing(run: Run, tmp_path: Path) -> None:
    """At lr 1e9 the loss turns NaN: it was saved as a classifier of NaN weights, exit 0, with the
    non-JSON token NaN in finetune.json."""
    run_dir, ds = run
    with pytest.raises(FastclrError, match="training the classifier diverged: its loss became NaN or infinite at a "
                                           "learning rate of 1e[+]09; lower --lr"):
        finetune_run(run_dir, dataclasses.replace(FT, steps=3, lr=1e9, baseline=False), out=tmp_path / "ft",
                     dataset=ds, log=lambda s: None)
    assert not (tmp_path / "ft").exists()  # not even its folder: it is made when the results are written


def test_the_baseline_is_the_fine_tuned_networks_architecture_freshly_initialised(
        run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From head layer 1 the classifier is encoder -> Linear+BN+ReLU -> Linear; its baseline was
    encoder -> Linear alone, though documented as the same network."""
    import fastclr.semisup.pipeline as pipeline
    from fastclr.evaluation import supervised

    heads: list[torch.nn.Module] = []
    real = supervised.scratch_network

    def spy(*args: Any, **kw: Any) -> Any:
        enc, head = real(*args, **kw)
        heads.append(head)
        return enc, head

    monkeypatch.setattr(supervised, "scratch_network", spy)
    run_dir, ds = run
    r = finetune_run(run_dir, dataclasses.replace(FT, steps=1), out=tmp_path / "ft", dataset=ds, log=lambda s: None)
    model, _, _ = load_classifier(tmp_path / "ft")
    fine = {k: v.shape for k, v in torch.nn.Sequential(model.neck, model.fc).state_dict().items()}
    assert len(heads) == 1 and {k: v.shape for k, v in heads[0].state_dict().items()} == fine
    assert "baseline_accuracy" in r and pipeline.FINETUNE_FILE == "finetune.json"


def test_the_baselines_new_neck_and_linear_layer_are_independent_draws_of_its_seed(
        run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The neck was drawn by the caller from the state `manual_seed(seed)` had left, and the linear
    layer after the same seed again: its weights were the neck's first ones times sqrt(2). Both are
    now drawn from one stream, fixed by the seed whatever the caller drew before."""
    from fastclr.evaluation import supervised

    starts: list[dict[str, torch.Tensor]] = []
    real = supervised.scratch_network

    def spy(*args: Any, **kw: Any) -> Any:
        enc, head = real(*args, **kw)
        starts.append({k: v.clone() for k, v in head.state_dict().items()})
        return enc, head

    monkeypatch.setattr(supervised, "scratch_network", spy)
    run_dir, ds = run
    for i, before in enumerate((123, 456)):
        torch.manual_seed(before)
        torch.rand(7)
        finetune_run(run_dir, dataclasses.replace(FT, steps=1), out=tmp_path / f"ft{i}", dataset=ds, log=lambda s: None)
    first, again = starts
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    neck, linear = first["0.0.weight"].flatten(), first["1.weight"].flatten()
    assert abs(float(torch.corrcoef(torch.stack([neck[:linear.numel()], linear]))[0, 1])) < 0.3


def test_a_head_from_another_step_than_the_encoder_is_refused(run: Run) -> None:
    """The head comes from the newest checkpoint that verifies, the encoder from encoder.safetensors:
    were the newest checkpoint damaged, the head of an older step would sit under the final encoder."""
    from fastclr.pretrained import trained_head

    loaded = load_run(run[0])
    assert trained_head(loaded, torch.device("cpu")) is not None  # the same step: taken
    other = dataclasses.replace(loaded, encoder=__import__("copy").deepcopy(loaded.encoder))
    with torch.no_grad():
        next(other.encoder.parameters()).add_(1e-3)
    with pytest.raises(FastclrError, match=r"does not hold the encoder of encoder.safetensors .*--from-head-layer 0"):
        trained_head(other, torch.device("cpu"))


def test_distill_from_the_teachers_own_folder_names_the_output_after_it(
        run: Run, finetuned: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fastclr distill .` wrote the student into RUN/distill/ itself (the name of "." is "")."""
    import shutil

    run_dir, ds = run
    teacher = tmp_path / "teach2"
    shutil.copytree(finetuned["out"], teacher)
    monkeypatch.chdir(teacher)
    r = distill_run(Path("."), dataclasses.replace(DS, steps=1), dataset=ds, log=lambda s: None)
    assert Path(r["out"]) == run_dir / "distill" / "teach2"


def test_distill_finds_the_run_its_teacher_sits_in_when_the_run_was_moved_or_copied(
        run: Run, finetuned: dict[str, Any], tmp_path: Path) -> None:
    """A teacher in RUN/finetune/NAME recorded RUN's path: a moved run's teacher was refused as
    gone, and a copy's distilled from the original run, into the original's folder. The run it
    sits in is the one used: a copy distils into itself, and a copy trained on since is refused by
    its encoder's checksum, not passed over for the original."""
    import shutil

    from eval_fixtures import alter_encoder

    run_dir, ds = run
    teacher = Path(finetuned["out"])
    assert teacher.parent == run_dir / "finetune"
    copy = tmp_path / "moved"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("distill"))
    r = distill_run(copy / "finetune" / teacher.name, dataclasses.replace(DS, steps=1), dataset=ds, log=lambda s: None)
    assert Path(r["out"]) == copy / "distill" / teacher.name
    assert json.loads((copy / "distill" / teacher.name / "distill.json").read_text())["run_dir"] == str(copy)
    shutil.rmtree(copy / "distill")
    alter_encoder(copy, lambda w: w.add_(1e-3))  # the copy trained on since; the original is still there
    for init in ("pretrained", "random"):  # not passed over for the original, nor distilled on the copy's data
        with pytest.raises(FastclrError, match=f"^{copy / 'finetune' / teacher.name} sits in the run {copy} but was "
                                               f"fine-tuned from {run_dir.resolve()}, another run"):
            distill_run(copy / "finetune" / teacher.name, dataclasses.replace(DS, steps=1, student_init=init),
                        dataset=ds, log=lambda s: None)
    moved = tmp_path / "moved-away"  # the recorded run gone: the one it sits in, checked by its encoder's checksum
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("distill"))
    told = json.loads((moved / "finetune" / teacher.name / "finetune.json").read_text())
    from fastclr.semisup.pipeline import teachers_run

    assert teachers_run(moved / "finetune" / teacher.name, dict(told, run_dir=str(tmp_path / "gone"))) == moved


def test_distillation_reads_a_memory_mapped_pool_without_copying_it(
        run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image of a store is the student's pool: the memory map goes to the loader, which reads
    a batch at a time, not a copy of the store in memory."""
    from fastclr.evaluation import classifier

    run_dir, ds = run
    assert ds.train is not None
    path = tmp_path / "pool.npy"
    np.save(path, ds.train.images)
    mapped = np.load(path, mmap_mode="r")
    seen: list[type] = []
    real = classifier.ImageSource

    def spy(images: Any, device: Any) -> Any:
        seen.append(type(images))
        return real(images, device)

    monkeypatch.setattr(classifier, "ImageSource", spy)
    r = load_run(run_dir)
    setup = labelled_splits(r, ds, torch.device("cpu"), dataclasses.replace(EvaluateOptions(), steps=1).recipe(0.5))
    setup = dataclasses.replace(setup, train_images=mapped)
    head = torch.nn.Linear(r.spec.feature_dim, 10)
    classifier.train_classifier(r.encoder, head, setup, np.arange(len(mapped)), 0)
    classifier.train_classifier(r.encoder, head, setup, np.arange(5), 0)
    assert seen == [np.memmap, np.ndarray]


def test_a_label_fraction_a_class_cannot_give_names_the_largest_that_works() -> None:
    from fastclr.semisup.pipeline import _per_class

    labels = np.array([0] * 10 + [1] * 4 + [2] * 10)
    with pytest.raises(FastclrError, match=r"--label-fraction 1 asks for 8 labels per class but a class has only 4 "
                                           r"labelled training images; use --label-fraction of at most 0.5$"):
        _per_class(FinetuneOptions(label_fraction=1.0), labels, 3)
    assert _per_class(FinetuneOptions(label_fraction=0.5), labels, 3) == 4
    with pytest.raises(FastclrError, match=r"class 1 \(b\) has no labelled training images"):
        stratified_subset(np.array([0, 0, 2, 2]), 1, 0, ["a", "b", "c"])


def test_a_damaged_finetune_json_is_one_line_naming_it(tmp_path: Path) -> None:
    """distill reads the teacher's finetune.json: damaged, it is named in one line, not a traceback."""
    from fastclr.semisup.network import CLASSIFIER_FILE
    from fastclr.semisup.pipeline import FINETUNE_FILE, read_teacher

    (tmp_path / CLASSIFIER_FILE).write_bytes(b"")
    (tmp_path / FINETUNE_FILE).write_text('{"labels_per_class": ')
    with pytest.raises(FastclrError,
                       match=r"finetune.json is damaged .*; delete that directory and run `fastclr finetune` again"):
        read_teacher(tmp_path)
    (tmp_path / FINETUNE_FILE).write_text('{"labels_per_class": 5}')  # JSON, but not all of a record
    with pytest.raises(FastclrError, match=r"finetune.json is damaged: run_dir, seed, subset, accuracy missing or of "
                                           r"the wrong type; delete that directory and run `fastclr finetune` again"):
        read_teacher(tmp_path)
    told = {"run_dir": "/r", "seed": 0, "labels_per_class": 5, "subset": "abc", "accuracy": 0.5}
    (tmp_path / FINETUNE_FILE).write_text(json.dumps(told))
    assert read_teacher(tmp_path) == told


def test_distil_refuses_a_student_from_an_encoder_the_teacher_was_not_fine_tuned_from(
        run: Run, tmp_path: Path) -> None:
    """The run trained on after the fine-tuning (here: its encoder's weights changed): a student
    started from the run would start from other weights than its teacher's, silently. Refused,
    unless the student starts at random; distill.json names the encoder it started from."""
    import shutil

    from fastclr.export import save_encoder

    run_dir, ds = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("finetune", "distill"))
    teacher = Path(finetune_run(copy, dataclasses.replace(FT, steps=1, baseline=False), dataset=ds,
                                log=lambda s: None)["out"])
    encoder, spec = fastclr.load_encoder(copy / "encoder.safetensors")
    with torch.no_grad():
        next(encoder.parameters()).add_(0.01)
    save_encoder(copy / "encoder.safetensors", encoder, spec)
    with pytest.raises(FastclrError, match=f"{copy}'s encoder is not the one {teacher} was fine-tuned from"):
        distill_run(teacher, dataclasses.replace(DS, steps=1), dataset=ds, log=lambda s: None)
    r = distill_run(teacher, dataclasses.replace(DS, steps=1, student_init="random"), dataset=ds, log=lambda s: None)
    assert r["run_encoder_sha256"] == state_checksum(encoder) != json.loads(
        (teacher / "finetune.json").read_text())["run_encoder_sha256"]


def labelled_setup_of(x: np.ndarray, y: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> LabelledSetup:
    """A CPU, fp32 LabelledSetup of three classes training on x, y and testing on them too."""
    from fastclr.runtime import FP32

    return LabelledSetup(x, y, x, y, ["a", "b", "c"], mean, std, 28, torch.device("cpu"), FP32,
                         TrainRecipe(1, 4, 1e-3, 0.0, 0.0, 0.0, 0.0))


def test_the_teacher_gives_its_eval_mode_logits_without_gradients_or_moving() -> None:
    """The teacher is fixed: handed over in train mode, its targets are still its eval-mode logits
    (BatchNorm on running statistics, which do not move), and the loss's gradient reaches the
    student's logits only, none of the teacher's parameters."""
    from conftest import synthetic_images

    spec = EncoderSpec("cnn", 1, 28, 0.125, "off", 64, (0.5,), (0.25,), "32|256|fc512")
    torch.manual_seed(0)
    teacher = Classifier(encoder_from_spec(spec), torch.nn.Sequential(), torch.nn.Linear(spec.feature_dim, 3))
    x, y = synthetic_images(8, 28, seed=5, classes=3)
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    setup = labelled_setup_of(x, y, mean, std)
    batch = prepare_images(torch.from_numpy(x[:4]), mean, std, 28)
    with torch.no_grad():
        want = teacher.eval()(batch)
    teacher.train()
    before = state_checksum(teacher)
    known = known_labels(8, np.array([1]), y[[1]])
    logits = torch.randn(4, 3, requires_grad=True)
    b = torch.arange(4)
    loss = distillation_objective(teacher, known, 2.0, 0.25, setup, "same")(batch, logits, b)
    loss.backward()
    formula = distillation_loss(logits.detach(), want, torch.from_numpy(known[:4]), 2.0, 0.25)
    assert float(loss.detach()) == pytest.approx(float(formula), rel=1e-5)
    assert logits.grad is not None and all(p.grad is None for p in teacher.parameters())
    assert state_checksum(teacher) == before


def test_the_neck_is_a_copy_that_trains_apart_from_the_run_head() -> None:
    """neck_of copies the head's layers: changing the classifier's neck (fine-tuning trains it)
    leaves the projection head as it was."""
    torch.manual_seed(0)
    head = ProjectionHead(12, 10, out_dim=6, layers=3, batch_norm=True)
    before = state_checksum(head)
    neck = neck_of(head, 2)
    with torch.no_grad():
        for p in neck.parameters():
            p.add_(1.0)
    neck.train()(torch.randn(5, 12))  # a train-mode pass moves the neck's BatchNorm statistics
    assert state_checksum(head) == before


def test_exactly_one_of_labels_per_class_and_label_fraction() -> None:
    """Both given (possible from Python, not from the command line) or neither: one line, not a
    silent preference for one of them."""
    from fastclr.semisup.pipeline import _per_class

    labels = np.repeat(np.arange(3), 10)
    for both_or_neither in (FinetuneOptions(labels_per_class=5, label_fraction=0.1), FinetuneOptions()):
        with pytest.raises(FastclrError, match="give exactly one of --labels-per-class N and --label-fraction F"):
            _per_class(both_or_neither, labels, 3)
    assert _per_class(FinetuneOptions(labels_per_class=5), labels, 3) == 5


def test_finetune_draws_its_subset_with_its_seed_and_trains_with_the_fine_tuning_recipe(
        run: Run, finetuned: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--seed picks the labelled subset (evaluate's for that seed), and the fine-tuning is trained
    with evaluate's fine-tuning recipe, the baseline with its from-scratch one; both as recorded."""
    import fastclr.semisup.pipeline as pipeline

    run_dir, ds = run
    assert ds.train is not None and ds.train.labels is not None
    seen: dict[str, Any] = {}
    real_tune, real_scratch = pipeline.probe_then_finetune, pipeline.train_from_scratch

    def tune(backbone: Any, subset_x: Any, test_x: Any, setup: Any, idx: np.ndarray, seed: int) -> Any:
        seen.update(idx=idx, tune=setup.recipe, seed=seed)
        return real_tune(backbone, subset_x, test_x, setup, idx, seed)

    def scratch(spec: Any, setup: Any, idx: np.ndarray, seed: int, *rest: Any) -> Any:
        seen.update(scratch=setup.recipe, scratch_idx=idx)
        return real_scratch(spec, setup, idx, seed, *rest)

    monkeypatch.setattr(pipeline, "probe_then_finetune", tune)
    monkeypatch.setattr(pipeline, "train_from_scratch", scratch)
    o = dataclasses.replace(FT, seed=1, steps=1, from_head_layer=0)
    r = finetune_run(run_dir, o, out=tmp_path / "ft", dataset=ds, log=lambda s: None)
    subset = stratified_subset(ds.train.labels, 5, 1)
    assert np.array_equal(seen["idx"], subset) and np.array_equal(seen["scratch_idx"], subset) and seen["seed"] == 1
    assert r["subset"] == subset_id(subset) != finetuned["subset"]
    ev = dataclasses.replace(EvaluateOptions(), steps=1, batch_size=o.batch_size, lr=o.lr)
    flip = load_run(run_dir).config.augment.flip_p
    assert seen["tune"] == ev.recipe(flip, finetune=True) and r["recipe"] == dataclasses.asdict(seen["tune"])
    assert seen["scratch"] == ev.recipe(flip) and r["baseline_recipe"] == dataclasses.asdict(seen["scratch"])
    assert seen["tune"] != seen["scratch"]  # the two recipes differ (in their shifts): which one trained is seen


def test_distill_trains_with_its_options_on_the_teachers_labelled_images(
        run: Run, finetuned: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With unlabelled images before the train split in the pool, the labelled positions handed to
    the student's training are the teacher's subset (its images and labels, not the pool's first
    rows); --seed, --shift, --temperature, --label-weight and --teacher-views reach it."""
    import fastclr.semisup.pipeline as pipeline

    run_dir, ds = run
    assert ds.train is not None and ds.train.labels is not None
    extra = np.ascontiguousarray(ds.train.images[:150, :, ::-1])
    pool = Dataset(ds.name, ImageSet(np.concatenate([extra, ds.train.images]), None), ds.train, ds.test, ds.classes,
                   unlabelled=len(extra))
    seen: dict[str, Any] = {}
    real = pipeline.distill

    def spy(teacher: Any, student: Any, setup: Any, labelled: np.ndarray, temperature: float, label_weight: float,
            seed: int, teacher_views: str = "same") -> Any:
        seen.update(setup=setup, labelled=labelled, options=(temperature, label_weight, seed, teacher_views))
        return real(teacher, student, setup, labelled, temperature, label_weight, seed, teacher_views)

    monkeypatch.setattr(pipeline, "distill", spy)
    o = dataclasses.replace(DS, steps=1, seed=3, shift_fraction=0.0, temperature=3.0, label_weight=0.25,
                            teacher_views="same")
    r = distill_run(Path(finetuned["out"]), o, out=tmp_path / "student", dataset=pool, log=lambda s: None)
    subset = stratified_subset(ds.train.labels, 5, 0)
    setup, labelled = seen["setup"], seen["labelled"]
    assert np.array_equal(setup.train_images[labelled], ds.train.images[subset])
    assert np.array_equal(setup.train_labels[labelled], ds.train.labels[subset])
    assert seen["options"] == (3.0, 0.25, 3, "same") and r["seed"] == 3 and r["subset"] == finetuned["subset"]
    assert setup.recipe.shift_fraction == 0.0 == r["recipe"]["shift_fraction"] != DistillOptions().shift_fraction


def test_the_command_lines_flags_reach_the_options(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Every flag of `fastclr finetune` and `fastclr distill` lands in its own option, each given a
    value other than its default."""
    import fastclr.semisup.pipeline as pipeline

    got: dict[str, Any] = {}

    def fake_finetune(run_dir: Path, o: FinetuneOptions, out: Any = None, log: Any = print) -> dict[str, Any]:
        got["finetune"] = (run_dir, o, out)
        return {"labels": 10, "accuracy": 0.5, "linear_accuracy": 0.4, "baseline_accuracy": 0.3, "out": str(out)}

    def fake_distill(teacher_dir: Path, o: DistillOptions, out: Any = None, log: Any = print) -> dict[str, Any]:
        got["distill"] = (teacher_dir, o, out)
        return {"accuracy": 0.5, "teacher_accuracy": 0.6, "out": str(out)}

    monkeypatch.setattr(pipeline, "finetune_run", fake_finetune)
    monkeypatch.setattr(pipeline, "distill_run", fake_distill)
    machine = ["--device", "cpu", "--precision", "fp32", "--threads", "1", "--quiet"]
    assert main(["finetune", "R", "--label-fraction", "0.1", "--seed", "2", "--from-head-layer", "1", "--steps", "3",
                 "--batch-size", "5", "--lr", "0.5", "--baseline", "--out", "O", *machine]) == 0
    assert got["finetune"] == (Path("R"), FinetuneOptions(
        labels_per_class=0, label_fraction=0.1, seed=2, from_head_layer=1, steps=3, batch_size=5, lr=0.5, baseline=True,
        device="cpu", precision="fp32", threads=1), "O")
    assert main(["finetune", "R", "--labels-per-class", "7", *machine]) == 0
    assert got["finetune"][1].labels_per_class == 7 and got["finetune"][1].label_fraction == 0.0
    assert main(["distill", "T", "--steps", "7", "--batch-size", "9", "--lr", "0.02", "--temperature", "2.5",
                 "--label-weight", "0.25", "--student-width", "0.5", "--student-init", "random", "--teacher-views",
                 "same", "--shift", "0.1", "--seed", "4", "--out", "O", *machine]) == 0
    assert got["distill"] == (Path("T"), DistillOptions(
        steps=7, batch_size=9, lr=0.02, temperature=2.5, label_weight=0.25, student_width=0.5, student_init="random",
        teacher_views="same", shift_fraction=0.1, seed=4, device="cpu", precision="fp32", threads=1), "O")
    assert "distilled student: test accuracy 50.00% (teacher 60.00%)" in capsys.readouterr().out


def test_features_and_distillation_leave_a_classifier_in_the_mode_it_was_in() -> None:
    """`Classifier.backbone()` is a new wrapper, in train mode as every new module: reading h
    through it, and `distill`'s closing accuracies of the teacher and the student (read through it),
    leave every module of each classifier in its own mode, not the wrapper's. In train mode one
    image would raise in BatchNorm, and a batch's results would depend on its other images."""
    torch.manual_seed(0)
    spec = EncoderSpec("cnn", 1, 28, 0.125, "off", 64, (0.5,), (0.25,), "32|256|fc512")
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])

    def classifier() -> Classifier:
        return Classifier(encoder_from_spec(spec), torch.nn.Sequential(), torch.nn.Linear(spec.feature_dim, 3)).eval()

    x = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    y = np.arange(16) % 3
    model = classifier()
    extract_features(model.backbone(), x, mean, std, torch.device("cpu"))
    assert not any(m.training for m in model.modules())
    teacher, student = classifier(), classifier()
    distill(teacher, student, labelled_setup_of(x, y, mean, std), np.array([0, 1, 2]), 1.0, 0.0, 0)
    assert not any(m.training for m in [*teacher.modules(), *student.modules()])
    # a teacher given in train mode (from Python) is read in eval mode and given back in train mode
    teacher.train()
    distill(teacher, classifier(), labelled_setup_of(x, y, mean, std), np.array([0, 1, 2]), 1.0, 0.0, 0)
    assert all(m.training for m in teacher.modules())


def test_distil_on_data_whose_class_shrank_says_to_fine_tune_again(run: Run, tmp_path: Path) -> None:
    """The teacher drew 5 labels per class; the data now holds 2 of class 0. The error advised
    "--labels-per-class values of at most 2", a flag distil does not have: it says what to do now."""
    import shutil

    run_dir, ds = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("finetune", "distill"))
    teacher = Path(finetune_run(copy, dataclasses.replace(FT, steps=1, baseline=False), dataset=ds,
                                log=lambda s: None)["out"])
    assert ds.train is not None
    keep = np.flatnonzero(ds.train.labels != 0).tolist() + np.flatnonzero(ds.train.labels == 0)[:2].tolist()
    train = ImageSet(ds.train.images[sorted(keep)], ds.train.labels[sorted(keep)])
    shrunk = Dataset(ds.name, train, train, ds.test, ds.classes)
    with pytest.raises(FastclrError) as e:
        distill_run(teacher, dataclasses.replace(DS, steps=1), dataset=shrunk, log=lambda s: None)
    assert str(e.value).startswith(f"the labelled subset of {teacher} cannot be drawn from this dataset (asked for 5 "
                                   "labels per class but class 0")
    assert str(e.value).endswith("): the data changed since fine-tuning; fine-tune again")


def test_finetune_records_the_data_and_distill_refuses_a_store_prepared_again(run: Run, tmp_path: Path) -> None:
    """finetune.json did not say which data the teacher saw: a store prepared again with other
    images of the same classes and sizes passed the subset check and distilled a teacher of other
    images. The record carries the store's content identity; distill refuses another one."""
    import shutil

    run_dir, ds = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("finetune", "distill"))
    then, now = dataclasses.replace(ds, content="a" * 64), dataclasses.replace(ds, content="b" * 64)
    teacher = Path(finetune_run(copy, dataclasses.replace(FT, steps=1, baseline=False), dataset=then,
                                log=lambda s: None)["out"])
    assert json.loads((teacher / "finetune.json").read_text())["data_content"] == "a" * 64
    with pytest.raises(FastclrError, match=f"^{teacher} was fine-tuned on {ds.name} as it was then; the store has "
                                           "been prepared again since"):
        distill_run(teacher, dataclasses.replace(DS, steps=1), dataset=now, log=lambda s: None)
    assert not (copy / "distill").exists()
    distill_run(teacher, dataclasses.replace(DS, steps=1), dataset=then, log=lambda s: None)
