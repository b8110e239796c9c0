"""`fastclr report`: RUN_DIR/report.html, one offline file showing what the run learned.

Sections: training curves (values on hover); augmented view pairs as the model saw them; their
cosine-similarity matrix; the contrastive playground (temperature and batch, live, on the run's
own h and z); the augmentation explorer (each view's drawn parameters); a 2-D map of test
embeddings (thumbnails on hover, neighbours on click, classes toggled from the legend); the
label-efficiency curve and every protocol's numbers (from eval.json when `fastclr evaluate` has
run, with a note otherwise); nearest-neighbour retrievals; the config. Every static figure is
there with scripts off; the script (interactive.js) adds the interactive parts.
"""

from __future__ import annotations

import json
import time
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastclr.cpus import gives_threads_back, set_threads
from fastclr.data import Dataset, ImageSet
from fastclr.errors import FastclrError
from fastclr.files import write_text
from fastclr.files import read_json
from fastclr.evaluation.features import (encode, evenly_spaced, features_of, require_finite, state_checksum,
                                         view_pairs)
from fastclr.evaluation.knn import cosine_topk
from fastclr.evaluation.reference import small_lift
from fastclr.evaluation.run import (EVAL_FILE, evaluate_again, has_labelled_splits, read_eval, same_data,
                                    unreadable_as_damaged)
from fastclr.evaluation.table import format_table, unfinished
from fastclr.pretrained import (LoadedRun, head_checkpoint, load_run, run_data, trained_head,
                                trained_temperature)
from fastclr.ingest.embed import embed_images
from fastclr.report import figures, interactive
from fastclr.report.embedding_map import MAP_METHODS, pca, tsne
from fastclr.report.html import note, page, section
from fastclr.runs import read_metrics_and_cut, refuse_output, refuse_unwritable_file
from fastclr.runtime import select_device

REPORT_FILE = "report.html"
VIEW_IMAGES = 12
"""Images whose two views are shown; their 2 x 12 views make the similarity matrix."""
MAP_POINTS = 2000
"""Test embeddings in the 2-D map: exact t-SNE is O(N^2) per iteration."""
BANK_LIMIT = 20000
"""Training images searched for neighbours (evenly spaced), bounding the report's run time."""
QUERIES, NEIGHBOURS = 8, 8


def _features(run: LoadedRun, images: np.ndarray, device: torch.device) -> torch.Tensor:
    return features_of(run.encoder, run.spec, images, device, run.precision)


