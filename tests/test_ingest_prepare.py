"""`fastclr prepare`: the issue's fixture folder, exact store contents and skip report,
incremental re-runs, atomic writes, and one-line errors for bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastclr.cli import main
from fastclr.data.store import is_store, read_csv, read_store
from fastclr.errors import FastclrError
from fastclr.ingest import DecodeOptions, prepare_store
from fastclr.ingest.decode import Unusable, decode_image, process_file, to_8bit
from fastclr.ingest.prepare import holdout, layout, refuse_split_folders
from fastclr.ingest.walk import REASONS
from ingest_fixtures import FIXTURE_IMAGES, PIXEL_LIMIT, RED, bar_images, halves, write_fixture_folder

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], object]:
    root = tmp_path_factory.mktemp("fixture")
    expected_skips = write_fixture_folder(root / "photos")
    result = prepare_store(root / "photos", root / "store", DecodeOptions(16, max_pixels=PIXEL_LIMIT), workers=2, **QUIET)
    return root, expected_skips, result


def rows_by_path(store_dir: Path) -> dict[str, np.ndarray]:
    s = read_store(store_dir)
    return {p: np.asarray(s.images[i]) for i, p in enumerate(s.paths)}


def test_fixture_folder_gives_exactly_the_valid_images_with_labels_and_splits(fixture_store) -> None:  # type: ignore[no-untyped-def]
    root, _, result = fixture_store
    s = read_store(root / "store")
    expected = set(FIXTURE_IMAGES) | ({"dogs/locked.png"} if os.geteuid() == 0 else set())
    assert set(s.paths) == expected and len(s.paths) == len(expected)
    assert s.images.shape == (len(expected), 16, 16, 3) and isinstance(s.images, np.memmap)
    assert s.classes == ["cats", "dogs"]
    for path, label in zip(s.paths, s.labels.tolist()):
        assert label == {"loose.png": -1}.get(path, 0 if path.startswith("cats/") else 1), path
    # Rows are grouped unlabeled, train, test, each sorted by path; the test split is the hash holdout.
    names = s.split_of_rows()
    assert names[0] == "unlabeled" and s.paths[0] == "loose.png"
    for split in ("train", "test"):
        a, b = s.split_range(split)
        assert s.paths[a:b] == sorted(p for p in expected if p != "loose.png" and holdout(p) == (split == "test"))
    # As a dataset: pretrain is the unlabelled row, then the train rows (what distillation relies on)
    from fastclr.data.store import store_dataset

    ds = store_dataset(s)
    assert ds.unlabelled == 1 and ds.train is not None
    assert np.array_equal(ds.pretrain.images[1:], ds.train.images) and np.array_equal(ds.pretrain.images[0], s.images[0])
    manifest = read_csv(root / "store" / "manifest.csv")
    assert [r["index"] for r in manifest] == [str(i) for i in range(len(expected))]
    jpeg = next(r for r in manifest if r["path"] == "cats/rotated.jpg")
    assert (jpeg["width"], jpeg["height"], jpeg["mode"]) == ("32", "48", "RGB")  # displayed size, after EXIF
    data = (root / "photos" / "cats" / "png.png").read_bytes()
    png = next(r for r in manifest if r["path"] == "cats/png.png")
    assert png["bytes"] == str(len(data)) and png["sha256"] == __import__("hashlib").sha256(data).hexdigest()
    meta = json.loads((root / "store" / "store.json").read_text())
    assert meta["options"] == {"size": 16, "fit": "crop", "channels": "auto", "max_pixels": PIXEL_LIMIT,
                               "labels": "auto", "pipeline": 2}
    assert sorted(result.decoded) == sorted(expected | {"cats/over_limit.png", "cats/truncated.jpg", "dogs/garbage.png"})


def test_fixture_skip_report_is_exact(fixture_store) -> None:  # type: ignore[no-untyped-def]
    root, expected_skips, result = fixture_store
    report = read_csv(root / "store" / "skipped.csv")
    assert {r["path"]: r["reason"] for r in report} == expected_skips
    assert [r["path"] for r in report] == sorted(expected_skips)
    assert {r["reason"] for r in report} <= set(REASONS)
    details = {r["path"]: r["detail"] for r in report}
    assert details["cats/over_limit.png"] == f"400x300 = 120000 pixels, more than {PIXEL_LIMIT} (--max-pixels)"
    assert details["dogs/gone.jpg"] == "broken symbolic link"
    assert details["dogs/notes.txt"] == "extension .txt is not an image format"
    if os.geteuid() != 0:
        assert details["dogs/locked.png"] == "Permission denied"
    meta = json.loads((root / "store" / "store.json").read_text())
    assert sum(meta["skipped"].values()) == len(expected_skips) == len(result.skipped)


# (path, row, column) -> expected RGB, sampled away from the edges between the two halves.
PIXELS = {
    ("cats/png.png", 8, 2): (0, 255, 0), ("cats/png.png", 8, 13): (0, 0, 255),
    ("cats/webp.webp", 8, 2): (255, 0, 0), ("cats/webp.webp", 8, 13): (0, 255, 0),
    ("dogs/bmp.bmp", 8, 2): (0, 0, 255), ("dogs/tiff.tiff", 8, 2): (0, 255, 0),
    # transparency composited on white
    ("dogs/rgba.png", 8, 2): (255, 255, 255), ("dogs/rgba.png", 8, 13): (0, 255, 0),
    ("dogs/palette.png", 8, 2): (255, 255, 255), ("dogs/palette.png", 8, 13): (0, 0, 255),
    # 16-bit: round(10000 / 257) = 39, round(60000 / 257) = 233 (clipping would give 255)
    ("dogs/deeper/gray16.png", 8, 2): (39, 39, 39), ("dogs/deeper/gray16.png", 8, 13): (233, 233, 233),
    ("dogs/deeper/gray8.png", 8, 2): (77, 77, 77), ("dogs/deeper/gray8.png", 8, 13): (200, 200, 200),
    ("loose.png", 8, 2): (128, 128, 128),
}
# Lossy formats: within a JPEG's error of the colour.
NEAR = {
    ("cats/jpeg.jpg", 8, 2): RED, ("cats/upper.JPG", 8, 13): (0, 0, 255),
    ("dogs/cmyk.jpg", 8, 2): RED, ("dogs/cmyk.jpg", 8, 13): (0, 0, 255),  # M+Y ink is red, C+M blue
    # orientation 6: stored top red / bottom blue is displayed left blue / right red
    ("cats/rotated.jpg", 8, 2): (0, 0, 255), ("cats/rotated.jpg", 8, 13): RED,
}


def test_fixture_pixels_have_the_right_orientation_and_mode(fixture_store) -> None:  # type: ignore[no-untyped-def]
    rows = rows_by_path(fixture_store[0] / "store")
    for (path, y, x), rgb in PIXELS.items():
        assert tuple(rows[path][y, x]) == rgb, path
    for (path, y, x), rgb in NEAR.items():
        assert np.abs(rows[path][y, x].astype(int) - rgb).max() <= 6, (path, rows[path][y, x])


def test_sixteen_bit_gray_spans_the_full_range_without_saturating() -> None:
    # round(v / 257): 128 -> 0, 129 -> 1, 386 -> 2 (v >> 8 would give 1), 65535 -> 255.
    ramp = np.array([[0, 128, 129, 386, 32896, 65535]], np.uint16)
    for mode_array in (ramp, ramp.astype(">u2")):
        im = Image.frombytes("I;16B" if mode_array.dtype.byteorder == ">" else "I;16", (6, 1), mode_array.tobytes())
        assert np.asarray(to_8bit(im)).tolist() == [[0, 0, 1, 2, 128, 255]]
    assert np.asarray(to_8bit(Image.fromarray(ramp.astype(np.int32), "I"))).tolist() == [[0, 0, 1, 2, 128, 255]]


def _png(width: int, height: int, colour_type: int, depth: int, rows: np.ndarray) -> bytes:
    """A PNG written by hand (filter 0 on every row): Pillow cannot write 16-bit grey with alpha."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_sixteen_bit_grey_with_alpha_is_one_channel_as_its_eight_bit_form(tmp_path: Path) -> None:
    """Pillow opens a 16-bit grey-with-alpha PNG (colour type 4) as RGBA: such a file made a folder
    of grey images a 3-channel store. It is grey, its value the high byte as Pillow reads it (0x80
    of 0x80ff), a transparent pixel white, as for the 8-bit LA file beside it."""
    grey16 = np.array([[[0x80FF, 0xFFFF], [0x1234, 0]], [[0xFFFF, 0xFFFF], [0x0000, 0xFFFF]]], ">u2")  # (y, x, [L, A])
    (tmp_path / "la16.png").write_bytes(_png(2, 2, 4, 16, grey16.reshape(2, -1)))
    grey8 = (grey16 >> 8).astype(np.uint8)
    Image.fromarray(grey8, "LA").save(tmp_path / "la8.png")
    for name in ("la16.png", "la8.png"):
        out = process_file(tmp_path / name, name, DecodeOptions(2))
        assert out.image is not None and out.image.shape == (2, 2, 1), (name, out.reason)
        assert out.image[..., 0].tolist() == [[0x80, 255], [255, 0]], name
    assert process_file(tmp_path / "la16.png", "la16.png", DecodeOptions(2)).mode == "LA"


def test_an_update_names_the_images_gone_and_a_channel_count_it_changed(tmp_path: Path) -> None:
    """Prepare again after one file was deleted, one renamed and a colour one added to a grey folder:
    the summary said "3 files decoded, 2 reused" with neither the row dropped nor the store turned
    RGB named. A renamed file is not gone (its bytes are stored under the new name)."""
    folder = tmp_path / "grey"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (12, 12), 40 * i).save(folder / f"g{i}.png")
    lines: list[str] = []
    assert prepare_store(folder, tmp_path / "s", DecodeOptions(12), workers=1, progress=False, log=lines.append).images == 3
    assert not [line for line in lines if line.startswith("note:")]
    (folder / "g1.png").unlink()
    (folder / "g2.png").rename(folder / "renamed.png")
    Image.new("RGB", (12, 12), (200, 10, 10)).save(folder / "red.png")
    lines.clear()
    res = prepare_store(folder, tmp_path / "s", DecodeOptions(12), workers=1, progress=False, log=lines.append)
    assert res.images == 3
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == ["note: 1 image of the previous store is no longer in the folder (g1.png): its row is not in the store",
                     "note: the store has 3 channels now, 1 before: runs trained on it before no longer fit it; train "
                     "again, or give --channels 1 to keep 1"]
    assert read_store(tmp_path / "s").images.shape[-1] == 3


