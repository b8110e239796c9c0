"""What the report's interactive parts need, computed once and embedded in the page as JSON.

- The contrastive playground: PLAY_IMAGES images, two views each as the run's augmentation draws
  them, their h (encoder) and z (the trained projection head, from the newest checkpoint), and a
  thumbnail of every view; the page's script (interactive.js) recomputes the similarity matrix,
  the softmax of an anchor and NT-Xent with its metrics for any temperature and batch, in the
  same way as fastclr.pretraining.losses.
- The embedding map: the neighbours in h of every point (among the map's images, as `fastclr
  neighbours` finds them in a store of those images) and one sprite sheet of their thumbnails.
- The augmentation explorer: several view pairs of a few images with the parameters each view
  was drawn with.

Vectors travel as base64 of little-endian float32, the dtype torch computed them in.
"""

from __future__ import annotations

import base64
import json
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import nn

from fastclr.augment import ViewParams, normalize, render_views, view_params
from fastclr.data import ImageSet
from fastclr.evaluation.features import encode, evenly_spaced
from fastclr.evaluation.knn import cosine_topk
from fastclr.pretrained import LoadedRun
from fastclr.report.png import SHOWN_SIDE, data_uri, encode_png, shrink, tile, to_rgb

PLAY_IMAGES = 32
"""Images of the playground: 64 views, batches of 4, 8, 16 or 32 pairs."""
EXPLORER_IMAGES, EXPLORER_PAIRS = 4, 3
MAP_NEIGHBOURS = 8
SPRITE_COLUMNS = 50


def f32_base64(x: torch.Tensor | np.ndarray) -> str:
    """Little-endian float32 bytes of an array, base64 (what the page's Float32Array reads)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def from_f32_base64(text: str, dim: int) -> np.ndarray:
    """Inverse of f32_base64 for (N, dim) arrays."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(-1, dim)


