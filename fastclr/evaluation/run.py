"""`fastclr evaluate`: every protocol on one run's encoder, results saved as RUN_DIR/eval.json.

Features h of the labelled train and test splits are extracted once, in eval mode, and shared by
the linear, kNN and few-label protocols; the supervised baseline and fine-tuning train their own
copies. A checksum of the encoder is taken before and after: nothing here may change it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastclr.cpus import gives_threads_back, set_threads
from fastclr.data import Dataset
from fastclr.errors import FastclrError, first_sentence, warn_stderr
from fastclr.evaluation.classifier import LabelledSetup, TrainRecipe
from fastclr.evaluation.features import (encode, evenly_spaced, features_of, require_finite, state_checksum,
                                         view_pairs)
from fastclr.evaluation.fewshot import fewshot_probe
from fastclr.evaluation.finetune import finetune
from fastclr.evaluation.options import EXTRA_PROTOCOLS, LABELLED, PROTOCOLS, EvaluateOptions
from fastclr.evaluation.quality import feature_quality
from fastclr.evaluation.subsets import fraction_per_class, labels_for_fraction, smallest_class, stratified_subset
from fastclr.evaluation.reference import lift_summary, untrained_encoder
from fastclr.evaluation.supervised import supervised_baseline
from fastclr.evaluation.table import format_table
from fastclr.evaluation.knn import knn_accuracy
from fastclr.pretrained import LoadedRun, load_run, run_data
from fastclr.evaluation.probe import linear_probe, probe_record
from fastclr import config as config_mod
from fastclr.files import read_json, unwritable
from fastclr.runs import read_metrics, write_json
from fastclr.tracking import importable, numbers, read_ids, tracked
from fastclr.runtime import select_device
from fastclr.version import __version__

EVAL_FILE = "eval.json"
FROZEN = ("linear", "knn", "fewshot", "finetune")
"""Protocols that use the frozen features of the labelled splits, extracted once for all of them."""


@dataclass
class Context:
    """What the protocols share: the run, its data, the frozen features and the options."""

    run: LoadedRun
    dataset: Dataset
    options: EvaluateOptions
    device: torch.device
    log: Callable[[str], None]
    train_x: torch.Tensor | None = None  # (N_train, D) frozen h, when a labelled protocol runs
    test_x: torch.Tensor | None = None  # (N_test, D)
    setup: LabelledSetup | None = None
    untrained_train_x: torch.Tensor | None = None  # (N_train, D): h of the same network untrained
    untrained_test_x: torch.Tensor | None = None  # (N_test, D)


def _both(c: Context) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The frozen features to evaluate: the run's, then (when there is one) its untrained twin's."""
    assert c.train_x is not None and c.test_x is not None
    out = [("trained", c.train_x, c.test_x)]
    if c.untrained_train_x is not None and c.untrained_test_x is not None:
        out.append(("random_init", c.untrained_train_x, c.untrained_test_x))
    return out


def _linear(c: Context) -> dict[str, Any]:
    s = c.setup
    assert s is not None
    out: dict[str, Any] = {}
    for which, xtr, xte in _both(c):
        res = linear_probe(xtr, torch.from_numpy(s.train_labels), xte, torch.from_numpy(s.test_labels),
                           feature_dtype=c.run.precision.feature_dtype)
        entry = probe_record(res)
        if which == "trained":
            out.update(entry, labels=len(s.train_labels))
        else:
            out[which] = entry
    return out


def _knn(c: Context) -> dict[str, Any]:
    s = c.setup
    assert s is not None
    asked = c.options.knn_k or c.run.config.eval.knn_k
    k = min(asked, len(s.train_labels))  # what the vote uses (fastclr.evaluation.knn): the record says that k
    if k < asked:
        source = f"--knn-k {asked}" if c.options.knn_k else f"the run's k ({asked}, eval.knn_k)"
        c.log(f"note: kNN with k = {k}, every training image: {source} is more than the {k} there are")
    out: dict[str, Any] = {"k": k, "tau": c.options.knn_tau}
    for which, xtr, xte in _both(c):
        acc = knn_accuracy(xtr, torch.from_numpy(s.train_labels), xte, torch.from_numpy(s.test_labels), k,
                           c.options.knn_tau, c.run.precision)
        if which == "trained":
            out["accuracy"] = acc
        else:
            out[which] = {"accuracy": acc}
    return out


