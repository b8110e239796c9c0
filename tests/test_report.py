"""The report's parts (PNG, chart ticks, t-SNE) against references, and the page it writes."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import sealed
from eval_fixtures import alter_encoder, one_thread, tiny_dataset, tiny_run  # noqa: F401 (one_thread: autouse)
from fastclr.data import Dataset, ImageSet
from fastclr.evaluation.options import EvaluateOptions
from fastclr.evaluation.run import evaluate
from fastclr.evaluation.knn import cosine_topk
from fastclr.evaluation.features import encode, evenly_spaced, view_pairs
from fastclr.pretrained import load_run
from fastclr.report import figures
from fastclr.report.build import VIEW_IMAGES, build_report
from fastclr.runtime import FP32, Precision
from fastclr.runs import read_metrics
from fastclr.report.embedding_map import affinities, squared_distances, tsne
from fastclr.report.png import encode_png, viridis
from fastclr.report.svg import Series, nice_ticks, tick_label

SECTIONS = ("curves", "views", "similarity", "playground", "augment", "map", "retrievals", "efficiency", "numbers",
            "config")


def decode_png(data: bytes) -> tuple[int, int, int, np.ndarray]:
    """A literal reading of the PNG spec for what encode_png writes: chunks with CRCs, IHDR, zlib IDAT."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(tag + body)
        chunks[tag] = body
        pos += 12 + length
    w, h, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    channels = {0: 1, 2: 3}[colour]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * channels)
    assert (raw[:, 0] == 0).all()  # filter type "none" on every row
    return w, h, depth, raw[:, 1:].reshape(h, w, channels)


@pytest.mark.parametrize("shape", [(5, 7), (4, 9, 3)])
def test_png_round_trip(shape: tuple[int, ...]) -> None:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    w, h, depth, pixels = decode_png(encode_png(img))
    assert (w, h, depth) == (shape[1], shape[0], 8)
    np.testing.assert_array_equal(pixels.reshape(img.shape), img)
    pil = pytest.importorskip("PIL.Image")  # an independent decoder, when present
    import io

    np.testing.assert_array_equal(np.asarray(pil.open(io.BytesIO(encode_png(img)))), img)


def test_viridis_ends_and_ticks() -> None:
    np.testing.assert_array_equal(viridis(np.array([0.0, 1.0])), [[68, 1, 84], [253, 231, 37]])
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(66.05, 83.3) == [65, 70, 75, 80, 85]  # covers the data: first tick <= min, last >= max
    assert [tick_label(v) for v in (2500.0, 0.25, 0.0015, 0.002)] == ["2500", "0.25", "0.0015", "0.002"]


def test_tsne_affinities_hit_the_perplexity_and_the_map_keeps_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g) * 4
    y = torch.arange(240) % 3
    x = centres[y] + torch.randn(240, 20, generator=g)
    p = affinities(squared_distances(x) / 10, 15.0)
    entropy = -(p * p.clamp(min=1e-30).log()).sum(1)
    torch.testing.assert_close(entropy, torch.full((240,), math.log(15.0)), atol=1e-3, rtol=0)
    m = tsne(x, perplexity=15, iters=300)
    d = torch.cdist(m, m).fill_diagonal_(math.inf)
    assert (y[d.argmin(1)] == y).all()  # every point's nearest neighbour in the map is of its cluster
    torch.testing.assert_close(m, tsne(x, perplexity=15, iters=300))  # deterministic


@pytest.mark.parametrize("precision", [FP32, Precision("bf16", "shortlist")], ids=["exact", "bf16-shortlist"])
def test_nearest_matches_brute_force_and_excludes_self(precision: Precision, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fastclr.evaluation.knn.bf16_native_on", lambda device_type: True)  # the shortlist runs
    bank, q = torch.randn(50, 6), torch.randn(4, 6)
    _, got = cosine_topk(bank, q, 3, precision)
    for i in range(4):
        sims = [float(torch.cosine_similarity(q[i], b, dim=0)) for b in bank]
        assert got[i].tolist() == list(np.argsort(sims)[::-1][:3])
    assert 7 not in cosine_topk(bank, bank[[7]], 5, precision, exclude=torch.tensor([7]))[1][0].tolist()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    ds = tiny_dataset()
    return tiny_run(tmp_path_factory.mktemp("report") / "run", ds), ds


def test_report_without_evaluation_says_what_to_run(run: tuple[Path, Dataset], tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(run[0], tmp_path / "run"))
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=run[1]).read_text()
    # --out in a folder that does not exist yet: made, as embed makes its --out's folder
    elsewhere = build_report(run_dir, out=tmp_path / "new" / "r.html", device="cpu", map_method="pca", dataset=run[1])
    assert elsewhere.read_text().count('<section id="') == html.count('<section id="') == len(SECTIONS)
    for sid in SECTIONS:
        assert f'<section id="{sid}"' in html
    assert f"No evaluation yet: run <code>fastclr evaluate {run_dir}</code>" in html
    assert "<title>fastclr report: run</title>" in html
    # Self-contained: a CSP that forbids every fetch, and nothing that would need one.
    assert "content=\"default-src 'none'; img-src data:;" in html
    assert not re.search(r'(src|href)="(?!data:)', html) and "url(" not in html and "@import" not in html


def section_html(html: str, sid: str) -> str:
    """The HTML of one section of the report."""
    start = html.index(f'<section id="{sid}"')
    return html[start:html.index("</section>", start)]