def _thumbs(views: torch.Tensor) -> list[str]:
    """float (N, C, S, S) in [0, 1] -> one PNG data URI per view."""
    v = shrink((views.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy(), SHOWN_SIDE)
    return [data_uri(encode_png(img[..., 0] if img.shape[-1] == 1 else img)) for img in v]


def _draw(run: LoadedRun, images: np.ndarray, device: torch.device, g: torch.Generator
          ) -> tuple[torch.Tensor, ViewParams]:
    """Two views of each image exactly as pretraining draws them: ([0, 1] views (2B, C, S, S), parameters)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    params = view_params(x.shape, run.augment, g, device)
    return render_views(x, params, run.augment), params


def playground(run: LoadedRun, head: nn.Module | None, split: ImageSet, device: torch.device, seed: int,
               temperature: float) -> dict[str, Any]:
    """h and z of the 2 x PLAY_IMAGES views (first views, then second views), their thumbnails, and
    the temperature the page starts at (the run's: learned, where it learned one)."""
    idx = evenly_spaced(len(split), PLAY_IMAGES)
    g = torch.Generator(device=device).manual_seed(seed)
    raw, _ = _draw(run, split.images[idx], device, g)
    h = encode(run.encoder, normalize(raw, run.mean.to(device), run.std.to(device)), run.precision)
    out: dict[str, Any] = {"pairs": len(idx), "h": f32_base64(h), "h_dim": h.shape[1], "thumbs": _thumbs(raw),
                           "temperature": temperature}
    if head is not None:
        with torch.no_grad():
            z = head(h.to(device)).float()
        out.update(z=f32_base64(z), z_dim=z.shape[1])
    return out


def describe_view(p: ViewParams, i: int, size: tuple[int, int]) -> dict[str, Any]:
    """The drawn parameters of view i, as the page lists them (unused operations say so)."""
    x0, y0, w, h = (float(v) for v in p.box[i])
    jit = bool(p.jitter[i])
    return {
        "crop": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
        "crop_share": round(w * h / (size[0] * size[1]), 4),
        "flip": bool(p.flip[i]),
        "jitter": {"brightness": round(float(p.brightness[i]), 4), "contrast": round(float(p.contrast[i]), 4),
                   "saturation": round(float(p.saturation[i]), 4), "hue": round(float(p.hue[i]), 4)} if jit else None,
        "grayscale": bool(p.gray[i]),
        "blur_sigma": round(float(p.blur_sigma[i]), 4),
        "solarize": bool(p.solarize[i]),
        "erase": erased(p, i),
    }


def erased(p: ViewParams, i: int) -> list[float] | None:
    """View i's erased rectangle (x0, y0, w, h as fractions of the side) and its grey level, rounded
    to 4 decimals (an edge then moves by 5e-5 of the side, far from the pixel centres 1 / S apart), or None."""
    if p.erase is None or p.erase_value is None or float(p.erase[i, 2]) == 0:
        return None
    return [round(float(v), 4) for v in p.erase[i]] + [round(float(p.erase_value[i]), 4)]


def params_text(p: dict[str, Any]) -> str:
    """One view's parameters as one line (the tooltip the page shows with scripts off)."""
    j = p["jitter"]
    jitter = (f"jitter b {j['brightness']:.3f} c {j['contrast']:.3f} s {j['saturation']:.3f} h {j['hue']:.3f}"
              if j else "no jitter")
    return (f"crop x0 {p['crop'][0]:.1f} y0 {p['crop'][1]:.1f} w {p['crop'][2]:.1f} h {p['crop'][3]:.1f}; "
            f"{'flipped' if p['flip'] else 'not flipped'}; {jitter}; {'grayscale' if p['grayscale'] else 'colour'}; "
            f"{'blur sigma %.3f' % p['blur_sigma'] if p['blur_sigma'] > 0 else 'no blur'}; "
            f"{'solarized' if p['solarize'] else 'not solarized'}"
            + (f"; erased x0 {e[0]:.2f} y0 {e[1]:.2f} w {e[2]:.2f} h {e[3]:.2f} to {e[4]:.2f}" if (e := p.get("erase")) else ""))


def explorer(run: LoadedRun, split: ImageSet, device: torch.device, seed: int) -> dict[str, Any]:
    """EXPLORER_PAIRS view pairs of EXPLORER_IMAGES images, each view with its parameters."""
    idx = evenly_spaced(len(split), EXPLORER_IMAGES)
    images = split.images[idx]
    g = torch.Generator(device=device).manual_seed(seed + 1)
    rows = []
    for i, image in enumerate(images):
        views, params = [], []
        for _ in range(EXPLORER_PAIRS):
            raw, p = _draw(run, image[None], device, g)
            views += _thumbs(raw)
            params += [describe_view(p, j, image.shape[:2]) for j in range(2)]
        rows.append({"original": data_uri(encode_png(to_rgb(shrink(image[None], SHOWN_SIDE))[0])), "index": int(idx[i]),
                     "views": views, "params": params})
    return {"images": rows}


def map_neighbours(h: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Each map point's MAP_NEIGHBOURS nearest others by cosine in h: (indices, similarities), best
    first. cosine_topk is the search `fastclr neighbours` runs; the point itself is left out."""
    n = h.shape[0]
    k = min(MAP_NEIGHBOURS, n - 1)
    if k < 1:  # a single point has no other
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    sims, rows = cosine_topk(h, h, k, exclude=torch.arange(n))
    return rows.numpy(), sims.numpy()


MAP_THUMB_SIDE = 48
"""The largest side of a map thumbnail: the page enlarges them, 2000 of them at a 224 px store's
side would be 300 MB of pixels."""


def map_thumbnails(images: np.ndarray) -> np.ndarray:
    """The map's images (N, H, W, C) at most MAP_THUMB_SIDE on a side (`shrink`)."""
    return shrink(images, MAP_THUMB_SIDE)


def sprite(images: np.ndarray) -> str:
    """One PNG of all map thumbnails, SPRITE_COLUMNS per row, no gaps: image i at (i % cols, i // cols)."""
    sheet = tile(images, cols=SPRITE_COLUMNS, pad=0)
    return data_uri(encode_png(sheet[..., 0] if images.shape[-1] == 1 else sheet))  # grey stays one channel


def page_data(payload: dict[str, Any]) -> str:
    """The JSON block of the page, safe inside <script type="application/json">: <, > and & as
    JSON escapes, so no user text (a class folder named `<!--<script>`) can end the block or put
    the HTML parser in a state that swallows the rest of the page."""
    text = json.dumps(payload, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def script() -> str:
    """The page's own JavaScript (fastclr/report/interactive.js)."""
    return resources.files("fastclr.report").joinpath("interactive.js").read_text(encoding="utf-8")
