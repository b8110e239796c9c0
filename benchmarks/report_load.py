"""How fast a report opens and answers, in headless Chromium, and what it looks like.

Opens REPORT (a `fastclr report` page) --repeats times, each in a fresh browser, and reads the
navigation timing (load event end, from navigation start: parsing, images, the script's first
drawing of the playground and the map), then times the interactions a reader makes: a temperature
change at 32 pairs, a batch change, a click on a matrix row, a hover and a click on a map point,
and a class toggled in the legend (each from the event to the end of its handler, in the page).
With --screenshots DIR it saves one PNG per section. Prints one JSON line.

    python benchmarks/report_load.py runs/RUN/report.html --repeats 5 --screenshots docs/report
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from cdp import Browser, find_chromium
from harness import report

SECTIONS = ("curves", "views", "similarity", "playground", "augment", "map", "retrievals", "efficiency", "numbers")

# Each interaction timed inside the page: performance.now() around a dispatched event whose
# handlers run synchronously.
_TIMED = """
(() => {
  const t = (f) => { const a = performance.now(); f(); return performance.now() - a; };
  const fire = (id, v, ev) => { const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event(ev)); };
  const click = (e) => e.dispatchEvent(new MouseEvent('click', {bubbles: true, clientX: e.getBoundingClientRect().x + 2,
                                                                clientY: e.getBoundingClientRect().y + 40}));
  const point = document.querySelector('#map svg circle[data-i="5"]');
  const legend = document.querySelector('#map g.legend');
  return {
    temperature_ms: t(() => fire('pg-temp', '-1.5', 'input')),
    batch_ms: t(() => fire('pg-batch', '16', 'change')),
    batch_back_ms: t(() => fire('pg-batch', '32', 'change')),
    matrix_row_ms: t(() => click(document.getElementById('pg-matrix'))),
    map_hover_ms: t(() => point.dispatchEvent(new MouseEvent('mouseenter'))),
    map_click_ms: t(() => point.dispatchEvent(new MouseEvent('click'))),
    legend_toggle_ms: t(() => legend.dispatchEvent(new MouseEvent('click'))),
  };
})()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--screenshots", type=Path, default=None)
    args = ap.parse_args()
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("error: no chromium on PATH; install it: apt-get install -y chromium")
    loads, interactions = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            b = Browser(chromium, Path(tmp) / "profile", 1280, 900)
            try:
                b.open(args.report.resolve().as_uri())
                loads.append(b.js("performance.getEntriesByType('navigation')[0].loadEventEnd"))
                status = b.js("document.getElementById('render-check').textContent")
                interactions.append(b.js(_TIMED))
                if args.screenshots is not None and r == 0:
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    b.open(args.report.resolve().as_uri())
                    for sid in SECTIONS:
                        b.screenshot(args.screenshots / f"{sid}.png", f"#{sid}")
            finally:
                b.close()
    timed = {k: round(statistics.median(i[k] for i in interactions), 1) for k in interactions[0]}
    report("report_load", {"report": str(args.report), "bytes": args.report.stat().st_size, "render_check": status,
                           "load_event_ms": [round(v, 1) for v in loads],
                           "load_event_ms_median": round(statistics.median(loads), 1),
                           "interaction_ms_median": timed})


if __name__ == "__main__":
    main()
