"""`fastclr embed` and `fastclr neighbours`: features in the source's order, for every source."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastclr.augment import normalize, to_float
from fastclr.cli import main
from fastclr.config import Config, apply_overrides
from fastclr.data import load_builtin
from fastclr.data.store import read_store
from fastclr.errors import FastclrError
from fastclr.export import save_encoder
from fastclr.ingest import DecodeOptions, prepare_store
from fastclr.ingest.embed import embed, embed_images, match_channels
from fastclr.evaluation.knn import cosine_topk
from fastclr.models import CNN_STAGES, EncoderSpec
from fastclr.ingest.neighbours import decode_query, grid_image, neighbours, store_features
from fastclr.models import build_encoder
from fastclr.pretrained import LoadedRun, load_run
from fastclr.runs import write_config
from conftest import file_size_limit
from ingest_fixtures import bar_images

QUIET = dict(progress=False, log=lambda s: None)
CPU = torch.device("cpu")


def make_run(run_dir: Path, channels: int = 3, size: int = 28, data: str = "fashion-mnist") -> LoadedRun:
    """A run directory holding a randomly initialised encoder: enough to test feature plumbing."""
    torch.manual_seed(0)
    enc = build_encoder("cnn", channels, size, 0.125)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    spec = EncoderSpec(encoder="cnn", in_channels=channels, image_size=size, width=0.125, cifar_stem="off",
                       feature_dim=enc.feature_dim, mean=(0.3,) * channels, std=(0.25,) * channels, stages=CNN_STAGES)
    run_dir.mkdir(parents=True)
    save_encoder(run_dir / "encoder.safetensors", enc, spec)
    write_config(run_dir, apply_overrides(Config(), {"train.channels_last": False, "data.name": data}))
    return load_run(run_dir, precision="fp32")  # compared with the fp32 literal definition below


def reference_features(run: LoadedRun, images: np.ndarray) -> np.ndarray:
    """One image at a time, straight through the encoder: the literal definition of h."""
    out = []
    with torch.no_grad():
        for im in images:
            x = normalize(to_float(torch.from_numpy(np.array(im))[None]), run.mean, run.std)
            out.append(run.encoder(x)[0].numpy())
    return np.stack(out)


def read_index(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def bars(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, LoadedRun]:
    root = tmp_path_factory.mktemp("embed")
    bar_images(root / "bars", n_per_class=6, size=32)
    store = prepare_store(root / "bars", root / "store", DecodeOptions(28), workers=1, **QUIET).store
    return root, store, make_run(root / "run")


def test_store_embeddings_are_each_rows_features_in_store_order(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, store, run = bars
    npy, index = embed(run, str(store), tmp_path / "emb.npy", CPU, log=lambda s: None)
    feats, rows, s = np.load(npy), read_index(index), read_store(store)
    assert feats.dtype == np.float32 and feats.shape == (12, run.spec.feature_dim)
    assert [r["path"] for r in rows] == s.paths and [int(r["row"]) for r in rows] == list(range(12))
    assert [int(r["label"]) for r in rows] == s.labels.tolist()
    assert [r["class"] for r in rows] == [s.classes[y] for y in s.labels.tolist()]
    np.testing.assert_allclose(feats, reference_features(run, np.asarray(s.images)), rtol=1e-4, atol=1e-5)
    a, b = s.split_range("test")
    npy, index = embed(run, str(store), tmp_path / "test.npy", CPU, split="test", log=lambda s: None)
    np.testing.assert_allclose(np.load(npy), feats[a:b], rtol=1e-4, atol=1e-5)
    assert [r["split"] for r in read_index(index)] == ["test"] * (b - a) and b > a


def test_folder_embeddings_equal_those_of_its_store(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, store, run = bars
    lines: list[str] = []
    a = embed(run, str(root / "bars"), tmp_path / "folder.npy", CPU, log=lines.append)
    b = embed(run, str(store), tmp_path / "store.npy", CPU, log=lambda s: None)
    assert np.array_equal(np.load(a[0]), np.load(b[0])) and read_index(a[1]) == read_index(b[1])
    # the log names the folder, not the temporary store it was decoded into
    assert any(line.startswith(f"{root / 'bars'} decoded: 12 images") for line in lines), lines
    assert not any("fastclr-embed-" in line for line in lines)


def test_a_folder_is_decoded_at_the_side_the_run_stored_not_its_crop(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A run that trained at 24 px (--crop-size) on 28 px images, of a store and of mnist: a folder
    was decoded straight to 24 px by Pillow while the run's own images are resized from 28 by
    evaluation's resampling, so every row differed (cosine 0.996). Decoded at 28, as stored, a
    folder gives its store's rows."""
    root, store, _ = bars
    for data in (str(store), "mnist"):
        run = make_run(tmp_path / Path(data).name, size=24, data=data)
        a = embed(run, str(root / "bars"), tmp_path / "folder.npy", CPU, log=lambda s: None)
        b = embed(run, str(store), tmp_path / "store.npy", CPU, log=lambda s: None)
        assert np.array_equal(np.load(a[0]), np.load(b[0])), data


