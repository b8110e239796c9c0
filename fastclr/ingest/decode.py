"""One image file -> uint8 (S, S, C) pixels, or the reason it cannot be used.

The pipeline, in order (each step is a pure function of the file's bytes and the options):
  read + SHA-256 of the bytes -> open (header only) -> pixel-limit check -> JPEG draft (libjpeg
  decodes at 1/2, 1/4 or 1/8 scale, still >= 2x the target, for speed) -> full decode ->
  EXIF orientation -> 8-bit L or RGB -> short side to S and centre crop (or pad to a square).

Mode conversion, decided once here:
  * 16-bit and 32-bit integer grayscale (I;16, I;16B, I) map the full 16-bit range to 8 bits,
    round(v / 257): the exact inverse of 8->16-bit scaling, and no 16-bit value saturates (32-bit
    values above 65535 become 255). Data that uses only 12 of the 16 bits comes out dark, as it
    looks in any viewer. 16-bit colour (48-bit RGB, 64-bit RGBA PNG) is read by Pillow as 8 bits a
    channel, the high byte of each value (v >> 8, at most one level below round(v / 257)).
  * A 16-bit grey-with-alpha PNG, which Pillow opens as RGBA, is grey (one channel), as its 8-bit
    form (LA) is; its grey is the high byte of each value, as for 16-bit colour.
  * Transparency (RGBA, LA, P or L with a transparent colour) is composited onto white, as image
    viewers and browsers show it: product shots and logos on transparent ground stay visible.
  * CMYK -> RGB with Pillow's conversion (Adobe-inverted CMYK JPEGs are un-inverted by Pillow's
    decoder); embedded ICC profiles are not applied.
  * A palette image (P, PA) whose pixels come out grey is a grayscale image (one channel), as an
    L file is: a GIF or PNG saved from a grey image has a palette of greys.
  * Multi-frame files (GIF, multi-page TIFF) use their first frame. Float images (mode F) have no
    known range and are skipped as unsupported-mode.

This module does not use torch: it runs in the decoding worker processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from typing import BinaryIO
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin, UnidentifiedImageError

from fastclr.data.store import Store

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"})
PALETTE_MODES = frozenset({"P", "PA"})
_INT_GRAY = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
"""EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose)."""
DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own decompression-bomb limit (a 3-channel image of this size is 256 MiB decoded)."""
DECODE_BYTES_PER_PIXEL = 11
"""Upper bound of the memory one decode needs per pixel, beyond one strip's temporaries (the file
is read as it decodes, not held: tests/test_decode_memory.py holds the whole growth to this). Measured
peak resident growth beyond the file, which the decoder then held, noise images of 16M pixels
(benchmarks/decode_memory.py, docs/benchmarks.md section 8): RGBA 9.7 (decoded 4, the 8-bit RGB
result 4), CMYK 9.1, LA 6.6, P with a transparent colour 6.5, RGB 4.2, 16-bit gray 3.9, L 1.1, JPEG
0.3 (decoded at reduced scale). Converting whole images at once took up to 24 (rotated RGBA), 20
(RGBA, LA) and 19 (16-bit gray)."""
STRIP_PIXELS = 1 << 20
"""Pixels per strip of the 8-bit conversion: a few MB of temporaries, whatever the image size."""
STRIP_BYTES = 32 * STRIP_PIXELS
"""Upper bound of one strip's temporaries (compositing holds an RGBA copy, a white ground, their
composite and its RGB: 16 bytes per pixel), beyond DECODE_BYTES_PER_PIXEL."""
PIPELINE_VERSION = 2
"""Bumped when the pixels this module produces change, so old stores are decoded afresh."""


@dataclass(frozen=True)
class DecodeOptions:
    """How images become store rows."""

    size: int
    fit: str = "crop"
    """crop: short side to `size`, centre crop; pad: long side to `size`, black borders."""
    channels: str = "auto"
    """auto: 1 if every image in the store is grayscale, else 3; 1: luma; 3: RGB."""
    max_pixels: int = DEFAULT_MAX_PIXELS


def store_decoding(store: Store, size: int, channels: int) -> DecodeOptions:
    """How a new image must be decoded to match `store`'s rows at `size` and `channels`: the fit
    and pixel limit the store was prepared with (a query, or a folder embedded for its run)."""
    opts = store.meta.get("options", {})
    return DecodeOptions(size, str(opts.get("fit", "crop")), "1" if channels == 1 else "3",
                         int(opts.get("max_pixels", DEFAULT_MAX_PIXELS)))


class Unusable(Exception):
    """A file that cannot become a store row: `reason` is one of walk.REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Outcome:
    """What a worker returns for one file. `image` is uint8 (S, S, 1 or 3) when decoded; None when
    the file was unusable (`reason` set) or its hash is already in the store (`known`)."""

    rel: str
    size: int
    sha256: str = ""
    image: np.ndarray | None = None
    known: bool = False
    reason: str = ""
    detail: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""


def decode_peak_bytes(max_pixels: int) -> int:
    """Memory one worker may need for one image of `max_pixels` pixels: the decode bound, one
    strip's temporaries, and 4 bytes per pixel more as a margin (what an uncompressed RGBA file
    would hold; the file is read as it is decoded, not held, and Pillow's readers buffer less)."""
    return max_pixels * (DECODE_BYTES_PER_PIXEL + 4) + STRIP_BYTES


