"""The report's figures as HTML fragments: each function takes what it draws and returns an SVG
string or an <img> with an embedded PNG, plus the numbers that go in its caption."""

from __future__ import annotations

import math
from html import escape
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F

from fastclr.report.png import SHOWN_SIDE, data_uri, encode_png, enlargement, shrink, tile, viridis
from fastclr.report.svg import Series, class_colour, line_chart, scatter_chart

GREEN = np.array([46, 160, 67], np.uint8)
RED = np.array([214, 39, 40], np.uint8)
GREY = np.array([150, 150, 150], np.uint8)


def img_tag(rgb: np.ndarray, alt: str, width: int | None = None) -> str:
    """An <img> embedding the uint8 image (H, W, 3) or (H, W) as a PNG data URI."""
    w = f' width="{width}"' if width else ""
    return f'<img src="{data_uri(encode_png(rgb))}" alt="{escape(alt)}"{w}>'


CURVE_KEYS = ("loss", "top1", "top5", "lr", "knn_acc")
"""The metrics.jsonl values the training curves draw."""


def is_number(v: object) -> TypeGuard[int | float]:
    """Whether a JSON value is a number (true and false are not, though Python counts them as ints)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def _value(record: dict[str, Any], key: str) -> float:
    """record[key] as a float; NaN where it is missing or null (pandas saves NaN as null): the chart
    leaves such a point out."""
    v = record.get(key)
    return float(v) if is_number(v) else float("nan")


def training_curves(metrics: list[dict[str, Any]]) -> list[str]:
    """Loss, contrastive accuracy, learning rate and monitor accuracy against the step, as SVGs."""
    train = [r for r in metrics if "loss" in r]
    mon = [r for r in metrics if "knn_acc" in r]
    steps = [float(r["step"]) for r in train]
    charts = [
        line_chart([Series("NT-Xent loss", steps, [_value(r, "loss") for r in train], class_colour(0))],
                   "Contrastive loss", "step", "loss"),
        line_chart([Series(name, steps, [_value(r, key) for r in train], class_colour(i))
                    for i, (name, key) in enumerate((("top-1", "top1"), ("top-5", "top5")))
                    if train and key in train[0]],
                   "Contrastive accuracy (positive found among 2N-1)", "step", "accuracy", y_range=(0.0, 1.0)),
        line_chart([Series("learning rate", steps, [_value(r, "lr") for r in train], class_colour(2))],
                   "Learning rate", "step", "lr"),
    ]
    if mon:
        knn = Series("kNN monitor", [float(r["step"]) for r in mon], [_value(r, "knn_acc") for r in mon],
                     class_colour(4), markers=True)
        charts.append(line_chart([knn], "Online kNN monitor accuracy", "step", "accuracy", y_limits=(0.0, 1.0)))
    return charts


def view_pairs_grid(originals: np.ndarray, views: torch.Tensor, scale: int = 3) -> str:
    """Each image next to its two augmented views, as the model saw them (before standardisation),
    four such triples per row.

    originals: uint8 (B, H, W, C); views: float (2B, C, S, S) in [0, 1], first views then second.
    """
    b = originals.shape[0]
    v = shrink((views.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy(), SHOWN_SIDE)
    s = v.shape[1]  # v: (2B, S, S, C)
    scale = enlargement(s, scale)
    if originals.shape[1] != s:  # show originals at the views' size, nearest pixel
        idx = (np.arange(s) * originals.shape[1] / s).astype(np.int64)
        originals = originals[:, idx][:, :, idx]
    triples = np.stack([originals, v[:b], v[b:]], 1)  # (B, 3, S, S, C)
    cells = np.stack([tile(t, cols=3, scale=scale, pad=1) for t in triples])  # (B, H', W', 3): one image, its views
    return img_tag(tile(cells, cols=4, pad=8), "augmented view pairs")


def similarity_heatmap(h: torch.Tensor, cell: int = 12) -> tuple[str, dict[str, float]]:
    """Cosine similarity of the 2B view features h (2B, D) as a heatmap, with mean positive and
    negative similarity. Positives lie on the diagonals of the off-diagonal blocks."""
    z = F.normalize(h.float(), dim=1)
    sim = (z @ z.T).numpy()  # (2B, 2B)
    n = sim.shape[0] // 2
    lo = 0.0 if sim.min() >= 0 else -1.0
    rgb = viridis((sim - lo) / (1 - lo)).repeat(cell, 0).repeat(cell, 1)
    rgb[n * cell - 1 : n * cell + 1, :] = 255  # white rules between the view-1 and view-2 blocks
    rgb[:, n * cell - 1 : n * cell + 1] = 255
    pos = np.concatenate([np.diag(sim, n), np.diag(sim, -n)])
    mask = ~np.eye(2 * n, dtype=bool)
    mask[np.arange(n), np.arange(n) + n] = mask[np.arange(n) + n, np.arange(n)] = False
    stats = {"positive": float(pos.mean()), "negative": float(sim[mask].mean()), "low": lo}
    return img_tag(rgb, "cosine similarity of view pairs"), stats


def embedding_map(xy: np.ndarray, labels: np.ndarray | None, classes: list[str], method: str,
                  split: str = "test") -> str:
    """The 2-D map of the `split` images' embeddings, coloured by class when labels exist."""
    return scatter_chart(xy, labels, classes, f"{split.capitalize()} embeddings h, {method.upper()} map")


