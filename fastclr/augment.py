"""SimCLR's stochastic augmentation, batched on the batch's device (Chen et al. 2020, appendix A).

Every image gets its own random parameters, drawn as (B,) tensors from one generator, and every
operation is a batched tensor function; there is no Python loop over images. Crop, resize and
flip are one resampling: a per-image separable interpolation matrix on each axis, applied as two
batched matmuls (`Ry @ x @ Rx^T`), which also anti-aliases when a crop is shrunk. Gaussian blur is
the same kind of separable matmul with a per-image sigma.

Departures from torchvision's per-image pipeline, chosen for speed and stated here:
- crop corners are continuous rather than rounded to whole pixels;
- colour jitter applies brightness, contrast, saturation, hue in this fixed order;
- the blur kernel is truncated at radius round(5% of the view side), i.e. a kernel of about 10%
  of the image as in the paper, and renormalised at the borders;
- random erasing (on in the Fashion-MNIST recipe, off in the paper's) draws its rectangle in
  fractions of the view and fills the pixels whose centres lie inside with one grey level per
  view (torchvision: whole pixels, a constant or per-pixel noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from fastclr.config import AugmentConfig
from fastclr.data.loader import check_stored

LUMA = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights of R, G, B, as Pillow's L mode and torchvision use for grayscale."""


@dataclass
class ViewParams:
    """Random parameters of a batch of B views; every field is a (B,) or (B, 4) tensor."""

    box: torch.Tensor
    """(B, 4) float32: x0, y0, width, height of the crop in source pixels."""
    flip: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    gray: torch.Tensor
    blur_sigma: torch.Tensor
    """0 where no blur is applied."""
    solarize: torch.Tensor
    erase: torch.Tensor | None = None
    """(B, 4) float32: x0, y0, width, height of the erased rectangle as fractions of the view side;
    zero width and height where nothing is erased (all zeros, and no draws, when erasing is off)."""
    erase_value: torch.Tensor | None = None
    """(B,) the grey level in [0, 1] the rectangle is filled with."""

    def select(self, idx: torch.Tensor | slice) -> ViewParams:
        """The parameters of a subset of the views."""
        picked: dict[str, Any] = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                                  for f in fields(self)}
        return ViewParams(**picked)


def _uniform(lo: float, hi: float, shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=device)


def _bernoulli(p: float, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def sample_crop_boxes(
    cfg: AugmentConfig, n: int, height: int, width: int, g: torch.Generator, device: torch.device, tries: int = 10
) -> torch.Tensor:
    """Random-resized-crop boxes (n, 4) = x0, y0, w, h, as torchvision's RandomResizedCrop draws them.

    Area fraction ~ U(scale_min, scale_max), log aspect ratio ~ U(log ratio_min, log ratio_max);
    `tries` candidates per image, the first that fits is kept, else the centred fallback crop.
    """
    area = height * width * _uniform(cfg.scale_min, cfg.scale_max, (n, tries), g, device)
    log_r = _uniform(math.log(cfg.ratio_min), math.log(cfg.ratio_max), (n, tries), g, device)
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio)
    h = torch.sqrt(area / ratio)
    ok = (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting candidate
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # torchvision's fallback: the whole image, with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < cfg.ratio_min:
        fw, fh = float(width), width / cfg.ratio_min
    elif in_ratio > cfg.ratio_max:
        fw, fh = height * cfg.ratio_max, float(height)
    else:
        fw, fh = float(width), float(height)
    any_ok = ok.any(dim=1)
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    x0 = torch.rand(n, generator=g, device=device) * (width - w)
    y0 = torch.rand(n, generator=g, device=device) * (height - h)
    x0 = torch.where(any_ok, x0, (width - w) / 2)  # the fallback is centred (drawn anyway: the stream stays)
    y0 = torch.where(any_ok, y0, (height - h) / 2)
    return torch.stack([x0, y0, w, h], dim=1)


def sample_params(
    cfg: AugmentConfig, n: int, height: int, width: int, g: torch.Generator, device: torch.device
) -> ViewParams:
    """Draw independent parameters for n views of (height, width) images."""
    box = sample_crop_boxes(cfg, n, height, width, g, device)
    flip = _bernoulli(cfg.flip_p, n, g, device)
    jitter = _bernoulli(cfg.jitter_p, n, g, device)
    brightness = _uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, (n,), g, device)
    contrast = _uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, (n,), g, device)
    saturation = _uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, (n,), g, device)
    hue = _uniform(-cfg.hue, cfg.hue, (n,), g, device)
    gray = _bernoulli(cfg.grayscale_p, n, g, device)
    blur = _bernoulli(cfg.blur_p, n, g, device)
    sigma = _uniform(cfg.blur_sigma_min, cfg.blur_sigma_max, (n,), g, device) * blur
    solar = _bernoulli(cfg.solarize_p, n, g, device)
    # Drawn last and only when on, so that every other draw of a run is the same with or without it.
    erase = sample_erase_boxes(cfg, n, g, device) if cfg.erase_p > 0 else torch.zeros(n, 4, device=device)
    value = torch.rand(n, generator=g, device=device) if cfg.erase_p > 0 else torch.zeros(n, device=device)
    return ViewParams(box, flip, jitter, brightness, contrast, saturation, hue, gray, sigma, solar, erase, value)


