"""Decoding memory is bounded and said: the 8-bit conversion by strips gives the pixels of a
whole-image conversion, the rotation after it gives Pillow's EXIF transpose, the measured peak of
one decode stays within DECODE_BYTES_PER_PIXEL, and `prepare` runs no more decoders than fit."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, TiffImagePlugin

from conftest import REPO
from fastclr.errors import FastclrError
from fastclr.ingest.decode import (DECODE_BYTES_PER_PIXEL, STRIP_BYTES, DecodeOptions, _strip_to_8bit,
                                   decode_image, decode_peak_bytes, fit_square, to_8bit)
from fastclr.ingest.prepare import prepare_store, workers_that_fit

sys.path.insert(0, str(REPO / "benchmarks"))
import decode_memory  # noqa: E402  (the benchmark's images and measurement, shared)


def modes(rng: np.random.Generator, w: int, h: int) -> dict[str, Image.Image]:
    """Small images of every mode the conversion handles, random content."""
    a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    p = Image.fromarray(a[..., 0], "L").convert("P")
    p.info["transparency"] = 7
    gray_t = Image.fromarray(a[..., 1], "L")
    gray_t.info["transparency"] = 200
    wide = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    return {
        "RGBA": Image.fromarray(a, "RGBA"), "LA": Image.fromarray(a[..., :2].copy(), "LA"),
        "P": Image.fromarray(a[..., 0], "L").convert("P"), "P+transparency": p, "L+transparency": gray_t,
        "I;16": Image.fromarray(wide), "I;16B": Image.frombytes("I;16B", (w, h), wide.astype(">u2").tobytes()),
        "I": Image.fromarray(wide.astype(np.int32) * 3 - 20000, "I"), "CMYK": Image.fromarray(a, "RGBA").convert("CMYK"),
        "1": Image.fromarray(a[..., 0] > 127), "YCbCr": Image.fromarray(a[..., :3], "RGB").convert("YCbCr"),
    }


@pytest.mark.parametrize("strip", [1, 7 * 13, 13 * 13 + 5])
def test_strips_give_the_pixels_of_a_whole_image_conversion(strip: int) -> None:
    """Strips of 1 row, 7 rows and a remainder row count: equal, pixel for pixel, in every mode."""
    for name, im in modes(np.random.default_rng(strip), 13, 29).items():
        whole = _strip_to_8bit(im)
        by_strips = to_8bit(im, strip_pixels=strip)
        assert by_strips.mode == whole.mode, name
        assert np.array_equal(np.asarray(by_strips), np.asarray(whole)), name


@pytest.mark.parametrize("orientation", range(1, 9))
def test_rotating_after_the_conversion_is_pillows_exif_transpose(orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 36, 4), dtype=np.uint8), "RGBA").save(buf, "PNG", exif=exif.tobytes())
    pixels, w, h, _ = decode_image(buf.getvalue(), DecodeOptions(size=16, fit="pad"))
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())))
    expected = np.asarray(fit_square(_strip_to_8bit(upright), 16, "pad"))
    assert (w, h) == upright.size
    assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_with_an_orientation_tag_is_turned_upright_once(orientation: int) -> None:
    # Scanners and cameras write TIFFs with the tag; Pillow's TIFF loader may apply it itself.
    # The same pixels as a PNG with that EXIF orientation, and the same displayed size.
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 256, (20, 36, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    png, tif = io.BytesIO(), io.BytesIO()
    stored.save(png, "PNG", exif=exif.tobytes())
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[0x0112] = orientation
    stored.save(tif, "TIFF", tiffinfo=tags)
    want = decode_image(png.getvalue(), DecodeOptions(size=16, fit="pad"))
    got = decode_image(tif.getvalue(), DecodeOptions(size=16, fit="pad"))
    assert got[1:3] == want[1:3] == ImageOps.exif_transpose(Image.open(io.BytesIO(png.getvalue()))).size
    assert np.array_equal(got[0], want[0])


def test_a_transparent_colour_in_16_bit_gray_is_white_as_in_8_bit_gray() -> None:
    wide = np.zeros((8, 8), np.uint16)
    wide[:, 4:] = 40000
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG", transparency=0)
    pixels = decode_image(buf.getvalue(), DecodeOptions(size=8, fit="pad"))[0][..., 0]
    assert (pixels[:, :4] == 255).all()  # transparent: the white ground
    assert (pixels[:, 4:] == round(40000 / 257)).all()  # opaque: the 16-bit value in 8 bits


def test_one_decode_stays_within_the_declared_bytes_per_pixel(tmp_path: Path) -> None:
    """Peak resident growth (the kernel's high-water mark) of decoding 9M-pixel noise images of the
    heaviest modes, in a fresh process each: within DECODE_BYTES_PER_PIXEL per pixel and one strip's
    temporaries, the file included (it is read as it decodes, not held). Converting whole images
    took 17 to 24 bytes per pixel beyond the file, over the 14.7 this allows at this size."""
    heavy = ("RGBA-rotated.png", "LA.png", "P-transparent.png", "I16.png", "CMYK.tif")
    side = 3000
    for path in decode_memory.write_images(tmp_path, side, only=heavy):
        row = decode_memory.measure(path)
        allowed = DECODE_BYTES_PER_PIXEL + STRIP_BYTES / side**2
        assert float(row["bytes_per_pixel"]) <= allowed, (row, allowed)


def test_prepare_runs_no_more_decoders_than_fit_in_memory() -> None:
    per = decode_peak_bytes(1_000_000)
    assert per == 1_000_000 * (DECODE_BYTES_PER_PIXEL + 4) + STRIP_BYTES
    assert workers_that_fit(8, 1_000_000, None) == 8  # memory unknown: as asked
    assert workers_that_fit(8, 1_000_000, 3 * per + per - 1) == 3
    assert workers_that_fit(2, 1_000_000, 100 * per) == 2
    big = decode_peak_bytes(10_000_000)
    suggested = (big // 2 - STRIP_BYTES) // (DECODE_BYTES_PER_PIXEL + 4)
    assert decode_peak_bytes(suggested) <= big // 2 < decode_peak_bytes(suggested + 1)
    with pytest.raises(FastclrError, match=rf"lower --max-pixels \(e.g. --max-pixels {suggested}\)$"):
        workers_that_fit(1, 10_000_000, big - 1)
    with pytest.raises(FastclrError, match="free memory first$"):
        workers_that_fit(1, 10_000_000, STRIP_BYTES)


def test_prepare_says_when_it_runs_fewer_decoders_and_refuses_before_writing(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    folder, out = tmp_path / "images", tmp_path / "store"
    (folder / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 24), (i * 60, 0, 0)).save(folder / "a" / f"{i}.png")
    opts, logs = DecodeOptions(size=16, max_pixels=1_000_000), []
    monkeypatch.setattr("fastclr.ingest.prepare.available_memory", lambda: decode_peak_bytes(1_000_000) // 2)
    with pytest.raises(FastclrError, match="free memory first$"):
        prepare_store(folder, out, opts, workers=2, progress=False, log=logs.append)
    assert not out.exists()
    monkeypatch.setattr("fastclr.ingest.prepare.available_memory", lambda: decode_peak_bytes(1_000_000) + 1)
    result = prepare_store(folder, out, opts, workers=2, progress=False, log=logs.append)
    assert result.images == 3
    assert [line for line in logs if line.startswith("decoding with 1 processes, not 2: each may need")]