def test_a_runs_store_prepared_again_is_said_when_a_folder_is_decoded_or_searched_as_it(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A folder embedded for a run is decoded as the run's store is prepared now, and a search reads
    that store as it is now: prepared again at 36 px instead of 28, every row changed without a
    word (evaluate and export said so). The note of `run_data`; none while the store is as it was."""
    import dataclasses
    import shutil

    from fastclr.pretrained import store_content

    root, _, _ = bars
    store = tmp_path / "store"
    prepare_store(root / "bars", store, DecodeOptions(28), workers=1, **QUIET)
    run = dataclasses.replace(make_run(tmp_path / "run", data=str(store)), data_content=store_content(store))
    query = next(p for p in sorted((root / "bars").rglob("*")) if p.is_file())
    searched = (f"note: {store} changed since {run.run_dir} trained on it (prepared again: its images, labels or splits "
                "differ); what follows is measured on it as it is now")
    decoded = (f"note: {store} was prepared again since {run.run_dir} trained on it: the folder is decoded as it is "
               "prepared now (its side or fit may differ from the images the run trained on)")
    for again in (False, True):
        if again:
            shutil.rmtree(store)
            prepare_store(root / "bars", store, DecodeOptions(36), workers=1, **QUIET)
        lines: list[str] = []
        embed(run, str(root / "bars"), tmp_path / f"folder-{again}.npy", CPU, log=lines.append)
        neighbours(run, store, query, 1, CPU, log=lines.append)
        assert (lines.count(decoded), lines.count(searched)) == (again, again), lines


def test_a_folders_skipped_files_are_listed_beside_the_embeddings(bars, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedding a folder decodes it to a temporary store, removed afterwards: its list of skipped
    files is kept as FILE.skipped.csv, and the log names that file (it named the removed one)."""
    import shutil

    root, store, run = bars
    folder = tmp_path / "bars"
    shutil.copytree(root / "bars", folder)
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines: list[str] = []
    npy, index = embed(run, str(folder), tmp_path / "out" / "e.npy", CPU, log=lines.append)
    listed = tmp_path / "out" / "e.skipped.csv"
    rows = read_index(listed)
    assert [(r["path"], r["reason"]) for r in rows] == [("garbage.png", "corrupt")]
    assert any(f"(listed in {listed})" in line for line in lines), lines
    assert len(read_index(index)) == len(read_store(store).paths)  # every other image embedded
    # Embedding fails after the folder is decoded: the list the log names is there where no pair was; where an
    # earlier pair is, it keeps its own list (a refused run replaced it with one describing other files).
    before, its_list = np.load(npy), listed.read_bytes()
    (folder / "other.png").write_bytes(b"not an image either")
    with monkeypatch.context() as m:
        m.setattr("fastclr.ingest.embed.embed_images", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            embed(run, str(folder), tmp_path / "out" / "e.npy", CPU, log=lines.append)
        assert listed.read_bytes() == its_list and np.array_equal(np.load(npy), before)
        assert lines[-1] == f"note: {listed} was not written: the embedding already in {npy} is kept as it was, with its own list"
        with pytest.raises(RuntimeError, match="boom"):
            embed(run, str(folder), tmp_path / "new" / "f.npy", CPU, log=lines.append)
    assert [r["path"] for r in read_index(tmp_path / "new" / "f.skipped.csv")] == ["garbage.png", "other.png"]
    assert not (tmp_path / "new" / "f.npy").exists()
    (folder / "other.png").unlink()
    # The file fixed and the same command again: the list goes, as it no longer describes the pair.
    from PIL import Image

    Image.new("RGB", (20, 20), (1, 2, 3)).save(folder / "garbage.png")  # (a copy would be a duplicate, skipped)
    npy, index = embed(run, str(folder), tmp_path / "out" / "e.npy", CPU, log=lines.append)
    assert not listed.exists() and "garbage.png" in [r["path"] for r in read_index(index)]


def test_a_folder_is_embedded_as_the_runs_store_was_prepared(tmp_path: Path) -> None:
    """A run trained on a store prepared with --fit pad: its folder embeddings pad too (a folder
    was always centre-cropped), so they equal the store's rows' features."""
    folder = tmp_path / "wide"
    rng = np.random.default_rng(3)
    for i in range(6):
        (folder / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 44, 3), dtype=np.uint8)).save(folder / "c" / f"{i}.png")
    store = prepare_store(folder, tmp_path / "store", DecodeOptions(28, fit="pad"), workers=1, **QUIET).store
    run = make_run(tmp_path / "run")
    write_config(run.run_dir, apply_overrides(Config(), {"train.channels_last": False, "data.name": str(store)}))
    run = load_run(run.run_dir, precision="fp32")
    a = embed(run, str(folder), tmp_path / "folder.npy", CPU, log=lambda s: None)
    b = embed(run, str(store), tmp_path / "store.npy", CPU, log=lambda s: None)
    assert np.array_equal(np.load(a[0]), np.load(b[0]))
    with pytest.raises(FastclrError, match="--batch-size must be at least 1, got 0"):
        embed(run, str(store), tmp_path / "zero.npy", CPU, batch_size=0, log=lambda s: None)