ERASE_RATIO = (0.3, 1 / 0.3)
"""Aspect ratios of erased rectangles (Zhong et al. 2020, as torchvision's RandomErasing)."""


def sample_erase_boxes(cfg: AugmentConfig, n: int, g: torch.Generator, device: torch.device,
                       tries: int = 10) -> torch.Tensor:
    """Random-erasing rectangles (n, 4) = x0, y0, w, h as fractions of the view side (Zhong et al.
    2020): with probability erase_p, area ~ U(erase_scale_min, erase_scale_max) of the view, log
    aspect ratio ~ U(log 0.3, log 3.3), the first of `tries` candidates that fits; else (or when
    none fits) an empty rectangle."""
    area = _uniform(cfg.erase_scale_min, cfg.erase_scale_max, (n, tries), g, device)
    ratio = torch.exp(_uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), (n, tries), g, device))
    h, w = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    ok = (w < 1) & (h < 1)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
    on = _bernoulli(cfg.erase_p, n, g, device) & ok.any(dim=1)
    w = w.gather(1, first).squeeze(1) * on
    h = h.gather(1, first).squeeze(1) * on
    x0 = torch.rand(n, generator=g, device=device) * (1 - w)
    y0 = torch.rand(n, generator=g, device=device) * (1 - h)
    return torch.stack([x0, y0, w, h], dim=1)