def test_a_store_of_the_first_pipeline_decodes_again_only_its_rgba_pngs(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipeline 2 reads a 16-bit grey-with-alpha PNG as grey, where pipeline 1 stored it as RGBA: a
    store of pipeline 1 is updated by decoding again only the rows it recorded as RGBA PNGs (which
    any of those may be), not every file, and the update names the channel count it changed."""
    import fastclr.ingest.decode as decode
    import fastclr.ingest.prepare as prepare

    folder = tmp_path / "grey"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(folder / f"g{i}.png")
    la16 = np.full((8, 8, 2), 0xFFFF, ">u2")
    la16[..., 0] = 0x7000  # grey 112, opaque: no other file's pixels
    (folder / "la16.png").write_bytes(_png(8, 8, 4, 16, la16.reshape(8, -1)))
    with monkeypatch.context() as m:  # pipeline 1 as it was
        m.setattr(decode, "file_mode", lambda im: im.mode)
        m.setattr(prepare, "PIPELINE_VERSION", 1)
        first = prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    assert (first.images, read_store(tmp_path / "s").images.shape[-1]) == (4, 3)
    lines: list[str] = []
    again = prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, progress=False, log=lines.append)
    assert (again.decoded, again.reused) == (["la16.png"], 3)
    assert read_store(tmp_path / "s").images.shape[-1] == 1
    assert [line for line in lines if line.startswith("note:")] == [
        "note: the store has 1 channel now, 3 before: runs trained on it before no longer fit it; train again, or "
        "give --channels 3 to keep 3"]


def test_pixel_limit_beyond_pillows_bomb_error_is_a_skip_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (1000, 1000), 0).save(path)  # 10x the limit: Pillow itself raises DecompressionBombError
    out = process_file(path, "bomb.png", DecodeOptions(16, max_pixels=100_000))
    assert (out.reason, out.image) == ("over-pixel-limit", None)
    assert out.detail == "more than 100000 pixels (--max-pixels)"  # our limit, not Pillow's threshold (2x)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the process-wide Pillow setting is restored


def test_read_failures_are_unreadable_skips(tmp_path: Path) -> None:
    # A file deleted, or replaced by a directory, between the walk and the read: testable as root,
    # where a chmod 000 file is still readable.
    (tmp_path / "dir.jpg").mkdir()
    for name in ("dir.jpg", "deleted.jpg"):
        out = process_file(tmp_path / name, name, DecodeOptions(16))
        assert out.reason == "unreadable" and out.detail and out.sha256 == ""


def test_an_unreadable_directory_is_reported_and_the_walk_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bar_images(tmp_path / "bars", n_per_class=2)
    import fastclr.ingest.walk as walk_mod

    real = os.scandir

    def denied(path: object) -> object:
        # As root a chmod 000 directory is still listable, so the refusal is simulated here.
        if str(path).endswith("class0"):
            raise PermissionError(13, "Permission denied")
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(walk_mod.os, "scandir", denied)
    w = walk_mod.walk_folder(tmp_path / "bars")
    assert [f.rel for f in w.files] == ["class1/img000.png", "class1/img001.png"]
    assert [(s.rel, s.reason, s.detail) for s in w.skipped] == [
        ("class0/", "unreadable", "directory cannot be listed: Permission denied")]


def test_a_file_name_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    bar_images(tmp_path / "bars", n_per_class=1)
    with open(os.path.join(os.fsencode(tmp_path / "bars"), b"caf\xe9.png"), "wb") as f:
        f.write((tmp_path / "bars" / "class0" / "img000.png").read_bytes())
    res = prepare_store(tmp_path / "bars", tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    assert res.images == 2 and [(s.rel, s.reason) for s in res.skipped] == [("caf\\xe9.png", "unreadable")]
    assert read_csv(tmp_path / "s" / "skipped.csv")[0]["path"] == "caf\\xe9.png"


def test_symbolic_links_out_of_the_folder_are_named_never_read(tmp_path: Path) -> None:
    bar_images(tmp_path / "bars", n_per_class=1)
    bar_images(tmp_path / "elsewhere", n_per_class=2)
    (tmp_path / "bars" / "class0" / "secret.png").symlink_to(tmp_path / "elsewhere" / "class1" / "img000.png")
    (tmp_path / "bars" / "class1" / "more").symlink_to(tmp_path / "elsewhere" / "class0")
    (tmp_path / "bars" / "class1" / "twin.png").symlink_to(tmp_path / "bars" / "class1" / "img000.png")  # inside: used
    res = prepare_store(tmp_path / "bars", tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    assert sorted(r["path"] for r in read_csv(tmp_path / "s" / "manifest.csv")) == [
        "class0/img000.png", "class1/img000.png"]
    assert sorted((s.rel, s.reason, s.detail) for s in res.skipped) == [  # the twin link: its bytes are in once
        ("class0/secret.png", "outside-folder", "symbolic link to a path outside the folder; copy the file in instead"),
        ("class1/more/", "outside-folder", "symbolic link to a path outside the folder; copy the file in instead"),
        ("class1/twin.png", "duplicate", "the same bytes as class1/img000.png")]


def test_a_link_into_a_sibling_folder_whose_name_extends_the_folders_is_outside(tmp_path: Path) -> None:
    """photos2/ is not inside photos/ although its path starts with photos' path: a link to it (a
    file or a folder) is named outside-folder and not read, as a link to any other folder is."""
    from fastclr.ingest.walk import walk_folder

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos2" / "more").mkdir(parents=True)
    Image.new("RGB", (8, 8), (3, 3, 3)).save(tmp_path / "photos" / "own.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photos2" / "secret.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photos2" / "more" / "other.png")
    (tmp_path / "photos" / "link.png").symlink_to(tmp_path / "photos2" / "secret.png")
    (tmp_path / "photos" / "sub").symlink_to(tmp_path / "photos2" / "more")
    w = walk_folder(tmp_path / "photos")
    assert [f.rel for f in w.files] == ["own.png"]
    assert sorted((s.rel, s.reason) for s in w.skipped) == [("link.png", "outside-folder"), ("sub/", "outside-folder")]


def test_the_walk_is_the_same_whatever_order_the_file_system_lists_entries(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two class folders each hold a link to one hidden folder: its images are walked once, under
    the link found first (class folders are walked in name order: class0's), and class1's link is
    named the duplicate. File systems list a directory in an order of their own; listed forwards or
    backwards, the walk is the same."""
    import fastclr.ingest.walk as walk_mod

    folder = tmp_path / "photos"
    bar_images(folder, n_per_class=1, size=8)
    (folder / ".shared").mkdir()
    Image.new("RGB", (8, 8), (7, 7, 7)).save(folder / ".shared" / "x.png")
    for cls in ("class0", "class1"):
        (folder / cls / "shared").symlink_to(folder / ".shared")
    real, walks = os.scandir, []
    for backwards in (False, True):
        @contextlib.contextmanager
        def listed(path: object, backwards: bool = backwards) -> Iterator[list[os.DirEntry[str]]]:
            with real(path) as it:  # type: ignore[call-overload]
                yield sorted(it, key=lambda e: e.name, reverse=backwards)

        monkeypatch.setattr(walk_mod.os, "scandir", listed)
        walks.append(walk_mod.walk_folder(folder))
    assert walks[0] == walks[1]
    assert [f.rel for f in walks[0].files] == ["class0/img000.png", "class0/shared/x.png", "class1/img000.png"]
    assert [(s.rel, s.reason, s.detail) for s in walks[0].skipped] == [
        (".shared/", "hidden-directory", "directories starting with . are not searched"),
        ("class1/shared/", "duplicate-directory", "same directory as class0/shared/, walked once")]


def test_of_several_links_to_one_folder_the_first_by_path_is_walked(tmp_path: Path) -> None:
    """A hidden folder reached only through links, two at the top (b_link, a_link) and two deeper
    (p/l, q/l): its images are walked once, under the link first by path, a_link, whatever the
    links' depth or the order they were found in (it was b_link: the last of one folder's links)."""
    from fastclr.ingest.walk import walk_folder

    root = tmp_path / "photos"
    (root / ".stash").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / ".stash" / "x.png")
    for link in ("b_link", "a_link", "q/l", "p/l"):
        (root / link).parent.mkdir(exist_ok=True)
        (root / link).symlink_to(root / ".stash")
    w = walk_folder(root)
    assert [f.rel for f in w.files] == ["a_link/x.png"]
    assert [(s.rel, s.detail) for s in w.skipped if s.reason == "duplicate-directory"] == [
        (rel, "same directory as a_link/, walked once") for rel in ("b_link/", "p/l/", "q/l/")]


def test_a_link_to_itself_and_a_fifo_named_as_an_image_are_named_never_opened(tmp_path: Path) -> None:
    """A link that resolves to itself is a symlink loop, not an unreadable file; a FIFO (or socket,
    or device) named x.jpg is not a regular file: reading it would block forever, so it is listed
    as not-an-image without being opened (its size, 0, does not make it an empty image)."""
    from fastclr.ingest.walk import walk_folder

    bar_images(tmp_path / "bars", n_per_class=1, size=8)
    (tmp_path / "bars" / "self.png").symlink_to(tmp_path / "bars" / "self.png")
    os.mkfifo(tmp_path / "bars" / "pipe.jpg")
    w = walk_folder(tmp_path / "bars")
    assert [f.rel for f in w.files] == ["class0/img000.png", "class1/img000.png"]
    assert [(s.rel, s.reason, s.detail) for s in w.skipped] == [
        ("pipe.jpg", "not-an-image", "not a regular file (FIFO, socket or device)"),
        ("self.png", "symlink-loop", "symbolic link resolves to itself")]