def test_a_report_of_the_current_directory_is_titled_with_its_name(run: tuple[Path, Dataset], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`fastclr report .` was titled "fastclr report: " (the name of "." is empty)."""
    run_dir = Path(shutil.copytree(run[0], tmp_path / "my-run"))
    monkeypatch.chdir(run_dir)
    html = build_report(Path("."), device="cpu", map_method="pca", dataset=run[1]).read_text()
    assert "<title>fastclr report: my-run</title>" in html


def test_report_with_evaluation_shows_the_curve_and_numbers(run: tuple[Path, Dataset], tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(run[0], tmp_path / "run"))
    opts = EvaluateOptions(protocols=("linear", "fewshot", "supervised"), labels_per_class=(2, 5), seeds=(0,),
                           supervised_seeds=(0,), steps=2, batch_size=16, device="cpu")
    out = evaluate(run_dir, opts, dataset=run[1], log=lambda s: None)
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=run[1]).read_text()
    assert "No evaluation yet" not in html and 'aria-label="Label efficiency"' in html
    assert f"{100 * out['protocols']['linear']['accuracy']:.2f}%" in html
    # the few-label lift beside its untrained figure, as the linear probe's (it was in eval.json alone)
    few, untrained = out["protocols"]["fewshot"]["curve"][0], out["protocols"]["fewshot"]["random_init_curve"][0]
    rows = [re.split(r"\s{2,}", line.strip()) for line in section_html(html, "numbers").splitlines()]
    assert next(r for r in rows if r[0] == "2")[:4] == [
        "2", f"{100 * few['mean']:.2f}% (1 seed)", f"{100 * untrained['mean']:.2f}% (1 seed)",
        f"{100 * (few['mean'] - untrained['mean']):+.2f} points"]
    # The curve's points are eval.json's means: each marker names its (labels, accuracy).
    points = re.findall(r"<title>([^<:]+): ([\d.]+), ([\d.]+)</title>", section_html(html, "efficiency"))
    p = out["protocols"]
    for name, curve in (("linear probe on h (self-supervised)", p["fewshot"]["curve"]),
                        ("linear probe on h, same net untrained", p["fewshot"]["random_init_curve"]),
                        ("supervised from scratch", p["supervised"]["curve"])):
        drawn = [(float(x), float(y)) for n, x, y in points if n == name]
        assert drawn == [(e["labels_per_class"], pytest.approx(100 * e["mean"], abs=5e-3)) for e in curve], name
    assert "out of date" not in html
    out["encoder_sha256"] = "0" * 64  # as if the run had been trained further after `evaluate`
    (run_dir / "eval.json").write_text(json.dumps(sealed(out)))
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=run[1]).read_text()
    for part in ("efficiency", "numbers"):  # the curve is out of date as much as the table
        assert "These numbers are out of date</b>: eval.json was computed for other encoder weights" in \
            section_html(html, part), part
    # the same weights, but the store prepared again since (its content identity changed)
    out["encoder_sha256"] = json.loads((run_dir / "eval.json").read_text())["encoder_sha256_after"]
    (run_dir / "eval.json").write_text(json.dumps(sealed({**out, "data_content": "a" * 64})))
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=run[1]).read_text()
    assert "eval.json was computed for other data than the run's now" in section_html(html, "efficiency")


def test_a_moved_run_is_named_as_it_is_now_and_advice_names_its_folder(run: tuple[Path, Dataset],
                                                                      tmp_path: Path) -> None:
    """`cp -a base renamed; fastclr report renamed`: the Numbers named `base` (eval.json's run_dir),
    and the advice for a few-label curve named a literal RUN_DIR."""
    old = Path(shutil.copytree(run[0], tmp_path / "base"))
    evaluate(old, EvaluateOptions(protocols=("knn",), device="cpu"), dataset=run[1], log=lambda s: None)
    moved = Path(shutil.copytree(old, tmp_path / "renamed"))
    shutil.rmtree(old)
    html = build_report(moved, device="cpu", map_method="pca", dataset=run[1]).read_text()
    numbers = section_html(html, "numbers")
    assert f"<pre>{moved}: " in numbers and f"results in {moved}/eval.json</pre>" in numbers
    assert str(old) + ":" not in numbers and f"{old}/" not in numbers
    assert (f'<p class="note">eval.json holds no few-label results: run <code>fastclr evaluate {moved} --protocols '
            f"fewshot,supervised</code>, then <code>fastclr report {moved}</code> again.</p>") in \
        section_html(html, "efficiency")


def test_a_report_of_an_unfinished_run_says_at_which_step(run: tuple[Path, Dataset], tmp_path: Path) -> None:
    """A run stopped at step 3 (no exported encoder): the terminal said so, the report did not, in its
    header or its numbers, though eval.json records the step."""
    from fastclr.pretraining.loop import pretrain
    from tiny import tiny_config

    run_dir = tmp_path / "stopped"
    cfg = tiny_config(run_dir, train__batch_size=64, train__epochs=1.0, train__device="cpu")
    assert pretrain(cfg, dataset=run[1], log=lambda s: None, progress=False, stop=lambda step: step == 3).stopped
    out = evaluate(run_dir, EvaluateOptions(protocols=("knn",), device="cpu"), dataset=run[1], log=lambda s: None)
    assert out["checkpoint_step"] == 3
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=run[1]).read_text()
    words = ("the checkpoint of step 3 (the run has no exported encoder: it stopped before its end, is still training, "
             "or its export is gone)")
    assert f'<p class="note">{run_dir} · the encoder of {words} · cnn encoder' in html
    dim = out["encoder"]["feature_dim"]
    assert f"<pre>{run_dir}: cnn encoder (h: {dim}-d) on fashion-mnist, measured at {words}\n" in section_html(html,
                                                                                                              "numbers")
    finished = build_report(run[0], out=tmp_path / "r.html", device="cpu", map_method="pca", dataset=run[1])
    assert "unfinished" not in finished.read_text()


def test_the_probe_line_says_when_probe_json_measured_other_weights(run: tuple[Path, Dataset], tmp_path: Path) -> None:
    """probe.json stays when a finished run trains on and stops, or stops during its probe: its
    line was shown as the probe of the weights the report shows. By the checksum it records, and
    in an older probe.json without one by its step against the checkpoint the encoder came from."""
    from fastclr.evaluation.features import state_checksum
    from fastclr.report.build import _probe_line

    run_dir = tiny_run(tmp_path / "run", run[1], eval__probe=True)
    loaded = load_run(run_dir, log=lambda s: None)
    record = json.loads((run_dir / "probe.json").read_text())
    assert record["encoder_sha256"] == state_checksum(loaded.encoder)
    assert _probe_line(loaded, state_checksum(loaded.encoder)).startswith("Linear probe at the end of pretraining")
    assert "out of date" not in _probe_line(loaded, state_checksum(loaded.encoder))
    assert _probe_line(loaded, "0" * 64).endswith(" (out of date: measured on other weights than the run holds now).")
    del record["encoder_sha256"]
    (run_dir / "probe.json").write_text(json.dumps(record))
    at = dataclasses.replace(loaded, checkpoint_step=record["steps"])
    assert "out of date" not in _probe_line(at, "0" * 64) and "out of date" not in _probe_line(loaded, "0" * 64)
    assert "out of date" in _probe_line(dataclasses.replace(loaded, checkpoint_step=record["steps"] - 1), "0" * 64)


def test_the_similarity_matrix_shows_the_cosines_of_the_runs_own_view_pairs(run: tuple[Path, Dataset],
                                                                            tmp_path: Path) -> None:
    """Decode the embedded heatmap and compare every cell's colour with viridis of the cosine
    similarity recomputed here from the run's encoder on the same view pairs."""
    run_dir, ds = Path(shutil.copytree(run[0], tmp_path / "run")), run[1]
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=ds, precision="fp32").read_text()
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', section_html(html, "similarity"))
    assert uri is not None
    _, _, _, pixels = decode_png(base64.b64decode(uri.group(1)))
    r = load_run(run_dir, precision="fp32")
    images = ds.pretrain.images[evenly_spaced(len(ds.pretrain), VIEW_IMAGES)]
    _, views = view_pairs(images, r.config.augment, 0, r.mean, r.std, torch.device("cpu"))
    z = torch.nn.functional.normalize(encode(r.encoder, views, FP32), dim=1)
    sim = (z @ z.T).numpy()
    lo = 0.0 if sim.min() >= 0 else -1.0
    cell = pixels.shape[0] // sim.shape[0]
    centres = pixels[cell // 2 :: cell, cell // 2 :: cell][: sim.shape[0], : sim.shape[1]]  # (2B, 2B, 3)
    assert np.abs(centres.astype(int) - viridis((sim - lo) / (1 - lo)).astype(int)).max() <= 2
    n = sim.shape[0] // 2
    positives = float(np.concatenate([np.diag(sim, n), np.diag(sim, -n)]).mean())
    assert f"mean cosine {positives:.3f} for positives" in section_html(html, "similarity")


@pytest.mark.parametrize("labelled", ["none", "all -1"])
def test_report_of_an_unlabelled_dataset(run: tuple[Path, Dataset], tmp_path: Path, labelled: str) -> None:
    """Pretraining images without labels, or (as an unlabelled store gives them, for --supcon) all
    -1: the map was then "coloured by class" and every neighbour "shared the query's class" -1."""
    run_dir = Path(shutil.copytree(run[0], tmp_path / "run"))
    x = run[1].pretrain.images
    images = ImageSet(x, None if labelled == "none" else np.full(len(x), -1, np.int64))
    unlabelled = Dataset("my-photos", images, None, None, [])
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=unlabelled).read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}"' in html
    assert "pretraining images (evenly spaced)" in html and "coloured by class" not in html
    assert "share the query's class" not in html  # nothing to compare without labels
    # The advice was `fastclr evaluate RUN_DIR` (the default protocols, which need labels, and a literal
    # RUN_DIR), then with an eval.json `--protocols fewshot,supervised`: both refused on this data.
    why = ("my-photos has no labelled train and test splits, so there is no label-efficiency curve (the few-label "
           "probe and the supervised baseline need labels)")
    quality = (f"{why}: run <code>fastclr evaluate {run_dir} --protocols quality</code>, then <code>fastclr report "
               f"{run_dir}</code> again, for its label-free measures.")
    assert f'<p class="note">{quality}</p>' in section_html(html, "efficiency")
    assert f'<p class="note">{quality}</p>' in section_html(html, "numbers")
    evaluate(run_dir, EvaluateOptions(protocols=("quality",), quality_images=32, device="cpu"), dataset=unlabelled,
             log=lambda s: None)
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=unlabelled).read_text()
    assert f'<p class="note">{why}; its label-free measures are under Numbers.</p>' in section_html(html, "efficiency")
    assert "RUN_DIR" not in html and "fewshot" not in html