def test_builtin_embeddings_cover_train_then_test(data_root: Path, bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = bars[2]  # RGB, 28 px: the 28 px grayscale images are repeated into three channels
    npy, index = embed(run, "fashion-mnist", tmp_path / "fm", CPU, log=lambda s: None)
    assert npy.name == "fm.npy" and index.name == "fm.csv"
    ds, feats, rows = load_builtin("fashion-mnist"), np.load(npy), read_index(index)
    assert feats.shape[0] == len(rows) == 256 + 64
    assert [r["split"] for r in rows] == ["train"] * 256 + ["test"] * 64
    assert [int(r["label"]) for r in rows] == ds.train.labels.tolist() + ds.test.labels.tolist()  # type: ignore[union-attr]
    assert rows[256]["path"] == "test/000000" and rows[0]["class"] == ds.classes[ds.train.labels[0]]  # type: ignore[union-attr]
    expected = reference_features(run, np.repeat(ds.test.images[:3], 3, axis=-1))  # type: ignore[union-attr]
    np.testing.assert_allclose(feats[256:259], expected, rtol=1e-4, atol=1e-5)


def test_one_split_of_a_builtin_dataset_is_that_splits_images_alone(data_root: Path, bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--split test of a built-in dataset: its test images alone, in order, indexed as test/000000 ..."""
    run = bars[2]
    npy, index = embed(run, "fashion-mnist", tmp_path / "test", CPU, split="test", log=lambda s: None)
    ds, feats, rows = load_builtin("fashion-mnist"), np.load(npy), read_index(index)
    assert ds.test is not None and feats.shape[0] == len(rows) == len(ds.test) == 64
    assert [(r["row"], r["path"], r["split"]) for r in rows] == [(str(i), f"test/{i:06d}", "test") for i in range(64)]
    assert [int(r["label"]) for r in rows] == ds.test.labels.tolist()  # type: ignore[union-attr]
    np.testing.assert_allclose(feats[:3], reference_features(run, np.repeat(ds.test.images[:3], 3, axis=-1)),
                               rtol=1e-4, atol=1e-5)


def test_grayscale_store_with_rgb_encoder_equals_pillows_gray_to_rgb(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = bars[2]
    (tmp_path / "gray").mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L").save(tmp_path / "gray" / f"{i}.png")
    one = prepare_store(tmp_path / "gray", tmp_path / "g1", DecodeOptions(28, channels="1"), workers=1, **QUIET).store
    three = prepare_store(tmp_path / "gray", tmp_path / "g3", DecodeOptions(28, channels="3"), workers=1, **QUIET).store
    assert read_store(one).images.shape[-1] == 1
    f1 = np.load(embed(run, str(one), tmp_path / "a.npy", CPU, log=lambda s: None)[0])
    f3 = np.load(embed(run, str(three), tmp_path / "b.npy", CPU, log=lambda s: None)[0])
    assert np.array_equal(f1, f3)
    # neighbours converts the same way, and now says so as embed does (it was silent)
    lines: list[str] = []
    found = neighbours(run, one, tmp_path / "gray" / "2.png", 3, CPU, log=lines.append)
    assert "note: the images have 1 channel(s), the encoder 3: repeating the gray channel" in lines
    assert found == neighbours(run, three, tmp_path / "gray" / "2.png", 3, CPU, log=lambda s: None)


def test_rgb_to_one_channel_is_pillows_luma() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8),
                        rng.integers(0, 256, (1, 4, 3), dtype=np.uint8)])  # (2, 4, 3)
    pil = np.asarray(Image.fromarray(x, "RGB").convert("L"))
    ours = match_channels(x[None], 1)[0, ..., 0]
    assert ours[0].tolist() == [76, 150, 29, 255] == pil[0].tolist()
    assert np.abs(ours.astype(int) - pil).max() <= 1


def test_cosine_topk_against_a_brute_force_loop() -> None:
    rng = np.random.default_rng(0)
    f, q = rng.normal(size=(50, 8)), rng.normal(size=8)
    sims = [float(np.dot(r, q) / np.linalg.norm(r) / np.linalg.norm(q)) for r in f]
    got, idx = cosine_topk(torch.from_numpy(f), torch.from_numpy(q)[None], 5)
    assert idx[0].tolist() == sorted(range(50), key=lambda i: -sims[i])[:5]
    np.testing.assert_allclose(got[0].numpy(), [sims[i] for i in idx[0].tolist()], rtol=1e-12)
    tied = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])  # rows 0, 2, 3: the same direction
    assert cosine_topk(tied, torch.tensor([[1.0, 0.0]]), 3)[1].tolist() == [[0, 2, 3]]  # ties in row order


@pytest.mark.parametrize("n, d", [(42, 12544), (1001, 512), (1001, 16)])
def test_bitwise_identical_rows_are_equally_similar_wherever_they_sit(n: int, d: int) -> None:
    """One image stored four times (rows 4, 7 and the last two, which a matrix-vector kernel
    computes in its tail block): the four come first for any query, with one similarity, in row order."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(n, d, generator=g)
    copies = [4, 7, n - 2, n - 1]
    bank[copies] = bank[7].clone()
    query = bank[7][None] + 0.3 * torch.randn(1, d, generator=g)  # nearest to the copies, but not on them
    for queries in (query, torch.cat([query, torch.randn(5, d, generator=g)])):
        sims, rows = cosine_topk(bank, queries, 4)
        assert rows[0].tolist() == copies and len(set(sims[0].tolist())) == 1
    # every row the same (a collapsed encoder): many more copies than k, still the first rows
    for k in (1, 5):
        sims, rows = cosine_topk(bank[7].repeat(n, 1), query, k)
        assert rows[0].tolist() == list(range(k)) and len(set(sims[0].tolist())) == 1


def test_neighbours_of_a_stored_image_start_with_itself_and_draw_a_grid(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, store, run = bars
    s = read_store(store)
    query = s.paths[7]
    found = neighbours(run, store, root / "bars" / query, 4, CPU, grid=tmp_path / "grid.png", log=lambda s: None)
    assert len(found) == 4 and found[0][0] == query and found[0][1] > 0.9999
    assert [p for p, _ in found][1:] and all(found[i][1] >= found[i + 1][1] for i in range(3))
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (28, 5 * 28 + 4 * 2, 3)
    assert np.array_equal(grid[:, :28], s.images[7]) and np.array_equal(grid[:, 30:58], s.images[7])
    assert list((run.run_dir / "features").glob("*.npy"))  # cached for the next query
    again = neighbours(run, store, root / "bars" / s.paths[0], 1, CPU, log=lambda s: None)
    assert again[0][0] == s.paths[0]


def test_a_query_is_held_to_the_pixel_limit_its_store_was_prepared_with(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The query is decoded with the store's own options, --max-pixels included: an image the
    store's prepare would have skipped as over-pixel-limit is refused as a query too."""
    root, _, _ = bars
    store = prepare_store(root / "bars", tmp_path / "s", DecodeOptions(28, max_pixels=40 * 40), workers=1, **QUIET).store
    Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / "fits.png")
    Image.new("RGB", (41, 40), (9, 9, 9)).save(tmp_path / "over.png")
    assert decode_query(tmp_path / "fits.png", read_store(store)).shape == (28, 28, 3)
    with pytest.raises(FastclrError, match=re.escape(f"--query {tmp_path / 'over.png'} cannot be used: over-pixel-limit "
                                                     "(41x40 = 1640 pixels, more than 1600 (--max-pixels))")):
        decode_query(tmp_path / "over.png", read_store(store))


def test_k_below_one_is_refused_before_the_search(bars) -> None:  # type: ignore[no-untyped-def]
    """-k 0 asks for no neighbour: a one-line error, not an empty answer."""
    root, store, run = bars
    with pytest.raises(FastclrError, match="^-k must be at least 1, got 0$"):
        neighbours(run, store, root / "bars" / read_store(store).paths[0], 0, CPU, log=lambda s: None)


def test_a_grid_of_more_tiles_than_a_row_wraps_onto_the_next_row() -> None:
    """Tiles go left to right in rows of `columns`, `gap` white pixels apart; the query and 10
    neighbours fill one row of 9 and two tiles of a second. Gray tiles are drawn as gray RGB."""
    tiles = [np.full((4, 4, 3), (i, 2 * i, 3 * i), np.uint8) for i in range(1, 11)] + [np.full((4, 4, 1), 99, np.uint8)]
    grid = np.asarray(grid_image(tiles, gap=2, columns=9))
    assert grid.shape == (2 * 4 + 2, 9 * 4 + 8 * 2, 3)
    for i, t in enumerate(tiles):
        r, c = divmod(i, 9)
        assert np.array_equal(grid[r * 6 : r * 6 + 4, c * 6 : c * 6 + 4], np.broadcast_to(t, (4, 4, 3))), i
    assert (grid[4:6] == 255).all() and (grid[:, 4:6] == 255).all()  # the gaps
    assert (grid[6:, 12:] == 255).all()  # the rest of the second row is blank


def test_store_features_cached_at_one_precision_are_not_served_at_another(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The cache of a store's features is keyed by the precision too: features computed in bf16
    (a few 1e-4 off) are not what an fp32 search of the same run gets, which are its fp32 features."""
    _, store, _ = bars
    run = make_run(tmp_path / "run")
    s = read_store(store)
    store_features(load_run(run.run_dir, precision="bf16"), s, CPU, log=lambda line: None)
    np.testing.assert_array_equal(store_features(run, s, CPU, log=lambda line: None), embed_images(run, s.images, CPU))


def test_embedding_more_rows_than_one_read_gives_the_features_of_all_rows_at_once(  # type: ignore[no-untyped-def]
        bars, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store is embedded `_CHUNK` rows at a time, so that a memory map larger than memory is
    never read whole. With reads of 5 rows, the 12 rows go as 5, 5 and 2, each row once, and the
    features equal those of embedding every row in one read."""
    import fastclr.ingest.embed as embed_module

    _, store, run = bars
    images = read_store(store).images
    whole = embed_module.embed_images(run, images, CPU)
    sizes: list[int] = []
    real = embed_module.features_of

    def counting(encoder: torch.nn.Module, spec: EncoderSpec, x: np.ndarray, *a: object, **k: object) -> torch.Tensor:
        sizes.append(len(x))
        return real(encoder, spec, x, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(embed_module, "_CHUNK", 5)
    monkeypatch.setattr(embed_module, "features_of", counting)
    chunked = embed_module.embed_images(run, images, CPU)
    assert sizes == [5, 5, 2]
    assert whole.shape == chunked.shape == (12, run.spec.feature_dim)
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-5)


def test_neighbours_after_the_runs_encoder_changed_are_those_of_the_new_encoder(  # type: ignore[no-untyped-def]
        bars, tmp_path: Path) -> None:
    """The store's features are cached in the run directory, keyed by store.json and the encoder's
    weights. Once the run's encoder changes (trained on and exported again), the old weights' cache
    is not served: the neighbours equal those a fresh run directory with the new weights finds."""
    import shutil

    root, store, _ = bars
    run = make_run(tmp_path / "run")
    query = root / "bars" / read_store(store).paths[2]
    old = neighbours(run, store, query, 12, CPU, log=lambda s: None)
    with torch.no_grad():
        for p in run.encoder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    save_encoder(run.run_dir / "encoder.safetensors", run.encoder, run.spec)
    changed = load_run(run.run_dir, precision="fp32")
    (tmp_path / "fresh").mkdir()
    for name in ("encoder.safetensors", "config.toml"):
        shutil.copy(run.run_dir / name, tmp_path / "fresh" / name)
    want = neighbours(load_run(tmp_path / "fresh", precision="fp32"), store, query, 12, CPU, log=lambda s: None)
    assert want != old  # the change moves the similarities
    assert neighbours(changed, store, query, 12, CPU, log=lambda s: None) == want


def test_a_damaged_or_unwritable_feature_cache_costs_a_recomputation_not_the_answer(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The store's features are a cache: one cut short (as numpy once left it on a full disk) is
    recomputed and rewritten whole, and one that cannot be written is a note, not an error."""
    root, store, run = bars
    s = read_store(store)
    query = root / "bars" / s.paths[5]
    want = neighbours(run, store, query, 3, CPU, log=lambda s: None)
    cache = next((run.run_dir / "features").glob(f"{store.name}-*.npy"))  # (the run searched other stores too)
    cache.write_bytes(cache.read_bytes()[:200])
    notes: list[str] = []
    assert neighbours(run, store, query, 3, CPU, log=notes.append) == want
    assert any("unreadable feature cache" in n for n in notes), notes
    assert np.load(cache).shape == (len(s.images), run.spec.feature_dim)
    cache.unlink()
    notes.clear()
    with file_size_limit(64):
        assert neighbours(run, store, query, 3, CPU, log=notes.append) == want
    assert any(n.startswith("note: store features not cached") and "ulimit -f" in n for n in notes), notes
    assert not cache.exists()


def test_embed_and_neighbours_cli(bars, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    root, store, run = bars
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    (tmp_path / "zero.jpg").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo.png")
    assert main(["embed", str(run.run_dir), "--data", str(store), "--out", str(tmp_path / "e.npy"), "--device", "cpu"]) == 0
    assert np.load(tmp_path / "e.npy").shape[0] == 12 and (tmp_path / "e.csv").exists()
    q = root / "bars" / read_store(store).paths[3]
    assert main(["neighbours", str(run.run_dir), "--data", str(store), "--query", str(q), "-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].split()[0] == "1" and out[-2].split()[2] == read_store(store).paths[3]
    # a folder is decoded, not prepared: its progress line says so (it said "prepare 12/12 files")
    assert main(["embed", str(run.run_dir), "--data", str(root / "bars"), "--out", str(tmp_path / "f.npy"),
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "decode 12/12 files" in err and "prepare " not in err, err
    for args, message in [
        (["embed", str(run.run_dir), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.npy")], "not a built-in dataset"),
        (["neighbours", str(run.run_dir), "--data", str(root / "bars"), "--query", str(q)], "not a fastclr store"),
        (["neighbours", str(run.run_dir), "--data", "mnist", "--query", str(q)], "`fastclr prepare --builtin mnist --out STORE`"),
        (["neighbours", str(run.run_dir), "--data", str(store), "--query", str(tmp_path / "no.jpg")],
         f"--query {tmp_path / 'no.jpg'}: no such image file; give one image file"),
        # it was "no such image file" too
        (["neighbours", str(run.run_dir), "--data", str(store), "--query", str(tmp_path / "fifo.png")],
         f"--query {tmp_path / 'fifo.png'}: not a regular file (a pipe or device); give one image file"),
        # named as prepare names them (both were "corrupt (not a recognisable image file)"; a folder was "no such file")
        (["neighbours", str(run.run_dir), "--data", str(store), "--query", str(tmp_path / "notes.txt")],
         f"--query {tmp_path / 'notes.txt'} cannot be used: not-an-image (extension .txt is not an image format)"),
        (["neighbours", str(run.run_dir), "--data", str(store), "--query", str(tmp_path / "zero.jpg")],
         f"--query {tmp_path / 'zero.jpg'} cannot be used: zero-bytes (empty file)"),
        (["neighbours", str(run.run_dir), "--data", str(store), "--query", str(root / "bars")],
         f"--query {root / 'bars'} is a folder; give one image file"),
        (["embed", str(tmp_path), "--data", str(store), "--out", str(tmp_path / "x.npy")], "not a fastclr run directory"),
        (["embed", str(run.run_dir), "--data", str(run.run_dir), "--out", str(tmp_path / "x.npy")],
         f"--data {run.run_dir} is a fastclr run, not images; give a store"),
        (["embed", str(run.run_dir), "--data", str(store), "--split", "unlabeled", "--out", str(tmp_path / "x.npy")],
         f"--split unlabeled: {store} has no images there"),
        # a folder (a trailing slash): feats.npy and feats.csv were written beside it
        (["embed", str(run.run_dir), "--data", str(store), "--out", str(tmp_path) + "/"],
         f"--out {tmp_path}/ names a folder; give a file name, e.g. --out {tmp_path / 'feats'}"),
        # an output path under a file: named before any image is read (it was a traceback after the work)
        (["embed", str(run.run_dir), "--data", str(store), "--out", str(tmp_path / "e.csv" / "x.npy")],
         f"--out {tmp_path / 'e.csv'}: {tmp_path / 'e.csv'} is a file, not a folder; give another --out"),
    ]:
        assert main([*args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.npy").exists()
    assert main(["prepare", str(root / "bars"), "--size", "16", "--out", str(tmp_path / "e.csv" / "store")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot use {tmp_path / 'e.csv'}") and "give another path" in err, err


def test_embedding_a_folder_keeps_a_row_for_every_copy(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A folder is embedded through a temporary store: one row per file, so a copy of an image is
    embedded too (a store for training holds it once, listing the copy as a duplicate)."""
    import shutil

    root, store, run = bars
    folder = tmp_path / "bars"
    shutil.copytree(root / "bars", folder)
    shutil.copy(folder / "class0" / "img000.png", folder / "copy.png")
    npy, index = embed(run, str(folder), tmp_path / "e.npy", CPU, log=lambda s: None)
    rows = {r["path"]: i for i, r in enumerate(read_index(index))}
    assert len(rows) == len(read_store(store).paths) + 1 and "copy.png" in rows
    h = np.load(npy)
    assert np.array_equal(h[rows["copy.png"]], h[rows["class0/img000.png"]])


def test_outputs_never_replace_a_stores_files_the_query_or_another_kind_of_file(  # type: ignore[no-untyped-def]
        bars, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each output is checked before any work: an embedding named into a store replaced its
    manifest.csv (every later use failed, and so did `prepare` to mend it), a grid named as its
    query replaced the photo, a grid with a name PIL cannot write failed after the search, and a
    report written as query.jpg replaced the JPEG with HTML."""
    root, store, run = bars
    q = root / "bars" / read_store(store).paths[3]
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    query = q.read_bytes()
    photo = root / "bars" / read_store(store).paths[4]
    its_bytes = photo.read_bytes()
    (tmp_path / "data.csv").write_text("date,sales\n2026-12-01,3\n", encoding="utf-8")
    (tmp_path / "mine.skipped.csv").write_text("my notes\n", encoding="utf-8")
    np.save(tmp_path / "weights.npy", np.arange(6.0))  # a user's array, no embedding's index beside it
    r = str(run.run_dir)
    for args, message in [
        (["embed", r, "--data", str(store), "--out", str(store / "manifest")],
         f"--out {store / 'manifest.npy'} is inside the store {store}, whose files fastclr reads"),
        (["neighbours", r, "--data", str(store), "--query", str(q), "--grid", str(q)],
         f"--grid {q} is {q}, which this command reads; choose another --grid"),
        (["neighbours", r, "--data", str(store), "--query", str(q), "--grid", str(tmp_path / "g.txt")],
         f"--grid {tmp_path / 'g.txt'}: the grid is written as .png or .jpg"),
        (["neighbours", r, "--data", str(store), "--query", str(q), "--grid", str(store / "grid.png")],
         "is inside the store"),
        (["report", r, "--out", str(q)], f"--out {q}: a report is written as .html or .htm; give a name ending in .html"),
        (["export", r, "--out", str(store / "enc.safetensors")], "is inside the store"),
        # `--out data` beside the user's own data.csv (or data.skipped.csv) replaced (or deleted) it
        (["embed", r, "--data", str(store), "--out", str(tmp_path / "data")],
         f"--out {tmp_path / 'data'} would replace {tmp_path / 'data.csv'}, which is not an embedding's file"),
        (["embed", r, "--data", str(store), "--out", str(tmp_path / "mine.npy")],
         f"would replace {tmp_path / 'mine.skipped.csv'}, which is not an embedding's file"),
        (["embed", r, "--data", str(store), "--out", str(tmp_path / "weights")],
         f"would replace {tmp_path / 'weights.npy'}, which has no index weights.csv beside it"),
        # a grid named as another of the store's photos replaced it (and a later prepare took the grid in)
        (["neighbours", r, "--data", str(store), "--query", str(q), "--grid", str(photo)],
         f"--grid {photo} is there and is not a grid fastclr wrote (a photo of the store's, say, or a grid "
         "written before grids were marked); choose another --grid, or remove the file to replace it"),
    ]:
        assert main([*args, "--device", "cpu"] if args[0] != "export" else args) == 2, args
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert "nearest to" not in out  # refused before the search
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before and q.read_bytes() == query
    assert (tmp_path / "data.csv").read_text(encoding="utf-8").startswith("date,sales")
    assert (tmp_path / "mine.skipped.csv").read_text(encoding="utf-8") == "my notes\n"
    assert np.array_equal(np.load(tmp_path / "weights.npy"), np.arange(6.0)) and photo.read_bytes() == its_bytes
    for name in ("g.png", "g.jpg", "g.gif", "g.webp", "g.tif"):  # a grid is replaced by the next one into the same name
        for _ in range(2):
            assert main(["neighbours", r, "--data", str(store), "--query", str(q), "--grid", str(tmp_path / name),
                         "-k", "2", "--device", "cpu"]) == 0
    # an embedding's own pair is replaced by the next one into the same name
    for _ in range(2):
        assert main(["embed", r, "--data", str(store), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    assert main(["embed", r, "--data", str(store), "--out", str(tmp_path / "e.csv"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in tmp_path.glob("e.*")) == ["e.csv", "e.npy"]  # the index's name is the pair's (not e.csv.npy)


def test_the_onnx_check_images_of_a_store_run_are_its_own_without_a_warning(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`export --format onnx` checks onnxruntime on the run's own images: from a store they are a
    read-only memory map, which torch.from_numpy warned about on every such export; and a small
    store's test split (here 2 images) is topped up to 64 with training images (it checked on 8)."""
    import warnings

    from fastclr.cli import _check_images
    from fastclr.data import load_data

    root, store, _ = bars
    run = make_run(tmp_path / "run", data=str(store))
    ds = load_data(run.config.data)
    assert ds.test is not None and len(ds.test) < 64  # a small store: its test split is topped up with training images
    own = np.concatenate([ds.test.images, ds.pretrain.images[: 64 - len(ds.test)]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = _check_images(run)
    assert got is not None and got.shape == (len(own), 3, 28, 28)
    mean, std = run.mean.view(1, -1, 1, 1), run.std.view(1, -1, 1, 1)
    want = torch.from_numpy(own).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(got * std + mean, want, atol=1e-5)


def test_only_fastclrs_own_folders_are_protected_as_stores_runs_and_classifiers(tmp_path: Path) -> None:
    """A store.json or a config.toml with a checkpoints/ folder of the user's own do not make a folder
    a store or a run (every output under such a project folder was refused); a finetune output's
    classifier, which distill reads, is protected like a run's files (export replaced it)."""
    from fastclr.runs import refuse_output

    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "store.json").write_text('{"shop": "A"}', encoding="utf-8")
    (project / "config.toml").write_text("[train]\nepochs = 1.0\n", encoding="utf-8")  # a --config overrides file
    for out in (project / "out" / "e.npy", project / "checkpoints" / "r.html", project / "encoder.safetensors"):
        refuse_output(out)
    ft = tmp_path / "run" / "finetune" / "10-per-class-seed0-head0"
    ft.mkdir(parents=True)
    for name in ("classifier.safetensors", "encoder.safetensors", "finetune.json"):
        (ft / name).write_bytes(b"the classifier's")
    for name in ("classifier.safetensors", "encoder.safetensors", "finetune.json"):
        with pytest.raises(FastclrError, match=f"would replace {name} of the classifier in {ft}, which fastclr reads"):
            refuse_output(ft / name)
    refuse_output(ft / "other.safetensors")


def test_features_that_are_not_finite_are_refused_before_anything_is_written(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A damaged or diverged encoder gives NaN features: embed wrote them to F.npy, and neighbours
    cached them and ranked NaN similarities, without a word. Both now end in the one line evaluate
    gives, and nothing is written: no embedding, no cache, no grid."""
    root, store, _ = bars
    run = make_run(tmp_path / "run")
    bn = next(m for m in run.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var[0] = float("nan")  # one channel, as a diverged run leaves it
    message = "the encoder's features hold NaN or infinite values (12 of 12 rows)"
    with pytest.raises(FastclrError, match=re.escape(message)):
        embed(run, str(store), tmp_path / "out" / "e.npy", CPU, log=lambda s: None)
    query = root / "bars" / read_store(store).paths[0]
    with pytest.raises(FastclrError, match=re.escape(message)):
        neighbours(run, store, query, 3, CPU, grid=tmp_path / "out" / "g.png", log=lambda s: None)
    assert not (tmp_path / "out").exists() and not (run.run_dir / "features").exists()


def test_a_refused_embed_or_search_makes_no_output_folder(bars, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """--out and --grid name folders that do not exist yet: a command refused for its data or its
    query made them anyway, empty, though nothing was written."""
    root, store, run = bars
    r = str(run.run_dir)
    for args in (["embed", r, "--data", str(tmp_path / "typo"), "--out", str(tmp_path / "new" / "deep" / "e")],
                 ["neighbours", r, "--data", str(store), "--query", str(tmp_path / "no.png"), "--grid",
                  str(tmp_path / "new" / "deep" / "g.png")]):
        assert main([*args, "--device", "cpu"]) == 2
        assert capsys.readouterr().err.count("\n") == 1
        assert not (tmp_path / "new").exists()
    assert main(["neighbours", r, "--data", str(store), "--query", str(root / "bars" / read_store(store).paths[0]),
                 "-k", "4", "--grid", str(tmp_path / "new" / "deep" / "g.png"), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "new" / "deep" / "g.png").size == (5 * 28 + 4 * 2, 28)  # the folder made for it


def test_a_grid_that_cannot_be_written_keeps_the_one_there(bars, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """PIL wrote the grid straight to its name: a full disk (here a file-size limit) left the earlier
    grid cut short. It is written whole or not at all now, with one line naming the file."""
    root, store, run = bars
    query = root / "bars" / read_store(store).paths[2]
    grid = tmp_path / "g.png"
    neighbours(run, store, query, 4, CPU, grid=grid, log=lambda s: None)
    good = grid.read_bytes()
    assert len(good) > 64
    with file_size_limit(64), pytest.raises(FastclrError, match=re.escape(f"cannot write {grid} (")):
        neighbours(run, store, query, 8, CPU, grid=grid, log=lambda s: None)
    assert grid.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temporary left beside it


def test_a_store_named_like_a_built_in_dataset_is_asked_for_by_path(  # type: ignore[no-untyped-def]
        bars, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`fastclr prepare --out mnist`, then `--data mnist`: embed took built-in MNIST (70,000 rows,
    downloaded where missing) and neighbours the store, each without a word. Both refuse in one
    line, as pretrain does for a new run (a run's recorded name is the built-in); `./mnist` is the store."""
    import shutil

    root, store, run = bars
    shutil.copytree(store, tmp_path / "mnist")
    monkeypatch.chdir(tmp_path)
    query = str(root / "bars" / read_store(store).paths[0])
    says = "--data mnist names the built-in dataset mnist and the store ./mnist in this folder; give ./mnist"
    for argv in (["embed", str(run.run_dir), "--data", "mnist", "--out", "m"],
                 ["neighbours", str(run.run_dir), "--data", "mnist", "--query", query]):
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(f"error: {says}")
    assert main(["pretrain", "--data", "mnist", "--run-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {says}") and not (tmp_path / "r").exists()
    assert not (tmp_path / "m.npy").exists()
    assert main(["embed", str(run.run_dir), "--data", "./mnist", "--out", "m"]) == 0
    assert np.load(tmp_path / "m.npy").shape[0] == len(read_store(store).paths)
    assert main(["neighbours", str(run.run_dir), "--data", "./mnist", "--query", query, "-k", "1"]) == 0
    # a folder of images of that name too (embed took the built-in's 70,000 rows); MNIST's own data folder is data
    shutil.rmtree(tmp_path / "mnist")
    shutil.copytree(root / "bars", tmp_path / "mnist")
    assert main(["embed", str(run.run_dir), "--data", "mnist", "--out", "m2"]) == 2
    assert capsys.readouterr().err == ("error: --data mnist names the built-in dataset mnist and the folder ./mnist in "
                                       "this folder; give ./mnist for the folder's images, or rename the folder to use "
                                       "the built-in\n") and not (tmp_path / "m2.npy").exists()
    from fastclr.data.datasets import holds_dataset

    (tmp_path / "data" / "mnist").mkdir(parents=True)
    (tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    assert holds_dataset("mnist", tmp_path / "data") and holds_dataset("mnist", tmp_path / "data" / "mnist")
    assert not holds_dataset("mnist", tmp_path / "mnist")
    # a folder of that name holding no images (embeddings written into it, a run) is no folder of images: not refused
    from fastclr.ingest.embed import holds_images

    (tmp_path / "out" / "deep").mkdir(parents=True)
    (tmp_path / "out" / "e.npy").write_bytes(b"")
    (tmp_path / "out" / "e.csv").write_text("row\n")
    assert holds_images(tmp_path / "mnist") and not holds_images(tmp_path / "out")
    (tmp_path / "out" / "deep" / "x.JPG").write_bytes(b"")
    assert holds_images(tmp_path / "out")


def test_an_empty_data_and_a_nameless_one_are_one_line_before_any_work(  # type: ignore[no-untyped-def]
        bars, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--data ""` (an unset variable): embed walked this folder and embedded all of it, pretrain
    was told this folder is not a store. `--data .` or `/` given to neighbours, which needs a store:
    a traceback from the store name it suggested (`.` and `/` have none)."""
    root, store, run = bars
    monkeypatch.chdir(tmp_path)
    query = str(root / "bars" / read_store(store).paths[0])
    empty = ("error: --data '' names nothing (an unset variable?); give a built-in dataset (fashion-mnist, mnist, "
             "cifar10, cifar100, stl10) or a path (. for this folder)\n")
    for argv in (["embed", str(run.run_dir), "--data", "", "--out", "m"],
                 ["neighbours", str(run.run_dir), "--data", "", "--query", query],
                 ["pretrain", "--data", "", "--run-dir", str(tmp_path / "r")]):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.endswith(empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert main(["embed", str(run.run_dir), "--data", query, "--out", "m"]) == 2  # one image: where it goes instead
    assert capsys.readouterr().err == (f"error: --data {query}: not a built-in dataset (fashion-mnist, mnist, cifar10, "
                                       "cifar100, stl10), a store or a folder of images; put it in a folder of its own "
                                       "to embed it, or give it to `fastclr neighbours --query`\n")
    for data, suggested in ((".", f"{tmp_path}.store"), ("/", "images.store")):
        assert main(["neighbours", str(run.run_dir), "--data", data, "--query", query]) == 2
        assert capsys.readouterr().err == (f"error: {data} is not a fastclr store (it has no store.json); if it holds "
                                           f"your images, make one with `fastclr prepare {data} --size S --out "
                                           f"{suggested}` and give that\n")


@pytest.mark.parametrize("out", ["", ".", "/"])
def test_an_output_without_a_file_name_is_one_line_before_any_work(  # type: ignore[no-untyped-def]
        bars, out: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--out ""` (or `.`, `/`) ended embed and export in a traceback about an empty name after the
    work; neighbours' `--grid ""` drew nothing and said nothing. And an index path that is a folder
    let the .npy be written without its index, against "written together or not at all"."""
    import shutil

    root, store, run = bars
    monkeypatch.chdir(tmp_path)
    query = str(root / "bars" / read_store(store).paths[0])
    for argv in (["embed", str(run.run_dir), "--data", str(store), "--out", out],
                 ["export", str(run.run_dir), "--format", "fastclr", "--out", out],
                 ["neighbours", str(run.run_dir), "--data", str(store), "--query", query, "--grid", out]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and re.match(r"^error: --(out|grid) names no file; give a file name, e.g. --(out|grid) ", err[0]), err
    (tmp_path / "photos").mkdir()  # --out beside a folder of the same name writes photos.npy and .csv, as before
    assert main(["embed", str(run.run_dir), "--data", str(store), "--out", "photos"]) == 0
    assert (tmp_path / "photos.npy").is_file() and (tmp_path / "photos.csv").is_file()
    for name in ("photos", "photos.npy", "photos.csv"):
        shutil.rmtree(tmp_path / name) if (tmp_path / name).is_dir() else (tmp_path / name).unlink()
    (tmp_path / "e.csv").mkdir()
    assert main(["embed", str(run.run_dir), "--data", str(store), "--out", "e"]) == 2
    assert "would write e.csv, which is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.csv"]


@pytest.mark.parametrize("left", [".images.u8.partial", "images.u8"])
def test_an_unfinished_store_is_refused_as_such_not_read_as_a_folder_of_images(bars, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                               left: str) -> None:
    """`embed --data STORE` on a store an interrupted prepare left: it was walked as a folder of
    images and refused as "no images (1 not-an-image)"; pretrain named it an incomplete store."""
    _, _, run = bars
    unfinished = tmp_path / "store"
    unfinished.mkdir()
    (unfinished / left).write_bytes(b"\0" * 784)
    with pytest.raises(FastclrError, match=rf"^{re.escape(str(unfinished))} is an incomplete store \(an interrupted "
                                           r"prepare\): it has no store.json; run the same `fastclr prepare"):
        embed(run, str(unfinished), tmp_path / "emb.npy", CPU, log=lambda s: None)
    assert not (tmp_path / "emb.npy").exists()


def test_features_coarser_than_the_training_are_said_once_with_the_flag_that_matches_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`embed` of a run trained in fp32 on a machine where `auto` computes bf16 gave bf16 features without
    a word (its .npy records nothing); said once, for auto only, naming --precision fp32. A run trained
    in bf16, or fp32 asked for, gets no note."""
    import fastclr.pretrained as pretrained
    from fastclr.runtime import Precision, resolve_precision
    from tiny import tiny_dataset, tiny_run

    def native_bf16(requested: str, device: torch.device, **kw: object) -> Precision:
        return Precision("bf16", "test cpu has native bf16 (AMX-BF16)") if requested == "auto" else \
            resolve_precision(requested, device)
    monkeypatch.setattr(pretrained, "resolve_precision", native_bf16)
    ds = tiny_dataset(64)
    notes: dict[tuple[str, str], list[str]] = {}
    for trained in ("fp32", "bf16"):
        run = tiny_run(tmp_path / trained, ds, train__precision=trained)
        for asked in ("auto", "fp32"):
            lines: list[str] = []
            assert load_run(run, "cpu", asked, log=lines.append).precision.name == ("bf16" if asked == "auto" else "fp32")
            notes[trained, asked] = lines
    assert notes["fp32", "auto"] == [f"note: computing in bf16 (test cpu has native bf16 (AMX-BF16)); {tmp_path / 'fp32'} "
                                     "trained in fp32: --precision fp32 computes as it trained"]
    assert notes["fp32", "fp32"] == notes["bf16", "auto"] == notes["bf16", "fp32"] == []


def test_neighbours_names_with_control_characters_are_printed_escaped(tmp_path: Path) -> None:
    """An image file named with a terminal escape sequence cleared the screen and retitled the window
    when `neighbours` printed it; its control characters are written as escapes, other characters as is."""
    from fastclr.streams import shown

    folder = tmp_path / "pics"
    bar_images(folder, n_per_class=3, size=32)
    first = sorted(folder.rglob("*.png"))[0]
    trap = first.with_name("\x1b]0;owned\x07\x1b[2Jé.png")
    first.rename(trap)
    store = prepare_store(folder, tmp_path / "store", DecodeOptions(28), workers=1, **QUIET).store
    lines: list[str] = []
    found = neighbours(make_run(tmp_path / "run"), store, trap, 6, CPU, log=lines.append)
    stored = next(p for p, _ in found if "owned" in p)
    assert "\x1b" not in "".join(lines) and "\x07" not in "".join(lines)
    assert any(line.endswith(shown(stored)) for line in lines[1:]) and shown(stored).endswith(r"\x1b]0;owned\x07\x1b[2Jé.png")
