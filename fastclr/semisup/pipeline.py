"""`fastclr finetune` and `fastclr distill`: SimCLRv2's semi-supervised steps 2 and 3 on a run.

finetune: a class-balanced subset of the labels (n per class, or a fraction), the run's encoder
with the first layers of its projection head kept (SimCLRv2) or from h (SimCLR), a linear head
started from the probe's logistic regression, then everything trained (LP-FT, as `evaluate` does).
distill: that fine-tuned classifier as a fixed teacher of a student trained on every training
image. Each writes a directory a user can load: `encoder.safetensors` (`fastclr.load_encoder`),
`classifier.safetensors` (`fastclr.load_classifier`: images -> logits) and a JSON record with the
test accuracy, the subset and every option.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastclr.config import SEED_MAX
from fastclr.cpus import gives_threads_back, set_threads
from fastclr.data import Dataset
from fastclr.errors import FastclrError
from fastclr.evaluation.classifier import LabelledSetup, TrainRecipe
from fastclr.evaluation.features import extract_features, state_checksum
from fastclr.evaluation.finetune import probe_then_finetune
from fastclr.evaluation.options import EvaluateOptions
from fastclr.evaluation.reference import untrained_encoder
from fastclr.evaluation.run import labelled_splits as evaluation_splits
from fastclr.evaluation.subsets import labels_for_fraction, stratified_subset, subset_id
from fastclr.evaluation.supervised import train_from_scratch
from fastclr.export import ENCODER_FILE, save_encoder
from fastclr.models import EncoderSpec, encoder_from_spec, feature_dim
from fastclr.pretrained import LoadedRun, has_weights, load_run, run_data, trained_head
from fastclr.files import not_a_folder, read_json
from fastclr.runs import refuse_output, refuse_uncreatable, write_json
from fastclr.runtime import cpu_model, on_meta, require_model_memory, select_device, to_channels_last
from fastclr.semisup.distill import check_distill_options, distill
from fastclr.semisup.network import (CLASSIFIER_FILE, Classifier, empty_neck, load_classifier, neck_of,
                                     neck_widths, save_classifier)
from fastclr.version import __version__

FINETUNE_FILE = "finetune.json"
DISTILL_FILE = "distill.json"
STUDENT_INITS = ("auto", "pretrained", "random")


@dataclass
class FinetuneOptions:
    """Choices of one `fastclr finetune`."""

    labels_per_class: int = 0
    label_fraction: float = 0.0
    """Exactly one of the two is given: n labels per class, or a class-balanced fraction of all."""
    seed: int = 0
    """Picks the labelled subset (the same one `evaluate` uses for this seed) and the training draws."""
    from_head_layer: int = 0
    """Layers of the projection head kept under the linear head: 0 fine-tunes from h (SimCLR), 1
    from the head's first layer (SimCLRv2's choice for its 3-layer head). On Fashion-MNIST, 1% and
    10% labels, three seeds each, from h won with the 2-layer and the 3-layer head alike
    (docs/benchmarks.md section 11)."""
    steps: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    baseline: bool = False
    """Also train the same architecture from scratch on the same labels (the supervised baseline)."""
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0


@dataclass
class DistillOptions:
    """Choices of one `fastclr distill`."""

    steps: int = 2000
    """Student steps over all training images (2000 x 256 = 8.5 epochs of Fashion-MNIST)."""
    batch_size: int = 256
    lr: float = 1e-3
    temperature: float = 1.0
    """Of teacher and student distributions (SimCLRv2 uses 1)."""
    label_weight: float = 0.0
    """Weight of the labelled images' cross-entropy (1 - alpha in SimCLRv2's equation 3); 0 is
    distillation alone."""
    student_width: float = 0.0
    """Channel multiplier of the student; 0: the teacher's (self-distillation)."""
    student_init: str = "auto"
    """pretrained (the run's SimCLR encoder), random, or auto: pretrained when the student has the
    run's architecture."""
    teacher_views: str = "clean"
    """clean: the teacher labels the un-augmented images, once, and only the student sees the
    augmentation; same: the teacher labels the student's augmented batch (SimCLRv2's code). At 1% of
    Fashion-MNIST's labels, three seeds: +0.81 points over the teacher with clean, +0.12 with same
    (docs/benchmarks.md section 11)."""
    shift_fraction: float = 0.0625
    """Largest random shift of the student's images, as a fraction of the side (2 px at 28 px, the
    supervised baseline's)."""
    seed: int = -1
    """-1: the teacher's seed."""
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0


