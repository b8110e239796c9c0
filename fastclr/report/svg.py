"""Hand-written SVG charts for the report: line charts (with spread bands) and a scatter map.

Plain strings, no plotting library and no script: the charts render in any browser offline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from html import escape

import numpy as np

# Tableau 10: distinguishable classes, the usual choice for categorical data.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]


def class_colour(i: int) -> str:
    """Colour of class i: Tableau 10, then evenly spaced hues beyond ten classes."""
    if i < len(PALETTE):
        return PALETTE[i]
    return f"hsl({(i * 137.508) % 360:.0f}, 60%, 50%)"  # golden-angle hues stay apart


@dataclass
class Series:
    """One line of a chart; `lo`/`hi` draw a shaded band (e.g. mean ± std)."""

    name: str
    x: list[float]
    y: list[float]
    colour: str
    lo: list[float] | None = None
    hi: list[float] | None = None
    dashed: bool = False
    markers: bool = False
    line: bool = True


def finite_points(s: Series) -> Series:
    """`s` without the points where x, y or the band is NaN or infinite (from an edited or foreign
    metrics.jsonl): one such value made every range, and so the whole chart, NaN."""
    cols = [s.x, s.y] + [c for c in (s.lo, s.hi) if c is not None]
    keep = [i for i in range(len(s.x)) if all(math.isfinite(c[i]) for c in cols)]
    if len(keep) == len(s.x):
        return s
    pick = lambda c: None if c is None else [c[i] for i in keep]  # noqa: E731
    return replace(s, x=pick(s.x) or [], y=pick(s.y) or [], lo=pick(s.lo), hi=pick(s.hi))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (steps of 1, 2 or 5 times a power of ten), from the last one at
    or below `lo` to the first one at or above `hi`."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:  # one value: a range around it, so that it sits mid-axis (0.92 -> 0.86 ... 0.98)
        pad = 0.05 * abs(lo) or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_label(v: float) -> str:
    """Short label: 2500 -> 2500, 0.25 -> 0.25, 0.0015 -> 0.0015, 1.23456 -> 1.23."""
    if v == int(v) and abs(v) < 1e7:
        return str(int(v))
    return f"{v:.3g}"


@dataclass
class Frame:
    """Maps data coordinates to pixels inside the plotting area."""

    x0: float
    x1: float
    y0: float
    y1: float
    width: int
    height: int
    log_x: bool = False
    margin: tuple[int, int, int, int] = field(default=(16, 16, 44, 58))  # top, right, bottom, left

    def px(self, x: float) -> float:
        t, r, b, left = self.margin
        fx = (math.log10(x) - math.log10(self.x0)) / (math.log10(self.x1) - math.log10(self.x0)) if self.log_x \
            else (x - self.x0) / ((self.x1 - self.x0) or 1)
        return left + fx * (self.width - left - r)

    def py(self, y: float) -> float:
        t, r, b, left = self.margin
        return self.height - b - (y - self.y0) / ((self.y1 - self.y0) or 1) * (self.height - t - b)


def _path(f: Frame, xs: list[float], ys: list[float]) -> str:
    return " ".join(f"{'M' if i == 0 else 'L'}{f.px(x):.1f},{f.py(y):.1f}" for i, (x, y) in enumerate(zip(xs, ys)))


def line_chart(series: list[Series], title: str, x_label: str, y_label: str, width: int = 460, height: int = 280,
               log_x: bool = False, x_ticks: list[float] | None = None,
               y_range: tuple[float, float] | None = None, y_limits: tuple[float, float] | None = None) -> str:
    """An SVG line chart with axes, ticks, grid, legend and optional shaded bands (points that are
    not finite left out). `y_range` fixes the y axis; otherwise it spans the data with round ticks,
    never beyond `y_limits` (an accuracy's 0 and 1: a tick at 1.05 reads as a possible value)."""
    series = [finite_points(s) for s in series]
    xs = [x for s in series for x in s.x]
    ys = [y for s in series for y in (s.y + (s.lo or []) + (s.hi or []))]
    if not xs:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40">'
                f'<text x="4" y="24">{escape(title)}: no data</text></svg>')
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = (x0 / 2, x0 * 2) if log_x else (x0 - 1, x1 + 1)
    y0, y1 = y_range or (min(ys), max(ys))
    yt = nice_ticks(y0, y1)
    if y_range:
        yt = [t for t in yt if y0 <= t <= y1]
    else:
        if y_limits:
            yt = [t for t in yt if y_limits[0] <= t <= y_limits[1]] or [max(min(y0, y_limits[1]), y_limits[0])]
        y0, y1 = min(yt[0], y0), max(yt[-1], y1)
    top = 24 + 14 * len(series)  # title, then one legend line per series: nothing overlaps the data
    f = Frame(x0, x1, y0, y1, width, height + top - 16, log_x, (top, 16, 44, 58))
    height = f.height
    xt = x_ticks if x_ticks is not None else nice_ticks(x0, x1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="11">']
    top, right, bottom, left = f.margin
    for t in yt:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{f.py(t):.1f}" y2="{f.py(t):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{f.py(t) + 4:.1f}" text-anchor="end" fill="#555">{tick_label(t)}</text>')
    for t in xt:
        if x0 <= t <= x1:
            x, y = f.px(t), height - bottom
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + 4}" stroke="#555"/>')
            out.append(f'<text x="{x:.1f}" y="{y + 16}" text-anchor="middle" fill="#555">{tick_label(t)}</text>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#555"/>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#555"/>')
    mid_x, mid_y = (left + width - right) / 2, (top + height - bottom) / 2
    out.append(f'<text x="{mid_x:.0f}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14,{mid_y:.0f}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>')
    for s in series:
        if s.lo is not None and s.hi is not None and len(s.x) > 1:
            band = _path(f, s.x, s.hi) + " " + _path(f, s.x[::-1], s.lo[::-1]).replace("M", "L", 1) + " Z"
            out.append(f'<path d="{band}" fill="{s.colour}" fill-opacity="0.18" stroke="none"/>')
        if s.line and len(s.x) > 1:
            dash = ' stroke-dasharray="5,4"' if s.dashed else ""
            out.append(f'<path d="{_path(f, s.x, s.y)}" fill="none" stroke="{s.colour}" stroke-width="1.8"{dash}/>')
        if s.markers or len(s.x) == 1:  # each marker names its values on hover
            out += [f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3.2" fill="{s.colour}">'
                    f'<title>{escape(s.name)}: {x:g}, {y:.4g}</title></circle>' for x, y in zip(s.x, s.y)]
        elif s.line:  # an invisible target on every point of a plain line names its values on hover
            out += [f'<circle class="hover" cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="4" fill="transparent">'
                    f'<title>{escape(s.name)}: {x:g}, {y:.4g}</title></circle>' for x, y in zip(s.x, s.y)]
    out.append(f'<text x="{left}" y="14" font-weight="bold">{escape(title)}</text>')
    for i, s in enumerate(series):  # legend under the title
        y = 30 + 14 * i
        out.append(f'<rect x="{left + 2}" y="{y - 5}" width="14" height="3" fill="{s.colour}"/>')
        out.append(f'<text x="{left + 22}" y="{y}">{escape(s.name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


LEGEND_CHARS = 22
"""The characters of a class name that fit the legend's 150 px at 11 px sans-serif (the whole name is its tooltip)."""


def _fit(name: str, chars: int) -> str:
    return name if len(name) <= chars else name[:chars - 1] + "\u2026"


def scatter_chart(xy: np.ndarray, labels: np.ndarray | None, class_names: list[str], title: str, width: int = 640,
                  height: int = 480) -> str:
    """An SVG scatter of 2-D points (N, 2), coloured by class with a legend (one colour without labels)."""
    legend_w = 150 if labels is not None else 0
    plot_w, plot_h = width - legend_w, height
    if labels is not None:  # one legend line per class, all inside the picture (CIFAR-100 has 100); the
        height = max(height, 34 + 16 * len(class_names))  # map keeps its shape: a taller one would distort it
    lo, hi = xy.min(0), xy.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    p = np.where(hi > lo, (xy - lo) / span, 0.5)  # (N, 2) in [0, 1]; an axis without spread in the middle
    px = 10 + p[:, 0] * (plot_w - 20)
    py = 24 + (1 - p[:, 1]) * (plot_h - 34)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="11">',
           f'<text x="10" y="14" font-weight="bold">{escape(title)}</text>']
    for i in range(len(xy)):  # data-i: the point's row; data-c: its class (the page's script uses both)
        c = class_colour(int(labels[i])) if labels is not None else "#4e79a7"
        cls = f' data-c="{int(labels[i])}"' if labels is not None else ""
        out.append(f'<circle data-i="{i}"{cls} cx="{px[i]:.1f}" cy="{py[i]:.1f}" r="2.6" fill="{c}" fill-opacity="0.8"/>')
    if labels is not None:
        for k, name in enumerate(class_names):
            y = 34 + 16 * k
            out.append(f'<g class="legend" data-class="{k}"><rect x="{plot_w + 4}" y="{y - 12}" width="{legend_w - 8}" '
                       f'height="15" fill="transparent"/><circle cx="{plot_w + 12}" cy="{y - 4}" r="5" '
                       f'fill="{class_colour(k)}"/><text x="{plot_w + 22}" y="{y}">{escape(_fit(name, LEGEND_CHARS))}'
                       f'</text><title>{escape(name)}</title></g>')
    out.append("</svg>")
    return "\n".join(out)