def _fewshot(c: Context) -> dict[str, Any]:
    s = c.setup
    assert s is not None
    o = c.options
    out: dict[str, Any] = {}
    for which, xtr, xte in _both(c):
        curve = fewshot_probe(xtr, s.train_labels, xte, s.test_labels, o.labels_per_class, o.seeds, s.classes,
                              c.log if which == "trained" else lambda m: None)
        out["curve" if which == "trained" else "random_init_curve"] = curve
    return out


def _supervised(c: Context) -> dict[str, Any]:
    assert c.setup is not None
    o = c.options
    return {"curve": supervised_baseline(c.run.spec, c.setup, o.labels_per_class, o.supervised_seeds, c.log),
            "recipe": asdict(c.setup.recipe)}


def _finetune(c: Context) -> dict[str, Any]:
    assert c.setup is not None and c.train_x is not None and c.test_x is not None
    o = c.options
    recipe = o.recipe(c.run.config.augment.flip_p, finetune=True)
    return {"fractions": finetune(c.run.encoder, c.run.spec, c.train_x, c.test_x, c.setup, recipe, o.finetune_fractions,
                                  o.finetune_seeds, log=c.log),
            "recipe": asdict(recipe), "scratch_recipe": asdict(c.setup.recipe)}


def _quality(c: Context) -> dict[str, Any]:
    """Label-free: uses the pretraining images, so it works on unlabelled data too."""
    o, run = c.options, c.run
    images = c.dataset.pretrain.images[evenly_spaced(len(c.dataset.pretrain), o.quality_images)]
    _, views = view_pairs(images, run.augment, o.view_seed, run.mean, run.std, c.device)
    precision = run.precision
    untrained = (untrained_encoder(run.spec, config_mod.weights_seed(run.config), c.device) if run.spec.rebuildable
                 else None)

    def measure(enc: torch.nn.Module) -> dict[str, float]:
        h = features_of(enc, run.spec, images, c.device, precision)
        v = encode(enc, views, precision)
        return feature_quality(h, *v.chunk(2))

    # The same architecture at random initialisation: the reference a trained encoder must beat.
    return {"images": len(images), **measure(run.encoder),
            **({"random_init": measure(untrained)} if untrained is not None else {})}


def _pixels(c: Context) -> dict[str, Any]:
    s = c.setup
    assert s is not None
    ytr, yte = torch.from_numpy(s.train_labels), torch.from_numpy(s.test_labels)
    xtr, xte = pixel_rows(s.train_images), pixel_rows(s.test_images)
    res = linear_probe(xtr, ytr, xte, yte)
    k = c.options.knn_k or c.run.config.eval.knn_k
    return {"linear_accuracy": res.accuracy, "l2": res.l2,
            "knn_accuracy": knn_accuracy(xtr, ytr, xte, yte, k, c.options.knn_tau)}


def pixel_rows(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, C) as float rows (N, H*W*C) in [0, 1]. Divided in NumPy into one new
    float32 array: a store's images are a read-only memory map, which torch.from_numpy warns about
    (and a copy of the uint8 images first would only add a fourth of the floats' memory for nothing)."""
    return torch.from_numpy(np.divide(images.reshape(len(images), -1), np.float32(255), dtype=np.float32))


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "linear": _linear, "knn": _knn, "fewshot": _fewshot, "supervised": _supervised, "finetune": _finetune,
    "quality": _quality, "pixels": _pixels,
}


