"""The report's interactive parts, driven in headless Chromium over the DevTools protocol with
real pointer events: what the page computes and shows must be what fastclr computes.

- the playground's loss, top-1/top-5 and mean rank at several temperatures and batch sizes equal
  fastclr's NT-Xent and its metrics on the vectors the page embeds, to 1e-4; a clicked row shows
  that anchor's softmax, its two views and its hardest negatives;
- a hovered map point shows its thumbnail; a clicked one shows the neighbours `fastclr
  neighbours` returns for that image; a legend click hides exactly that class;
- a hovered view of the augmentation explorer shows the parameters that render its pixels;
- with scripts off the page is the static document: every figure there, nothing interactive.

Skipped without Chromium unless FASTCLR_REQUIRE_CHROMIUM=1 (CI), like test_report_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO
from eval_fixtures import one_thread, tiny_dataset, tiny_run  # noqa: F401 (one_thread: autouse)
from fastclr.augment import ViewParams, augment, to_float
from fastclr.evaluation.features import evenly_spaced
from fastclr.evaluation.options import EvaluateOptions
from fastclr.evaluation.run import evaluate
from fastclr.ingest import DecodeOptions, prepare_store
from fastclr.ingest.neighbours import neighbours
from fastclr.pretrained import load_run
from fastclr.pretraining.losses import contrastive_metrics, nt_xent, nt_xent_logits
from fastclr.report.build import build_report
from fastclr.report.interactive import from_f32_base64

sys.path.insert(0, str(REPO / "benchmarks"))
from cdp import Browser, find_chromium  # noqa: E402  (the driver benchmarks/report_load.py uses too)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    ds = tiny_dataset()
    run_dir = tiny_run(tmp_path_factory.mktemp("interactive") / "run", ds)
    opts = EvaluateOptions(protocols=("linear", "knn"), device="cpu")
    evaluate(run_dir, opts, dataset=ds, log=lambda s: None)
    return build_report(run_dir, device="cpu", dataset=ds), ds


def chromium() -> str:
    """Path of a Chromium binary, or skip (fail when FASTCLR_REQUIRE_CHROMIUM=1)."""
    found = find_chromium()
    if found is None:
        if os.environ.get("FASTCLR_REQUIRE_CHROMIUM") == "1":
            pytest.fail("FASTCLR_REQUIRE_CHROMIUM=1 but no chromium on PATH; install it: apt-get install -y chromium")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return found


@pytest.fixture(scope="module")
def browser(report: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    b = Browser(chromium(), tmp_path_factory.mktemp("profile"), 1280, 900)
    b.open(report[0].resolve().as_uri())
    assert b.js("document.getElementById('render-check').getAttribute('data-status')") == "ok", \
        b.js("document.getElementById('render-check').textContent")
    yield b
    assert b.console() == []  # no error, warning or log line from the page during the whole module
    b.close()


def page_data(path: Path) -> dict[str, Any]:
    text = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S)
    assert text is not None
    return dict(json.loads(text.group(1).replace("<\\/", "</")))


def value(b: Browser, element_id: str) -> float:
    return float(b.js(f"document.getElementById('{element_id}').getAttribute('data-value')"))


def set_control(b: Browser, element_id: str, v: str, event: str) -> None:
    """What a user's drag or choice does: the control's value changes, then its input/change event fires."""
    b.js(f"(() => {{ const e = document.getElementById('{element_id}'); e.value = '{v}'; "
         f"e.dispatchEvent(new Event('{event}')); }})()")


def test_the_playground_computes_fastclrs_nt_xent_and_metrics(report: tuple[Path, Any], browser: Browser) -> None:
    data = page_data(report[0])["playground"]
    n = data["pairs"]
    for rep in ("z", "h"):
        vectors = torch.from_numpy(from_f32_base64(data[rep], data[f"{rep}_dim"]).copy())
        set_control(browser, "pg-rep", rep, "change")
        for pairs in (4, 8, 16, 32):
            set_control(browser, "pg-batch", str(pairs), "change")
            for t in (0.01, 0.03, 0.1, 0.3, 1.0):
                set_control(browser, "pg-temp", repr(math.log10(t)), "input")
                shown = value(browser, "pg-t")  # the slider moves in steps of 0.001 of log10(t)
                assert abs(math.log10(shown) - math.log10(t)) <= 0.0005, (t, shown)
                z1, z2 = vectors[:pairs], vectors[n:n + pairs]
                logits, target = nt_xent_logits(z1, z2, shown)
                metrics = contrastive_metrics(logits, target)
                where = (rep, pairs, t)
                assert abs(value(browser, "pg-loss") - float(nt_xent(z1, z2, shown))) <= 1e-4, where
                for element, key in (("pg-top1", "top1"), ("pg-top5", "top5"), ("pg-rank", "mean_rank")):
                    assert abs(value(browser, element) - float(metrics[key])) <= 1e-4, (where, key)
                assert value(browser, "pg-pairs") == pairs and value(browser, "pg-negatives") == 2 * pairs - 2


def test_clicking_a_matrix_row_shows_that_anchors_softmax_views_and_hardest_negatives(
        report: tuple[Path, Any], browser: Browser) -> None:
    data = page_data(report[0])["playground"]
    n, pairs, t = data["pairs"], 8, 0.2
    set_control(browser, "pg-rep", "z", "change")
    set_control(browser, "pg-batch", str(pairs), "change")
    set_control(browser, "pg-temp", repr(math.log10(t)), "input")
    z = torch.from_numpy(from_f32_base64(data["z"], data["z_dim"]).copy())
    rows = torch.cat([torch.arange(pairs), n + torch.arange(pairs)])
    logits, target = nt_xent_logits(z[:pairs], z[n:n + pairs], t)
    for row in (3, 2 * pairs - 1):
        x, y = browser.centre("#pg-matrix", 0.5, (row + 0.5) / (2 * pairs))
        browser.click(x, y)
        assert value(browser, "pg-anchor-id") == row
        p = F.softmax(logits[row].double(), 0)
        assert abs(value(browser, "pg-ppos") - float(p[target[row]])) <= 1e-4
        views = browser.js("[...document.querySelectorAll('#pg-views figure')].map(f => +f.dataset.view)")
        assert views == [int(rows[row]), int(rows[target[row]])]
        sims = F.normalize(z[rows], dim=1) @ F.normalize(z[rows[row]], dim=0)
        sims[[row, int(target[row])]] = -math.inf
        hardest = rows[sims.topk(5).indices].tolist()
        assert browser.js("[...document.querySelectorAll('#pg-hard figure')].map(f => +f.dataset.view)") == hardest
        bars = browser.js("document.querySelectorAll('#pg-softmax rect').length")
        assert bars == 2 * pairs - 1  # every candidate but the anchor itself
    # A row's first and last pixel lines select it: the matrix is drawn inside the canvas's border
    # (the bounding box is 2 px taller), and 41 of 128 such clicks chose a neighbouring row.
    # The events land on whole pixels: the first and the last pixel line whose top is inside the row.
    set_control(browser, "pg-batch", "32", "change")
    x, _ = browser.centre("#pg-matrix", 0.5, 0.5)
    top, inner, side = browser.js("(() => { const c = document.getElementById('pg-matrix'); "
                                  "return [c.getBoundingClientRect().y, c.clientTop, c.clientHeight]; })()")
    m = 64
    for row in range(m):
        for y in (math.ceil(top + inner + row * side / m), math.ceil(top + inner + (row + 1) * side / m) - 1):
            browser.click(x, y)
            assert value(browser, "pg-anchor-id") == row, (row, y)


def test_map_hover_click_and_legend(report: tuple[Path, Any], browser: Browser, tmp_path: Path) -> None:
    path, ds = report
    m = page_data(path)["map"]
    labels, count = np.array(m["labels"]), len(m["labels"])
    assert browser.js("document.querySelectorAll('#map svg circle[data-i]').length") == count
    point = browser.js("(() => { document.querySelector('#map svg').scrollIntoView({block: 'center'}); "
                       "for (const c of document.querySelectorAll('#map svg circle[data-i]')) { "
                       "const r = c.getBoundingClientRect(); "
                       "if (document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === c) return +c.dataset.i; "
                       "} return -1; })()")  # a point no other is drawn over
    assert point >= 0
    x, y = browser.centre(f'#map svg circle[data-i="{point}"]')
    browser.hover(x, y)
    assert browser.js("document.getElementById('map-hover').dataset.i") == str(point)
    drawn = browser.js("(() => { const c = document.querySelector('#map-hover canvas'); const d = c.getContext('2d')"
                       ".getImageData(0, 0, c.width, c.height).data; let s = 0; for (const v of d) s += v; return [c"
                       ".dataset.i, s]; })()")
    assert drawn[0] == str(point) and drawn[1] > 0  # the thumbnail is there and drawn
    browser.click(x, y)
    shown = browser.js("[...document.querySelectorAll('#map-neighbours figure')].map(f => +f.dataset.i)")
    # `fastclr neighbours` on a store of the map's images, asked about the same image.
    folder = tmp_path / "map-images"
    folder.mkdir()
    images = ds.test.images[evenly_spaced(len(ds.test), count)]
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0]).save(folder / f"{i:05d}.png")
    store = prepare_store(folder, tmp_path / "store", DecodeOptions(size=images.shape[1], channels="1"), workers=1,
                          progress=False, log=lambda s: None).store
    run = load_run(path.parent, torch.device("cpu"), "auto")
    found = neighbours(run, store, folder / f"{point:05d}.png", m["k"] + 1, torch.device("cpu"), log=lambda s: None)
    assert found[0][0] == f"{point:05d}.png"  # the image itself first
    assert shown == [int(Path(p).stem) for p, _ in found[1:]]
    cls = int(labels[point])
    x, y = browser.centre(f'#map g.legend[data-class="{cls}"]')
    browser.click(x, y)
    assert value(browser, "map-visible") == count - int((labels == cls).sum())
    browser.click(x, y)
    assert value(browser, "map-visible") == count


def test_a_hovered_view_shows_the_parameters_that_render_its_pixels(browser: Browser, report: tuple[Path, Any]) -> None:
    path, ds = report
    for r, j in ((0, 0), (1, 3), (3, 5)):
        view = browser.js(f"document.querySelectorAll('#augment .aug-row')[{r}].querySelectorAll('img[data-params]')"
                          f"[{j}].dataset.view")
        x, y = browser.centre(f'#augment img[data-view="{view}"]')
        browser.hover(x, y)
        shown = browser.js("document.getElementById('aug-detail').dataset.view")
        assert shown == view
        img = browser.js(f"(() => {{ const e = document.querySelector('#augment img[data-view=\"{view}\"]'); "
                         "return [e.dataset.params, e.src, e.closest('.aug-row').querySelector('img.original').alt]; })()")
        p = json.loads(img[0])
        text = browser.js("document.getElementById('aug-detail').textContent")
        assert ", ".join(str(v) for v in p["crop"]) in text
        # Render the stored image with exactly these parameters: the view's pixels come back.
        original = ds.pretrain.images[int(img[2].split()[-1])]
        j = p["jitter"] or {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
        params = ViewParams(box=torch.tensor([p["crop"]]), flip=torch.tensor([p["flip"]]),
                            jitter=torch.tensor([p["jitter"] is not None]),
                            brightness=torch.tensor([j["brightness"]]), contrast=torch.tensor([j["contrast"]]),
                            saturation=torch.tensor([j["saturation"]]), hue=torch.tensor([j["hue"]]),
                            gray=torch.tensor([p["grayscale"]]), blur_sigma=torch.tensor([p["blur_sigma"]]),
                            solarize=torch.tensor([p["solarize"]]),
                            erase=torch.tensor([p["erase"][:4] if p["erase"] else [0.0] * 4]),
                            erase_value=torch.tensor([p["erase"][4] if p["erase"] else 0.0]))
        cfg = load_run(path.parent, torch.device("cpu"), "fp32").config.augment
        rendered = augment(to_float(torch.from_numpy(original[None])), params, original.shape[0], cfg)[0, 0]
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(img[1].split(",", 1)[1])))).astype(np.float64)
        # The parameters are shown rounded (2 decimals for the crop, 4 for the factors).
        assert np.abs(rendered.numpy() * 255 - png).mean() < 2.0, view


def test_with_scripts_off_the_page_is_the_static_document(report: tuple[Path, Any], tmp_path: Path) -> None:
    b = Browser(chromium(), tmp_path / "profile", 1280, 900)
    try:
        b.call("Emulation.setScriptExecutionDisabled", value=True)
        b.open(report[0].resolve().as_uri())
        b.call("Emulation.setScriptExecutionDisabled", value=False)  # lets us read the page; its own scripts stay unrun
        shown = b.js("[...document.querySelectorAll('section')].filter(s => !s.hidden).map(s => s.id)")
        assert "playground" not in shown and {"curves", "views", "similarity", "augment", "map", "retrievals",
                                              "numbers", "config"} <= set(shown)
        assert b.js("document.getElementById('map-tools').hidden") is True
        assert b.js("document.querySelectorAll('#views img, #similarity img, #retrievals img').length") == 3
        assert b.js("[...document.querySelectorAll('#augment img[data-params]')].every(i => i.title.startsWith('crop x0'))")
        assert b.js("document.getElementById('render-check').dataset.status") == "pending"  # no script ran
    finally:
        b.close()


def test_the_page_data_block_cannot_be_ended_or_escaped_by_user_text() -> None:
    """Class names come from folder names: `<!--<script>` put Chromium's parser in the escaped
    script state and the data block swallowed the page's scripts; `</script>` would end it. The
    block holds no <, > or & at all, and parses back to the same values."""
    from fastclr.report.interactive import page_data as block

    names = ["<!--<script>", "a&b</script>", "<b>bold</b>", "plain"]
    text = block({"classes": names, "note": "x < y > z &amp;"})
    assert not set("<>&") & set(text)
    assert json.loads(text) == {"classes": names, "note": "x < y > z &amp;"}