def test_the_store_written_inside_the_folder_is_passed_over_in_silence(tmp_path: Path) -> None:
    """A store kept inside the folder it is prepared from (here photos/out/store) is the output, not
    an entry of the folder: prepared again, it is neither read nor listed as skipped, and the folder
    holding it is not named as a class folder without images."""
    rels = bar_images(tmp_path / "photos", n_per_class=2, size=8)
    out, lines = tmp_path / "photos" / "out" / "store", []
    for _ in range(2):  # before the store is there, and once it is
        res = prepare_store(tmp_path / "photos", out, DecodeOptions(8), workers=1, progress=False, log=lines.append)
    assert res.skipped == [] and read_csv(out / "skipped.csv") == []
    assert sorted(read_store(out).paths) == rels and read_store(out).classes == ["class0", "class1"]
    assert [line for line in lines if line.startswith("note:")] == []


def test_a_labelled_image_kept_as_its_unlabelled_copy_is_named(tmp_path: Path) -> None:
    """A stray copy at the top of a class folder tree is the one kept (unlabelled rows come first);
    the label it costs is said, not lost in silence."""
    bar_images(tmp_path / "bars", n_per_class=2)
    (tmp_path / "bars" / "stray.png").write_bytes((tmp_path / "bars" / "class1" / "img001.png").read_bytes())
    lines: list[str] = []
    res = prepare_store(tmp_path / "bars", tmp_path / "s", DecodeOptions(16), workers=1, progress=False,
                        log=lines.append)
    rows = {r["path"]: r for r in read_csv(tmp_path / "s" / "manifest.csv")}
    assert rows["stray.png"]["split"] == "unlabeled" and "class1/img001.png" not in rows
    assert [(s.rel, s.reason) for s in res.skipped] == [("class1/img001.png", "duplicate")]
    assert lines[-1] == ("note: 1 labelled image (class1/img001.png) had the same bytes or pixels as an unlabelled file and was "
                         "kept unlabelled, without its class (skipped.csv: duplicate); remove the unlabelled copies and "
                         "prepare again to keep the labels")


def test_pad_keeps_the_whole_image_with_black_borders() -> None:
    buf = __import__("io").BytesIO()
    halves(64, 32, RED, (0, 0, 255)).save(buf, "PNG")
    pixels, w, h, mode = decode_image(buf.getvalue(), DecodeOptions(16, fit="pad"))
    assert (w, h, mode) == (64, 32, "RGB")
    assert pixels[:3].max() == 0 and pixels[-3:].max() == 0  # 4 black rows above and below
    assert tuple(pixels[8, 1]) == RED and tuple(pixels[8, 14]) == (0, 0, 255)
    with pytest.raises(Unusable):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, DecodeOptions(16))


def test_32_bit_gray_outside_the_16_bit_range_clips_to_black_and_white() -> None:
    """Mode I holds any 32-bit integer: values below 0 are black and above 65535 white, as the
    16-bit range's ends are (round(v / 257) of the clipped value), never wrapped around."""
    values = np.array([[-70000, -1000, -1, 0, 65535, 65536, 70000, 2**31 - 1]], np.int32)
    assert np.asarray(to_8bit(Image.fromarray(values, "I"))).tolist() == [[0, 0, 0, 0, 255, 255, 255, 255]]


def test_a_one_bit_image_is_one_channel_of_black_and_white() -> None:
    """Mode 1 (bilevel scans, fax TIFFs) is a grayscale mode: one channel, 0 and 255."""
    buf = io.BytesIO()
    halves(16, 16, (0,), (255,), "1").save(buf, "PNG")
    pixels, w, h, mode = decode_image(buf.getvalue(), DecodeOptions(8, fit="pad"))
    assert (w, h, mode) == (16, 16, "1") and pixels.shape == (8, 8, 1)
    assert (pixels[:, :3] == 0).all() and (pixels[:, 5:] == 255).all()


def test_an_image_of_exactly_the_pixel_limit_is_decoded_and_one_more_pixel_is_not() -> None:
    """--max-pixels is the largest image decoded: w x h equal to it is used, one pixel more skipped."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 50), RED).save(buf, "PNG")
    pixels, w, h, _ = decode_image(buf.getvalue(), DecodeOptions(8, max_pixels=64 * 50))
    assert (w, h) == (64, 50) and tuple(pixels[4, 4]) == RED
    with pytest.raises(Unusable) as e:
        decode_image(buf.getvalue(), DecodeOptions(8, max_pixels=64 * 50 - 1))
    assert (e.value.reason, e.value.detail) == ("over-pixel-limit", "64x50 = 3200 pixels, more than 3199 (--max-pixels)")


def test_one_channel_stores_of_colour_images_hold_pillows_luma(tmp_path: Path) -> None:
    """--channels 1 turns colour images into their luma (Pillow's RGB -> L), gray ones stay as they are."""
    (tmp_path / "f").mkdir()
    colours = {"a.png": (200, 100, 50), "b.png": (0, 0, 255), "c.png": (255, 255, 255)}
    for name, rgb in colours.items():
        Image.new("RGB", (12, 10), rgb).save(tmp_path / "f" / name)
    Image.new("L", (12, 10), 77).save(tmp_path / "f" / "d.png")
    s = read_store(prepare_store(tmp_path / "f", tmp_path / "s", DecodeOptions(8, channels="1"), workers=1, **QUIET).store)
    luma = [Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0)) for rgb in colours.values()]
    assert s.images.shape == (4, 8, 8, 1)
    assert [np.unique(s.images[i]).tolist() for i in range(4)] == [[v] for v in luma] + [[77]]


def test_unlabeled_folder_and_grayscale_auto_channels(tmp_path: Path) -> None:
    (tmp_path / "scans").mkdir()
    for i in range(3):
        Image.new("L", (20, 30), 40 * i).save(tmp_path / "scans" / f"s{i}.png")
    res = prepare_store(tmp_path / "scans", tmp_path / "store", DecodeOptions(12), workers=1, **QUIET)
    s = read_store(res.store)
    assert s.images.shape == (3, 12, 12, 1) and s.classes == [] and s.labels.tolist() == [-1, -1, -1]
    assert [int(s.images[i].max()) for i in range(3)] == [0, 40, 80]
    # A single subfolder is not a labelling: still unlabeled. --labels none ignores classes.
    lay = layout(["all/a.png", "all/b.png"])
    assert lay.classes == [] and set(lay.split.values()) == {"unlabeled"}
    lay = layout(["x/a.png", "y/b.png"], labels="none")
    assert lay.classes == [] and set(lay.label.values()) == {-1}


def test_auto_channels_promote_to_rgb_when_a_colour_image_comes_after_gray(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    Image.new("L", (16, 16), 50).save(tmp_path / "f" / "a.png")
    Image.new("L", (16, 16), 60).save(tmp_path / "f" / "b.png")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "f" / "c.png")
    s = read_store(prepare_store(tmp_path / "f", tmp_path / "s", DecodeOptions(8), workers=1, **QUIET).store)
    assert s.images.shape == (3, 8, 8, 3)
    assert [tuple(s.images[i, 0, 0]) for i in range(3)] == [(50, 50, 50), (60, 60, 60), (1, 2, 3)]


def test_gray_images_with_transparency_keep_an_auto_channel_store_gray(tmp_path: Path) -> None:
    """LA (gray with alpha) is a grayscale mode: composited onto white it is one channel, so a
    folder of L and LA images is a 1-channel store (three equal channels would triple its size and
    make the run a colour one). Transparent pixels are white (255), opaque ones keep their gray."""
    (tmp_path / "f").mkdir()
    Image.new("L", (16, 16), 50).save(tmp_path / "f" / "a.png")
    halves(16, 16, (0, 0), (90, 255), "LA").save(tmp_path / "f" / "b.png")  # left transparent, right opaque 90
    s = read_store(prepare_store(tmp_path / "f", tmp_path / "s", DecodeOptions(8), workers=1, **QUIET).store)
    assert s.images.shape == (2, 8, 8, 1)
    assert int(s.images[0].min()) == int(s.images[0].max()) == 50
    assert (int(s.images[1, 4, 1, 0]), int(s.images[1, 4, 6, 0])) == (255, 90)
    assert [r["mode"] for r in read_csv(tmp_path / "s" / "manifest.csv")] == ["L", "LA"]


def test_palette_images_of_greys_are_gray_and_an_update_decides_it_as_a_fresh_prepare(tmp_path: Path) -> None:
    """A GIF (or palette PNG) saved from a grey image holds a palette of greys: it is a grayscale
    image, so a folder of them and L files is a 1-channel store (it was three equal channels), and
    the same pixels as an L file count as one image. A palette with colours in use stays colour.
    Beside a colour image the grey palette rows are three equal channels; once the colour file is
    gone an update gives them one channel, byte for byte what a fresh prepare writes."""
    folder = tmp_path / "f"
    folder.mkdir()
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey, "L").save(folder / "a.png")

    def greys(pixels: np.ndarray) -> Image.Image:  # a palette of greys in another order (Pillow reads 0..255 in order as L)
        im = Image.fromarray(255 - pixels, "P")
        im.putpalette([255 - i for i in range(256) for _ in range(3)])
        return im

    greys(grey[::-1].copy()).save(folder / "b.gif")
    greys(grey).save(folder / "same.png")  # a.png's pixels as a palette PNG
    Image.new("RGB", (16, 16), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "red.gif")
    first = prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    s = read_store(first.store)
    assert s.images.shape == (3, 8, 8, 3) and [sk.reason for sk in first.skipped] == ["duplicate"]
    assert tuple(s.images[s.paths.index("red.gif"), 0, 0]) == (200, 10, 10)
    b = np.asarray(s.images[s.paths.index("b.gif")])
    assert (b == b[..., :1]).all()
    (folder / "red.gif").unlink()
    again = prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    fresh = prepare_store(folder, tmp_path / "fresh", DecodeOptions(8), workers=1, **QUIET).store
    assert again.decoded == ["same.png"]  # only the duplicate, whose kept twin may have gone
    assert read_store(fresh).images.shape == (2, 8, 8, 1)
    assert (fresh / "images.u8").read_bytes() == (tmp_path / "s" / "images.u8").read_bytes()
    assert np.array_equal(read_store(fresh).images[read_store(fresh).paths.index("b.gif")], b[..., :1])