def random_erase(x: torch.Tensor, box: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Fill each view's rectangle (fractions of the side) with its grey level: the pixels whose
    centres lie inside it. (B, C, S, S) -> (B, C, S, S)."""
    s = x.shape[-1]
    centre = (torch.arange(s, device=x.device, dtype=torch.float32) + 0.5) / s  # (S,)
    x0, y0, w, h = (box[:, k, None] for k in range(4))  # (B, 1) each
    cols = (centre >= x0) & (centre < x0 + w)  # (B, S)
    rows = (centre >= y0) & (centre < y0 + h)
    inside = rows[:, None, :, None] & cols[:, None, None, :]  # (B, 1, S, S)
    return torch.where(inside, _per_image(value).to(x.dtype), x)


def resample_matrix(start: torch.Tensor, length: torch.Tensor, n_in: int, n_out: int, flip: torch.Tensor) -> torch.Tensor:
    """Per-image 1-D resampling matrices (B, n_out, n_in) taking source span [start, start+length)
    to n_out samples, reversed where `flip`.

    Output sample j sits at source coordinate u_j = start + (j + 0.5) * length / n_out - 0.5 (pixel
    centres). Weights are a triangle filter of half-width max(1, length / n_out): bilinear when
    enlarging, area-like anti-aliasing when shrinking. Rows are normalised to sum to 1.
    """
    b = start.shape[0]
    dev = start.device
    j = torch.arange(n_out, device=dev, dtype=torch.float32).expand(b, n_out)
    j = torch.where(flip[:, None], n_out - 1 - j, j)
    step = (length / n_out)[:, None]  # (B, 1)
    u = start[:, None] + (j + 0.5) * step - 0.5  # (B, n_out)
    support = step.clamp(min=1.0)[:, :, None]  # (B, 1, 1)
    i = torch.arange(n_in, device=dev, dtype=torch.float32)
    w = (1 - (i[None, None, :] - u[:, :, None]).abs() / support).clamp(min=0)  # (B, n_out, n_in)
    return w / w.sum(dim=2, keepdim=True)


def crop_resize_flip(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop `box`, resize to (size, size), flip horizontally where `flip`: (B, C, H, W) -> (B, C, S, S)."""
    _, _, h, w = x.shape
    no_flip = torch.zeros_like(flip)
    ry = resample_matrix(box[:, 1], box[:, 3], h, size, no_flip)  # (B, S, H)
    rx = resample_matrix(box[:, 0], box[:, 2], w, size, flip)  # (B, S, W)
    return ry[:, None].to(x.dtype) @ x @ rx[:, None].transpose(-1, -2).to(x.dtype)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of (B, 3, H, W) -> (B, 1, H, W); identity for one channel."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b)[:, None]


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-12)
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)  # (B, 3, H, W)
    return v[:, None] - (v * s)[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def color_jitter(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Brightness, contrast, then (3 channels only) saturation and hue, each clamped to [0, 1]."""
    x = (x * _per_image(p.brightness)).clamp(0, 1)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * _per_image(p.contrast) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        g = grayscale(x)
        x = ((x - g) * _per_image(p.saturation) + g).clamp(0, 1)
        hsv = _rgb_to_hsv(x)
        hsv = torch.stack([(hsv[:, 0] + p.hue[:, None, None]) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
        x = _hsv_to_rgb(hsv).clamp(0, 1)
    return x


def blur_matrix(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image Gaussian blur matrices (B, size, size); identity rows where sigma == 0."""
    radius = max(1, round(0.05 * size))
    i = torch.arange(size, device=sigma.device, dtype=torch.float32)
    d2 = (i[None, :] - i[:, None]) ** 2  # (S, S)
    s2 = (2 * sigma.clamp(min=1e-6) ** 2)[:, None, None]
    k = torch.exp(-d2[None] / s2) * (d2 <= radius * radius)[None]
    k = k / k.sum(dim=2, keepdim=True)
    eye = torch.eye(size, device=sigma.device).expand_as(k)
    return torch.where((sigma > 0)[:, None, None], k, eye)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma: (B, C, H, W) with H == W."""
    k = blur_matrix(sigma, x.shape[-1])[:, None]  # (B, 1, S, S)
    return k @ x @ k.transpose(-1, -2)


def augment(x: torch.Tensor, p: ViewParams, size: int, cfg: AugmentConfig) -> torch.Tensor:
    """Apply one set of view parameters: float (B, C, H, W) in [0, 1] -> (B, C, S, S) in [0, 1].

    Operations whose probability is 0 in `cfg` are skipped outright; the others run on the whole
    batch and are selected per image with masks, so the step never waits on the host.
    """
    x = crop_resize_flip(x, p.box, p.flip, size).clamp(0, 1)
    if cfg.jitter_p > 0:
        x = torch.where(_per_image(p.jitter), color_jitter(x, p), x)
    if x.shape[1] == 3 and cfg.grayscale_p > 0:
        x = torch.where(_per_image(p.gray), grayscale(x).expand_as(x), x)
    if cfg.blur_p > 0:
        x = gaussian_blur(x, p.blur_sigma).clamp(0, 1)  # its rows sum to 1 within rounding: 1 + 5e-7 on white
    if cfg.solarize_p > 0:
        x = torch.where(_per_image(p.solarize) & (x >= 0.5), 1 - x, x)
    if cfg.erase_p > 0 and p.erase is not None and p.erase_value is not None:
        x = random_erase(x, p.erase, p.erase_value)
    return x


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Stored uint8 (B, H, W, C) -> float32 (B, C, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-channel standardisation with (C,) statistics of the training images."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def two_views(
    images: torch.Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    channels_last: bool = False,
    global_batch: int | None = None,
    offset: int = 0,
    render: Callable[..., torch.Tensor] | None = None,
    views: int = 2,
) -> torch.Tensor:
    """Two (or `views`) independently augmented views of each image, as one batch for one encoder pass.

    images: uint8 (B, H, W, C) on the device of `generator`.
    Returns float32 (2B, C, S, S): rows [0, B) are the first views, rows [B, 2B) the second,
    standardised with `mean`/`std` when given. S is `cfg.crop_size`, or H when it is 0.

    global_batch, offset: under data parallelism `images` are rows [offset, offset + B) of a
    global batch of `global_batch` images. Parameters are drawn for all 2 x global_batch views
    (cheap (2G,) vectors) and this rank keeps its own rows, so every image gets exactly the views
    one process would give it: the training run is the same whatever the number of processes.

    render: `render_views` or a compiled version of it (the pixel work, free of random draws, so
    that torch.compile can fuse it into a few kernels).
    """
    check_stored(images)
    params = view_params(images.shape, cfg, generator, images.device, global_batch, offset, views)
    return (render or render_views)(images, params, cfg, mean, std, channels_last)


def local_config(cfg: AugmentConfig, side: int) -> AugmentConfig:
    """The recipe of multi-crop's small views for images of `side` pixels: the same colour,
    flip, blur, solarisation and erasing draws, crops of cfg.local_scale_min-max of the image rendered at
    cfg.local_size pixels (half the view side when 0)."""
    size = cfg.local_size or max(1, (cfg.crop_size or side) // 2)
    return replace(cfg, crop_size=size, scale_min=cfg.local_scale_min, scale_max=cfg.local_scale_max)


def view_params(
    shape: torch.Size | tuple[int, ...],
    cfg: AugmentConfig,
    generator: torch.Generator,
    device: torch.device,
    global_batch: int | None = None,
    offset: int = 0,
    views: int = 2,
) -> ViewParams:
    """The random parameters of the K * B views (K = `views`: view 1 of every image, then view 2,
    ...) of a batch of B images of `shape` (B, H, W, C)."""
    b, h, w, _ = shape
    if global_batch is None:
        return sample_params(cfg, views * b, h, w, generator, device)
    rows = torch.arange(offset, offset + b, device=device)
    params = sample_params(cfg, views * global_batch, h, w, generator, device)
    return params.select(torch.cat([rows + v * global_batch for v in range(views)]))  # (KB,) of the (KG,)


def render_views(
    images: torch.Tensor,
    params: ViewParams,
    cfg: AugmentConfig,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (B, H, W, C) and the parameters of KB views -> float32 (KB, C, S, S): deterministic."""
    size = cfg.crop_size or images.shape[1]
    x = to_float(images)
    x = x.repeat(params.box.shape[0] // max(x.shape[0], 1), 1, 1, 1)  # (KB, C, H, W): view 1, then view 2, ...
    out = augment(x, params, size, cfg)
    if mean is not None and std is not None:
        out = normalize(out, mean, std)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
