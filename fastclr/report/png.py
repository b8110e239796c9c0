"""PNG writing with zlib and struct only, and the colour helpers the report's images use."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(img: np.ndarray) -> bytes:
    """uint8 (H, W) grey or (H, W, 3) RGB -> PNG bytes (8 bits per sample, no interlace, filter 0)."""
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"expected uint8 (H, W) or (H, W, 3), got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    colour_type = 0 if img.ndim == 2 else 2
    rows = np.ascontiguousarray(img).reshape(h, -1)
    raw = np.hstack([np.zeros((h, 1), np.uint8), rows]).tobytes()  # each row: filter byte 0, then samples
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def data_uri(png: bytes) -> str:
    """A data: URI embedding PNG bytes in the page (no file, no network)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# Viridis at 9 evenly spaced stops (matplotlib's table): perceptually uniform, readable in grey.
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
                     [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64)


def viridis(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape S) -> uint8 RGB (S + (3,)), linear between the stops."""
    t = np.clip(np.asarray(v, dtype=np.float64), 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(t.astype(np.int64), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    return np.round(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 1 or 3) -> (N, H, W, 3)."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def tile(images: np.ndarray, cols: int, scale: int = 1, pad: int = 2, borders: np.ndarray | None = None,
         background: int = 255) -> np.ndarray:
    """Lay out uint8 images (N, H, W, C) in a grid of `cols` columns: (H', W', 3).

    Each image is enlarged `scale` times by pixel repetition (no smoothing: the pixels the model saw)
    and framed by `pad` pixels, coloured by `borders` (N, 3) when given.
    """
    rgb = to_rgb(images)
    if scale > 1:
        rgb = rgb.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = rgb.shape
    rows = -(-n // cols)
    ch, cw = h + 2 * pad, w + 2 * pad
    out = np.full((rows * ch, cols * cw, 3), background, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        cell = out[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw]
        if borders is not None:
            cell[:] = borders[i]
        cell[pad : pad + h, pad : pad + w] = rgb[i]
    return out


SHOWN_SIDE = 96
"""The largest side an image of the page keeps (the page shows them at 84 px, map thumbnails at 3x
their side on hover): a 224 px store's 2000 map thumbnails alone were 300 MB of pixels, beyond what
a browser parses."""


def shrink(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 images (N, H, W, C), H and W at most `side`: each f x f block averaged (rounded) for
    the smallest whole f that fits, the last rows and columns that do not fill a block left out;
    images already that small as they are."""
    f = -(-max(images.shape[1:3]) // side)
    if f <= 1:
        return images
    n, h, w, c = images.shape
    blocks = images[:, : h // f * f, : w // f * f].reshape(n, h // f, f, w // f, f, c)
    return np.round(blocks.mean(axis=(2, 4), dtype=np.float64)).astype(np.uint8)


def enlargement(side: int, scale: int) -> int:
    """`scale`, or less so that the enlarged side stays within SHOWN_SIDE (at least 1)."""
    return max(1, min(scale, SHOWN_SIDE // side))