def parse_protocols(text: str) -> tuple[str, ...]:
    """'linear,knn' -> ('linear', 'knn'); 'all' -> the defaults plus the extras; checked."""
    if text.strip() == "all":
        return PROTOCOLS + EXTRA_PROTOCOLS
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in names if p not in RUNNERS]
    if bad or not names:
        raise FastclrError(
            f"unknown protocol {', '.join(bad) or repr(text)}; choose from: {', '.join(RUNNERS)} (or all)")
    return names


def has_labelled_splits(dataset: Dataset) -> bool:
    """Whether `dataset` has the labelled train and test splits the labelled protocols need."""
    tr, te = dataset.train, dataset.test
    return tr is not None and te is not None and tr.labels is not None and te.labels is not None


def labelled_splits(run: LoadedRun, dataset: Dataset, device: torch.device, recipe: TrainRecipe,
                    missing: str) -> LabelledSetup:
    """The run's labelled train and test splits with `recipe`; without them, one line: the dataset
    has none, then `missing` (who needs them and what to do instead)."""
    if not has_labelled_splits(dataset):
        raise FastclrError(f"dataset {dataset.name} has no labelled train and test splits{missing}")
    tr, te = dataset.train, dataset.test
    assert tr is not None and te is not None and tr.labels is not None and te.labels is not None  # (for mypy)
    empty = [name for name, labels in (("train", tr.labels), ("test", te.labels)) if len(labels) == 0]
    if empty:  # (a Dataset built in Python: a store's splits hold images) torch's error was about max()
        raise FastclrError(f"dataset {dataset.name}'s labelled {' and '.join(empty)} split{'s' * (len(empty) > 1)} "
                           f"{'are' if len(empty) > 1 else 'is'} empty{missing}")
    classes = list(dataset.classes) or [str(i) for i in range(int(max(tr.labels.max(), te.labels.max())) + 1)]
    return LabelledSetup(tr.images, tr.labels, te.images, te.labels, classes, run.mean, run.std, run.spec.image_size,
                         device, run.precision, recipe)


def labelled_setup(run: LoadedRun, dataset: Dataset, options: EvaluateOptions, device: torch.device,
                   wanted: tuple[str, ...], log: Callable[[str], None] = print
                   ) -> tuple[LabelledSetup, EvaluateOptions]:
    """The labelled splits and recipe, and `options` with the default few-label points and
    fine-tuning fractions a class cannot reach left out (said in a note: a small store of one's own
    photos has classes of tens); one-line errors when labels are missing, or asked-for points are
    too many."""
    setup = labelled_splits(run, dataset, device, options.recipe(run.config.augment.flip_p),
                            f", which protocols {', '.join(wanted)} need; run `fastclr evaluate {run.run_dir} "
                            "--protocols quality` for the label-free measures")
    fewest, k = smallest_class(setup.train_labels, len(setup.classes)), len(setup.classes)
    if fewest > 0:
        def reachable(points: tuple[Any, ...], need: Callable[[Any], int], fallback: Any, what: str, flag: str,
                      show: Callable[[Any], str]) -> tuple[Any, ...]:
            """The default's points the smallest class can give, or `fallback` alone, said in a note."""
            fits = tuple(p for p in points if need(p) <= fewest)
            if fits != points:
                log(f"note: the smallest class has {fewest} labelled training images: {what} "
                    f"{', '.join(map(show, fits or (fallback,)))} (the default's "
                    f"{', '.join(show(p) for p in points if p not in fits)} need more); {flag} chooses")
            return fits or (fallback,)

        if options.labels_per_class == EvaluateOptions().labels_per_class and {"fewshot", "supervised"} & set(wanted):
            options = replace(options, labels_per_class=reachable(
                options.labels_per_class, int, fewest, "few-label points", "--labels-per-class", str))
        if options.finetune_fractions == EvaluateOptions().finetune_fractions and "finetune" in wanted:
            options = replace(options, finetune_fractions=reachable(
                options.finetune_fractions, lambda f: fraction_per_class(setup.train_labels, f, k),
                fewest * k / len(setup.train_labels),  # the fraction of exactly `fewest` per class
                "fine-tuning on label fractions", "--finetune-fractions", lambda f: f"{f:g}"))
    # Fail before any expensive work: every asked-for subset must exist.
    if {"fewshot", "supervised"} & set(wanted):
        for n in options.labels_per_class:
            stratified_subset(setup.train_labels, n, 0, setup.classes)
    if "finetune" in wanted:
        for f in options.finetune_fractions:
            n = labels_for_fraction(setup.train_labels, f, k, "--finetune-fractions")
            stratified_subset(setup.train_labels, n, 0, setup.classes)
    return setup, options


