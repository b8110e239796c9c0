"""The report in a real browser: headless Chromium opens report.html from disk, the page's own
check confirms every section rendered, no console message or blocked request occurred, and a
screenshot is taken.

Skipped when no Chromium is installed, unless FASTCLR_REQUIRE_CHROMIUM=1 (CI sets it and
installs the `chromium` package), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from eval_fixtures import one_thread, tiny_dataset, tiny_run  # noqa: F401 (one_thread: autouse)
from fastclr.evaluation.options import EvaluateOptions
from fastclr.evaluation.run import evaluate
from fastclr.report.build import build_report

WINDOW = (1280, 5600)


def chromium() -> str:
    """Path of a Chromium binary, or skip (fail when FASTCLR_REQUIRE_CHROMIUM=1)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("FASTCLR_REQUIRE_CHROMIUM") == "1":
        pytest.fail("FASTCLR_REQUIRE_CHROMIUM=1 but no chromium on PATH; install it: apt-get install -y chromium")
    pytest.skip("chromium not installed (apt-get install -y chromium)")


def open_in_chromium(html: Path, work: Path) -> tuple[str, list[str], Path]:
    """Load `html` headless; returns the DOM after load, the console lines, and the screenshot path."""
    shot = work / "screenshot.png"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={work / 'profile'}", "--enable-logging=stderr", "--v=1", "--virtual-time-budget=10000",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", "--dump-dom", html.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    return r.stdout, console, shot


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = tiny_dataset()
    run_dir = tiny_run(tmp_path_factory.mktemp("browser") / "run", ds)
    opts = EvaluateOptions(labels_per_class=(2, 5), seeds=(0,), supervised_seeds=(0,), finetune_fractions=(0.1,),
                           steps=2, batch_size=16, quality_images=64, device="cpu")
    evaluate(run_dir, opts, dataset=ds, log=lambda s: None)
    return build_report(run_dir, device="cpu", dataset=ds)


def test_report_renders_every_section_in_chromium(report: Path, tmp_path: Path) -> None:
    dom, console, shot = open_in_chromium(report, tmp_path)
    check = re.search(r'<p id="render-check" data-status="(\w+)" data-sections="(\d+)">([^<]*)</p>', dom)
    assert check is not None, "the page's render check did not run"
    status, sections, text = check.groups()
    assert status == "ok", text
    assert int(sections) == report.read_text(encoding="utf-8").count("<section ") == 10
    assert console == []  # no console output at all: no errors, no CSP violations, no warnings
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == WINDOW
    assert len(data) > 100_000  # a page of charts and images, not a blank canvas (a blank one is ~10 kB)
    print(f"screenshot: {shot}")


def test_the_check_catches_a_network_request(report: Path, tmp_path: Path) -> None:
    """The harness itself: a page that tries to load from the network fails the check."""
    bad = tmp_path / "bad.html"
    bad.write_text(report.read_text(encoding="utf-8").replace("<main>", '<main><img src="http://127.0.0.1:9/x.png" alt="">', 1))
    dom, console, _ = open_in_chromium(bad, tmp_path)
    assert 'data-status="fail"' in dom and "blocked: http://127.0.0.1:9/x.png" in dom
    assert any("Content Security Policy" in line for line in console)


def test_a_small_run_with_hostile_class_names_renders_whole(tmp_path: Path) -> None:
    """20 training images (fewer than the playground's 32 pairs: its batch menu offered 32 and the
    script read past the embedded pairs) and class folder names that are markup (`<!--<script>`
    put the page's data block in the parser's escaped state, swallowing the scripts after it)."""
    import dataclasses

    from tiny import tiny_dataset as tiny_labelled

    ds = tiny_labelled(20, classes=4, n_test=12, name="hostile")
    ds = dataclasses.replace(ds, classes=["<!--<script>", "a&b</script>", "<b>bold</b>", "plain"])
    from fastclr.pretraining import pretrain
    from tiny import tiny_config

    run_dir = tmp_path / "run"
    pretrain(tiny_config(run_dir, train__batch_size=8, train__epochs=1.0, train__device="cpu"), dataset=ds,
             log=lambda s: None, progress=False)
    report = build_report(run_dir, device="cpu", dataset=ds)
    dom, console, _ = open_in_chromium(report, tmp_path)
    check = re.search(r'<p id="render-check" data-status="(\w+)" data-sections="(\d+)">([^<]*)</p>', dom)
    assert check is not None and check.group(1) == "ok", check.group(3) if check else dom[-2000:]
    assert console == []
    menu = re.search(r'<select id="pg-batch">(.*?)</select>', dom, re.S)
    assert menu is not None and re.findall(r"<option[^>]*>(\d+)</option>", menu.group(1)) == ["4", "8", "16"]
    drawn = re.search(r'<canvas id="pg-matrix"[^>]*data-batch="(\d+)"', dom)
    assert drawn is not None and drawn.group(1) == "16"  # the largest batch that fits the 20 pairs
