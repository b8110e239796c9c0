"""Image folders written by the tests: every format, mode and kind of broken file prepare meets."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
PIXEL_LIMIT = 100_000
"""The --max-pixels the fixture folder is prepared with: over_limit.png has 120,000 pixels."""


def halves(w: int, h: int, left: tuple[int, ...], right: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    """An image whose left half is one colour and right half another."""
    im = Image.new(mode, (w, h), left if len(left) > 1 else left[0])
    im.paste(right if len(right) > 1 else right[0], (w // 2, 0, w, h))
    return im


def jpeg_bytes(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def write_fixture_folder(root: Path) -> dict[str, str]:
    """The issue's fixture folder. Returns {relative path: expected skip reason} for every entry
    that must not be in the store; every other file written is a valid image.

    Layout: two classes (cats/, dogs/), one loose image at the top (unlabeled), and the broken
    and special files spread across them.
    """
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "deeper").mkdir(parents=True)
    halves(48, 32, RED, BLUE).save(root / "cats" / "jpeg.jpg", quality=95)
    halves(48, 32, RED, BLUE).save(root / "cats" / "upper.JPG", "JPEG", quality=90)  # other bytes: not a duplicate
    halves(48, 32, GREEN, BLUE).save(root / "cats" / "png.png")
    halves(48, 32, RED, GREEN).save(root / "cats" / "webp.webp", lossless=True)
    halves(48, 32, BLUE, RED).save(root / "dogs" / "bmp.bmp")
    halves(48, 32, GREEN, RED).save(root / "dogs" / "tiff.tiff")
    # CMYK JPEG (Pillow writes Adobe-inverted CMYK): magenta+yellow ink is red.
    halves(48, 32, (0, 255, 255, 0), (255, 255, 0, 0), "CMYK").save(root / "dogs" / "cmyk.jpg", quality=95)
    # RGBA: left half fully transparent black (must come out white), right half opaque green.
    halves(48, 32, (0, 0, 0, 0), (0, 255, 0, 255), "RGBA").save(root / "dogs" / "rgba.png")
    # Palette with a transparent index: left transparent (white), right blue.
    p = Image.new("P", (48, 32), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (24, 0, 48, 32))
    p.save(root / "dogs" / "palette.png", transparency=0)
    # 16-bit grayscale: 10000 and 60000 must become round(v / 257) = 39 and 233, not 255.
    g16 = np.full((32, 48), 10000, np.uint16)
    g16[:, 24:] = 60000
    Image.fromarray(g16).save(root / "dogs" / "deeper" / "gray16.png")
    halves(48, 32, (77,), (200,), "L").save(root / "dogs" / "deeper" / "gray8.png")
    # EXIF orientation 6 (displayed rotated 90 degrees clockwise): stored top red / bottom blue,
    # displayed left blue / right red.
    tb = Image.new("RGB", (48, 32), RED)
    tb.paste(BLUE, (0, 16, 48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "cats" / "rotated.jpg").write_bytes(jpeg_bytes(tb, exif=exif.tobytes()))
    halves(40, 40, (128, 128, 128), WHITE).save(root / "loose.png")
    Image.new("L", (400, 300), 9).save(root / "cats" / "over_limit.png")  # 120,000 px > PIXEL_LIMIT

    good = jpeg_bytes(halves(48, 32, RED, BLUE))
    (root / "cats" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "cats" / "empty.jpg").write_bytes(b"")
    (root / "cats" / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 80)
    (root / "dogs" / "notes.txt").write_text("not an image\n")
    (root / "dogs" / "garbage.png").write_bytes(random.Random(0).randbytes(300))  # fixed: 1 in 30,000 random draws decodes
    (root / "dogs" / "gone.jpg").symlink_to(root / "dogs" / "missing.jpg")  # dangling link
    (root / "cats" / "loop").symlink_to(root)  # a directory loop
    (root / "dogs" / "alias").symlink_to(root / "cats")  # the same directory twice: walked once
    (root / ".thumbnails").mkdir()
    halves(48, 32, RED, GREEN).save(root / ".thumbnails" / "thumb.png")
    halves(48, 32, BLUE, GREEN).save(root / "dogs" / "locked.png")  # pixels of its own: not a duplicate
    os.chmod(root / "dogs" / "locked.png", 0)
    return {
        ".thumbnails/": "hidden-directory",
        "cats/._photo.jpg": "appledouble",
        "cats/empty.jpg": "zero-bytes",
        "cats/loop/": "symlink-loop",
        "cats/over_limit.png": "over-pixel-limit",
        "cats/truncated.jpg": "truncated",
        "dogs/alias/": "duplicate-directory",
        "dogs/garbage.png": "corrupt",
        "dogs/gone.jpg": "unreadable",
        "dogs/notes.txt": "not-an-image",
        # root can read a chmod-000 file; the tests expect it in the store when run as root.
        **({} if os.geteuid() == 0 else {"dogs/locked.png": "unreadable"}),
    }


FIXTURE_IMAGES = ["cats/jpeg.jpg", "cats/png.png", "cats/rotated.jpg", "cats/upper.JPG", "cats/webp.webp",
                  "dogs/bmp.bmp", "dogs/cmyk.jpg", "dogs/deeper/gray16.png", "dogs/deeper/gray8.png",
                  "dogs/palette.png", "dogs/rgba.png", "dogs/tiff.tiff", "loose.png"]
"""The images of the fixture folder that must be in the store (plus dogs/locked.png as root)."""


def bar_images(root: Path, n_per_class: int = 24, size: int = 20, classes: int = 2, labelled: bool = True) -> list[str]:
    """A learnable folder: class c has a bright bar at position c; PNGs, returned as relative paths."""
    rng = np.random.default_rng(0)
    rels = []
    for c in range(classes):
        for i in range(n_per_class):
            x = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            band = size // classes
            x[c * band : (c + 1) * band] = 220
            rel = f"class{c}/img{i:03d}.png" if labelled else f"img{c}_{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(root / rel)
            rels.append(rel)
    return sorted(rels)