@gives_threads_back
def evaluate(
    run_dir: str | Path,
    options: EvaluateOptions | None = None,
    dataset: Dataset | None = None,
    log: Callable[[str], None] = print,
    show: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the chosen protocols on a run's encoder; writes and returns the results (eval.json).
    `show` is given them before eval.json is written: a disk that fills meanwhile loses the file,
    not the minutes of results (the command prints its table there)."""
    o = options or EvaluateOptions()
    o.check()
    run_dir = Path(run_dir)
    set_threads(o.threads, warn=log)
    device = select_device(o.device, warn=log)
    run = load_run(run_dir, device, o.precision, log, command="evaluate")
    if not os.access(run_dir, os.W_OK | os.X_OK):  # found only at the end, the results of minutes were lost
        why, fix = unwritable(run_dir)
        raise FastclrError(f"{run_dir} {why}, and evaluate saves its results there ({EVAL_FILE}); {fix}, or copy "
                           f"the run (`cp -r {run_dir} COPY`) and evaluate the copy")
    trackers = importable(tuple(read_ids(run_dir)), run_dir, log)  # a tracked run gets its evaluation too
    dataset = run_data(run, dataset, log)
    labelled = tuple(p for p in o.protocols if p in LABELLED)
    t_start = time.perf_counter()
    ctx = Context(run, dataset, o, device, log)
    before = state_checksum(run.encoder)
    timings: dict[str, float] = {}
    if labelled:
        ctx.setup, o = labelled_setup(run, dataset, o, device, labelled, log)
        ctx.options = o
    if set(o.protocols) & set(FROZEN):
        assert ctx.setup is not None
        t0 = time.perf_counter()
        ctx.train_x = require_finite(features_of(run.encoder, run.spec, ctx.setup.train_images, device,
                                                 run.precision), f"the features of {run_dir}'s training images")
        ctx.test_x = require_finite(features_of(run.encoder, run.spec, ctx.setup.test_images, device, run.precision),
                                    f"the features of {run_dir}'s test images")
        if run.spec.rebuildable:  # a module given in Python cannot be rebuilt untrained by name
            untrained = untrained_encoder(run.spec, config_mod.weights_seed(run.config), device)
            # Not the run's fault when these overflow (a deep network at its initial weights in fp16): said so.
            why = ("the network at its initial weights overflows in fp16, not the trained one; evaluate with "
                   "--precision fp32 (or bf16)" if run.precision.name == "fp16" else
                   f"the network at its initial weights gives them in {run.precision.name}, not the trained one: this "
                   "architecture is unstable at random initialisation, and its untrained reference cannot be measured")
            ctx.untrained_train_x = require_finite(features_of(untrained, run.spec, ctx.setup.train_images, device,
                                                               run.precision), "the untrained network's features", why)
            ctx.untrained_test_x = require_finite(features_of(untrained, run.spec, ctx.setup.test_images, device,
                                                              run.precision), "the untrained network's features", why)
        timings["features"] = time.perf_counter() - t0
        log(f"features h ({ctx.train_x.shape[1]}-d) of {len(ctx.train_x)} train and {len(ctx.test_x)} test images "
            f"in {timings['features']:.1f} s")
    results: dict[str, Any] = {}
    for name in o.protocols:
        t0 = time.perf_counter()
        results[name] = RUNNERS[name](ctx)
        timings[name] = time.perf_counter() - t0
        log(f"{name}: done in {timings[name]:.1f} s")
    after = state_checksum(run.encoder)
    if after != before:  # a protocol trained the run's own encoder instead of a copy: its numbers are void
        raise AssertionError(f"evaluation changed the encoder's weights (SHA-256 {before[:12]} -> {after[:12]})")
    kept = _earlier_results(run_dir, before, dataset, results, log)
    results = {**kept["protocols"], **results}
    timings = {**kept["seconds"], **timings}
    out = {
        "run_dir": str(run_dir),
        "dataset": dataset.name,
        **({"data_content": dataset.content} if dataset.content else {}),
        "classes": ctx.setup.classes if ctx.setup else list(dataset.classes),
        "encoder": {k: v for k, v in run.spec.to_dict().items() if k not in ("mean", "std")},
        "encoder_sha256": before,
        **({"checkpoint_step": run.checkpoint_step} if run.checkpoint_step is not None else {}),
        "encoder_unchanged": after == before,
        "encoder_sha256_after": after,
        "options": asdict(o),
        "options_of": {**kept["options_of"], **{name: asdict(o) for name in o.protocols}},
        "protocols": results,
        "lift": lift_summary(results),
        "seconds": timings,
        "total_seconds": time.perf_counter() - t_start,
        "environment": {"device": str(device), "precision": run.precision.name, "precision_reason": run.precision.reason,
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "fastclr": __version__, "machine": platform.machine(),
                        "time": time.strftime("%Y-%m-%d %H:%M:%S")},
    }
    if show is not None:
        show(out)
    out[CHECKSUM_KEY] = content_checksum(out)  # after the table: a figure JSON cannot hold fails the write, not it
    write_json(run_dir / EVAL_FILE, out)
    step = run.checkpoint_step if run.checkpoint_step is not None else _pretrained_steps(run_dir)
    # Their warnings on stderr, as every warning: `--quiet` silences `log`, and a result not filed must be said.
    with tracked(trackers, run_dir, config_mod.to_flat(run.config), warn=warn_stderr) as sinks:
        for t in sinks:
            t.results(numbers({"protocols": results, "lift": out["lift"]}, "eval/"), step)
            t.artifact(run_dir / EVAL_FILE, "evaluation")
    return out


def _earlier_results(run_dir: Path, encoder_sha256: str, dataset: Dataset, now: dict[str, Any],
                     log: Callable[[str], None]) -> dict[str, Any]:
    """What an earlier eval.json of the same encoder and data holds for protocols not run now
    (`--protocols knn` after a full evaluation keeps the rest), with their seconds and options;
    nothing when it measured another encoder (the run trained on since) or dataset (another one,
    or the same store prepared again: its content differs). A damaged one is kept aside under a
    name of its own, said in a note: its results cannot be carried over, and are not lost unsaid."""
    none: dict[str, Any] = {"protocols": {}, "seconds": {}, "options_of": {}}
    path = run_dir / EVAL_FILE
    aside = _aside(path)
    try:
        old = read_eval(run_dir, fix=f"kept as {aside}; this evaluation's results replace it")
    except FastclrError as e:
        os.replace(path, aside)
        warn_stderr(f"note: {e}")  # a file of the user's moved: said under --quiet too (log is silent there)
        return none
    if old is None:
        return none
    if old.get("encoder_sha256") != encoder_sha256 or not same_data(old, dataset):
        log(f"{EVAL_FILE} held results of another encoder (the run trained on since) or data: replaced")
        return none
    names = [n for n in old["protocols"] if n not in now and n in RUNNERS]
    if names:
        log(f"kept from the earlier {EVAL_FILE} (the same encoder): {', '.join(names)}")
    seconds, options = (v if isinstance(v, dict) else {} for v in (old.get("seconds"), old.get("options_of")))
    return {"protocols": {n: old["protocols"][n] for n in names},
            "seconds": {n: seconds[n] for n in names if n in seconds},
            "options_of": {n: options.get(n, old.get("options")) for n in names}}


def _aside(path: Path) -> Path:
    """A free name beside `path` to keep a damaged copy under: NAME.damaged, then NAME.damaged-2, ...
    (an earlier damaged copy is never replaced)."""
    n = 1
    while True:
        aside = path.with_name(f"{path.name}.damaged" + (f"-{n}" if n > 1 else ""))
        if not aside.exists():
            return aside
        n += 1


def _pretrained_steps(run_dir: Path) -> int:
    """The step trackers file the evaluation of a finished run under: pretraining's last, from
    probe.json, else (a run trained with --probe false) metrics.jsonl's last record; 0 when neither
    can say (the results are written already, and this only places them)."""
    try:
        steps = read_json(run_dir / "probe.json", "").get("steps")
        if isinstance(steps, int):
            return steps
    except (FastclrError, OSError):
        pass
    try:
        records = read_metrics(run_dir)
    except (FastclrError, OSError):
        return 0
    return int(records[-1]["step"]) if records else 0


def same_data(record: dict[str, Any], dataset: Dataset) -> bool:
    """Whether an eval.json `record` measured `dataset` as it is now: its name, and its content
    identity (a store prepared again differs; a record without one is not known to be this data)."""
    return record.get("dataset") == dataset.name and record.get("data_content", "") == dataset.content


def read_eval(run_dir: Path, fix: str = "") -> dict[str, Any] | None:
    """A run's eval.json, or None when it has not been evaluated. One line naming the file and
    `fix` (by default: evaluate again) when it is damaged: not JSON, or not an evaluation the
    table can show (edited by hand: a figure missing, or not a number)."""
    path = run_dir / EVAL_FILE
    if not path.exists():
        return None
    fix = fix or evaluate_again(run_dir)
    record = read_json(path, fix)
    if not isinstance(record.get("protocols"), dict):
        raise FastclrError(f"{path} is damaged (no \"protocols\" object); {fix}")
    if CHECKSUM_KEY not in record:  # written before eval.json held one, or the key removed with an edit
        raise FastclrError(f"{path} holds no {CHECKSUM_KEY}, so its figures cannot be told from edited ones; {fix}")
    if record[CHECKSUM_KEY] != content_checksum(record):
        raise FastclrError(f"{path} no longer matches its {CHECKSUM_KEY} (edited or damaged since `fastclr "
                           f"evaluate` wrote it); {fix}")
    with unreadable_as_damaged(path, fix):
        format_table(record)  # reads every figure the table and the merge read: the check is its use
    return record


CHECKSUM_KEY = "content_sha256"
"""eval.json's key for the SHA-256 of its other contents (`content_checksum`): a figure edited by
hand (a kNN accuracy made 0.9999) was carried into later evaluations and the report as measured,
beside a lift that no longer matched it. A file without it is not read: the key could otherwise be
deleted with the edit, and the next evaluation would carry the edited figures under a valid one."""


def content_checksum(record: dict[str, Any]) -> str:
    """SHA-256 of `record` without its checksum, as JSON with sorted keys (read back first, so that
    the figures are hashed as the file gives them: integer keys as text, tuples as lists)."""
    body = json.loads(json.dumps({k: v for k, v in record.items() if k != CHECKSUM_KEY}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def evaluate_again(run_dir: Path) -> str:
    """The fix for a damaged eval.json: evaluating again sets it aside (named here) and writes a new one."""
    aside = _aside(run_dir / EVAL_FILE).name
    return f"run `fastclr evaluate {run_dir}` again, which keeps it as {aside} and writes a new one"


@contextmanager
def unreadable_as_damaged(path: Path, fix: str) -> Iterator[None]:
    """Reading an eval.json's figures (the table, the report's curve): one missing, or of another
    kind than a number, as a hand edit leaves them, is one line naming `path` and `fix`."""
    try:
        yield
    except KeyError as e:
        raise FastclrError(f"{path} is damaged (no {e.args[0]!r} where an evaluation holds one); {fix}") from None
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise FastclrError(f"{path} is damaged (a figure of another kind than an evaluation holds: "
                           f"{first_sentence(e)}); {fix}") from None