def test_parallel_and_serial_decoding_write_identical_stores(tmp_path: Path) -> None:
    bar_images(tmp_path / "bars", n_per_class=10)
    a = prepare_store(tmp_path / "bars", tmp_path / "a", DecodeOptions(16), workers=1, **QUIET).store
    b = prepare_store(tmp_path / "bars", tmp_path / "b", DecodeOptions(16), workers=2, **QUIET).store
    assert (a / "images.u8").read_bytes() == (b / "images.u8").read_bytes()
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()


def test_incremental_rerun_decodes_only_new_and_changed_files(tmp_path: Path) -> None:
    folder = tmp_path / "bars"
    rels = bar_images(folder, n_per_class=6)
    opts = DecodeOptions(16)
    first = prepare_store(folder, tmp_path / "s", opts, workers=1, **QUIET)
    assert sorted(first.decoded) == rels
    before = rows_by_path(tmp_path / "s")

    Image.new("RGB", (20, 20), (9, 9, 9)).save(folder / "class0" / "new.png")  # new
    shutil.copy(folder / rels[3], folder / "class1" / "copy.png")  # new path, known content (its file goes)
    Image.new("RGB", (20, 20), (200, 0, 0)).save(folder / rels[1])  # changed content
    later = time.time() + 5
    os.utime(folder / rels[2], (later, later))  # touched, same content
    (folder / rels[3]).unlink()  # deleted
    (folder / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)  # new and corrupt

    second = prepare_store(folder, tmp_path / "s", opts, workers=2, **QUIET)
    assert sorted(second.decoded) == sorted(["class0/new.png", rels[1], "class1/broken.jpg"])
    after = rows_by_path(tmp_path / "s")
    assert set(after) == (set(rels) - {rels[3]}) | {"class0/new.png", "class1/copy.png"}
    for p in set(rels) - {rels[1], rels[3]}:
        assert np.array_equal(after[p], before[p]), p
    assert np.array_equal(after["class1/copy.png"], before[rels[3]])
    assert tuple(after[rels[1]][5, 5]) == (200, 0, 0)
    # The re-run store equals a fresh prepare of the grown folder, and a third run decodes nothing.
    fresh = rows_by_path(prepare_store(folder, tmp_path / "fresh", opts, workers=1, **QUIET).store)
    assert fresh.keys() == after.keys() and all(np.array_equal(fresh[p], after[p]) for p in fresh)
    third = prepare_store(folder, tmp_path / "s", opts, workers=1, **QUIET)
    assert third.decoded == [] and [s.rel for s in third.skipped] == ["class1/broken.jpg"]
    # Other pixel options make every file decode again.
    assert len(prepare_store(folder, tmp_path / "s", DecodeOptions(12), workers=1, **QUIET).decoded) == len(after) + 1


def test_a_same_size_edit_in_place_is_decoded_again(tmp_path: Path) -> None:
    """The cheap check takes a file from the previous store when its path, size and mtime are
    unchanged: an edit that keeps the size (a BMP of the same dimensions) but moves the mtime is a
    changed file, decoded again, and the store equals a fresh prepare of the folder."""
    folder = tmp_path / "f"
    folder.mkdir()
    Image.new("RGB", (16, 16), (10, 10, 10)).save(folder / "a.bmp")
    Image.new("RGB", (16, 16), (99, 0, 0)).save(folder / "b.bmp")
    prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    size = (folder / "a.bmp").stat().st_size
    Image.new("RGB", (16, 16), (200, 200, 200)).save(folder / "a.bmp")
    st = (folder / "a.bmp").stat()
    os.utime(folder / "a.bmp", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # surely another mtime
    assert (folder / "a.bmp").stat().st_size == size
    again = prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    assert again.decoded == ["a.bmp"] and again.reused == 1
    s = read_store(again.store)
    assert tuple(s.images[s.paths.index("a.bmp"), 0, 0]) == (200, 200, 200)
    fresh = prepare_store(folder, tmp_path / "fresh", DecodeOptions(8), workers=1, **QUIET).store
    assert (fresh / "images.u8").read_bytes() == (tmp_path / "s" / "images.u8").read_bytes()
    assert (fresh / "manifest.csv").read_text() == (tmp_path / "s" / "manifest.csv").read_text()


def test_gray_rows_reused_from_a_colour_store_are_gray_again_once_the_colour_image_is_gone(tmp_path: Path) -> None:
    """With --channels auto, gray images beside one colour image are stored as three equal
    channels. Once the colour file is deleted, a re-run reuses the gray rows as one channel each:
    the store is the 1-channel store a fresh prepare of the folder writes."""
    folder = tmp_path / "f"
    folder.mkdir()
    Image.new("L", (16, 16), 50).save(folder / "a.png")
    Image.new("L", (16, 16), 70).save(folder / "b.png")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "c.png")
    first = prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    assert read_store(first.store).images.shape == (3, 8, 8, 3)
    (folder / "c.png").unlink()
    again = prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    assert again.decoded == [] and again.reused == 2
    fresh = prepare_store(folder, tmp_path / "fresh", DecodeOptions(8), workers=1, **QUIET).store
    assert read_store(again.store).images.shape == read_store(fresh).images.shape == (2, 8, 8, 1)
    assert (fresh / "images.u8").read_bytes() == (tmp_path / "s" / "images.u8").read_bytes()


def test_rehash_of_an_unchanged_folder_reads_every_file_and_decodes_none(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--rehash turns off the (path, size, mtime) check: every file is read and hashed again, and a
    file whose hash the previous store holds as a usable row is taken from it, not decoded (only
    earlier verdicts of unusable files are decided again)."""
    import fastclr.ingest.prepare as prep

    folder = tmp_path / "bars"
    rels = bar_images(folder, n_per_class=3, size=16)
    first = prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    before = (tmp_path / "s" / "images.u8").read_bytes()
    real, read = prep.process_file, []

    def counting(path: Path, rel: str, *a: object, **k: object) -> object:
        read.append(rel)
        return real(path, rel, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(prep, "process_file", counting)  # workers=1: decoded in this process
    again = prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, rehash=True, **QUIET)
    assert sorted(read) == rels and sorted(first.decoded) == rels
    assert again.decoded == [] and again.reused == len(rels)
    assert (tmp_path / "s" / "images.u8").read_bytes() == before


def test_interrupted_prepare_leaves_the_old_store_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "bars"
    bar_images(folder, n_per_class=4)
    import fastclr.ingest.prepare as prep

    real, calls = prep.process_file, []

    def dies_on_third(*a: object, **k: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(prep, "process_file", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(folder, tmp_path / "new", DecodeOptions(16), workers=1, **QUIET)
    assert not (tmp_path / "new").exists()

    monkeypatch.setattr(prep, "process_file", real)
    store = prepare_store(folder, tmp_path / "s", DecodeOptions(16), workers=1, **QUIET).store
    snapshot = {p.name: p.read_bytes() for p in store.iterdir()}
    Image.new("RGB", (20, 20), 1).save(folder / "class0" / "zz.png")
    calls.clear()
    monkeypatch.setattr(prep, "process_file", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(folder, store, DecodeOptions(16), workers=1, rehash=True, **QUIET)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == snapshot  # untouched, no partial files

    # Dying between the renames of the commit: the store no longer looks complete, and the next
    # prepare rebuilds it.
    import fastclr.data.store as store_mod

    monkeypatch.setattr(prep, "process_file", real)
    real_replace, n = os.replace, []

    def second_replace_fails(a: object, b: object) -> None:
        n.append(1)
        if len(n) == 2:
            raise OSError("disk full")
        real_replace(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod.os, "replace", second_replace_fails)
    with pytest.raises(OSError):
        prepare_store(folder, store, DecodeOptions(16), workers=1, **QUIET)
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    assert not is_store(store)
    with pytest.raises(FastclrError, match="incomplete store"):
        read_store(store)
    again = prepare_store(folder, store, DecodeOptions(16), workers=1, **QUIET)
    assert len(again.decoded) == 9 and read_store(store).images.shape[0] == 9


def test_a_crashing_decoder_process_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bar_images(tmp_path / "bars", n_per_class=12)
    import fastclr.ingest.prepare as prep

    real = prep.process_file

    def segfaults_on_one_file(path: Path, rel: str, *a: object) -> object:
        if rel == "class1/img005.png":
            os._exit(139)  # what a crashing C decoder does to its process
        return real(path, rel, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(prep, "process_file", segfaults_on_one_file)  # forked workers inherit it
    with pytest.raises(FastclrError, match="a decoding process died .* --workers 1"):
        prepare_store(tmp_path / "bars", tmp_path / "s", DecodeOptions(16), workers=2, **QUIET)
    assert not (tmp_path / "s").exists()


def one_line_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_bad_input_gives_one_line_errors_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert "nope does not exist" in one_line_error(["prepare", str(tmp_path / "nope"), "--size", "16", "--out", str(out)], capsys)
    (tmp_path / "empty").mkdir()
    assert "no images in" in one_line_error(["prepare", str(tmp_path / "empty"), "--size", "16", "--out", str(out)], capsys)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    (tmp_path / "junk" / "b.jpg").write_bytes(b"not a jpeg at all")
    err = one_line_error(["prepare", str(tmp_path / "junk"), "--size", "16", "--out", str(out), "--quiet"], capsys)
    assert "no usable images" in err and "1 corrupt, 1 not-an-image" in err
    bar_images(tmp_path / "ok", n_per_class=1)
    assert "at least 8" in one_line_error(["prepare", str(tmp_path / "ok"), "--size", "4", "--out", str(out)], capsys)
    # 0 is a size too small, not a size missing
    assert "--size must be at least 8 pixels, got 0" in one_line_error(
        ["prepare", str(tmp_path / "ok"), "--size", "0", "--out", str(out)], capsys)
    # a --size too large is said of --size, not of --max-pixels, which the user never gave
    assert one_line_error(["prepare", str(tmp_path / "ok"), "--size", "100000", "--out", str(out)], capsys) == (
        "error: --size 100000 makes images of 10,000,000,000 pixels, more than --max-pixels 89,478,485 (the largest "
        "image decoded); give a smaller --size, or a larger --max-pixels\n")
    assert not out.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    err = one_line_error(["prepare", str(tmp_path / "ok"), "--size", "16", "--out", str(tmp_path / "mine")], capsys)
    assert "is not a fastclr store" in err and os.listdir(tmp_path / "mine") == ["thesis.tex"]
    err = one_line_error(["pretrain", "--data", str(tmp_path / "mine"), "--epochs", "1", "--run-dir", str(tmp_path / "r")],
                         capsys)
    assert "not a fastclr store" in err


@pytest.mark.parametrize("flags, named", [
    (["--channels", "1"], "--channels applies"), (["--fit", "pad", "--rehash"], "--fit and --rehash apply"),
    (["--max-pixels", "1000"], "--max-pixels applies"), (["--labels", "none"], "--labels applies"),
    (["--workers", "2"], "--workers applies")])
def test_a_builtin_store_refuses_the_options_of_decoding_a_folder(tmp_path: Path, flags: list[str], named: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`prepare --builtin cifar10 --channels 1` wrote the RGB dataset and said nothing; every option
    of decoding a folder is refused with --builtin now, before anything is read or written."""
    err = one_line_error(["prepare", "--builtin", "mnist", *flags, "--out", str(tmp_path / "s"), "--no-download"],
                         capsys)
    assert err == (f"error: {named} to decoding a FOLDER; --builtin mnist writes the dataset's own images as they are: "
                   f"drop {'them' if named.endswith('apply') else 'it'}\n")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags, named", [(["--data-root", "x"], "--data-root applies"),
                                          (["--no-download"], "--no-download applies")])
