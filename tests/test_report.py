"""The report's parts (PNG, chart ticks, t-SNE) against references, and the page it writes."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_fixtures import alter_encoder, one_thread, tiny_dataset, tiny_run  # noqa: F401 (one_thread: autouse)
from fastclr.data import Dataset, ImageSet
from fastclr.evaluation.options import EvaluateOptions
from fastclr.evaluation.run import evaluate
from fastclr.evaluation.knn import cosine_topk
from fastclr.evaluation.features import encode, evenly_spaced, view_pairs
from fastclr.pretrained import load_run
from fastclr.report.build import VIEW_IMAGES, build_report
from fastclr.runtime import FP32, Precision
from fastclr.runs import read_metrics
from fastclr.report.embedding_map import affinities, squared_distances, tsne
from fastclr.report.png import encode_png, viridis
from fastclr.report.svg import nice_ticks, tick_label

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
    # Self-contained: a CSP that forbids every fetch, and nothing that would need one.
    assert "content=\"default-src 'none'; img-src data:;" in html
    assert not re.search(r'(src|href)="(?!data:)', html) and "url(" not in html and "@import" not in html


def section_html(html: str, sid: str) -> str:
    """The HTML of one section of the report."""
    start = html.index(f'<section id="{sid}"')
    return html[start:html.index("</section>", start)]


def test_report_with_evaluation_shows_the_curve_and_numbers(run: tuple[Path, Dataset], tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(run[0], tmp_path / "run"))
    opts = EvaluateOptions(protocols=("linear", "fewshot", "supervised"), labels_per_class=(2, 5), seeds=(0,),
                           supervised_seeds=(0,), steps=2, batch_size=16, device="cpu")
    out = evaluate(run_dir, opts, dataset=run[1], log=lambda s: None)
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=run[1]).read_text()
    assert "No evaluation yet" not in html and 'aria-label="Label efficiency"' in html
    assert f"{100 * out['protocols']['linear']['accuracy']:.2f}%" in html
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
    (run_dir / "eval.json").write_text(json.dumps(out))
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=run[1]).read_text()
    assert "These numbers are out of date" in html


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


def test_report_of_an_unlabelled_dataset(run: tuple[Path, Dataset], tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(run[0], tmp_path / "run"))
    images = ImageSet(run[1].pretrain.images, None)
    unlabelled = Dataset("my-photos", images, None, None, [])
    html = build_report(run_dir, device="cpu", map_method="pca", dataset=unlabelled).read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}"' in html
    assert "pretraining images (evenly spaced)" in html and "coloured by class" not in html
    assert "share the query's class" not in html  # nothing to compare without labels


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


@pytest.mark.parametrize("text", ['{"protocols": ', "[1]", "\udcff"])
def test_a_damaged_eval_json_is_one_line_naming_it(tmp_path: Path, text: str) -> None:
    from fastclr.errors import FastclrError
    from fastclr.evaluation.run import read_eval

    (tmp_path / "eval.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(FastclrError, match=r"eval.json is damaged .*; run fastclr evaluate .* again"):
        read_eval(tmp_path)


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
    centre = 10 + 0.5 * (640 - 150 - 20), 24 + 0.5 * (height - 34)
    assert re.findall(r'cx="([\d.]+)" cy="([\d.]+)" r="2.6"', svg) == [(f"{centre[0]:.1f}", f"{centre[1]:.1f}")] * 3


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


def test_the_playground_starts_at_the_temperature_the_run_ended_with() -> None:
    """A learned temperature is in the checkpoint (log t); the page started at the configured one."""
    from types import SimpleNamespace

    from fastclr.pretrained import trained_temperature

    run = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(temperature=0.5)))
    learned = {"temperature": {"log_t": torch.tensor([math.log(0.0731)])}}
    assert trained_temperature(run, learned) == pytest.approx(0.0731, rel=1e-6)  # type: ignore[arg-type]
    assert trained_temperature(run, {"head": {}}) == 0.5  # type: ignore[arg-type]
    assert trained_temperature(run, None) == 0.5  # type: ignore[arg-type]