def test_training_curves_name_every_logged_value_on_hover(run: tuple[Path, Dataset], tmp_path: Path) -> None:
    """Hovering a point of the loss curve shows its step and loss (an SVG <title>: no script needed)."""
    run_dir = Path(shutil.copytree(run[0], tmp_path / "run"))
    html = section_html(build_report(run_dir, device="cpu", map_method="pca", dataset=run[1]).read_text(), "curves")
    shown = re.findall(r'<circle class="hover"[^>]*><title>NT-Xent loss: ([^,]+), ([^<]+)</title>', html)
    logged = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [(float(s), float(v)) for s, v in shown] == [(float(r["step"]), float(f"{r['loss']:.4g}")) for r in logged]
    assert len(logged) >= 2


def test_the_explorer_names_an_erased_rectangle_and_only_when_there_is_one() -> None:
    from fastclr.augment import sample_params
    from fastclr.config import AugmentConfig
    from fastclr.report.interactive import describe_view, params_text

    p = sample_params(AugmentConfig(erase_p=0.0), 2, 28, 28, torch.Generator().manual_seed(0), torch.device("cpu"))
    p.erase = torch.tensor([[0.25, 0.5, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0]])
    p.erase_value = torch.tensor([0.7, 0.3])
    first, second = describe_view(p, 0, (28, 28)), describe_view(p, 1, (28, 28))
    assert first["erase"] == [0.25, 0.5, 0.5, 0.25, 0.7] and second["erase"] is None
    assert params_text(first).endswith("; erased x0 0.25 y0 0.50 w 0.50 h 0.25 to 0.70")
    assert "erased" not in params_text(second)


def test_retrieval_queries_exclude_their_own_bank_row_and_only_that() -> None:
    """Queries from the bank's split exclude themselves; a query the evenly spaced bank left out
    excludes nothing (it excluded the bank row at its insertion point: a real neighbour)."""
    from fastclr.report.build import own_rows

    bank = np.arange(0, 50_000, 3)  # every third image of 50,000
    queries = np.array([0, 1, 2, 3, 49_998, 49_999])
    rows = own_rows(bank, queries)
    assert rows.tolist() == [0, -1, -1, 1, 16_666, -1]
    assert all(bank[r] == q for r, q in zip(rows, queries) if r >= 0)
    features = torch.randn(20, 6)
    assert cosine_topk(features, features[[7]], 1, FP32, exclude=torch.tensor([-1]))[1].tolist() == [[7]]


def test_maps_of_one_point_and_of_identical_points_are_finite() -> None:
    """A store whose test split holds one image, and a collapsed encoder (every h the same): the map
    is a point, or one spot, not a crash or NaN; one point has no neighbours to list."""
    from fastclr.report.embedding_map import pca
    from fastclr.report.interactive import map_neighbours

    assert torch.equal(tsne(torch.ones(60, 16)), torch.zeros(60, 2))
    assert tsne(torch.randn(1, 8)).shape == (1, 2) and pca(torch.randn(1, 8), 2).shape == (1, 2)
    full = pca(torch.randn(5, 3, dtype=torch.float64), 2)
    assert full.shape == (5, 2) and torch.allclose(full.T @ full, torch.diag(torch.diag(full.T @ full)), atol=1e-9)
    near, sims = map_neighbours(torch.randn(1, 8))
    assert near.shape == sims.shape == (1, 0)


def test_the_probe_line_without_evaluation_gives_the_untrained_reference_and_flags_a_small_lift() -> None:
    from fastclr.report.build import probe_summary

    line = probe_summary({"accuracy": 0.9, "random_init_accuracy": 0.88, "steps": 12, "train_seconds": 3.4})
    assert line == ("Linear probe at the end of pretraining: 90.00% after 12 steps (3 s of training); the same "
                    "network untrained: 88.00%, lift +2.00 points; SMALL: most of it is the architecture's.")
    assert "SMALL" not in probe_summary({"accuracy": 0.9, "random_init_accuracy": 0.8})
    assert probe_summary({"accuracy": 0.9, "train_seconds": None}) == "Linear probe at the end of pretraining: 90.00%."
    assert probe_summary({"steps": 2}) == ""


SHOWN = {"run_dir": "r", "dataset": "d", "encoder": {"encoder": "cnn", "feature_dim": 8}, "total_seconds": 1.0,
         "protocols": {"linear": {"accuracy": 0.9, "labels": 10, "random_init": {"accuracy": 0.8}}}}
"""The least an eval.json holds for its table to be shown."""