def pixels_that_fit(memory: int) -> int:
    """The largest image (in pixels) one worker can decode within `memory` bytes; the inverse of
    decode_peak_bytes."""
    return max(0, (memory - STRIP_BYTES) // (DECODE_BYTES_PER_PIXEL + 4))


def file_mode(im: Image.Image) -> str:
    """The Pillow mode of the file's own pixels: "LA" for a 16-bit grey-with-alpha PNG, which Pillow
    opens as RGBA (its raw mode LA;16B says what the file holds), else `im.mode`."""
    png = getattr(im, "png", None)
    return "LA" if im.mode == "RGBA" and getattr(png, "im_rawmode", "") == "LA;16B" else im.mode


def is_gray(mode: str) -> bool:
    """Whether images of a Pillow mode become single-channel (luma) images whatever their pixels."""
    return mode in GRAY_MODES


def as_stored(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Decoded (S, S, C) pixels of a file of Pillow `mode` as a store holds them: a palette image
    whose three channels are equal is grey, one channel (decided on the S x S result, which an
    update can decide again from a stored row)."""
    if pixels.shape[-1] == 3 and (is_gray(mode) or (mode in PALETTE_MODES and (pixels[..., :1] == pixels).all())):
        return pixels[..., :1]
    return pixels


def to_8bit(im: Image.Image, strip_pixels: int = STRIP_PIXELS) -> Image.Image:
    """Any Pillow mode -> 'L' (grayscale modes) or 'RGB' (all others); see the module docstring.

    Every conversion is per pixel, so it runs on strips of rows of about `strip_pixels` pixels
    pasted into the result: the same pixels as converting the whole image at once, with the
    temporaries of one strip (16-bit arithmetic, the RGBA copy and white ground of compositing)
    instead of several copies of the whole image (see DECODE_BYTES_PER_PIXEL)."""
    if im.mode in ("L", "RGB") and "transparency" not in im.info:
        return im
    w, h = im.size
    rows = max(1, strip_pixels // max(1, w))
    if rows >= h:
        return _strip_to_8bit(im)
    out: Image.Image | None = None
    for y in range(0, h, rows):
        strip = _strip_to_8bit(im.crop((0, y, w, min(h, y + rows))))
        if out is None:
            out = Image.new(strip.mode, (w, h))
        out.paste(strip, (0, y))
    assert out is not None
    return out


def _strip_to_8bit(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in _INT_GRAY:
        v = np.asarray(im)  # numpy reads the byte order of I;16B itself
        wide = np.clip(v, 0, 65535).astype(np.uint32) if mode == "I" else v.astype(np.uint32)
        wide += 128
        wide //= 257
        out = wide.astype(np.uint8)
        key = im.info.get("transparency")
        if isinstance(key, int):
            out[v == key] = 255  # the transparent colour, composited onto white as for 8-bit images
        return Image.fromarray(out, "L")
    if mode == "F":
        raise Unusable("unsupported-mode", "32-bit float image (mode F) has no known range; save it as 8 or 16-bit")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, rgba).convert("RGB")
        return flat.convert("L") if is_gray(mode) else flat
    if mode in ("L", "RGB"):
        return im
    if mode == "1":
        return im.convert("L")
    try:
        return im.convert("RGB")  # CMYK, P, YCbCr, RGBX, HSV ...
    except ValueError as e:
        raise Unusable("unsupported-mode", f"mode {mode} cannot be converted to RGB ({e})") from None


def fit_square(im: Image.Image, size: int, fit: str) -> Image.Image:
    """Resize an L/RGB image to `size` x `size`: centre crop of the short side, or padded (black)."""
    w, h = im.size
    if fit == "crop":
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        return im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new(im.mode, (size, size), 0)
    canvas.paste(im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0), ((size - nw) // 2, (size - nh) // 2))
    return canvas


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    # Pillow warns above MAX_IMAGE_PIXELS and raises DecompressionBombError above twice that.
    # With its limit set to ours, the error (caught as a skip) guards formats that decode while
    # opening; our own check right after `open` catches everything above the limit itself.
    # Decoder warnings (the bomb warning, odd palettes, EXIF quirks) are silenced: what matters
    # about a file is whether it decodes, and that is reported per file.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _failure(e: BaseException, max_pixels: int) -> Unusable:
    text = str(e) or type(e).__name__
    if isinstance(e, MemoryError):  # this machine's state, not the file's: tried again by the next run
        return Unusable("out-of-memory", "not enough memory to decode it; run again with fewer --workers, "
                        "or a lower --max-pixels")
    if isinstance(e, Image.DecompressionBombError):
        # Pillow's own text quotes its threshold, twice the limit; the user set (or read) ours.
        return Unusable("over-pixel-limit", f"more than {max_pixels} pixels (--max-pixels)")
    if isinstance(e, UnidentifiedImageError):
        return Unusable("corrupt", "not a recognisable image file")
    if isinstance(e, EOFError) or "truncated" in text.lower():
        return Unusable("truncated", text)
    return Unusable("corrupt", text)


# Pillow's readers of the extensions the walk accepts (walk.IMAGE_EXTENSIONS), and only those: left
# to guess, Pillow opens PostScript saved as .jpg with its EPS reader, which runs Ghostscript.
# AVIF where this Pillow has its reader (walk.readable_here words the skip where it has not).
Image.init()
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF", "PPM", "TGA", "JPEG2000", "AVIF")
                if f in Image.OPEN)
TRANSIENT = frozenset({"out-of-memory"})
"""Reasons that describe this run, not the file: never remembered by the file's hash."""
_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def decode_image(data: bytes | BinaryIO, opts: DecodeOptions) -> tuple[np.ndarray, int, int, str]:
    """Encoded bytes, or a binary file open at its start -> (uint8 (S, S, C) with C = 1 for
    grayscale modes else 3 (or 1 when `opts.channels` is "1"), displayed width, displayed height,
    Pillow mode). Raises Unusable. From a file Pillow reads what it decodes (the header, the first
    frame), not the whole file."""
    try:
        with _pixel_limit(opts.max_pixels):
            im: Image.Image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=FORMATS)
            w, h = im.size
            if w * h > opts.max_pixels:
                raise Unusable("over-pixel-limit", f"{w}x{h} = {w * h} pixels, more than {opts.max_pixels} (--max-pixels)")
            mode = file_mode(im)
            # Decode at reduced scale where the format allows it (JPEG), keeping >= 2x the target
            # (min and max of the sides do not depend on the orientation).
            f = 2 * opts.size / (min(w, h) if opts.fit == "crop" else max(w, h))
            if f < 1:
                im.draft(None, (int(im.size[0] * f) + 1, int(im.size[1] * f) + 1))
            # The pixels before the EXIF block: a PNG's getexif() decodes the image to find an eXIf
            # chunk after the data, and a decoding error swallowed there as a damaged EXIF block left
            # the image "loaded" with no pixels: stored black, not skipped as corrupt.
            im.load()
            try:
                orientation = im.getexif().get(_ORIENTATION, 1)
            except Exception:  # a damaged EXIF block does not make the pixels unusable
                orientation = 1
            if isinstance(im, TiffImagePlugin.TiffImageFile) and _ORIENTATION not in im.tag_v2:
                orientation = 1  # Pillow's TIFF loader turned it upright itself and dropped the tag (Pillow 13 does)
            # Convert first, then rotate: the rotated copy is of the 8-bit image (per-pixel
            # conversion and a transpose commute), and the decoded one is freed before it.
            im = to_8bit(im)
            if orientation in _TRANSPOSE:
                im = im.transpose(_TRANSPOSE[orientation])
            if orientation in _QUARTER_TURNS:  # as displayed (before draft's reduced scale, the file's own size)
                w, h = h, w
            if opts.channels == "1" and im.mode == "RGB":
                im = im.convert("L")
            pixels = np.asarray(fit_square(im, opts.size, opts.fit))
    except Unusable:
        raise
    except OSError as e:
        if e.errno is not None:  # the read itself failed (EIO, a stale NFS handle): not the file's content, not
            raise  # remembered by its hash as "corrupt"; Pillow's own decoding errors carry no errno
        raise _failure(e, opts.max_pixels) from None
    except Exception as e:  # any decoder failure is this file's problem, never the run's
        raise _failure(e, opts.max_pixels) from None
    return as_stored(pixels.reshape(opts.size, opts.size, -1), mode), w, h, mode


def process_file(path: Path, rel: str, opts: DecodeOptions, known: frozenset[str] = frozenset()) -> Outcome:
    """Hash and (unless the hash is in `known`) decode one file; never raises. Both read the file
    as they go, never whole: a 172 MB stack of 60 TIFF pages held all of it in memory to decode its
    first page, past the memory per worker that `decode_peak_bytes` counts on."""
    try:
        with open(path, "rb") as f:
            out = Outcome(rel, os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest())
            if out.sha256 in known:
                out.known = True
                return out
            f.seek(0)
            try:
                out.image, out.width, out.height, out.mode = decode_image(f, opts)
            except Unusable as u:
                out.reason, out.detail = u.reason, u.detail
    except OSError as e:  # opening or hashing: the decoder's own failures are Unusable
        return Outcome(rel, -1, reason="unreadable", detail=e.strerror or str(e))
    except MemoryError as e:  # while hashing: this machine's state, as in decoding
        failure = _failure(e, opts.max_pixels)
        return Outcome(rel, -1, reason=failure.reason, detail=failure.detail)
    return out
