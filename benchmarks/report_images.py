"""How many bytes the report's embedded images take for stores of larger images, at the side they
are shown (thumbnails shrunk by block means, `fastclr.report.png.shrink`) against the store's own
side (what the report embedded before).

For each --sides S, --images smooth synthetic S x S colour images (bilinear-upsampled noise with
fine noise over it: between a photo and pure noise for PNG's compression) are laid out as the map's
sprite (2000 in the report) and as the playground's 64 view thumbnails, then encoded as the page
embeds them (PNG data URIs). Prints one JSON line per side.

    python benchmarks/report_images.py --sides 28 96 224 --images 2000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from harness import report
from fastclr.report import interactive
from fastclr.report.png import SHOWN_SIDE, data_uri, encode_png, shrink


def images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, side, side, 3): 8 x 8 noise upsampled bilinearly, plus fine noise of 8 levels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    smooth = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    fine = (torch.rand(n, 3, side, side, generator=g) - 0.5) * (8 / 255)
    return ((smooth + fine).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sprite_bytes(x: np.ndarray) -> tuple[int, float]:
    """Bytes of the map's sprite data URI of images `x`, and the seconds it took to make."""
    start = time.perf_counter()
    size = len(interactive.sprite(x))
    return size, time.perf_counter() - start


def thumbnail_bytes(x: np.ndarray) -> int:
    """Bytes of one PNG data URI per image of `x`, as the playground embeds its views."""
    return sum(len(data_uri(encode_png(v))) for v in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", type=int, nargs="+", default=[28, 96, 224])
    p.add_argument("--images", type=int, default=2000, help="map points (the report's MAP_POINTS)")
    args = p.parse_args()
    for side in args.sides:
        x = images(args.images, side)
        full_map, full_map_s = sprite_bytes(x)
        shown_map, shown_map_s = sprite_bytes(interactive.map_thumbnails(x))
        full_views, shown_views = thumbnail_bytes(x[:64]), thumbnail_bytes(shrink(x[:64], SHOWN_SIDE))
        report("report_images", {
            "side": side, "images": args.images,
            "map_thumbnail_side": int(interactive.map_thumbnails(x[:1]).shape[1]),
            "map_sprite_mb": {"store_side": round(full_map / 1e6, 2), "shown": round(shown_map / 1e6, 2)},
            "map_sprite_seconds": {"store_side": round(full_map_s, 2), "shown": round(shown_map_s, 2)},
            "view_thumbnails_mb": {"store_side": round(full_views / 1e6, 2), "shown": round(shown_views / 1e6, 2)},
        })


if __name__ == "__main__":
    main()