def test_a_folder_refuses_the_options_of_finding_a_builtin_dataset(tmp_path: Path, flags: list[str], named: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bar_images(tmp_path / "ok", n_per_class=1)
    err = one_line_error(["prepare", str(tmp_path / "ok"), "--size", "16", *flags, "--out", str(tmp_path / "s")], capsys)
    assert err == f"error: {named} to --builtin NAME, not to a FOLDER: drop it\n"
    assert not (tmp_path / "s").exists()


def test_prepare_cli_prints_totals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bar_images(tmp_path / "ok", n_per_class=2)
    (tmp_path / "ok" / "class0" / "x.txt").write_text("x")
    assert main(["prepare", str(tmp_path / "ok"), "--size", "16", "--out", str(tmp_path / "s"), "--workers", "1"]) == 0
    out = capsys.readouterr()
    assert "4 images (2 classes, 3 channels); 4 files decoded, 0 reused" in out.out
    assert "skipped 1: 1 not-an-image" in out.out
    assert "prepare 4/4 files" in out.err and "files/s" in out.err


def test_sigkill_during_prepare_takes_its_decoders_with_it_and_a_rerun_completes(tmp_path: Path) -> None:
    """Kill `fastclr prepare` (SIGKILL: no handler runs) while its 2 decoding workers are busy: the
    workers die with it (they would otherwise decode on, reparented), no store.json is left
    behind, and running the same command again writes a complete, consistent store."""
    import os
    import signal
    import subprocess
    import sys
    import time

    bar_images(tmp_path / "imgs", n_per_class=1500, size=96)  # 3000 PNGs: seconds of decoding
    args = [sys.executable, "-m", "fastclr", "prepare", str(tmp_path / "imgs"), "--size", "32", "--out",
            str(tmp_path / "store"), "--workers", "2", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    end = time.monotonic() + 60
    workers: list[int] = []
    while len(workers) < 2 and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)
        workers = children()
    assert len(workers) >= 2, "the decoding workers never started"
    assert proc.poll() is None  # killed while decoding: the store is not written yet
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    end = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < end:
        time.sleep(0.1)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}") and "Z" not in
                 open(f"/proc/{p}/stat", encoding="utf-8").read().split()[2]]
    assert not alive, f"decoders {alive} outlived their parent"
    assert not (tmp_path / "store" / "store.json").exists()
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = read_store(tmp_path / "store")
    assert len(s.paths) == 3000 and s.images.shape[0] == 3000 and len(set(s.paths)) == 3000