def retrievals(queries: np.ndarray, q_labels: np.ndarray | None, neighbours: np.ndarray,
               n_labels: np.ndarray | None, scale: int = 2) -> str:
    """Rows of a query (grey frame) and its nearest training images (green frame: same class, red: not).

    queries: uint8 (Q, H, W, C); neighbours: uint8 (Q, K, H, W, C); labels (Q,), (Q, K) or None.
    """
    q, k = neighbours.shape[:2]
    images = shrink(np.concatenate([queries[:, None], neighbours], 1).reshape(q * (k + 1), *queries.shape[1:]),
                    SHOWN_SIDE)
    scale = enlargement(images.shape[1], scale)
    borders = np.tile(GREY, (q * (k + 1), 1))
    if q_labels is not None and n_labels is not None:
        same = n_labels == q_labels[:, None]  # (Q, K)
        colours = np.where(same[..., None], GREEN, RED)  # (Q, K, 3)
        borders = np.concatenate([np.tile(GREY, (q, 1, 1)), colours], 1).reshape(-1, 3)
    return img_tag(tile(images, cols=k + 1, scale=scale, pad=3, borders=borders), "nearest-neighbour retrievals")


def label_efficiency(protocols: dict[str, Any]) -> str:
    """Accuracy against labels per class: few-label probe, the same on the untrained network, and the
    supervised baseline (mean ± std bands), fine-tuning points, and the all-label linear probe (and
    its untrained reference) as dashed levels."""
    return efficiency_chart(efficiency_series(protocols))


def efficiency_chart(series: list[Series]) -> str:
    """The label-efficiency chart of `efficiency_series`' lines."""
    xs = sorted({x for s in series if not s.dashed for x in s.x})
    return line_chart(series, "Label efficiency", "labels per class (log scale)", "test accuracy (%)", width=620,
                      height=360, log_x=True, x_ticks=xs, y_limits=(0.0, 100.0))


def efficiency_series(protocols: dict[str, Any]) -> list[Series]:
    """The lines of `label_efficiency`, read from an evaluation's protocols: where its figures are
    read (a hand-edited eval.json fails here, a fault of the drawing does not)."""
    series = []
    for name, key, curve_key, colour in (
            ("linear probe on h (self-supervised)", "fewshot", "curve", class_colour(0)),
            ("linear probe on h, same net untrained", "fewshot", "random_init_curve", class_colour(7)),
            ("supervised from scratch", "supervised", "curve", class_colour(1))):
        curve = protocols.get(key, {}).get(curve_key, [])
        if curve:
            x = [float(e["labels_per_class"]) for e in curve]
            m = [100 * e["mean"] for e in curve]
            sd = [100 * e["std"] for e in curve]
            series.append(Series(name, x, m, colour, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                 markers=True))
    ft = protocols.get("finetune", {}).get("fractions", [])
    if ft:
        x = [float(e["labels_per_class"]) for e in ft]
        series.append(Series("fine-tuned (label fractions)", x, [100 * e["mean"] for e in ft], class_colour(2),
                             markers=True, line=False))
        if all("scratch_mean" in e for e in ft):
            series.append(Series("from scratch, same fractions", x, [100 * e["scratch_mean"] for e in ft],
                                 class_colour(5), markers=True, line=False))
    xs = sorted({x for s in series for x in s.x})
    odd = [x for x in xs if not math.isfinite(x) or x <= 0]  # on a log axis: only a hand edit puts one there
    if odd:
        raise ValueError(f"labels per class of {odd[0]}")
    if "linear" in protocols and xs:
        # across the points; around a single one as wide as line_chart's frame (a level from it to itself drew nothing)
        span = [xs[0], xs[-1]] if len(xs) > 1 else [xs[0] / 2, xs[0] * 2]
        acc = 100 * protocols["linear"]["accuracy"]
        series.append(Series("linear probe, all labels", span, [acc, acc], class_colour(4), dashed=True))
        if "random_init" in protocols["linear"]:
            ref = 100 * protocols["linear"]["random_init"]["accuracy"]
            series.append(Series("linear probe, all labels, untrained", span, [ref, ref], class_colour(7), dashed=True))
    return series