def _environment(device: torch.device, run: LoadedRun) -> dict[str, Any]:
    return {"device": str(device), "cpu": cpu_model(), "precision": run.precision.name, "torch": torch.__version__,
            "fastclr": __version__, "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def teachers_run(teacher_dir: Path, told: dict[str, Any]) -> Path:
    """The run a teacher was fine-tuned from. By the path it recorded alone, a moved run's teacher
    was refused as gone, and a copied run's teacher distilled from the original, into the original's
    folder. The run it sits in (RUN/finetune/NAME, where `finetune` puts it) comes first; `distill_run`
    then holds its encoder to the one the teacher recorded (`found_by_place`): a copy passes, another
    run (or this one trained on since) is refused, naming both."""
    recorded = Path(told["run_dir"])
    home = teacher_dir.resolve().parent
    if home.name == "finetune" and (home.parent / "config.toml").is_file() and has_weights(home.parent):
        return home.parent
    if not recorded.is_dir():
        raise FastclrError(f"the teacher's run {recorded} is gone; the student starts from it and trains on its "
                           "data (a run moved with its teachers in RUN/finetune/ is found there)")
    return recorded


def found_by_place(run_dir: Path, told: dict[str, Any]) -> bool:
    """Whether `teachers_run` chose another run directory than the one the teacher recorded."""
    return run_dir.resolve() != Path(told["run_dir"]).resolve()


def labelled_splits(run: LoadedRun, dataset: Dataset, device: torch.device, recipe: TrainRecipe) -> LabelledSetup:
    """The run's labelled train and test splits as a LabelledSetup; one line when there are none."""
    return evaluation_splits(run, dataset, device, recipe, "; fine-tuning and distillation need labels for some "
                             "training images and a labelled test split")


def _check(steps: int, batch_size: int, lr: float, seed: int, **at_least_zero: float) -> None:
    """One line for a training setting out of range, before anything is loaded or written."""
    if steps < 1:
        raise FastclrError(f"--steps must be at least 1, got {steps}")
    if batch_size < 2:  # BatchNorm in training mode needs two images to take statistics from
        raise FastclrError(f"--batch-size must be at least 2 (BatchNorm trains on batch statistics), got {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise FastclrError(f"--lr must be a finite number above 0, got {lr}")
    if not -1 <= seed <= SEED_MAX:
        raise FastclrError(f"--seed takes 0 to {SEED_MAX}, got {seed}")
    for name, value in at_least_zero.items():
        if not (value >= 0 and math.isfinite(value)):
            raise FastclrError(f"--{name.replace('_', '-')} must be a finite number of at least 0, got {value:g}")


def _per_class(o: FinetuneOptions, labels: np.ndarray, k: int) -> int:
    if (o.labels_per_class > 0) == (o.label_fraction > 0):
        raise FastclrError("give exactly one of --labels-per-class N and --label-fraction F (e.g. 0.01 for 1%)")
    if o.labels_per_class:
        return o.labels_per_class
    return labels_for_fraction(labels, o.label_fraction, k, "--label-fraction")


OS_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
"""What a file manager leaves in a folder it showed: the folder is still empty to its user."""


def _fresh_out(out: Path, what: str) -> Path:
    """`out`, checked before any work: a new or empty folder outside any store (`refuse_output`)
    that can be made (`refuse_uncreatable`); it is made only when the results are written
    (`_writing`), so a stopped command leaves nothing behind."""
    refuse_output(out)
    if out.exists() and not out.is_dir():
        raise FastclrError(f"--out {out} is a file; the {what} is written as a folder: give a new folder")
    refuse_uncreatable(out)
    taken = [n for n in (CLASSIFIER_FILE, ENCODER_FILE, FINETUNE_FILE, DISTILL_FILE, "config.toml") if (out / n).exists()]
    if taken:
        kind = "a run's files" if (out / "config.toml").exists() else \
            "a distilled classifier" if DISTILL_FILE in taken else \
            "a fine-tuned classifier" if FINETUNE_FILE in taken else taken[0]
        raise FastclrError(f"{out} already holds {kind}, which this {what} would replace; give another --out, or "
                           "delete that directory first")
    others = sorted(p.name for p in out.iterdir() if p.name not in OS_CLUTTER) if out.is_dir() else []
    if others:  # someone's own files: a class folder of their images, a store
        raise FastclrError(f"--out {out} already holds other files ({', '.join(others[:3])}"
                           f"{', ...' if len(others) > 3 else ''}); give a new or empty folder")
    return out


@contextmanager
def _writing(target: Path) -> Iterator[None]:
    """Write a classifier's files into `target` (made here): all of them, or, when a write fails or
    the command is stopped part-way, none (the folder too, if this made it), so a rerun is not
    refused by a folder holding half an output."""
    made = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for name in (ENCODER_FILE, CLASSIFIER_FILE, FINETUNE_FILE, DISTILL_FILE):
            (target / name).unlink(missing_ok=True)  # _fresh_out found none of them there
        if made:
            with contextlib.suppress(OSError):
                target.rmdir()
        raise


def _open_run(run_dir: Path, device_name: str, precision: str, threads: int, log: Callable[[str], None],
              command: str) -> tuple[LoadedRun, torch.device]:
    set_threads(threads, warn=log)
    device = select_device(device_name, warn=log)
    return load_run(run_dir, device, precision, log, command=command), device


@gives_threads_back
def finetune_run(run_dir: str | Path, options: FinetuneOptions | None = None, out: str | Path | None = None,
                 dataset: Dataset | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune a copy of a run's encoder (and head layers) on a labelled subset; write the
    classifier, its encoder and finetune.json to `out` (default RUN_DIR/finetune/NAME); return the record."""
    o = options or FinetuneOptions()
    if o.seed < 0:
        raise FastclrError(f"--seed takes 0 to {SEED_MAX}, got {o.seed}")
    _check(o.steps, o.batch_size, o.lr, o.seed, from_head_layer=o.from_head_layer)
    run, device = _open_run(Path(run_dir), o.device, o.precision, o.threads, log, "fine-tune")
    neck = nn.Sequential()
    if o.from_head_layer > 0:
        head = trained_head(run, device)
        if head is None:
            raise FastclrError(f"{run.run_dir} has no checkpoint holding its projection head; fine-tune from h with "
                               "--from-head-layer 0")
        neck = neck_of(head, o.from_head_layer).to(device)
    dataset = run_data(run, dataset, log)
    ev = dataclasses.replace(EvaluateOptions(), steps=o.steps, batch_size=o.batch_size, lr=o.lr)
    setup = labelled_splits(run, dataset, device, ev.recipe(run.config.augment.flip_p, finetune=True))
    n = _per_class(o, setup.train_labels, len(setup.classes))
    idx = stratified_subset(setup.train_labels, n, o.seed, setup.classes)
    target = _fresh_out(Path(out) if out else run.run_dir / "finetune" / f"{n}-per-class-seed{o.seed}-head{o.from_head_layer}",
                        "fine-tuned classifier")
    t0 = time.perf_counter()
    encoder_sha = state_checksum(run.encoder)
    encoder = to_channels_last(copy.deepcopy(run.encoder))
    backbone = nn.Sequential(encoder, neck)
    subset_x = extract_features(backbone, setup.train_images[idx], setup.mean, setup.std, device,
                                precision=run.precision, size=setup.size)
    test_x = extract_features(backbone, setup.test_images, setup.mean, setup.std, device, precision=run.precision,
                              size=setup.size)
    log(f"fine-tuning on {len(idx)} labels ({n} per class, seed {o.seed}) from "
        f"{'h' if o.from_head_layer == 0 else f'layer {o.from_head_layer} of the projection head'} "
        f"({subset_x.shape[1]}-d), {o.steps} steps")
    fc, result = probe_then_finetune(backbone, subset_x, test_x, setup, idx, o.seed)
    model = Classifier(encoder, neck, fc)
    record: dict[str, Any] = {
        "kind": "finetune", "run_dir": str(run.run_dir.resolve()), "run_encoder_sha256": encoder_sha,
        "dataset": dataset.name, **({"data_content": dataset.content} if dataset.content else {}),
        "classes": setup.classes, "labels_per_class": n, "labels": len(idx),
        "label_fraction": len(idx) / len(setup.train_labels), "seed": o.seed, "subset": subset_id(idx),
        "from_head_layer": o.from_head_layer, "feature_dim": int(subset_x.shape[1]), "recipe": asdict(setup.recipe),
        "options": asdict(o), **result,
    }
    if o.baseline:
        scratch = dataclasses.replace(setup, recipe=ev.recipe(run.config.augment.flip_p))
        # The same network: a fresh neck of the kept head layers' layout too (SimCLRv2's comparison).
        widths, with_bn = neck_widths(neck), any(isinstance(m, nn.BatchNorm1d) for m in neck)
        fresh = (lambda: empty_neck(widths, run.spec.feature_dim, with_bn)) if widths else None
        record["baseline_accuracy"] = train_from_scratch(run.spec, scratch, idx, o.seed, fresh,
                                                         widths[-1] if widths else 0)["accuracy"]
        record["baseline_recipe"] = asdict(scratch.recipe)
    record["seconds"] = time.perf_counter() - t0
    record["environment"] = _environment(device, run)
    if state_checksum(run.encoder) != encoder_sha:  # fine-tuning must train a copy
        raise AssertionError("fine-tuning changed the run's own encoder")
    with _writing(target):
        save_encoder(target / ENCODER_FILE, model.encoder, run.spec)
        save_classifier(target / CLASSIFIER_FILE, model, run.spec, setup.classes,
                        {"from_head_layer": o.from_head_layer, "accuracy": result["accuracy"]})
        write_json(target / FINETUNE_FILE, record)
    record["out"] = str(target)
    return record


def read_teacher(teacher_dir: Path) -> dict[str, Any]:
    """The finetune.json of a `fastclr finetune` output; one line when it is not one."""
    path = teacher_dir / FINETUNE_FILE
    if not teacher_dir.is_dir():
        raise FastclrError(f"{teacher_dir} {not_a_folder(teacher_dir)}; give the directory `fastclr finetune` wrote")
    if not (teacher_dir / CLASSIFIER_FILE).exists() or not path.exists():
        raise FastclrError(f"{teacher_dir} holds no {CLASSIFIER_FILE} and {FINETUNE_FILE}; give the directory "
                           "`fastclr finetune` wrote")
    fix = "delete that directory and run `fastclr finetune` again"
    told = read_json(path, fix)
    need = {"run_dir": str, "seed": int, "labels_per_class": int, "subset": str, "accuracy": float}
    wrong = [k for k, kind in need.items() if not isinstance(told.get(k) if isinstance(told, dict) else None, kind)]
    if wrong:
        raise FastclrError(f"{path} is damaged: {', '.join(wrong)} missing or of the wrong type; {fix}")
    return told


def student_for(run: LoadedRun, o: DistillOptions, num_classes: int, seed: int, device: torch.device
                ) -> tuple[Classifier, EncoderSpec, str]:
    """The student: an encoder of the run's architecture (width `student_width`) and a linear head;
    its encoder starts from the run's SimCLR weights or at random (`student_init`)."""
    width = o.student_width or run.spec.width
    same = width == run.spec.width
    init = o.student_init if o.student_init != "auto" else ("pretrained" if same else "random")
    if init not in STUDENT_INITS[1:]:
        raise FastclrError(f"--student-init {o.student_init!r}: choose one of {', '.join(STUDENT_INITS)}")
    if init == "pretrained" and not same:
        raise FastclrError(f"--student-init pretrained needs the run's width {run.spec.width:g}; a student of width "
                           f"{width:g} starts at random (--student-init random)")
    if init == "pretrained":
        encoder, spec = copy.deepcopy(run.encoder), run.spec
    else:
        narrow = dataclasses.replace(run.spec, width=width)  # its feature_dim is measured next
        require_model_memory(on_meta(lambda: encoder_from_spec(narrow)), device, f"a student of width {width:g}",
                             f"give a smaller --student-width (the run's own width is {run.spec.width:g})")
        encoder = untrained_encoder(narrow, seed, device)
        spec = dataclasses.replace(narrow, feature_dim=feature_dim(encoder, run.spec.in_channels, run.spec.image_size))
    torch.manual_seed(seed)
    student = Classifier(to_channels_last(encoder.to(device)), nn.Sequential(), nn.Linear(spec.feature_dim, num_classes))
    return student.to(device), spec, init


def with_unlabelled(dataset: Dataset, setup: LabelledSetup) -> tuple[LabelledSetup, int]:
    """The setup the student trains in: every training image, labelled or not. With unlabelled
    images (`Dataset.unlabelled`: STL-10's 100k, a store's unlabeled rows) its train images are the
    whole pretraining pool, those first and the train split after them (no copy; their labels are
    -1, never read), and the offset of the train split in it; else `setup` itself and 0."""
    n = dataset.unlabelled
    if n == 0:
        return setup, 0
    labels = np.concatenate([np.full(n, -1, dtype=setup.train_labels.dtype), setup.train_labels])
    return dataclasses.replace(setup, train_images=dataset.pretrain.images, train_labels=labels), n


@gives_threads_back
def distill_run(teacher_dir: str | Path, options: DistillOptions | None = None, out: str | Path | None = None,
                dataset: Dataset | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Distil a `fastclr finetune` classifier into a student over every training image; write the
    student's classifier, its encoder and distill.json to `out` (default RUN_DIR/distill/NAME)."""
    o = options or DistillOptions()
    _check(o.steps, o.batch_size, o.lr, o.seed, student_width=o.student_width)
    check_distill_options(o.temperature, o.label_weight, o.teacher_views)
    if not 0 <= o.shift_fraction < 0.5:
        raise FastclrError(f"--shift {o.shift_fraction} must be in [0, 0.5): a fraction of the image side")
    teacher_dir = Path(teacher_dir)
    told = read_teacher(teacher_dir)
    run_dir = teachers_run(teacher_dir, told)
    run, device = _open_run(run_dir, o.device, o.precision, o.threads, log, "distil from")
    teacher, _, _ = load_classifier(teacher_dir, device)
    dataset = run_data(run, dataset, log)
    ev = dataclasses.replace(EvaluateOptions(), steps=o.steps, batch_size=o.batch_size, lr=o.lr)
    recipe = dataclasses.replace(ev.recipe(run.config.augment.flip_p), shift_fraction=o.shift_fraction)
    setup = labelled_splits(run, dataset, device, recipe)
    seed = told["seed"] if o.seed < 0 else o.seed
    if told.get("data_content", dataset.content) != dataset.content:  # a store prepared again since
        raise FastclrError(f"{teacher_dir} was fine-tuned on {told.get('dataset', 'other data')} as it was then; the "
                           f"store has been prepared again since (its content differs): fine-tune again")
    try:
        labelled = stratified_subset(setup.train_labels, int(told["labels_per_class"]), int(told["seed"]), setup.classes)
    except FastclrError as e:  # its advice (--labels-per-class) is fine-tuning's; distil has no such flag
        raise FastclrError(f"the labelled subset of {teacher_dir} cannot be drawn from this dataset ({e}): the data "
                           "changed since fine-tuning; fine-tune again") from None
    if subset_id(labelled) != told["subset"]:
        raise FastclrError(f"the labelled subset of {teacher_dir} is not the one this dataset gives for its seed; "
                           "the data changed since fine-tuning: fine-tune again")
    student, spec, init = student_for(run, o, len(setup.classes), seed, device)
    encoder_sha = state_checksum(run.encoder)
    if found_by_place(run_dir, told) and told.get("run_encoder_sha256", encoder_sha) != encoder_sha:
        raise FastclrError(f"{teacher_dir} sits in the run {run_dir} but was fine-tuned from {told['run_dir']}, another "
                           "run (or this one trained on since): fine-tune again from the run to distil from")
    if init == "pretrained" and told.get("run_encoder_sha256", encoder_sha) != encoder_sha:
        raise FastclrError(f"{run_dir}'s encoder is not the one {teacher_dir} was fine-tuned from (the run trained on "
                           "since, or was started again): fine-tune again from the run, or start the student at "
                           "random (--student-init random)")
    target = _fresh_out(Path(out) if out else run.run_dir / "distill" / teacher_dir.resolve().name,
                        "distilled classifier")
    pool, offset = with_unlabelled(dataset, setup)
    wider = f" (wider than the run's {run.spec.width:g})" if spec.width > run.spec.width else ""
    log(f"distilling {teacher_dir} ({told['accuracy'] * 100:.2f}%) into a {init} student of width {spec.width:g}{wider} on "
        f"{len(pool.train_images)} images ({len(labelled)} of them with the labels the teacher was fine-tuned on, {offset} outside the "
        f"labelled split), {o.steps} steps, t = {o.temperature:g}, "
        f"label weight {o.label_weight:g}")
    t0 = time.perf_counter()
    res = distill(teacher, student, pool, labelled + offset, o.temperature, o.label_weight, seed, o.teacher_views)
    record = {"kind": "distill", "teacher": str(teacher_dir.resolve()), "run_dir": str(run.run_dir.resolve()),
              "run_encoder_sha256": encoder_sha,
              "dataset": dataset.name, "classes": setup.classes, "labels_per_class": told["labels_per_class"],
              "labels": len(labelled), "images": len(pool.train_images), "unlabelled_images": offset,
              "subset": told["subset"], "seed": seed, "student_init": init,
              "student_width": spec.width, "feature_dim": spec.feature_dim, "accuracy": res.accuracy,
              "final_loss": res.final_loss, "teacher_accuracy": res.teacher_accuracy, "recipe": asdict(setup.recipe),
              "options": asdict(o), "seconds": time.perf_counter() - t0, "environment": _environment(device, run)}
    with _writing(target):
        save_encoder(target / ENCODER_FILE, student.encoder, spec)
        save_classifier(target / CLASSIFIER_FILE, student, spec, setup.classes, {"accuracy": res.accuracy})
        write_json(target / DISTILL_FILE, record)
    record["out"] = str(target)
    return record