def test_a_store_of_another_folder_is_not_replaced_and_one_of_a_moved_folder_is_updated(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`prepare other --out s` over the store of a folder still there replaced it, and its decoding,
    without a word: refused in one line, the store byte for byte as it was. Where the store's folder
    is gone (renamed), the new one updates it, reusing its rows, and a note says so."""
    bar_images(tmp_path / "a", n_per_class=6, size=16)
    bar_images(tmp_path / "b", n_per_class=3, size=16, classes=3)
    store = tmp_path / "s"
    args = ["--size", "16", "--out", str(store), "--workers", "1", "--quiet"]
    assert main(["prepare", str(tmp_path / "a"), *args]) == 0
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "b"), *args]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {store} holds the store of {(tmp_path / 'a').resolve()}, not of {(tmp_path / 'b').resolve()}: give "
        f"another --out, or remove {store} first to replace it")
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    (tmp_path / "link").symlink_to(tmp_path / "a")  # the same folder by another path (a bind mount, say)
    assert main(["prepare", str(tmp_path / "link"), *args]) == 0
    assert "0 files decoded, 12 reused" in capsys.readouterr().out
    (tmp_path / "link").unlink()
    (tmp_path / "a").rename(tmp_path / "a2")
    assert main(["prepare", str(tmp_path / "a2"), *args]) == 0
    out = capsys.readouterr().out
    assert f"note: {store} was prepared from {(tmp_path / 'a').resolve()}, which is gone; updating it from " \
           f"{(tmp_path / 'a2').resolve()}" in out
    assert "12 images (2 classes, 3 channels); 0 files decoded, 12 reused" in out
    assert json.loads((store / "store.json").read_text())["source"] == str((tmp_path / "a2").resolve())


@pytest.mark.parametrize("tree, note", [
    (("data/train/cat/1.png", "data/train/dog/2.png"),
     "note: the images are all under train/, so none has a class (the classes are the top-level folders, two or "
     "more); to label them by its subfolders (cat, dog), give {root}/train"),
    (("data/train/1.png", "data/test/2.png"),
     "note: the classes are test, train, names of a dataset's splits; if they are splits of unlabelled images, "
     "prepare again with --labels none"),
    (("data/cat/1.png", "data/dog/2.png"), None),
    (("data/train/cat/1.png", "data/train/dog/2.png", "data/loose.png"), None),
])
def test_layouts_whose_labels_are_likely_not_meant_are_named(tmp_path: Path, tree: tuple[str, ...], note: str | None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A folder wrapping class folders (a Kaggle archive's `train/cat`) gave an unlabelled store,
    and split folders of loose images the classes "test" and "train", both without a word."""
    for i, rel in enumerate(tree):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(tmp_path / rel)
    assert main(["prepare", str(tmp_path / "data"), "--size", "8", "--out", str(tmp_path / "s"), "--workers", "1",
                 "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ([note.format(root=tmp_path / "data")] if note else [])


@pytest.mark.parametrize("kind", ["dangling", "loop", "not-utf-8"])
def test_an_out_no_store_can_be_written_at_is_refused_before_any_decoding(tmp_path: Path, kind: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A link to nothing was refused as "cannot use loopA (File exists)"; a name that is not UTF-8
    was prepared, then every `pretrain --data` on it refused. Both are one line naming the fix, and
    nothing is made."""
    bar_images(tmp_path / "imgs", n_per_class=2, size=16)
    if kind == "dangling":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "gone")
        message = f"--out {out} is a symbolic link to {tmp_path / 'gone'}, which does not exist (or loops); remove the link"
    elif kind == "loop":
        out = tmp_path / "loopA"
        out.symlink_to(tmp_path / "loopB")
        (tmp_path / "loopB").symlink_to(out)
        message = f"--out {out} is a symbolic link to {tmp_path / 'loopB'}, which does not exist (or loops)"
    else:
        out = Path(os.fsdecode(bytes(tmp_path / "out") + b"\xfe"))
        message = f"--out {str(out)!r} is not valid UTF-8: a run's config.toml could not name the store"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["prepare", str(tmp_path / "imgs"), "--size", "8", "--out", str(out), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_classes_a_probe_cannot_use_are_named_after_the_summary(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A class folder whose files are all corrupt was still a class of the store, with no row: the
    probe then measured a one-class problem and printed 100% without a word. A class whose only
    image the holdout puts in the test split is never learnt. Both are named; usable classes not."""
    bar_images(tmp_path / "imgs", n_per_class=30, size=16)
    (tmp_path / "imgs" / "broken").mkdir()
    for name in ("x.png", "y.jpg"):
        (tmp_path / "imgs" / "broken" / name).write_bytes(b"garbage")
    held = next(f"owl/{i}.png" for i in range(1000) if holdout(f"owl/{i}.png"))
    (tmp_path / "imgs" / "owl").mkdir()
    Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).save(tmp_path / "imgs" / held)
    assert main(["prepare", str(tmp_path / "imgs"), "--size", "16", "--out", str(tmp_path / "s"), "--workers", "1",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4 classes" in out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: no image of class broken could be stored (see skipped.csv): the store names that class without a "
        "row, so probes measure the other 3; add usable images to its folder or remove it, and prepare again",
        "note: every image of class owl is in the test split (1 labelled image in 10 is held out): a probe cannot "
        "learn that class and gets its test images wrong; add images to its folder and prepare again"]
    store = read_store(tmp_path / "s")
    assert store.classes == ["broken", "class0", "class1", "owl"]
    train = store.labels[slice(*store.split_range("train"))]
    assert sorted(set(train.tolist())) == [1, 2]  # the notes' reading of the store


@pytest.mark.parametrize("group, stop", [(False, "SIGTERM"), (True, "SIGTERM"), (True, "SIGHUP")])
def test_sigterm_during_an_update_keeps_the_old_store_and_leaves_nothing_behind(tmp_path: Path, group: bool,
                                                                               stop: str) -> None:
    """`kill` (SIGTERM) of a prepare updating a store while its decoders are busy: the process ends
    with the status a kill gives (128 + 15), the old store is byte for byte as it was, and neither
    the new store's partial files (as large as the store they would become) nor the lock remain;
    SIGTERM's default action left both, where Ctrl-C removed them. Sent to the whole process group
    (systemd, Slurm) too: the decoders end at once and the parent does not wait on them. A closed
    terminal's SIGHUP to the group alike (128 + 1)."""
    import signal
    import subprocess
    import sys

    if not hasattr(signal, stop):
        pytest.skip(f"{stop}: POSIX only")
    sig = getattr(signal, stop)

    bar_images(tmp_path / "imgs", n_per_class=20, size=64)
    store = tmp_path / "store"
    prepare_store(tmp_path / "imgs", store, DecodeOptions(32), workers=1, **QUIET)
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    bar_images(tmp_path / "imgs", n_per_class=1500, size=64)  # the same first 20 a class, and 2,960 more
    proc = subprocess.Popen([sys.executable, "-m", "fastclr", "prepare", str(tmp_path / "imgs"), "--size", "32",
                             "--out", str(store), "--workers", "2", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=group,
                            preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))  # as in a terminal, not under nohup
    partial = store / ".images.u8.partial"
    end = time.monotonic() + 60
    while time.monotonic() < end and proc.poll() is None and not (partial.exists() and partial.stat().st_size > 0):
        time.sleep(0.02)
    assert proc.poll() is None, "prepare ended before it could be stopped"
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:  # a hang fails the test, and leaves no process behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            proc.wait(10)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    # As Ctrl-C's "interrupted": a kill said nothing; a hang-up's terminal is gone
    assert err.strip().splitlines()[-1:] == (["terminated (SIGTERM)"] if stop == "SIGTERM" else [])
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    assert read_store(store).images.shape[0] == 40


@pytest.mark.parametrize("damage, message", [
    ("no-splits", "is damaged (KeyError"),
    ("flat-shape", "not [N, S, S, 1 or 3]"),
    ("wrong-splits", "do not add up to its"),
    ("label-text", "has a label that is not an integer"),
    ("label-beyond-classes", "labels are outside -1..1"),
    ("label-at-class-count", "labels are outside -1..1"),  # 2 classes: label 2 is the first one past them
    ("no-classes", "labels are outside -1..-1"),
])
def test_a_tampered_store_is_named_in_one_line(tmp_path: Path, damage: str, message: str) -> None:
    bar_images(tmp_path / "bars", n_per_class=6)
    store = tmp_path / "s"
    prepare_store(tmp_path / "bars", store, DecodeOptions(16), workers=1, **QUIET)
    meta = json.loads((store / "store.json").read_text())
    rows = (store / "manifest.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("label")
    if damage == "no-splits":
        del meta["splits"]
    elif damage == "flat-shape":
        n, s, _, c = meta["shape"]
        meta["shape"] = [n * s * s * c]  # the same byte count, one dimension
    elif damage == "wrong-splits":
        meta["splits"] = {"unlabeled": 0, "train": 1, "test": 1}
    elif damage == "no-classes":
        meta["classes"] = []
    else:
        cells = rows[1].split(",")
        cells[col] = {"label-text": "cat", "label-beyond-classes": "7", "label-at-class-count": "2"}[damage]
        rows[1] = ",".join(cells)
    (store / "store.json").write_text(json.dumps(meta))
    (store / "manifest.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(FastclrError) as e:
        read_store(store)
    assert message in str(e.value) and "\n" not in str(e.value) and "fastclr prepare" in str(e.value)


def test_store_csvs_saved_by_a_spreadsheet_read_as_written_or_are_named_in_one_line(tmp_path: Path) -> None:
    """A manifest saved back as "CSV UTF-8" (a byte-order mark first) is the same manifest; one in a
    legacy code page, or without its path column, ended every use of the store in a traceback
    (UnicodeDecodeError; KeyError): one line now. A skipped.csv saved so cost the re-run of
    `prepare` a traceback; now that run decodes every file and makes the same store."""
    bar_images(tmp_path / "bars", n_per_class=6)
    (tmp_path / "bars" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)  # a verdict with a hash
    store = tmp_path / "s"
    prepare_store(tmp_path / "bars", store, DecodeOptions(16), workers=1, **QUIET)
    first = read_store(store)
    manifest, skipped = (store / "manifest.csv").read_bytes(), (store / "skipped.csv").read_bytes()
    assert read_csv(store / "skipped.csv")[0]["sha256"]
    (store / "manifest.csv").write_bytes(b"\xef\xbb\xbf" + manifest)
    again = read_store(store)
    assert again.paths == first.paths and np.array_equal(again.labels, first.labels)
    for damaged, message in ((manifest.replace(b"img000", b"img\xe9000", 1), "is not a CSV file fastclr can read "
                                                                              "(UnicodeDecodeError: "),
                             (manifest.replace(b",path,", b",file,", 1), "has no path column; it was edited")):
        (store / "manifest.csv").write_bytes(damaged)
        with pytest.raises(FastclrError, match=re.escape(f"{store / 'manifest.csv'} {message}")) as e:
            read_store(store)
        assert "\n" not in str(e.value) and str(e.value).endswith("run `fastclr prepare` again")
    (store / "manifest.csv").write_bytes(manifest)
    (store / "skipped.csv").write_bytes(b"\xef\xbb\xbf" + skipped)
    reuse = prepare_store(tmp_path / "bars", store, DecodeOptions(16), workers=1, **QUIET)
    assert reuse.decoded == [] and reuse.reused == len(first.paths) + 1  # the broken file's verdict too, read past the mark
    (store / "skipped.csv").write_bytes(skipped.replace(b"broken", b"br\xf6ken", 1))
    lines: list[str] = []
    redo = prepare_store(tmp_path / "bars", store, DecodeOptions(16), workers=1, progress=False, log=lines.append)
    assert any(line.startswith(f"previous store not reusable ({store / 'skipped.csv'} is not a CSV file") and
               line.endswith("; decoding every file") for line in lines), lines
    assert sorted(redo.decoded) == sorted([*first.paths, "class1/broken.jpg"])
    after = read_store(store)
    assert after.paths == first.paths and np.array_equal(np.asarray(after.images), np.asarray(first.images))


def test_decoders_leave_ctrl_c_to_the_parent() -> None:
    """Ctrl-C goes to the whole process group; a decoder that took it inside a put on the result
    queue left the queue's lock held and `prepare` hung in its shutdown. A decoder ignores SIGINT
    (its parent stops the work, and SIGKILL or the parent's death still end it)."""
    import signal

    from fastclr.ingest import prepare as prep

    before = signal.getsignal(signal.SIGINT)
    try:
        prep._init(Path("."), prep.DecodeOptions(28), frozenset())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_class_folder_without_images_is_named_not_dropped_silently(tmp_path: Path) -> None:
    """An empty class folder, and one holding no image, simply vanished from the classes ("2
    classes" for three folders); now one note names them. Hidden folders and the store being
    written inside the folder are not the user's classes."""
    bar_images(tmp_path / "photos", n_per_class=4, size=16)
    (tmp_path / "photos" / "empty_class").mkdir()
    (tmp_path / "photos" / "notes").mkdir()
    (tmp_path / "photos" / "notes" / "readme.txt").write_text("no images here", encoding="utf-8")
    (tmp_path / "photos" / ".cache").mkdir()
    lines: list[str] = []
    res = prepare_store(tmp_path / "photos", tmp_path / "photos" / "store", DecodeOptions(16), workers=1,
                        progress=False, log=lines.append)
    assert read_store(res.store).classes == ["class0", "class1"]
    notes = [line for line in lines if line.startswith("note: no images in")]
    assert notes == ["note: no images in empty_class, notes: not classes (their files are in skipped.csv)"], lines
    lines.clear()
    (tmp_path / "photos" / "notes" / "readme.txt").unlink()
    (tmp_path / "photos" / "notes").rmdir()
    prepare_store(tmp_path / "photos", tmp_path / "photos" / "store", DecodeOptions(16), workers=1,
                  progress=False, log=lines.append)
    assert [line for line in lines if line.startswith("note:")] == ["note: no images in empty_class: not a class"]


def test_a_store_or_run_inside_the_folder_is_passed_over_as_one_entry(tmp_path: Path) -> None:
    """A store prepared into a class folder (or a run kept beside the photos) is fastclr's, not
    the user's images: its images.u8, manifest.csv and store.json were listed one by one as
    not-an-image; now the folder is one fastclr-folder entry. A class folder that merely holds a
    config.toml of the user's is still searched."""
    bar_images(tmp_path / "photos", n_per_class=4, size=16)
    prepare_store(tmp_path / "photos", tmp_path / "photos" / "class0" / "sub", DecodeOptions(16), workers=1, **QUIET)
    run = tmp_path / "photos" / "class1" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text("[train]\n", encoding="utf-8")
    (run / "checkpoints" / "step-000000005.pt").write_bytes(b"a checkpoint")
    # a config.toml or a store.json of the user's own does not make a folder fastclr's
    (tmp_path / "photos" / "class1" / "config.toml").write_text("mine = 1\n", encoding="utf-8")
    (tmp_path / "photos" / "class1" / "checkpoints").mkdir()
    (tmp_path / "photos" / "class0" / "store.json").write_text('{"shop": "A"}', encoding="utf-8")
    res = prepare_store(tmp_path / "photos", tmp_path / "store", DecodeOptions(16), workers=1, **QUIET)
    skipped = {r["path"]: (r["reason"], r["detail"]) for r in read_csv(res.store / "skipped.csv")}
    assert skipped == {"class0/sub/": ("fastclr-folder", "a fastclr store, not images: not searched"),
                       "class1/run/": ("fastclr-folder", "a fastclr run, not images: not searched"),
                       "class1/config.toml": ("not-an-image", skipped["class1/config.toml"][1]),
                       "class0/store.json": ("not-an-image", skipped["class0/store.json"][1])}
    assert res.images == 8 and read_store(res.store).classes == ["class0", "class1"]


def test_a_file_too_big_to_read_into_memory_is_skipped_not_the_run(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`process_file` "never raises": a MemoryError while reading the file (a file larger than the
    memory left) escaped it and ended the whole prepare in a traceback. It is an out-of-memory skip
    now, as the same error in decoding is: the machine's state, not the file's."""
    import hashlib

    Image.new("L", (8, 8), 7).save(tmp_path / "a.png")

    def file_digest(f: object, name: str) -> object:
        raise MemoryError
    monkeypatch.setattr(hashlib, "file_digest", file_digest)
    out = process_file(tmp_path / "a.png", "a.png", DecodeOptions(8))
    assert (out.reason, out.size, out.sha256, out.image) == ("out-of-memory", -1, "", None)
    assert out.detail == "not enough memory to decode it; run again with fewer --workers, or a lower --max-pixels"


def test_a_stack_of_pages_is_hashed_and_decoded_without_holding_the_file(tmp_path: Path) -> None:
    """A 60-page TIFF decodes its first page only, but the whole file was read into memory first:
    the memory per worker that `decode_peak_bytes` counts on did not hold for stacks (microscopy,
    scans). The file is hashed and decoded as it is read; the hash is the whole file's all the same."""
    import hashlib
    import tracemalloc

    pages = [Image.fromarray(np.full((300, 300, 3), i, np.uint8)) for i in range(60)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    size = path.stat().st_size
    assert size > 15_000_000
    tracemalloc.start()
    try:
        out = process_file(path, "stack.tif", DecodeOptions(16, fit="pad"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.reason == "" and out.image is not None and (out.width, out.height) == (300, 300)
    assert int(out.image.max()) == 0  # the first page
    assert out.size == size and out.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert peak < size / 10, (peak, size)


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_split_folders_holding_class_folders_are_refused_not_taken_as_two_classes(tmp_path: Path, held_out: str) -> None:
    """`photos/{train,val}/{cat,dog}` became the classes "train" and "val": every figure measured
    which split an image came from. One line says so and how to go on; with --labels none, or one
    split given, the images are read; split names without class folders under them stay classes.
    The split the line suggests is the training one, also where `test` comes first in sorted order."""
    root = tmp_path / "photos"
    for split in ("train", held_out):
        for c, shade in (("cat", 50), ("dog", 200)):
            (root / split / c).mkdir(parents=True)
            Image.new("L", (8, 8), shade + (split == held_out)).save(root / split / c / "a.png")  # not duplicates
    with pytest.raises(FastclrError) as e:
        prepare_store(root, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    assert str(e.value) == (f"the folders in {root} ({', '.join(sorted(('train', held_out)))}) are splits, each with its own subfolders (cat, dog in "
                            f"train), not classes; give one split, e.g. `fastclr prepare {root / 'train'}`, whose "
                            "subfolders are the classes, or --labels none to take every image unlabelled")
    assert not (tmp_path / "s").exists()
    res = prepare_store(root / "train", tmp_path / "t", DecodeOptions(8), workers=1, **QUIET)
    assert read_store(res.store).classes == ["cat", "dog"]
    res = prepare_store(root, tmp_path / "u", DecodeOptions(8), workers=1, labels="none", **QUIET)
    assert read_store(res.store).labels.tolist() == [-1] * 4
    assert refuse_split_folders(root, ["test", "train"], ["test/a.png", "train/b.png"]) is None


def test_a_store_being_prepared_by_another_process_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """Two prepares into one --out (two cluster jobs) truncated each other's partial files, and one
    could commit the other's rows under its own manifest. The second is refused by the owner's
    name, the store stays as it was, and a finished prepare leaves no lock behind."""
    import os
    import socket

    import fastclr.ingest.prepare as prepare_mod
    from fastclr.locks import RunLock

    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "b").mkdir(parents=True)
    for c, shade in (("a", 30), ("b", 220)):
        Image.new("L", (8, 8), shade).save(tmp_path / "f" / c / "x.png")
    out = tmp_path / "s"
    prepare_store(tmp_path / "f", out, DecodeOptions(8), workers=1, **QUIET)
    assert not (out / ".lock").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = RunLock(out, log=lambda s: None)  # another writer (a lock of its own open file)
    walked: list[Path] = []
    real_walk = prepare_mod.walk_folder
    try:
        prepare_mod.walk_folder = lambda root, exclude=None: walked.append(root) or real_walk(root, exclude)
        with pytest.raises(FastclrError, match=f"^{out} is being written by PID {os.getpid()} on "
                                               f"{socket.gethostname()}; wait for it to finish, or choose another --out$"):
            prepare_store(tmp_path / "f", out, DecodeOptions(8), workers=1, rehash=True, **QUIET)
    finally:
        prepare_mod.walk_folder = real_walk
        other.release()
    assert walked == []  # refused before the walk of the folder, not after its minutes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    prepare_store(tmp_path / "f", out, DecodeOptions(8), workers=1, rehash=True, **QUIET)
    assert read_store(out).classes == ["a", "b"] and not (out / ".lock").exists()
    # a writer that fails to open its partial files gives the store up: the next one is not refused
    from fastclr.data.store import StoreWriter

    (out / ".images.u8.partial").mkdir()
    with pytest.raises(IsADirectoryError):
        StoreWriter(out, 8, 1, log=lambda s: None)
    (out / ".images.u8.partial").rmdir()
    assert not (out / ".lock").exists()
    StoreWriter(out, 8, 1, log=lambda s: None).abort()
    fresh = tmp_path / "fresh"
    (tmp_path / "blocker").mkdir()
    with pytest.raises(FastclrError, match="no images in"):  # a failure before writing leaves no folder behind
        prepare_store(tmp_path / "blocker", fresh, DecodeOptions(8), workers=1, **QUIET)
    assert not fresh.exists()


def test_a_read_error_while_decoding_is_unreadable_and_tried_again_not_remembered_as_corrupt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is read twice (hashed, then decoded): an I/O error in the second read (EIO, a stale
    NFS handle) became "corrupt" under the file's hash, skipped by every later prepare. It is
    "unreadable", with no hash to be remembered by; Pillow's own errors stay the file's."""
    import errno

    import fastclr.ingest.decode as decode

    Image.new("L", (8, 8), 7).save(tmp_path / "a.png")

    def failing_open(*args: object, **kw: object) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(decode.Image, "open", failing_open)
    out = process_file(tmp_path / "a.png", "a.png", DecodeOptions(8))
    assert (out.reason, out.detail, out.sha256, out.size) == ("unreadable", "Input/output error", "", -1)

    def broken_data(*args: object, **kw: object) -> None:
        raise OSError("broken data stream when reading image file")
    monkeypatch.setattr(decode.Image, "open", broken_data)
    out = process_file(tmp_path / "a.png", "a.png", DecodeOptions(8))
    assert out.reason == "corrupt" and out.sha256 != ""


@pytest.mark.parametrize("old_size, new_size", [(16, 20), (20, 16)])  # the smaller one fails its first read
def test_a_store_read_while_a_prepare_swaps_it_is_read_whole_from_one_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_size: int, new_size: int) -> None:
    """A prepare updating a store removes store.json, renames the new images.u8 and manifest.csv in,
    then writes store.json. A reader that read the old store.json and opened the new images.u8 paired
    the old shape and rows with the new pixels: wrong embeddings, wrong labels, exit 0. Here the swap
    lands between the reader's manifest and its images."""
    import fastclr.data.store as store_mod

    bar_images(tmp_path / "imgs", n_per_class=10, size=24)
    prepare_store(tmp_path / "imgs", tmp_path / "old", DecodeOptions(old_size), workers=1, **QUIET)
    prepare_store(tmp_path / "imgs", tmp_path / "new", DecodeOptions(new_size), workers=1, **QUIET)
    real_read_csv, swapped = store_mod.read_csv, []

    def read_csv_then_swap(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
        rows = real_read_csv(path, columns)
        if path.parent == tmp_path / "old" and not swapped:  # as prepare does it, mid-read
            swapped.append(True)
            (tmp_path / "old" / "store.json").unlink()
            for name in ("images.u8", "manifest.csv"):
                os.replace(tmp_path / "new" / name, tmp_path / "old" / name)
            os.replace(tmp_path / "new" / "store.json", tmp_path / "old" / "store.json")
        return rows

    monkeypatch.setattr(store_mod, "read_csv", read_csv_then_swap)
    monkeypatch.setattr(store_mod.time, "sleep", lambda s: None)
    got = read_store(tmp_path / "old")
    assert swapped and got.images.shape[1:3] == (new_size, new_size)  # the new version, whole
    assert got.images.tobytes() == (tmp_path / "old" / "images.u8").read_bytes()
    assert got.meta == json.loads((tmp_path / "old" / "store.json").read_text(encoding="utf-8"))


def test_a_store_a_prepare_is_writing_for_the_first_time_names_it(tmp_path: Path) -> None:
    """Its partial files and no store.json yet: "an incomplete store (an interrupted prepare): run the
    same prepare again", which the running prepare's lock then refused."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".images.u8.partial").write_bytes(b"x")
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, %r)\n"
                               "from fastclr.locks import RunLock\nfrom pathlib import Path\n"
                               "RunLock(Path(%r), log=lambda s: None); print('held', flush=True); time.sleep(60)"
                               % (str(Path(__file__).resolve().parents[1]), str(tmp_path / "s"))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(FastclrError, match=r"is being written by PID \d+ on .* \(a prepare running now\); wait "
                                               r"for it to finish$"):
            read_store(tmp_path / "s")
    finally:
        holder.kill()
        holder.wait(10)
    with pytest.raises(FastclrError, match="an incomplete store"):
        read_store(tmp_path / "s")


def test_a_store_read_in_the_instant_a_prepare_swaps_its_files_waits_for_the_new_store_json(tmp_path: Path) -> None:
    """store.json is absent for an instant while a prepare (holding the store's lock) swaps the files
    in: a read then failed at once as an incomplete store; it waits and reads the new version."""
    import subprocess
    import sys
    import threading

    bar_images(tmp_path / "imgs", n_per_class=4, size=16)
    store = tmp_path / "s"
    prepare_store(tmp_path / "imgs", store, DecodeOptions(8), workers=1, **QUIET)
    meta = (store / "store.json").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, %r)\n"
                               "from fastclr.locks import RunLock\nfrom pathlib import Path\n"
                               "RunLock(Path(%r), log=lambda s: None); print('held', flush=True); time.sleep(60)"
                               % (str(Path(__file__).resolve().parents[1]), str(store))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        (store / "store.json").unlink()
        back = threading.Timer(0.3, lambda: ((store / "store.json.part").write_bytes(meta),  # whole, as prepare writes it
                                             os.replace(store / "store.json.part", store / "store.json")))
        back.start()
        assert len(read_store(store).images) == 8
        back.join()
    finally:
        holder.kill()
        holder.wait(10)


def test_contents_changed_under_a_kept_time_are_found_by_rehash(tmp_path: Path) -> None:
    """README: a file of the same path, size and modification time is taken as unchanged without being
    read (an archive unpacked with a fixed --mtime keeps all three); --rehash reads every file and
    decodes those whose content changed, giving the store a fresh prepare gives."""
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / c / f"{i}.bmp")
    prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    for path in sorted(folder.rglob("*.bmp")):  # new pixels, the same byte count, the time put back
        st = path.stat()
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
        assert path.stat().st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    prepare_store(folder, tmp_path / "fresh", DecodeOptions(8), workers=1, **QUIET)
    fresh = (tmp_path / "fresh" / "images.u8").read_bytes()
    prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, **QUIET)
    assert (tmp_path / "s" / "images.u8").read_bytes() != fresh  # taken as unchanged: not read
    prepare_store(folder, tmp_path / "s", DecodeOptions(8), workers=1, rehash=True, **QUIET)
    assert (tmp_path / "s" / "images.u8").read_bytes() == fresh
    assert read_store(tmp_path / "s").meta["content"] == read_store(tmp_path / "fresh").meta["content"]


def test_a_png_with_damaged_image_data_is_corrupt_not_a_black_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One flipped byte in a PNG's compressed data: Pillow refuses the file, but a PNG's getexif()
    (read first, to rotate) decodes the image to look for an eXIf chunk after it, and its error was
    swallowed as a damaged EXIF block; the image then counted as loaded with no pixels and went into
    the store as zeros, "skipped 0". It is skipped as corrupt; the same file undamaged decodes."""
    good = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 200, 200)).save(good, "PNG")
    data = bytearray(good.getvalue())
    data[data.index(b"IDAT") + 6] ^= 0xFF  # inside the zlib stream
    with pytest.raises(OSError):
        Image.open(io.BytesIO(bytes(data))).load()  # Pillow itself refuses it
    with pytest.raises(Unusable) as e:
        decode_image(bytes(data), DecodeOptions(16))
    assert e.value.reason == "corrupt"
    pixels, _, _, _ = decode_image(good.getvalue(), DecodeOptions(16))
    assert (pixels == 200).all()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "damaged.png").write_bytes(bytes(data))
    (tmp_path / "in" / "good.png").write_bytes(good.getvalue())
    assert main(["prepare", str(tmp_path / "in"), "--size", "16", "--out", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert ": 1 image (unlabeled, 3 channels)" in out and "skipped 1: 1 corrupt" in out


def test_avif_and_apng_files_are_images_and_an_avif_this_pillow_cannot_read_says_how_to_get_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """.avif (phones, the web) and .apng files were skipped as "extension .avif is not an image
    format" though Pillow reads both: stored now, pixel for pixel as Pillow decodes them; where
    Pillow has no AVIF reader the skip says so and names the Pillow that has one."""
    import fastclr.ingest.walk as walk
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF reader")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(pixels).save(tmp_path / "in" / "a.avif", quality=100)
    Image.fromarray(pixels).save(tmp_path / "in" / "b.apng", format="PNG")
    prepare_store(tmp_path / "in", tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    s = read_store(tmp_path / "s")
    assert list(s.paths) == ["a.avif", "b.apng"]
    assert np.array_equal(s.images[0], np.asarray(Image.open(tmp_path / "in" / "a.avif").convert("RGB")))
    assert np.array_equal(s.images[1], pixels)
    monkeypatch.setattr(features, "check", lambda name: False)
    assert walk.classify_file("a.avif", 10) == (
        "not-an-image", "extension .avif: this Pillow cannot read AVIF; pip install 'pillow>=11.3' (its wheels read AVIF)")
    assert walk.classify_file("b.apng", 10) is None


def test_the_same_pixels_from_other_bytes_are_stored_once_so_never_in_both_train_and_test(tmp_path: Path) -> None:
    """Duplicates were found by their bytes alone, and the test split is drawn by path: the same
    image saved again with other bytes (another compression level, its metadata stripped) could be
    in both train and test, its copy in the kNN bank at cosine 1 (15 of 92 test rows in a
    reviewer's store). One row now, the other skipped as a duplicate naming it; an update gives
    what a fresh prepare gives."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "in" / c).mkdir(parents=True)
        for i in range(20):
            image = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8))
            image.save(tmp_path / "in" / c / f"{i:02d}.png", compress_level=9)
            if c == "a" and i < 10:  # the same pixels again, other bytes
                image.save(tmp_path / "in" / c / f"{i:02d}b.png", compress_level=1)
    assert (tmp_path / "in" / "a" / "00.png").read_bytes() != (tmp_path / "in" / "a" / "00b.png").read_bytes()
    res = prepare_store(tmp_path / "in", tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    store = read_store(res.store)
    assert len(store.paths) == 40
    flat = store.images.reshape(len(store.paths), -1)
    assert len({row.tobytes() for row in flat}) == 40  # no two rows alike, so none in both splits
    duplicates = {r["path"]: r["detail"] for r in read_csv(res.store / "skipped.csv") if r["reason"] == "duplicate"}
    pairs = [(f"a/{i:02d}.png", f"a/{i:02d}b.png") for i in range(10)]  # one of each pair kept (a train row first)
    assert len(duplicates) == 10 and all((a in duplicates) != (b in duplicates) for a, b in pairs)
    assert all(duplicates.get(a, duplicates.get(b)) == f"the same pixels as {b if a in duplicates else a} at 16 px"
               for a, b in pairs)
    # a grey image saved again as RGB is the same row of a 3-channel store (the folder has colour)
    grey = Image.open(tmp_path / "in" / "b" / "00.png")
    grey.convert("RGB").save(tmp_path / "in" / "b" / "00-rgb.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in" / "b" / "colour.png")
    fresh = prepare_store(tmp_path / "in", tmp_path / "fresh", DecodeOptions(16), workers=1, **QUIET)
    kept = read_store(fresh.store).paths
    assert fresh.images == 41 and ("b/00.png" in kept) != ("b/00-rgb.png" in kept)
    # an update that meets the copies for the first time gives the fresh store
    update = prepare_store(tmp_path / "in", tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    assert update.reused >= 39  # the previous rows (one of the grey pair may give way to its RGB twin)
    for name in ("images.u8", "manifest.csv", "skipped.csv"):
        assert (update.store / name).read_bytes() == (fresh.store / name).read_bytes(), name


def test_a_decoder_crash_under_spawn_from_a_script_names_the_main_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under spawn (macOS, Windows) every decoder runs the calling script again: one calling
    `fastclr.prepare_store` at its top level ended them all, told only as a crashing decoder at the
    first file, which sent the user looking for a bad image. The fastclr command itself, and fork,
    get no such hint."""
    import __main__

    from fastclr.ingest.prepare import _spawn_hint

    monkeypatch.setattr(__main__, "__file__", "/home/me/make_store.py", raising=False)
    assert _spawn_hint("spawn") == ('; or, if make_store.py calls fastclr at its top level, put that under '
                                    '`if __name__ == "__main__":` (each decoding process runs the script again on '
                                    'this system)')
    assert _spawn_hint("fork") == ""
    monkeypatch.setattr(__main__, "__file__", "/usr/lib/python3/site-packages/fastclr/__main__.py")
    assert _spawn_hint("spawn") == ""


def test_a_folder_whose_store_json_or_manifest_is_not_a_stores_is_refused_as_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder holding a user's own store.json and manifest.csv (the store's names, not a store's
    files) was written over, exit 0, where the other commands already said it is not a store. A store's
    own folder is still prepared again."""
    bar_images(tmp_path / "ok", n_per_class=1)
    cases = {"meta": {"store.json": '{"shop": "inventory"}\n', "manifest.csv": "sku,count\n1,2\n"},
             "manifest": {"manifest.csv": "sku,count\n1,2\n"}}
    for name, files in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for f, text in files.items():
            (folder / f).write_text(text)
        err = one_line_error(["prepare", str(tmp_path / "ok"), "--size", "16", "--out", str(folder)], capsys)
        assert err == (f"error: {folder} exists and is not a fastclr store (its {sorted(files)[-1]} is not a store's); "
                       "choose a new --out\n")
        assert {p.name: p.read_text() for p in folder.iterdir()} == files
    store = prepare_store(tmp_path / "ok", tmp_path / "store", DecodeOptions(16), workers=1, **QUIET).store
    assert main(["prepare", str(tmp_path / "ok"), "--size", "16", "--out", str(store), "--quiet"]) == 0
    assert is_store(store)