@pytest.mark.parametrize("text, why", [
    ('{"protocols": ', r"Expecting value"), ("[1]", "a JSON list, not an object"), ("\udcff", "can't decode byte"),
    # hand edits: KeyError 'protocols' and TypeErrors reached the user as tracebacks
    ("{}", 'no "protocols" object'),
    (json.dumps(sealed({**SHOWN, "protocols": {"linear": {**SHOWN["protocols"]["linear"], "accuracy": "0.9"}}})),
     "a figure of another kind than an evaluation holds: unsupported operand type"),
    (json.dumps(sealed({**SHOWN, "protocols": {"linear": {"accuracy": None, "labels": 10}}})),
     "a figure of another kind than an evaluation holds: unsupported operand type"),
    (json.dumps(sealed({k: v for k, v in SHOWN.items() if k != "encoder"})),
     "no 'encoder' where an evaluation holds one"),
])
def test_a_damaged_eval_json_is_one_line_naming_it(tmp_path: Path, text: str, why: str) -> None:
    from fastclr.errors import FastclrError
    from fastclr.evaluation.run import read_eval

    (tmp_path / "eval.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(FastclrError) as e:
        read_eval(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'eval.json'} is damaged (") and why in message and "\n" not in message
    assert message.endswith(f"; run `fastclr evaluate {tmp_path}` again, which keeps it as eval.json.damaged and "
                            "writes a new one")
    (tmp_path / "eval.json").write_text(json.dumps(sealed(SHOWN)))
    assert read_eval(tmp_path) == sealed(SHOWN)


def test_an_eval_json_without_its_checksum_or_not_matching_it_is_not_read(tmp_path: Path) -> None:
    """Figures edited with the checksum deleted too would otherwise be read, and carried by the
    next evaluation under a valid one."""
    from fastclr.errors import FastclrError
    from fastclr.evaluation.run import read_eval

    fix = f"run `fastclr evaluate {tmp_path}` again, which keeps it as eval.json.damaged and writes a new one"
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(SHOWN))
    with pytest.raises(FastclrError) as e:
        read_eval(tmp_path)
    assert str(e.value) == f"{path} holds no content_sha256, so its figures cannot be told from edited ones; {fix}"
    path.write_text(json.dumps({**sealed(SHOWN), "total_seconds": 2.0}))
    with pytest.raises(FastclrError) as e:
        read_eval(tmp_path)
    assert str(e.value) == (f"{path} no longer matches its content_sha256 (edited or damaged since `fastclr evaluate` "
                            f"wrote it); {fix}")


def test_a_report_of_a_run_with_a_hand_edited_eval_json_is_one_line(run: tuple[Path, Dataset], tmp_path: Path) -> None:
    """The report read the figures eval.json holds where the table does not (a one-seed curve's std):
    one line too, not a TypeError from the chart."""
    from fastclr.errors import FastclrError

    run_dir = Path(shutil.copytree(run[0], tmp_path / "run"))
    curve = [{"labels_per_class": 2, "mean": 0.5, "std": "x", "runs": [{"subset": "a", "accuracy": 0.5}]}]
    (run_dir / "eval.json").write_text(json.dumps(sealed({**SHOWN, "protocols": {"fewshot": {"curve": curve}}})))
    with pytest.raises(FastclrError, match=r"^\S+eval.json is damaged \(a figure of another kind than an evaluation "
                                           r"holds: .*\); run `fastclr evaluate \S+` again, which keeps it as "
                                           r"eval.json.damaged and writes a new one$"):
        build_report(run_dir, device="cpu", map_method="pca", dataset=run[1])


def test_a_fault_in_drawing_the_curve_is_not_blamed_on_eval_json(run: tuple[Path, Dataset], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every error inside the label-efficiency chart was reported as "eval.json is damaged", and the fix
    it gave (evaluate again) could not help: only reading the file's figures is blamed on it."""
    from fastclr.errors import FastclrError

    run_dir = Path(shutil.copytree(run[0], tmp_path / "run"))
    curve = [{"labels_per_class": 2, "mean": 0.5, "std": 0.1, "runs": [{"subset": "a", "accuracy": 0.5}]}]
    (run_dir / "eval.json").write_text(json.dumps(sealed({**SHOWN, "protocols": {"fewshot": {"curve": curve}}})))

    drawn = figures.line_chart

    def fault(series: list[Series], title: str, *a: Any, **k: Any) -> str:
        if title == "Label efficiency":
            raise ValueError("a fault of the drawing")
        return drawn(series, title, *a, **k)
    monkeypatch.setattr(figures, "line_chart", fault)
    with pytest.raises(ValueError, match="^a fault of the drawing$"):
        build_report(run_dir, device="cpu", map_method="pca", dataset=run[1])
    # a count no evaluation writes, which only the log axis could not take, is still the file's
    for odd, named in ((0, "0.0"), (float("inf"), "inf")):  # (the infinite one was named by the smallest count)
        (run_dir / "eval.json").write_text(json.dumps(sealed({**SHOWN, "protocols": {"fewshot": {"curve": [
            curve[0], dict(curve[0], labels_per_class=odd)]}}})))
        with pytest.raises(FastclrError, match=r"^\S+eval.json is damaged \(a figure of another kind than an "
                                               rf"evaluation holds: labels per class of {named}\); run `fastclr evaluate"):
            build_report(run_dir, device="cpu", map_method="pca", dataset=run[1])


def test_metrics_values_that_are_null_are_left_out_and_others_that_are_not_numbers_are_one_line(
        tmp_path: Path) -> None:
    """A metrics.jsonl saved by pandas (NaN written as null) crashed the report with a TypeError; a
    null is that value missing, left out of its curve as NaN is. A string or non-UTF-8 bytes (a
    UnicodeDecodeError before) are damage: one line naming the file and record."""
    from fastclr.errors import FastclrError
    from fastclr.report.build import _metrics

    records = [{"step": 2, "loss": 4.0, "lr": 0.1}, {"step": 4, "loss": None, "lr": 0.2},
               {"step": 6, "loss": 3.0, "lr": None}, {"step": 8, "knn_acc": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    charts = figures.training_curves(_metrics(tmp_path))
    titles = lambda svg, name: re.findall(rf"<title>{name}: ([^<]+)</title>", svg)  # noqa: E731
    assert titles(charts[0], "NT-Xent loss") == ["2, 4", "6, 3"]
    assert titles(charts[2], "learning rate") == ["2, 0.1", "4, 0.2"]
    assert charts[3].endswith("Online kNN monitor accuracy: no data</text></svg>")
    path = tmp_path / "metrics.jsonl"
    fix = "the file was edited or damaged: repair it, or move it away to report the run without training curves"
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps({"step": 4, "loss": "3.5"}) + "\n")
    with pytest.raises(FastclrError) as e:
        _metrics(tmp_path)
    assert str(e.value) == f'{path} record 2 holds \'loss\': "3.5", not a number; {fix}'
    path.write_bytes(json.dumps(records[0]).encode() + b"\n\xd7\xff garbage\n")
    with pytest.raises(FastclrError) as e:
        _metrics(tmp_path)
    assert str(e.value) == f"{path} line 2 is not UTF-8 text (byte 0xd7); {fix}"  # its way out named too
    path.write_text(json.dumps(records[0]) + "\nnot json\n" + json.dumps(records[1]) + "\n")
    with pytest.raises(FastclrError) as e:
        _metrics(tmp_path)
    assert str(e.value) == f"{path} record 2 is not JSON (Expecting value); {fix}"


def test_a_last_metrics_line_cut_short_is_left_out_and_said(tmp_path: Path) -> None:
    """A half-written last record was dropped without a word, and where it was the only one the page
    said "This run has no metrics.jsonl" of a file that was there."""
    from fastclr.report.build import _curves_section
    from fastclr.runs import metrics_cut_short, read_metrics

    path, whole = tmp_path / "metrics.jsonl", json.dumps({"step": 2, "loss": 4.0}) + "\n"
    said = "The last line of metrics.jsonl was cut short"
    # a whole last record without its newline (as some writers leave one) is kept, and not called cut short
    for text, records, cut in ((whole, 1, False), (whole + '{"step": 4, "lo', 1, True), ('{"step": 4, "lo', 0, True),
                               (whole + "  ", 1, False), ("", 0, False), (whole + '{"step": 4}', 2, False),
                               (whole + '{"step": 4}  ', 2, False), (whole + '{"step": "4"}', 1, True)):
        path.write_text(text)
        assert (len(read_metrics(tmp_path)), metrics_cut_short(tmp_path)) == (records, cut), text
        page = _curves_section(tmp_path)
        assert (said in page, "This run has no whole record." in page) == (cut, records == 0), text
    path.unlink()
    assert "This run has no metrics.jsonl." in _curves_section(tmp_path) and not metrics_cut_short(tmp_path)


def test_a_chart_leaves_out_points_that_are_not_finite() -> None:
    from fastclr.report.svg import Series, line_chart

    svg = line_chart([Series("loss", [1.0, 2.0, 3.0, 4.0], [float("nan"), 3.0, float("inf"), 2.0], "#000")],
                     "t", "step", "loss")
    clean = line_chart([Series("loss", [2.0, 4.0], [3.0, 2.0], "#000")], "t", "step", "loss")
    assert "nan" not in svg and "inf" not in svg and svg == clean


def test_a_scatter_of_many_classes_shows_every_legend_line_and_a_collapsed_axis_sits_in_the_middle() -> None:
    """40 classes: the legend's lines 28 to 39 were below the fixed 480 px picture (CIFAR-100 lost 72
    of 100); a long name ran past the right edge; a map without spread sat in the bottom-left corner."""
    from fastclr.report.svg import LEGEND_CHARS, scatter_chart

    names = [f"class {k}" for k in range(39)] + ["golden_retriever_puppies_outdoors"]
    svg = scatter_chart(np.zeros((3, 2)), np.array([0, 1, 39]), names, "map")
    height = int(re.search(r'height="(\d+)"', svg).group(1))  # type: ignore[union-attr]
    lines = [float(y) for y in re.findall(r'<text x="[\d.]+" y="([\d.]+)">', svg)]
    assert len(lines) == 40 and max(lines) <= height
    assert f">{names[-1][:LEGEND_CHARS - 1]}\u2026</text><title>{names[-1]}</title>" in svg
    centre = 10 + 0.5 * (640 - 150 - 20), 24 + 0.5 * (480 - 34)  # the map's own area, not the legend's height
    assert re.findall(r'cx="([\d.]+)" cy="([\d.]+)" r="2.6"', svg) == [(f"{centre[0]:.1f}", f"{centre[1]:.1f}")] * 3


def test_the_map_keeps_its_shape_whatever_the_legend_needs() -> None:
    """The same points span the same 470 x 446 px with 10 classes and with 100: the legend's 100
    lines made the picture 1634 px tall, and the map was drawn over that height (3.4 : 1)."""
    from fastclr.report.svg import scatter_chart

    xy = np.random.default_rng(0).normal(size=(500, 2))
    spans = []
    for k in (10, 100):
        svg = scatter_chart(xy, np.arange(500) % k, [f"c{i}" for i in range(k)], "map")
        at = np.array(re.findall(r'cx="([\d.]+)" cy="([\d.]+)" r="2.6"', svg), dtype=np.float64)
        spans.append(at.max(0) - at.min(0))
    np.testing.assert_allclose(spans[0], [470, 446], atol=0.11)
    np.testing.assert_array_equal(spans[1], spans[0])


def test_one_value_sits_mid_axis_and_an_accuracy_axis_stops_at_its_limit() -> None:
    """One kNN monitor record (a one-epoch run) drew its 0.92 at the bottom of an axis to 2.0; a band
    of mean + std near 100% labelled ticks above 100."""
    from fastclr.report.svg import Series, line_chart

    svg = line_chart([Series("kNN", [5.0], [0.92], "#000", markers=True)], "t", "step", "accuracy",
                     y_limits=(0.0, 1.0))
    ticks = [float(t) for t in re.findall(r'text-anchor="end" fill="#555">([^<]*)<', svg)]
    height = int(re.search(r'height="(\d+)"', svg).group(1))  # type: ignore[union-attr]
    top = 24 + 14  # the title and one legend line
    assert max(ticks) <= 1 and min(ticks) < 0.92 < max(ticks)
    assert float(re.search(r'cy="([\d.]+)"', svg).group(1)) == pytest.approx((top + height - 44) / 2, abs=0.05)  # type: ignore[union-attr]
    band = Series("probe", [1.0, 10.0], [96.0, 99.0], "#000", lo=[94.0, 97.5], hi=[98.0, 100.5])
    ticks = [float(t) for t in re.findall(r'text-anchor="end" fill="#555">([^<]*)<',
                                          line_chart([band], "t", "x", "y", y_limits=(0.0, 100.0)))]
    assert max(ticks) == 100 and min(ticks) <= 94


def test_large_images_are_shown_shrunk_by_block_means() -> None:
    """224 px images: the map's sprite holds 48 px thumbnails, each the rounded mean of its 5 x 5
    blocks (float64 here), and the views and retrieval grids keep every image within 96 px."""
    from fastclr.report.interactive import MAP_THUMB_SIDE, map_thumbnails, sprite
    from fastclr.report.png import SHOWN_SIDE, shrink

    images = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    thumbs = map_thumbnails(images)
    want = np.round(images[:, :220, :220].astype(np.float64).reshape(3, 44, 5, 44, 5, 3).mean(axis=(2, 4)))
    assert thumbs.shape == (3, 44, 44, 3) and 44 <= MAP_THUMB_SIDE
    np.testing.assert_array_equal(thumbs, want.astype(np.uint8))
    assert png_pixels(sprite(thumbs)).shape == (44, 50 * 44, 3)
    small = images[:, :28, :28]
    assert shrink(small, SHOWN_SIDE) is small  # images already small enough are as they are
    grid = img_pixels(figures.view_pairs_grid(images[:1], torch.rand(2, 3, 224, 224)))
    assert grid.shape[0] <= SHOWN_SIDE + 2 + 16  # one triple: its image, a 1 px frame, the 8 px gap around cells
    hits = img_pixels(figures.retrievals(images[:1], None, images[None, :2], None))
    assert hits.shape[0] <= SHOWN_SIDE + 6




def test_a_report_never_replaces_a_file_of_the_run(run: tuple[Path, Dataset], tmp_path: Path) -> None:
    """`report --out RUN/encoder.safetensors` wrote HTML over the encoder, and the run was lost."""
    from fastclr.errors import FastclrError

    run_dir, ds = run
    for name in ("encoder.safetensors", "config.toml", "metrics.jsonl"):
        before = (run_dir / name).read_bytes()
        with pytest.raises(FastclrError, match=f"would replace the run's own {name}, which the run needs; choose"):
            build_report(run_dir, out=run_dir / name, device="cpu", dataset=ds)
        assert (run_dir / name).read_bytes() == before
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    with pytest.raises(FastclrError, match="is in the run's checkpoints folder, which holds its checkpoints alone"):
        build_report(run_dir, out=checkpoint, device="cpu", dataset=ds)


def test_a_report_on_an_encoder_giving_nan_is_one_line(run: tuple[Path, Dataset], tmp_path: Path) -> None:
    """NaN features crashed the colour map with an IndexError (and t-SNE, and JSON, further on)."""
    from fastclr.errors import FastclrError

    run_dir, ds = run
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    alter_encoder(bad, lambda w: w.fill_(float("nan")))
    with pytest.raises(FastclrError, match=r"own images hold NaN or infinite values \(\d+ of \d+ rows\): the encoder's"):
        build_report(bad, device="cpu", dataset=ds)


def test_a_checkpoint_that_does_not_hold_the_export_leaves_the_playground_with_h_only(
        run: tuple[Path, Dataset], tmp_path: Path) -> None:
    """The newest checkpoint's encoder differs from encoder.safetensors (a newer checkpoint damaged,
    the export replaced): its head does not belong to h, so the page shows h alone and says why.
    The report failed instead, on the same refusal asked a second time."""
    run_dir, ds = run
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    alter_encoder(moved, lambda w: w.add_(1e-3))
    html = build_report(moved, device="cpu", map_method="pca", dataset=ds).read_text()
    assert "does not hold its exported encoder, so only h (no trained head z) is shown" in section_html(html, "playground")
    playground = report_data(html)["playground"]
    assert isinstance(playground, dict) and "h" in playground and "z" not in playground


def test_views_of_a_store_prepared_again_at_another_side_are_drawn_at_the_encoders(
        run: tuple[Path, Dataset], tmp_path: Path) -> None:
    """The run's 28 px store prepared again at 32 px: h is measured on images resized to 28, and the
    views must be drawn at 28 too. They were drawn at 32, which the fc readout cannot read (a
    traceback in evaluate's quality protocol and in the report). Both complete, the playground's
    views are 28 px, and the quality figures are finite."""
    run_dir, ds = run
    assert ds.train is not None and ds.test is not None
    pad = lambda s: ImageSet(np.pad(s.images, ((0, 0), (2, 2), (2, 2), (0, 0))), s.labels)  # noqa: E731
    wider = Dataset(ds.name, pad(ds.pretrain), pad(ds.train), pad(ds.test), ds.classes)
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    html = build_report(copy, device="cpu", map_method="pca", dataset=wider).read_text()
    playground = report_data(html)["playground"]
    assert isinstance(playground, dict)
    assert {png_pixels(t).shape[:2] for t in playground["thumbs"]} == {(28, 28)}
    quality = evaluate(copy, EvaluateOptions(protocols=("quality",), quality_images=32, device="cpu"), dataset=wider,
                       log=lambda s: None)["protocols"]["quality"]
    assert all(math.isfinite(v) for v in (quality["alignment"], quality["uniformity"]))


def test_the_playground_starts_at_the_temperature_the_run_ended_with() -> None:
    """A learned temperature is in the checkpoint (log t); the page started at the configured one."""
    from types import SimpleNamespace

    from fastclr.pretrained import trained_temperature

    run = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(temperature=0.5)))
    learned = {"temperature": {"log_t": torch.tensor([math.log(0.0731)])}}
    assert trained_temperature(run, learned) == pytest.approx(0.0731, rel=1e-6)  # type: ignore[arg-type]
    assert trained_temperature(run, {"head": {}}) == 0.5  # type: ignore[arg-type]
    assert trained_temperature(run, None) == 0.5  # type: ignore[arg-type]


def png_pixels(uri: str) -> np.ndarray:
    """The pixels (H, W, channels) of a data: URI PNG, read with `decode_png`."""
    _, _, _, pixels = decode_png(base64.b64decode(uri.split(",", 1)[1]))
    return pixels


def img_pixels(html: str) -> np.ndarray:
    """The pixels of the one embedded <img> of a figure."""
    found = re.search(r'src="(data:image/png;base64,[^"]+)"', html)
    assert found is not None
    return png_pixels(found.group(1))


def test_tile_puts_image_i_in_row_i_div_cols_and_column_i_mod_cols_enlarged_and_framed() -> None:
    """Cell (i // cols, i % cols) of `pad` + h * scale + `pad` rows holds image i, each source pixel
    (y, x) repeated over rows y * scale ... and columns x * scale ..., framed by its border colour;
    a cell past the last image stays background."""
    from fastclr.report.png import tile

    rng = np.random.default_rng(0)
    n, h, w, cols, scale, pad = 5, 3, 4, 3, 2, 1
    images = rng.integers(0, 200, (n, h, w, 3), dtype=np.uint8)
    borders = rng.integers(200, 250, (n, 3), dtype=np.uint8)
    out = tile(images, cols, scale=scale, pad=pad, borders=borders, background=251)
    ch, cw = h * scale + 2 * pad, w * scale + 2 * pad
    assert out.shape == (2 * ch, cols * cw, 3)
    ys, xs = np.arange(h * scale)[:, None] // scale, np.arange(w * scale)[None, :] // scale
    for i in range(n):
        cell = out[(i // cols) * ch : (i // cols + 1) * ch, (i % cols) * cw : (i % cols + 1) * cw]
        np.testing.assert_array_equal(cell[pad : pad + h * scale, pad : pad + w * scale], images[i][ys, xs])
        frame = np.ones((ch, cw), bool)
        frame[pad : pad + h * scale, pad : pad + w * scale] = False
        assert (cell[frame] == borders[i]).all()
    assert (out[ch:, 2 * cw :] == 251).all()


def test_viridis_is_linear_between_its_nine_stops() -> None:
    """Between the stops at k / 8 every channel is the straight line joining them (np.interp),
    rounded to the nearest integer."""
    stops = viridis(np.arange(9) / 8).astype(np.float64)  # k / 8 * 8 is exactly k: the stops themselves
    v = np.random.default_rng(1).random(500)
    ref = np.stack([np.interp(v, np.arange(9) / 8, stops[:, ch]) for ch in range(3)], 1)
    assert np.abs(viridis(v).astype(np.float64) - ref).max() <= 0.5 + 1e-9


def test_tick_labels_keep_three_significant_digits() -> None:
    assert [tick_label(v) for v in (1.23456, 0.012345, 123.456)] == ["1.23", "0.0123", "123"]


def axis_lines(svg: str) -> tuple[float, float, float, float]:
    """(left, right, top, bottom) of a line chart's plotting area, from its drawn x and y axes."""
    lines = [tuple(map(float, m)) for m in
             re.findall(r'<line x1="([\d.]+)" x2="([\d.]+)" y1="([\d.]+)" y2="([\d.]+)" stroke="#555"/>', svg)]
    x_axis = max((ln for ln in lines if ln[2] == ln[3]), key=lambda ln: ln[1] - ln[0])
    y_axis = max((ln for ln in lines if ln[0] == ln[1]), key=lambda ln: ln[3] - ln[2])
    return x_axis[0], x_axis[1], y_axis[2], x_axis[2]


def test_a_line_charts_points_span_its_axes_upwards_and_a_log_axis_spaces_decades_evenly() -> None:
    """The lowest value sits on the x axis and the highest at the top of the y axis (larger is
    higher: SVG's y grows downwards); on a log x axis 1, 10 and 100 are evenly spaced."""
    from fastclr.report.svg import Series, line_chart

    svg = line_chart([Series("acc", [1.0, 10.0, 100.0], [0.0, 0.25, 1.0], "#000", markers=True)], "t", "labels",
                     "acc", log_x=True, y_range=(0.0, 1.0))
    left, right, top, bottom = axis_lines(svg)
    pts = [(float(x), float(y)) for x, y in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', svg)]
    assert len(pts) == 3 and bottom - top > 100 and right - left > 100
    for (cx, cy), (want_x, want_y) in zip(pts, [(left, bottom), ((left + right) / 2, bottom - 0.25 * (bottom - top)),
                                                (right, top)]):
        assert cx == pytest.approx(want_x, abs=0.06) and cy == pytest.approx(want_y, abs=0.06)


def test_the_label_efficiency_band_is_the_mean_plus_and_minus_one_std_at_each_point() -> None:
    """The shaded band runs along mean + std left to right, then back along mean - std, through the
    markers' x positions, on the markers' own scale (fitted here from the markers)."""
    curve = [{"labels_per_class": 1, "mean": 0.3, "std": 0.05}, {"labels_per_class": 10, "mean": 0.5, "std": 0.04},
             {"labels_per_class": 100, "mean": 0.8, "std": 0.02}]
    svg = figures.label_efficiency({"fewshot": {"curve": curve}})
    marks = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="3.2"[^>]*>'
                       r'<title>linear probe on h \(self-supervised\): ([\d.]+), ([\d.]+)</title>', svg)
    assert [(float(x), float(y)) for *_, x, y in marks] == [(1.0, 30.0), (10.0, 50.0), (100.0, 80.0)]
    cx, cy = [float(m[0]) for m in marks], [float(m[1]) for m in marks]
    per_point = (cy[2] - cy[0]) / (80.0 - 30.0)  # pixels per accuracy point
    y_of = lambda acc: cy[0] + (acc - 30.0) * per_point  # noqa: E731
    assert cy[1] == pytest.approx(y_of(50.0), abs=0.15)
    band = re.search(r'<path d="([^"]+)" fill="[^"]+" fill-opacity="0.18"', svg)
    assert band is not None
    vertices = [tuple(map(float, p.split(","))) for p in re.findall(r"[ML]([\d.]+,[\d.]+)", band.group(1))]
    want = [(cx[i], y_of(100 * (e["mean"] + e["std"]))) for i, e in enumerate(curve)] + \
           [(cx[i], y_of(100 * (e["mean"] - e["std"]))) for i, e in reversed(list(enumerate(curve)))]
    assert len(vertices) == len(want)
    for (x, y), (wx, wy) in zip(vertices, want):
        assert x == pytest.approx(wx, abs=0.15) and y == pytest.approx(wy, abs=0.15)


def test_the_all_label_levels_are_drawn_beside_a_single_few_label_point() -> None:
    """With one labels-per-class point the dashed levels ran from that point to itself: listed in
    the legend, drawn as nothing. They span the frame around it, horizontal at their accuracy."""
    curve = [{"labels_per_class": 10, "mean": 0.5, "std": 0.04}]
    svg = figures.label_efficiency({"fewshot": {"curve": curve},
                                    "linear": {"accuracy": 0.9, "random_init": {"accuracy": 0.8}}})
    levels = re.findall(r'<path d="M([\d.]+),([\d.]+) L([\d.]+),([\d.]+)"[^>]*stroke-dasharray', svg)
    assert len(levels) == 2
    (x0, y0, x1, y1), (u0, v0, u1, v1) = [tuple(map(float, m)) for m in levels]
    left, right, _, _ = axis_lines(svg)
    assert (x0, x1) == (u0, u1) and x1 - x0 == pytest.approx(right - left, abs=0.2)  # the whole frame
    assert y0 == y1 and v0 == v1 and y0 < v0  # level, the trained one higher


def test_a_scatter_places_x_rightwards_and_y_upwards_colours_by_class_and_escapes_names() -> None:
    """Point i at its own coordinates (y up), filled with the legend's colour of its class; class
    names and the title are text, whatever characters they hold: the SVG parses as XML."""
    import xml.etree.ElementTree as ET

    from fastclr.report.svg import scatter_chart

    xy = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    labels = np.array([2, 0, 1, 2])
    names = ["cats & dogs", "<b>birds</b>", "fish"]
    root = ET.fromstring(scatter_chart(xy, labels, names, "map <1> & more"))
    ns = "{http://www.w3.org/2000/svg}"
    assert root.get("aria-label") == "map <1> & more"
    legend = {int(g.get("data-class", -1)): g for g in root.iter(f"{ns}g") if g.get("class") == "legend"}
    assert [legend[k].find(f"{ns}text").text for k in range(3)] == names  # type: ignore[union-attr]
    assert [legend[k].find(f"{ns}title").text for k in range(3)] == names  # type: ignore[union-attr]
    points = {int(c.get("data-i", -1)): c for c in root.iter(f"{ns}circle") if c.get("data-i") is not None}
    cx = {i: float(c.get("cx", "nan")) for i, c in points.items()}
    cy = {i: float(c.get("cy", "nan")) for i, c in points.items()}
    assert cx[1] > cx[0] and cy[1] == cy[0]  # larger x: to the right
    assert cy[2] < cy[0] and cx[2] == cx[0]  # larger y: higher up
    assert cx[3] == pytest.approx((cx[0] + cx[1]) / 2, abs=0.06)  # halfway is halfway
    assert cy[3] == pytest.approx((cy[0] + cy[2]) / 2, abs=0.06)
    for i, c in points.items():
        assert int(c.get("data-c", -1)) == labels[i]
        assert c.get("fill") == legend[int(labels[i])].find(f"{ns}circle").get("fill")  # type: ignore[union-attr]


def test_pca_projects_the_centred_rows_on_the_top_eigenvectors_of_their_covariance() -> None:
    """Rows far from the origin: the axes are those of the spread around the mean (numpy's eigh of
    the scatter matrix, float64), each up to its sign."""
    from fastclr.report.embedding_map import pca

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5)) + 10.0
    got = pca(torch.from_numpy(x), 2).numpy()
    xc = x - x.mean(0)
    _, vectors = np.linalg.eigh(xc.T @ xc)
    ref = xc @ vectors[:, ::-1][:, :2]
    np.testing.assert_allclose(got * np.sign((got * ref).sum(0)), ref, atol=1e-9)


def test_squared_distances_are_those_of_the_rows() -> None:
    x = torch.randn(30, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    d = squared_distances(x)
    torch.testing.assert_close(d, ref, rtol=0, atol=1e-12)
    assert (d.diagonal() == 0).all()


def test_each_image_is_shown_beside_its_own_two_views() -> None:
    """Image i (grey 10 + i), its first view (100 + i) and its second view (200 + i): side by side
    in that order, on the same rows, each enlarged alike."""
    b, s = 4, 4
    originals = np.stack([np.full((s, s, 1), 10 + i, np.uint8) for i in range(b)])
    views = torch.cat([torch.full((b, 1, s, s), 100.0), torch.full((b, 1, s, s), 200.0)])
    views += torch.arange(b, dtype=torch.float32).repeat(2).view(-1, 1, 1, 1)
    pixels = img_pixels(figures.view_pairs_grid(originals, views / 255))[..., 0]
    for i in range(b):
        boxes = []
        for level in (10 + i, 100 + i, 200 + i):
            ys, xs = np.nonzero(pixels == level)
            assert len(ys) > 0, level
            boxes.append((ys.min(), ys.max(), xs.min(), xs.max()))
            assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # one solid square
        assert len({(y0, y1) for y0, y1, _, _ in boxes}) == 1
        assert len({x1 - x0 for _, _, x0, x1 in boxes}) == 1
        assert boxes[0][3] < boxes[1][2] and boxes[1][3] < boxes[2][2]


def test_the_similarity_statistics_are_the_mean_cosines_of_positives_and_of_all_other_pairs() -> None:
    """A float64 transcription: positives are (i, n + i) and (n + i, i); every other pair i != j is a
    negative; the scale starts at -1 where any cosine is negative."""
    h = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, stats = figures.similarity_heatmap(h)
    z = h / h.norm(dim=1, keepdim=True)
    sim = (z @ z.T).numpy()
    n = 5
    pos = [sim[i, n + i] for i in range(n)] + [sim[n + i, i] for i in range(n)]
    neg = [sim[i, j] for i in range(2 * n) for j in range(2 * n) if i != j and abs(i - j) != n]
    assert sim.min() < 0 and stats["low"] == -1.0
    assert stats["positive"] == pytest.approx(np.mean(pos), abs=1e-6)
    assert stats["negative"] == pytest.approx(np.mean(neg), abs=1e-6)


def test_retrieval_frames_are_green_for_the_querys_class_red_otherwise_grey_for_queries() -> None:
    """Two queries, three neighbours each: two of the six share their query's class. Every frame has
    the same number of pixels, so the colours' pixel counts are in the frames' proportions."""
    q, k, s = 2, 3, 4
    queries = np.full((q, s, s, 1), 60, np.uint8)
    neighbours = np.full((q, k, s, s, 1), 90, np.uint8)
    pixels = img_pixels(figures.retrievals(queries, np.array([0, 1]), neighbours, np.array([[0, 1, 1], [1, 0, 0]])))
    count = {name: int((pixels == colour).all(-1).sum()) for name, colour in
             (("green", figures.GREEN), ("red", figures.RED), ("grey", figures.GREY))}
    assert count["green"] > 0 and count["red"] == 2 * count["green"] and count["grey"] == count["green"]


def test_the_top5_curve_plots_top5_and_each_curve_its_own_value() -> None:
    metrics = [{"step": 1, "loss": 2.5, "top1": 0.125, "top5": 0.375, "lr": 0.01},
               {"step": 2, "loss": 2.25, "top1": 0.25, "top5": 0.625, "lr": 0.02}]
    svg = "".join(figures.training_curves(metrics))
    for name, key in (("NT-Xent loss", "loss"), ("top-1", "top1"), ("top-5", "top5"), ("learning rate", "lr")):
        shown = re.findall(rf"<title>{name}: ([^,]+), ([^<]+)</title>", svg)
        assert [(float(s), float(v)) for s, v in shown] == [(r["step"], r[key]) for r in metrics], name


def test_retrieval_queries_are_the_first_image_of_each_of_the_first_classes() -> None:
    from fastclr.report.build import pick_queries

    split = ImageSet(np.zeros((7, 2, 2, 1), np.uint8), np.array([2, 0, 1, 0, 2, 1, 3]))
    assert pick_queries(split, 3).tolist() == [1, 2, 0]
    assert pick_queries(split, 10).tolist() == [1, 2, 0, 6]


def report_data(html: str) -> dict[str, object]:
    """The page's JSON block."""
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert found is not None
    return dict(json.loads(found.group(1)))


def test_the_map_data_names_each_points_image_label_and_sprite_tile(run: tuple[Path, Dataset], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With fewer map points than test images: point i is test image index[i], with that image's
    label, drawn in the sprite at column i % cols, row i // cols (the page's reading of it)."""
    import fastclr.report.build as build

    monkeypatch.setattr(build, "MAP_POINTS", 60)
    run_dir, ds = Path(shutil.copytree(run[0], tmp_path / "run")), run[1]
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=ds).read_text()
    m = report_data(html)["map"]
    assert isinstance(m, dict) and ds.test is not None and ds.test.labels is not None
    index = np.array(m["index"])
    assert len(index) == len(set(index.tolist())) == 60 and index.max() < len(ds.test)
    assert m["labels"] == ds.test.labels[index].tolist()
    sheet, size, cols = png_pixels(m["sprite"]), m["size"], m["cols"]
    assert cols < 60  # two rows of the sprite are read
    for i, image in enumerate(index):
        r, c = divmod(i, cols)
        cell = sheet[r * size : (r + 1) * size, c * size : (c + 1) * size]
        np.testing.assert_array_equal(cell, ds.test.images[image])
    drawn = re.findall(r'<circle data-i="(\d+)" data-c="(\d+)"', section_html(html, "map"))
    assert [(int(i), int(c)) for i, c in drawn] == list(enumerate(m["labels"]))


def test_retrievals_show_bank_images_framed_by_their_own_class_and_the_caption_counts_the_frames(
        run: tuple[Path, Dataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a bank smaller than the training set (evenly spaced images of it): each neighbour shown
    is a bank image whose class sets its frame, and the caption's share of neighbours of the query's
    class is the share of green frames in the picture."""
    import fastclr.report.build as build

    shown: dict[str, np.ndarray] = {}
    real = build.figures.retrievals

    def spy(queries: np.ndarray, q_labels: np.ndarray, neighbours: np.ndarray, n_labels: np.ndarray,
            scale: int = 2) -> str:
        shown.update(q_labels=q_labels, neighbours=neighbours, n_labels=n_labels)
        return real(queries, q_labels, neighbours, n_labels, scale)

    monkeypatch.setattr(build, "BANK_LIMIT", 150)
    monkeypatch.setattr(build.figures, "retrievals", spy)
    run_dir, ds = Path(shutil.copytree(run[0], tmp_path / "run")), run[1]
    assert ds.train is not None and ds.train.labels is not None and len(ds.train) > 150
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=ds).read_text()
    bank = evenly_spaced(len(ds.train), 150)
    images, labels = ds.train.images[bank], ds.train.labels[bank]
    for q, row in enumerate(shown["neighbours"]):
        for k, image in enumerate(row):
            same = (images == image).all(axis=(1, 2, 3))
            assert same.any() and shown["n_labels"][q, k] in labels[same], (q, k)
    section = section_html(html, "retrievals")
    pixels = img_pixels(section)
    green, red = ((pixels == colour).all(-1).sum() for colour in (figures.GREEN, figures.RED))
    share = re.search(r" (\d+)% of the neighbours share the query's class", section)
    assert share is not None and int(share.group(1)) == round(100 * green / (green + red))


def test_the_run_name_and_config_are_shown_as_written_whatever_characters_they_hold(run: tuple[Path, Dataset],
                                                                                     tmp_path: Path) -> None:
    """A run folder named `run <b>&amp;` and a config comment with markup: the page's title, heading
    and config block read back (as an HTML parser reads them) as those characters."""
    from html.parser import HTMLParser

    run_dir = Path(shutil.copytree(run[0], tmp_path / "run <b>&amp;"))
    config = run_dir / "config.toml"
    config.write_text(config.read_text() + "# <i>mine</i> & </pre><p>\n")

    class Texts(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.stack: list[str] = []
            self.text: dict[str, str] = {}

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.stack.append(tag if tag != "section" else f"section#{dict(attrs).get('id')}")

        def handle_endtag(self, tag: str) -> None:
            while self.stack and self.stack.pop().split("#")[0] != tag:
                pass

        def handle_data(self, data: str) -> None:
            key = "/".join(t for t in self.stack if t in ("head", "title", "h1", "pre", "section#config"))
            self.text[key] = self.text.get(key, "") + data

    parser = Texts()
    parser.feed(build_report(run_dir, device="cpu", map_method="pca", dataset=run[1]).read_text())
    assert parser.text["head/title"] == parser.text["h1"] == "fastclr report: run <b>&amp;"
    assert parser.text["section#config/pre"] == config.read_text()


def test_the_explorer_describes_each_view_with_its_own_parameters() -> None:
    """Every field of a view's description comes from that view's own parameter of the same name;
    the crop share is the crop's area over the image's; an erased rectangle at the left edge is one."""
    from fastclr.augment import sample_params
    from fastclr.config import AugmentConfig
    from fastclr.report.interactive import describe_view

    p = sample_params(AugmentConfig(erase_p=0.0), 2, 28, 28, torch.Generator().manual_seed(0), torch.device("cpu"))
    p.box = torch.tensor([[1.0, 2.0, 20.0, 10.0], [0.0, 0.0, 28.0, 28.0]])
    p.flip, p.jitter = torch.tensor([True, False]), torch.tensor([False, True])
    p.brightness, p.contrast = torch.tensor([1.0, 1.25]), torch.tensor([1.0, 0.75])
    p.saturation, p.hue = torch.tensor([1.0, 1.5]), torch.tensor([0.0, -0.125])
    p.gray, p.solarize = torch.tensor([False, True]), torch.tensor([True, False])
    p.blur_sigma = torch.tensor([0.0, 1.5])
    p.erase, p.erase_value = torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0]]), torch.tensor([0.25, 0.0])
    first, second = describe_view(p, 0, (28, 28)), describe_view(p, 1, (28, 28))
    assert first["crop"] == [1.0, 2.0, 20.0, 10.0] and first["crop_share"] == pytest.approx(200 / 784, abs=5e-5)
    assert (first["flip"], second["flip"]) == (True, False)
    assert first["jitter"] is None
    assert second["jitter"] == {"brightness": 1.25, "contrast": 0.75, "saturation": 1.5, "hue": -0.125}
    assert (first["grayscale"], second["grayscale"]) == (False, True)
    assert (first["solarize"], second["solarize"]) == (True, False)
    assert (first["blur_sigma"], second["blur_sigma"]) == (0.0, 1.5)
    assert first["erase"] == [0.0, 0.0, 0.5, 0.25, 0.25] and second["erase"] is None


def test_the_playground_vectors_are_those_of_its_thumbnails_in_the_same_order(run: tuple[Path, Dataset]) -> None:
    """Row i of h is the encoder's h of thumbnail i (re-encoded here from its PNG: nearest, and within
    the uint8 rounding), and z is the trained head of h."""
    from fastclr.augment import normalize
    from fastclr.pretrained import head_checkpoint, trained_head
    from fastclr.report.interactive import from_f32_base64, playground

    run_dir, ds = run
    r = load_run(run_dir, precision="fp32", log=lambda s: None)
    cpu = torch.device("cpu")
    head = trained_head(r, cpu, head_checkpoint(r))
    assert head is not None
    data = playground(r, head, ds.pretrain, cpu, 0, 0.5)
    h = torch.from_numpy(from_f32_base64(data["h"], data["h_dim"]).copy())
    z = torch.from_numpy(from_f32_base64(data["z"], data["z_dim"]).copy())
    assert len(data["thumbs"]) == len(h) == 2 * data["pairs"]
    thumbs = np.stack([png_pixels(t) for t in data["thumbs"]])  # (2P, S, S, C)
    x = torch.from_numpy(thumbs).permute(0, 3, 1, 2).float() / 255
    again = encode(r.encoder, normalize(x, r.mean, r.std), FP32)
    cos = torch.nn.functional.normalize(again, dim=1) @ torch.nn.functional.normalize(h, dim=1).T
    assert cos.argmax(1).tolist() == list(range(len(h)))
    assert float(cos.diagonal().min()) > 0.99
    with torch.no_grad():
        torch.testing.assert_close(head(h), z, rtol=1e-4, atol=1e-5)