def pick_queries(split: ImageSet, count: int) -> np.ndarray:
    """The first image of each of the first `count` classes, or evenly spaced images without labels."""
    if split.labels is None:
        return evenly_spaced(len(split), count)
    firsts = [int(np.flatnonzero(split.labels == c)[0]) for c in np.unique(split.labels)[:count]]
    return np.array(firsts, dtype=np.int64)


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, as `_metrics_and_cut` reads them."""
    return _metrics_and_cut(run_dir)[0]


def _metrics_and_cut(run_dir: Path) -> tuple[list[dict[str, Any]], bool]:
    """metrics.jsonl's records and whether a last line cut short was left out (`read_metrics_and_cut`),
    with one line naming the file for a curve's value that is not a number. A null (pandas saves NaN
    as null) is that value missing, left out of its curve as NaN is, not damage."""
    path = run_dir / "metrics.jsonl"
    way_out = "repair it, or move it away to report the run without training curves"
    fix = f"the file was edited or damaged: {way_out}"
    records, cut = read_metrics_and_cut(run_dir, mend=way_out)
    for n, record in enumerate(records, 1):  # numbered as read_metrics numbers them
        for key in figures.CURVE_KEYS:
            value = record.get(key)
            if value is not None and not figures.is_number(value):
                raise FastclrError(f"{path} record {n} holds {key!r}: {json.dumps(value)}, not a number; {fix}")
    return records, cut


def _curves_section(run_dir: Path) -> str:
    metrics, was_cut = _metrics_and_cut(run_dir)  # one read of the file for both
    cut = note("The last line of metrics.jsonl was cut short (a write the run did not finish: it was killed, or "
               "the disk filled) and is not shown.") if was_cut else ""
    if not metrics:
        what = "no whole record" if (run_dir / "metrics.jsonl").exists() else "no metrics.jsonl"
        return section("curves", "Training curves", note(f"This run has {what}.") + cut, "p")
    charts = "".join(f"<div>{c}</div>" for c in figures.training_curves(metrics))
    return section("curves", "Training curves", cut + f'<div class="charts">{charts}</div>', "svg",
                   "Logged every few steps during pretraining; the kNN monitor runs once per epoch on fixed subsets.")


PLAYGROUND = """
<div class="controls">
<label>temperature <input id="pg-temp" type="range" min="-2" max="0" step="0.001"> <b id="pg-t-label"></b></label>
<label>pairs in the batch <select id="pg-batch"><option>4</option><option>8</option><option>16</option>
<option selected>32</option></select></label>
<label>vectors <select id="pg-rep"><option value="z">z (head)</option><option value="h">h (encoder)</option></select></label>
</div>
<div class="playground">
<div><canvas id="pg-matrix" width="448" height="448"></canvas>
<p class="note">Cosine similarity (viridis: -1 dark to 1 bright); red frames: positives; white: the chosen anchor
(click a row to choose).</p></div>
<div><table class="stats">
<tr><th>NT-Xent loss</th><td id="pg-loss"></td></tr>
<tr><th>temperature</th><td id="pg-t"></td></tr>
<tr><th>pairs</th><td id="pg-pairs"></td></tr>
<tr><th>negatives per anchor</th><td id="pg-negatives"></td></tr>
<tr><th>top-1 contrastive accuracy</th><td id="pg-top1"></td></tr>
<tr><th>top-5 contrastive accuracy</th><td id="pg-top5"></td></tr>
<tr><th>mean rank of the positive</th><td id="pg-rank"></td></tr>
</table>
<p id="pg-anchor-id"></p>
<svg id="pg-softmax" width="448" height="150" role="img" aria-label="softmax of the anchor"></svg>
<p id="pg-ppos" class="note"></p>
<div id="pg-views" class="thumbs"></div>
<p class="note">Hardest negatives (most similar other views):</p>
<div id="pg-hard" class="thumbs"></div></div>
</div>
"""


def _playground_section(run: LoadedRun, dataset: Dataset, device: torch.device, seed: int,
                        data: dict[str, Any]) -> str:
    try:
        state = head_checkpoint(run)
        z_note = "" if state is not None else " This run has no checkpoint, so only h (no trained head z) is shown."
    except FastclrError:
        state, z_note = None, (" The run's newest readable checkpoint does not hold its exported encoder, so only h "
                               "(no trained head z) is shown.")
    head = trained_head(run, device, state) if state is not None else None  # None: no head to show
    data["playground"] = interactive.playground(run, head, dataset.pretrain, device, seed,
                                                trained_temperature(run, state))
    pairs = data["playground"]["pairs"]
    return section("playground", "Temperature and batch, live", PLAYGROUND, "canvas svg",
                   f"{pairs} images, two views each as pretraining draws them, embedded by this run's encoder (h) "
                   f"and trained head (z).{z_note} Move the temperature and choose the batch: the similarity matrix, "
                   "the softmax of the chosen anchor over its positive (green) and every negative, and NT-Xent with "
                   "its contrastive accuracy are recomputed on these vectors.", hidden=True)


def _explorer_section(run: LoadedRun, dataset: Dataset, device: torch.device, seed: int) -> str:
    ex = interactive.explorer(run, dataset.pretrain, device, seed)
    rows = []
    for r in ex["images"]:
        cells = [f'<img class="original" src="{r["original"]}" alt="stored image {r["index"]}" width="84" height="84">']
        for j, (uri, p) in enumerate(zip(r["views"], r["params"])):
            text = interactive.params_text(p)
            cells.append(f'<img src="{uri}" alt="view" width="84" height="84" data-view="{r["index"]}-{j}" '
                         f'data-params="{escape(json.dumps(p))}" title="{escape(text)}">')
        rows.append('<div class="aug-row">' + "".join(cells) + "</div>")
    body = "".join(rows) + '<div id="aug-detail" class="panel">Hover a view to see the parameters it was drawn with.</div>'
    return section("augment", "Augmentation explorer", body, "img",
                   f"{len(rows)} stored images (left), then {interactive.EXPLORER_PAIRS} pairs of views of each, drawn "
                   "by the run's own augmentation settings; hover a view for its crop box, flip, colour jitter "
                   "factors, grayscale, blur sigma, solarize and (when on) the erased rectangle.")


def _views_sections(run: LoadedRun, dataset: Dataset, device: torch.device, seed: int) -> list[str]:
    idx = evenly_spaced(len(dataset.pretrain), VIEW_IMAGES)
    originals = dataset.pretrain.images[idx]
    raw, views = view_pairs(originals, run.augment, seed, run.mean, run.std, device)
    grid = figures.view_pairs_grid(originals, raw)
    h = require_finite(encode(run.encoder, views, run.precision), f"the features of {run.run_dir}'s own images")
    heat, stats = figures.similarity_heatmap(h)
    n = len(idx)
    return [
        section("views", "Augmented view pairs", grid, "img",
                "Each stored image followed by its two views, drawn by the run's own augmentation settings "
                "(as pretraining does), before standardisation."),
        section("similarity", "Cosine similarity of the view pairs", heat, "img",
                f"Rows and columns: the {n} first views, then the {n} second views, of the images above; "
                f"bright is similar (scale from {stats['low']:g} to 1). Positives lie on the diagonals of the two "
                f"off-diagonal blocks: mean cosine {stats['positive']:.3f} for positives, {stats['negative']:.3f} "
                f"for all other pairs."),
    ]



def own_rows(bank_index: np.ndarray, query_index: np.ndarray) -> np.ndarray:
    """For queries drawn from the bank's split: the bank row holding each query (sorted
    `bank_index`), or -1 where the evenly spaced bank left the query out (no row to exclude)."""
    pos = np.searchsorted(bank_index, query_index)
    at = np.minimum(pos, len(bank_index) - 1)
    return np.where(bank_index[at] == query_index, at, -1)

def _map_and_retrievals(run: LoadedRun, dataset: Dataset, device: torch.device, method: str, seed: int,
                        data: dict[str, Any]) -> list[str]:
    # Without labelled splits, the pretraining images unlabelled: their labels are --supcon's, -1 for
    # most or all rows, never classes to colour or match (an unlabelled store showed "-1" as a class).
    pretrain = ImageSet(dataset.pretrain.images, None)
    test = dataset.test or pretrain
    bank_split = dataset.train or pretrain
    midx = evenly_spaced(len(test), MAP_POINTS)
    map_images = test.images[midx]
    h = torch.from_numpy(embed_images(run, map_images, device))  # as `fastclr neighbours` embeds a store
    require_finite(h, f"the features of {run.run_dir}'s own images")
    xy = (tsne(h, seed=seed) if method == "tsne" else pca(h, 2).float()).numpy()
    labels = test.labels[midx] if test.labels is not None else None
    classes = dataset.classes or ([str(c) for c in range(int(labels.max()) + 1)] if labels is not None else [])
    which = "test" if dataset.test is not None else "pretraining"
    near, sims = interactive.map_neighbours(h)
    thumbs = interactive.map_thumbnails(map_images)
    data["map"] = {"size": int(thumbs.shape[1]), "cols": interactive.SPRITE_COLUMNS,
                   "sprite": interactive.sprite(thumbs), "labels": labels.tolist() if labels is not None else [],
                   "classes": list(classes) if labels is not None else [], "index": midx.tolist(), "split": which,
                   "k": int(near.shape[1]), "neighbours": near.reshape(-1).tolist(),
                   "sims": [round(float(v), 4) for v in sims.reshape(-1)]}
    tools = ('<div id="map-tools" hidden><p id="map-visible" class="note"></p><div class="map-panels">'
             '<div id="map-hover" class="panel">Hover a point to see its image.</div>'
             '<div id="map-neighbours" class="panel">Click a point for its nearest neighbours in h.</div></div></div>')
    legend = ", click a class in the legend to hide or show it" if labels is not None else ""
    out = [section("map", "Embedding map", figures.embedding_map(xy, labels, classes, method, which) + tools, "svg",
                   f"{len(midx)} {which} images (evenly spaced), features h mapped to 2-D by {method.upper()}"
                   f"{', coloured by class' if labels is not None else ''}. With scripts on: hover a point for its "
                   f"image, click it for its {near.shape[1]} nearest neighbours in h among these images, itself "
                   f"left out (cosine on h, as <code>fastclr neighbours</code> ranks a store){legend}.")]
    bidx = evenly_spaced(len(bank_split), BANK_LIMIT)
    bank = _features(run, bank_split.images[bidx], device)
    qidx = pick_queries(test, QUERIES)
    same_split = test is bank_split
    exclude = own_rows(bidx, qidx) if same_split else None
    _, nn_idx = cosine_topk(bank, _features(run, test.images[qidx], device), NEIGHBOURS,
                            exclude=torch.from_numpy(exclude) if exclude is not None else None)
    nn_rows = nn_idx.numpy()  # (Q, K) into bidx
    neighbours = bank_split.images[bidx[nn_rows]]  # (Q, K, H, W, C)
    q_labels = test.labels[qidx] if test.labels is not None else None
    n_labels = bank_split.labels[bidx[nn_rows]] if bank_split.labels is not None else None
    agree = f" {100 * float((n_labels == q_labels[:, None]).mean()):.0f}% of the neighbours share the query's class." \
        if q_labels is not None and n_labels is not None else ""
    out.append(section("retrievals", "Nearest-neighbour retrievals",
                       figures.retrievals(test.images[qidx], q_labels, neighbours, n_labels), "img",
                       f"Left: a {which} image (grey frame); then its {NEIGHBOURS} most cosine-similar "
                       f"{'training' if bank_split is dataset.train else which} images among {len(bidx)}"
                       f"{' (green frame: same class, red: another)' if agree else ''}.{agree}"))
    return out


def probe_summary(record: dict[str, Any]) -> str:
    """The end-of-pretraining probe (probe.json) in one sentence, beside the same network untrained
    and its lift (flagged when small), as `pretrain` printed it; fields it lacks are left out."""
    def number(key: str) -> float | None:
        v = record.get(key)
        return float(v) if figures.is_number(v) else None

    acc, ref, steps, seconds = number("accuracy"), number("random_init_accuracy"), number("steps"), number("train_seconds")
    if acc is None:
        return ""
    line = f"Linear probe at the end of pretraining: {100 * acc:.2f}%"
    line += f" after {steps:.0f} steps" if steps is not None else ""
    line += f" ({seconds:.0f} s of training)" if seconds is not None else ""
    if ref is not None:
        lift = acc - ref
        line += f"; the same network untrained: {100 * ref:.2f}%, lift {100 * lift:+.2f} points"
        line += "; SMALL: most of it is the architecture's" if small_lift(lift) else ""
    return line + "."


def _probe_line(run: LoadedRun, encoder_sha256: str) -> str:
    """probe.json's sentence, said to be out of date when it measured other weights than the run
    holds now (a finished run trained on, or stopped during its probe): by the checksum it records,
    or, in a probe.json older than that, by its step against the checkpoint the encoder came from."""
    probe = run.run_dir / "probe.json"
    if not probe.exists():
        return ""
    record = read_json(probe, f"delete it (fastclr evaluate {run.run_dir} measures the linear probe again)")
    line = probe_summary(record)
    saved, steps = record.get("encoder_sha256"), record.get("steps")
    stale = saved != encoder_sha256 if saved is not None else \
        run.checkpoint_step is not None and steps is not None and steps != run.checkpoint_step
    return f"{line[:-1]} (out of date: measured on other weights than the run holds now)." if line and stale else line


def _evaluate_hint(run_dir: Path, dataset: Dataset, ev: dict[str, Any] | None) -> str:
    """What to run for the label-efficiency curve: the few-label protocols on labelled data; on data
    without labels, which they cannot use, where its label-free measures are (or what gives them)."""
    run = escape(str(run_dir))
    if has_labelled_splits(dataset):
        if ev is None:
            return (f"No evaluation yet: run <code>fastclr evaluate {run}</code>, then <code>fastclr report {run}"
                    "</code> again, to add the label-efficiency curve and the numbers of every protocol.")
        return (f"eval.json holds no few-label results: run <code>fastclr evaluate {run} --protocols "
                f"fewshot,supervised</code>, then <code>fastclr report {run}</code> again.")
    why = (f"{escape(dataset.name)} has no labelled train and test splits, so there is no label-efficiency curve "
           "(the few-label probe and the supervised baseline need labels)")
    if ev is not None and "quality" in ev["protocols"]:
        return f"{why}; its label-free measures are under Numbers."
    return (f"{why}: run <code>fastclr evaluate {run} --protocols quality</code>, then <code>fastclr report {run}"
            "</code> again, for its label-free measures.")


def _results_sections(ev: dict[str, Any] | None, run: LoadedRun, dataset: Dataset, encoder_sha256: str) -> list[str]:
    run_dir = run.run_dir
    probe_line = _probe_line(run, encoder_sha256)
    if ev is None:
        hint = note(_evaluate_hint(run_dir, dataset, None))
        return [section("efficiency", "Label efficiency", hint, "p"),
                section("numbers", "Numbers", note(escape(probe_line) or "No results yet.") + hint, "p")]
    p = ev["protocols"]
    other_data = not same_data(ev, dataset)
    stale = "" if ev.get("encoder_sha256") == encoder_sha256 and not other_data else note(
        "<b>These numbers are out of date</b>: eval.json was computed for "
        + ("other data than the run's now (a store prepared again?)" if other_data else
           "other encoder weights than the run holds now (trained further, or another run's eval.json)")
        + f". Run <code>fastclr evaluate {escape(str(run_dir))}</code> again.")
    if "fewshot" in p or "supervised" in p:
        # the curve reads figures the table does not (a one-seed point's std)
        with unreadable_as_damaged(run_dir / EVAL_FILE, evaluate_again(run_dir)):
            lines = figures.efficiency_series(p)
        curve = figures.efficiency_chart(lines)
        eff = section("efficiency", "Label efficiency", stale + curve, "svg",
                      "Test accuracy against labelled images per class, on fixed stratified subsets: a logistic "
                      "regression on the frozen self-supervised features (by default over ten subsets) against the "
                      "same architecture trained from scratch with labels only (on the first three of them). "
                      "Bands: mean ± standard deviation over subset seeds.")
    else:
        eff = section("efficiency", "Label efficiency", note(_evaluate_hint(run_dir, dataset, ev)), "p")
    text = escape(format_table(ev, run_dir=str(run_dir)))  # the run as named now: a moved run's file names the old
    environment = ev.get("environment")
    written = environment.get("time") if isinstance(environment, dict) else None
    return [eff, section("numbers", "Numbers", stale + f"<pre>{text}</pre>" + note(escape(probe_line)), "pre",
                         f"From eval.json, written {escape(str(written or '?'))}.")]


@gives_threads_back
def build_report(
    run_dir: Path,
    out: Path | None = None,
    device: str = "auto",
    map_method: str = "tsne",
    threads: int = 0,
    dataset: Dataset | None = None,
    seed: int = 0,
    precision: str = "auto",
) -> Path:
    """Write the report of `run_dir` (to RUN_DIR/report.html unless `out`) and return its path."""
    t0 = time.perf_counter()
    if map_method not in MAP_METHODS:  # any other name drew a PCA map captioned with that name
        raise FastclrError(f"unknown map {map_method!r}; choose {' or '.join(MAP_METHODS)}")
    set_threads(threads)
    dev = select_device(device)
    if out is not None:
        refuse_output(out, kind="a report", suffixes=(".html", ".htm"))
    if Path(run_dir).is_dir():  # else load_run names what the run directory is not
        refuse_unwritable_file(out if out is not None else Path(run_dir) / "report.html", given=out is not None)
    run = load_run(run_dir, dev, precision, command="report")
    dataset = run_data(run, dataset)
    ev = read_eval(run_dir)
    config_text = (run_dir / "config.toml").read_text(encoding="utf-8")
    data: dict[str, Any] = {}
    sections = [_curves_section(run_dir), *_views_sections(run, dataset, dev, seed),
                _playground_section(run, dataset, dev, seed, data), _explorer_section(run, dataset, dev, seed),
                *_map_and_retrievals(run, dataset, dev, map_method, seed, data),
                *_results_sections(ev, run, dataset, state_checksum(run.encoder)),
                section("config", "Config", f"<pre>{escape(config_text)}</pre>", "pre",
                        "The resolved configuration of the run (config.toml).")]
    spec = run.spec
    step = unfinished(run.checkpoint_step)  # the weights shown are a checkpoint's: said at the top
    at = f" · the encoder of {step}" if step else ""
    subtitle = escape(f"{run_dir}{at} · {spec.encoder} encoder, h {spec.feature_dim}-d · {dataset.name} · "
                      f"generated {time.strftime('%Y-%m-%d %H:%M')} in {time.perf_counter() - t0:.0f} s")
    path = out or run_dir / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)  # an --out in a new folder, as embed's
    write_text(path, page(f"fastclr report: {run_dir.resolve().name}", subtitle, sections, data=interactive.page_data(data),
                          script=interactive.script()))
    return path
