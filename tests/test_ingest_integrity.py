"""A store holds each image once, under its own path and class, in one split, with what the file
says of itself; `prepare` stays interruptible, and a manifest edited out of order is refused."""

from __future__ import annotations

import io
import re
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastclr.data.store import read_csv, read_store
from fastclr.errors import FastclrError
from fastclr.ingest import DecodeOptions, prepare_store
from fastclr.ingest import prepare as prep
from fastclr.ingest.decode import decode_image
from fastclr.ingest.prepare import holdout
from ingest_fixtures import bar_images

QUIET = dict(progress=False, log=lambda s: None)


def test_copies_and_links_of_an_image_are_one_row_never_in_both_splits(tmp_path: Path) -> None:
    """Each image copied and linked under other names: the split came from each path's hash, so
    some images were in train and test at once (5 of 40 in the review's folder). Now the bytes are
    stored once (the first path in split order, then name order) and the others listed as duplicates."""
    folder = tmp_path / "photos"
    rels = bar_images(folder, n_per_class=20)
    for r in rels:
        shutil.copy(folder / r, folder / r.replace(".png", "_copy.png"))
        (folder / r.replace(".png", "_link.png")).symlink_to(folder / r)
    res = prepare_store(folder, tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    rows = read_csv(tmp_path / "s" / "manifest.csv")
    hashes = [r["sha256"] for r in rows]
    assert len(rows) == len(rels) and len(set(hashes)) == len(rels)  # every image once
    kept = {r["path"] for r in rows}
    order = {"train": 0, "test": 1}
    for r in rels:
        group = [r, r.replace(".png", "_copy.png"), r.replace(".png", "_link.png")]
        first = min(group, key=lambda p: (order["test" if holdout(p) else "train"], p))
        assert [p for p in group if p in kept] == [first], group  # the first in split order, then name
    assert {s.rel for s in res.skipped} == {p for r in rels for p in (r, r.replace(".png", "_copy.png"),
                                                                      r.replace(".png", "_link.png"))} - kept
    assert all(s.reason == "duplicate" and s.detail.startswith("the same bytes as ") for s in res.skipped)
    held_out = [r for r in rels if len({holdout(p) for p in (r, r.replace(".png", "_copy.png"),
                                                                r.replace(".png", "_link.png"))}) == 2]
    assert held_out  # images whose copies the path hash put in both splits: each in one now
    again = prepare_store(folder, tmp_path / "s", DecodeOptions(16), workers=2, **QUIET)  # decided again each run
    assert again.decoded == [] and sorted(s.rel for s in again.skipped) == sorted(s.rel for s in res.skipped)


def test_a_linked_folder_never_takes_the_place_or_class_of_the_real_one(tmp_path: Path) -> None:
    """Links were walked before real folders sorting after them: `zzz -> dog` made every dog a
    `zzz`, and `cat/see_also -> ../dog` put dogs in the cat class; the real folder was the one skipped."""
    folder = tmp_path / "photos"
    bar_images(folder, n_per_class=3, classes=2)
    (folder / "class0" / "see_also").symlink_to(folder / "class1")
    (folder / "zzz").symlink_to(folder / "class1")
    res = prepare_store(folder, tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    s = read_store(tmp_path / "s")
    assert s.classes == ["class0", "class1"]
    assert sorted(s.paths) == [f"class{c}/img00{i}.png" for c in (0, 1) for i in range(3)]
    assert sorted((k.rel, k.reason, k.detail) for k in res.skipped) == [
        ("class0/see_also/", "duplicate-directory", "same directory as class1/, walked once"),
        ("zzz/", "duplicate-directory", "same directory as class1/, walked once")]


def test_decoding_in_this_process_keeps_ctrl_c_and_works_from_a_thread(tmp_path: Path) -> None:
    """One worker (or a re-run with few files) decoded in the parent with the decoders' SIGINT
    ignore: Ctrl-C no longer stopped `prepare` (nor `embed` of a folder), the caller kept SIG_IGN,
    and from a thread it raised ValueError."""
    folder = tmp_path / "photos"
    bar_images(folder, n_per_class=2)
    before = signal.getsignal(signal.SIGINT)
    prepare_store(folder, tmp_path / "a", DecodeOptions(16), workers=1, **QUIET)
    assert signal.getsignal(signal.SIGINT) is before
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(
        prepare_store(folder, tmp_path / "b", DecodeOptions(16), workers=1, **QUIET).images))
    t.start()
    t.join(60)
    assert done == [4]


def test_a_failure_of_this_run_is_retried_and_rehash_decodes_earlier_verdicts_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError was called "corrupt" and remembered by the file's hash, so the image never
    entered the store again, --rehash or not; a file once unusable stayed so under --rehash too."""
    folder = tmp_path / "photos"
    rels = bar_images(folder, n_per_class=2)
    real = prep.process_file

    def short_of_memory(path: Path, rel: str, *a: object, **k: object) -> prep.Outcome:
        if rel == rels[1]:
            monkeypatch.setattr("fastclr.ingest.decode.fit_square", _raise_memory)
        try:
            return real(path, rel, *a, **k)  # type: ignore[arg-type]
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(prep, "process_file", short_of_memory)
    first = prepare_store(folder, tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    monkeypatch.setattr(prep, "process_file", real)
    assert [(s.rel, s.reason) for s in first.skipped] == [(rels[1], "out-of-memory")] and first.images == 3
    assert read_csv(tmp_path / "s" / "skipped.csv")[0]["sha256"] == ""  # not remembered by its hash
    second = prepare_store(folder, tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    assert second.images == 4 and second.decoded == [rels[1]]
    bad = folder / "class0" / "late.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert prepare_store(folder, tmp_path / "s", DecodeOptions(16), workers=1, **QUIET).images == 4
    Image.new("RGB", (20, 20), (5, 6, 7)).save(bad)  # the same bytes no more: decoded as a changed file
    rehashed = prepare_store(folder, tmp_path / "s", DecodeOptions(16), rehash=True, workers=1, **QUIET)
    assert rehashed.images == 5 and "class0/late.png" in rehashed.decoded


def _raise_memory(*a: object, **k: object) -> None:
    raise MemoryError()


def test_the_manifest_gives_the_files_own_size_when_decoded_at_reduced_scale() -> None:
    """JPEG's draft mode decodes at 1/2 to 1/8 scale: the manifest recorded that size, not the
    file's (800 x 600, and 600 x 800 for EXIF orientation 6)."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8))
    plain, turned = io.BytesIO(), io.BytesIO()
    im.save(plain, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(turned, "JPEG", quality=90, exif=exif.tobytes())
    assert decode_image(plain.getvalue(), DecodeOptions(32))[1:3] == (800, 600)
    assert decode_image(turned.getvalue(), DecodeOptions(32))[1:3] == (600, 800)


@pytest.mark.parametrize("height, width", [(256, 256), (128, 512)])
def test_a_jpeg_decoded_at_reduced_scale_gives_the_pixels_of_a_full_decode(height: int, width: int) -> None:
    """Draft mode decodes a JPEG at 1/2, 1/4 or 1/8 scale for speed, but never below twice the
    target side, so the resize to the target still sees every detail it keeps: a 256 px noise image
    (the hardest case: all detail) at 32 px is within 3 grey levels of decoding the whole file and
    resizing it the same way (a draft at the target side itself is 9 off). Cropped, the side that
    counts is the short one: a 512 x 128 image may be reduced to 256 x 64, not to 128 x 32."""
    from fastclr.ingest.decode import fit_square

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    pixels = decode_image(buf.getvalue(), DecodeOptions(32))[0]
    full = np.asarray(fit_square(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), 32, "crop"))
    assert pixels.shape == full.shape == (32, 32, 3)
    assert np.abs(pixels.astype(int) - full.astype(int)).max() <= 3


def test_postscript_named_as_an_image_is_not_handed_to_ghostscript(tmp_path: Path) -> None:
    """Pillow identified EPS bytes in x.jpg and would run Ghostscript on them: only the readers of
    the accepted extensions are tried, so the file is not a recognisable image."""
    folder = tmp_path / "photos"
    bar_images(folder, n_per_class=1)
    (folder / "class0" / "x.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 20\n"
                                              b"newpath 0 0 moveto 20 20 lineto stroke\nshowpage\n")
    res = prepare_store(folder, tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    assert [(s.rel, s.reason, s.detail) for s in res.skipped] == [
        ("class0/x.jpg", "corrupt", "not a recognisable image file")]


def test_a_manifest_reordered_by_hand_is_refused(tmp_path: Path) -> None:
    """Sorted by path (a spreadsheet's sort), the manifest put labels on other images, silently."""
    folder = tmp_path / "photos"
    bar_images(folder, n_per_class=4)
    prepare_store(folder, tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    manifest = tmp_path / "s" / "manifest.csv"
    header, *rows = manifest.read_text().splitlines(keepends=True)
    manifest.write_text(header + "".join(sorted(rows, key=lambda r: r.split(",")[1], reverse=True)))
    with pytest.raises(FastclrError, match=r"manifest.csv row 1 is .* where image 0 of the (train|test) split belongs: "
                                           r"the manifest was reordered or edited; run `fastclr prepare` again"):
        read_store(tmp_path / "s")


def test_a_negative_worker_count_is_one_line(tmp_path: Path) -> None:
    """--workers -2 ran serially without a word."""
    bar_images(tmp_path / "photos", n_per_class=1)
    with pytest.raises(FastclrError, match=r"--workers must be 0 \(as many as fit, up to 8\) or more, got -2"):
        prepare_store(tmp_path / "photos", tmp_path / "s", DecodeOptions(16), workers=-2, **QUIET)
    assert not (tmp_path / "s").exists()


def test_a_manifest_whose_split_column_disagrees_with_store_json_is_refused(tmp_path: Path) -> None:
    """store.json counts the rows of each split and the manifest names each row's split: a row
    moved from train to test by hand (its index kept) would be probed as a test image while
    pretraining and the probe's fit read it as a train image. Refused, naming the row."""
    folder = tmp_path / "photos"
    bar_images(folder, n_per_class=6)
    prepare_store(folder, tmp_path / "s", DecodeOptions(16), workers=1, **QUIET)
    manifest = tmp_path / "s" / "manifest.csv"
    header, *rows = manifest.read_text().splitlines(keepends=True)
    i = next(k for k, r in enumerate(rows) if r.split(",")[2] == "train")
    cells = rows[i].split(",")
    cells[2] = "test"
    rows[i] = ",".join(cells)
    manifest.write_text(header + "".join(rows))
    with pytest.raises(FastclrError, match=re.escape(f"manifest.csv row {i + 1} is '{cells[1]}' with index '{i}' and "
                                                     f"split 'test', where image {i} of the train split belongs")):
        read_store(tmp_path / "s")


def test_a_renamed_image_is_other_content_although_its_pixels_are_the_same(tmp_path: Path) -> None:
    """A store's content identity covers each row's path: the same pixels in the same order under
    another name are not the data a run recorded (embeddings and neighbours are reported by path).
    The files are unlabelled, so the rename changes no split, label or class, only the path."""
    from fastclr.data import open_store

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / name)
    before = prepare_store(folder, tmp_path / "before", DecodeOptions(8), workers=1, **QUIET).store
    (folder / "a.png").rename(folder / "a_renamed.png")  # still sorts before b.png: the same row order
    after = prepare_store(folder, tmp_path / "after", DecodeOptions(8), workers=1, **QUIET).store
    assert read_store(after).paths == ["a_renamed.png", "b.png"]
    assert (before / "images.u8").read_bytes() == (after / "images.u8").read_bytes()
    assert open_store(before).content != open_store(after).content


def test_an_auto_channel_store_promoted_to_colour_is_the_content_of_a_three_channel_store(tmp_path: Path) -> None:
    """With --channels auto, a grayscale image written before the first colour one is stored with
    one channel, then the rows so far are expanded to three: the store's pixels are then exactly
    those of --channels 3, and so must its content identity be (it hashes the pixels as stored,
    not the one-channel bytes they were before the promotion)."""
    from fastclr.data import open_store

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("L", (16, 16), 50).save(folder / "a.png")  # first in the store: written gray, then promoted
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "c.png")
    auto = prepare_store(folder, tmp_path / "auto", DecodeOptions(8), workers=1, **QUIET).store
    rgb = prepare_store(folder, tmp_path / "rgb", DecodeOptions(8, channels="3"), workers=1, **QUIET).store
    assert read_store(auto).images.shape == (2, 8, 8, 3)
    assert (auto / "images.u8").read_bytes() == (rgb / "images.u8").read_bytes()
    assert open_store(auto).content == open_store(rgb).content
