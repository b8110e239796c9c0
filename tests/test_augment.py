"""Batched augmentation: per-image randomness, exact identities, ranges, determinism."""

from __future__ import annotations

import colorsys
import dataclasses
import math

import pytest
import torch

from fastclr.presets import config_for
from fastclr.augment import (
    ViewParams,
    _hsv_to_rgb,
    _rgb_to_hsv,
    augment,
    blur_matrix,
    color_jitter,
    crop_resize_flip,
    random_erase,
    resample_matrix,
    sample_crop_boxes,
    sample_erase_boxes,
    sample_params,
    to_float,
    two_views,
)
from fastclr.config import AugmentConfig

OFF = AugmentConfig(scale_min=1.0, scale_max=1.0, ratio_min=1.0, ratio_max=1.0, flip_p=0.0, jitter_p=0.0,
                    grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, erase_p=0.0)


def images(b: int = 8, size: int = 28, c: int = 3, seed: int = 0,
           device: torch.device = torch.device("cpu")) -> torch.Tensor:
    return torch.randint(0, 256, (b, size, size, c), dtype=torch.uint8, device=device,
                         generator=torch.Generator(device=device).manual_seed(seed))


def gen(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on `device`. CPU and CUDA generators give different streams, so the tests
    check identities and invariants on one device and never compare random draws across devices."""
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("c", [1, 3])
def test_all_off_and_full_crop_gives_back_the_input(c: int, device: torch.device) -> None:
    x = images(c=c, device=device)
    out = two_views(x, OFF, gen(device, 0))
    ref = to_float(x)
    torch.testing.assert_close(out[:8], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[8:], ref, atol=1e-6, rtol=0)


def test_flip_with_probability_one_mirrors_exactly(device: torch.device) -> None:
    x = images(device=device)
    out = two_views(x, dataclasses.replace(OFF, flip_p=1.0), gen(device, 0))
    torch.testing.assert_close(out[:8], to_float(x).flip(-1), atol=1e-6, rtol=0)


def test_every_image_gets_its_own_parameters(device: torch.device) -> None:
    cfg = config_for("stl10").augment  # the paper's ImageNet recipe: every operation on
    p = sample_params(cfg, 256, 32, 32, gen(device, 0), device)
    assert all(getattr(p, f.name).device.type == device.type for f in dataclasses.fields(p))
    assert len({tuple(r) for r in p.box.tolist()}) == 256
    assert len(set(p.brightness.tolist())) == 256 and len(set(p.hue.tolist())) == 256
    # Bernoulli masks are per image: a batch of 256 holds both outcomes.
    for mask in (p.flip, p.jitter, p.gray, p.blur_sigma > 0):
        assert 0 < int(mask.sum()) < 256
    # The two views of one image differ: view 1 and view 2 of every image are not equal.
    v = two_views(images(16, 32, device=device), cfg, gen(device, 1))
    assert all(not torch.equal(v[i], v[i + 16]) for i in range(16))


def test_crop_boxes_respect_scale_and_ratio_ranges(device: torch.device) -> None:
    cfg = AugmentConfig(scale_min=0.2, scale_max=0.6, ratio_min=0.5, ratio_max=2.0)
    box = sample_crop_boxes(cfg, 4000, 40, 40, gen(device, 0), device)
    x0, y0, w, h = box.unbind(1)
    area = w * h / 1600
    ratio = w / h
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 0.6 + 1e-5
    assert ratio.min() >= 0.5 - 1e-5 and ratio.max() <= 2.0 + 1e-5
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 40 + 1e-4).all() and (y0 + h <= 40 + 1e-4).all()
    # log-uniform aspect ratio: the median is ~1
    assert abs(float(ratio.median()) - 1.0) < 0.1


def test_crop_boxes_are_torchvisions_draw_replayed_in_float64(device: torch.device) -> None:
    """Each box is RandomResizedCrop's: from the generator's stream, `tries` area fractions
    ~ U(scale_min, scale_max), then `tries` log ratios ~ U(log ratio_min, log ratio_max), the first
    candidate whose w = sqrt(A r), h = sqrt(A / r) fits, then x0 ~ U(0, W - w), y0 ~ U(0, H - h).
    Replayed here in float64 from the same seed, image by image; with crops of up to the whole image
    and ratios up to 4, about half of the first candidates do not fit, so a draw that kept the last
    or the largest fitting candidate, centred the box, or drew the area log-uniformly fails. The blur's
    sigma, further along the stream, is U(sigma_min, sigma_max) where the blur's coin came up."""
    cfg = dataclasses.replace(OFF, scale_min=0.5, scale_max=1.0, ratio_min=0.25, ratio_max=4.0, blur_p=0.5,
                              blur_sigma_min=0.3, blur_sigma_max=1.7)
    n, tries, height, width = 2000, 10, 30, 40
    p = sample_params(cfg, n, height, width, gen(device, 3), device)
    g = gen(device, 3)
    u_area = torch.rand(n, tries, generator=g, device=device).double().cpu()
    u_ratio = torch.rand(n, tries, generator=g, device=device).double().cpu()
    u_x, u_y = (torch.rand(n, generator=g, device=device).double().cpu() for _ in range(2))
    for _ in ("flip", "jitter", "brightness", "contrast", "saturation", "hue", "gray"):
        torch.rand(n, generator=g, device=device)
    u_blur, u_sigma = (torch.rand(n, generator=g, device=device).double().cpu() for _ in range(2))
    want, skipped, fallbacks = [], 0, 0
    for i in range(n):
        for t in range(tries):
            area = height * width * (0.5 + 0.5 * float(u_area[i, t]))
            r = math.exp(math.log(0.25) + (math.log(4.0) - math.log(0.25)) * float(u_ratio[i, t]))
            w, h = math.sqrt(area * r), math.sqrt(area / r)
            if w <= width and h <= height:
                break
            skipped += 1
        else:  # torchvision's fallback: the whole image (its ratio 4:3 is in range), centred
            want.append((0.0, 0.0, float(width), float(height)))
            fallbacks += 1
            continue
        want.append((float(u_x[i]) * (width - w), float(u_y[i]) * (height - h), w, h))
    assert skipped > n // 2 and fallbacks > 0  # which candidate is kept, and the fallback, are tested
    torch.testing.assert_close(p.box.double().cpu(), torch.tensor(want, dtype=torch.float64), atol=2e-4, rtol=1e-5)
    sigma = (0.3 + 1.4 * u_sigma) * (u_blur < 0.5)
    torch.testing.assert_close(p.blur_sigma.double().cpu(), sigma, atol=1e-6, rtol=0)
    assert 0.4 < float((p.blur_sigma > 0).double().mean()) < 0.6


def test_impossible_crops_fall_back_to_the_whole_image(device: torch.device) -> None:
    # scale 1 with ratio 2 never fits a square: torchvision's fallback is the centred full crop
    cfg = AugmentConfig(scale_min=1.0, scale_max=1.0, ratio_min=2.0, ratio_max=2.0)
    box = sample_crop_boxes(cfg, 10, 20, 20, gen(device, 0), device)
    torch.testing.assert_close(box[:, 2:], torch.tensor([[20.0, 10.0]], device=device).expand(10, 2))
    torch.testing.assert_close(box[:, :2], torch.tensor([[0.0, 5.0]], device=device).expand(10, 2))  # centred
    # the fallback draws its offsets anyway: the generator ends where it would without the fallback
    g_fall, g_fit = gen(device, 0), gen(device, 0)
    sample_crop_boxes(cfg, 10, 20, 20, g_fall, device)
    sample_crop_boxes(AugmentConfig(), 10, 20, 20, g_fit, device)
    assert torch.equal(g_fall.get_state(), g_fit.get_state())


@pytest.mark.parametrize("c", [1, 3])
def test_shape_dtype_range_device_preserved(c: int, device: torch.device) -> None:
    x = images(6, 32, c, device=device)
    out = two_views(x, AugmentConfig(crop_size=24, solarize_p=0.5), gen(device, 0))
    assert out.shape == (12, c, 24, 24) and out.dtype == torch.float32 and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1


def test_views_stay_in_range_after_the_blur_and_an_empty_batch_gives_no_views(device: torch.device) -> None:
    """The blur's rows sum to 1 only within rounding (an all-white view came out at 1 + 4.8e-7, and
    solarised below 0): every view of white and black images, blurred then solarised, stays in [0, 1]."""
    x = torch.cat([torch.full((32, 16, 16, 3), 255, dtype=torch.uint8, device=device),
                   torch.zeros((32, 16, 16, 3), dtype=torch.uint8, device=device)])
    cfg = dataclasses.replace(OFF, blur_p=1.0, solarize_p=1.0, blur_sigma_min=0.1, blur_sigma_max=2.0)
    out = two_views(x, cfg, gen(device, 0))
    assert out.min() >= 0 and out.max() <= 1
    empty = two_views(x[:0], AugmentConfig(crop_size=8), gen(device, 0))
    assert empty.shape == (0, 3, 8, 8)


def test_normalisation_and_channels_last(device: torch.device) -> None:
    x = images(4, 16, 3, device=device)
    mean, std = torch.tensor([0.5, 0.4, 0.3], device=device), torch.tensor([0.2, 0.25, 0.3], device=device)
    out = two_views(x, OFF, gen(device, 0), mean, std, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[:4], (to_float(x) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), atol=1e-5, rtol=0)


def test_same_seed_same_views_different_seed_different_views(device: torch.device) -> None:
    x, cfg = images(8, 32, device=device), config_for("stl10").augment
    a = two_views(x, cfg, gen(device, 5))
    b = two_views(x, cfg, gen(device, 5))
    c = two_views(x, cfg, gen(device, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_channel_skips_colour_only_operations(device: torch.device) -> None:
    # saturation 0 and hue 0.5 would change any colour image; on one channel only brightness and
    # contrast act, so with those off the output equals the input.
    cfg = dataclasses.replace(OFF, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=1.0, hue=0.5, grayscale_p=1.0)
    x = images(5, 20, 1, device=device)
    out = two_views(x, cfg, gen(device, 0))
    torch.testing.assert_close(out[:5], to_float(x), atol=1e-6, rtol=0)


def test_grayscale_makes_channels_equal_with_luma(device: torch.device) -> None:
    x = images(4, 12, 3, device=device)
    out = two_views(x, dataclasses.replace(OFF, grayscale_p=1.0), gen(device, 0))
    f = to_float(x)
    luma = 0.299 * f[:, 0] + 0.587 * f[:, 1] + 0.114 * f[:, 2]
    for ch in range(3):
        torch.testing.assert_close(out[:4, ch], luma, atol=1e-5, rtol=0)


def test_solarize_inverts_pixels_above_half(device: torch.device) -> None:
    x = images(4, 12, 1, device=device)
    out = two_views(x, dataclasses.replace(OFF, solarize_p=1.0), gen(device, 0))
    f = to_float(x)
    torch.testing.assert_close(out[:4], torch.where(f >= 0.5, 1 - f, f), atol=1e-6, rtol=0)


def test_random_erasing_fills_the_pixels_whose_centres_lie_in_its_rectangle(device: torch.device) -> None:
    """Rectangle x0 0.25, y0 0.5, w 0.5, h 0.25 of an 8 px view: pixel centres (i + 0.5) / 8 inside
    are columns 2-5 and rows 4-5; the second view's empty rectangle leaves it as it was."""
    x = to_float(images(2, 8, 3, device=device))
    box = torch.tensor([[0.25, 0.5, 0.5, 0.25], [0.3, 0.3, 0.0, 0.0]], device=device)
    out = random_erase(x, box, torch.tensor([0.7, 0.1], device=device))
    want = x.clone()
    want[0, :, 4:6, 2:6] = 0.7
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_erasing_draws_come_last_and_keep_to_their_ranges() -> None:
    """Turning erasing on changes no other draw of a view (its draws come after them); its
    rectangles lie inside the view with area in [erase_scale_min, erase_scale_max] and aspect ratio
    in [0.3, 1 / 0.3], on for about erase_p of the views."""
    cpu = torch.device("cpu")
    off = sample_params(AugmentConfig(erase_p=0.0), 4000, 28, 28, gen(cpu, 3), cpu)
    on_cfg = AugmentConfig(erase_p=0.5, erase_scale_min=0.05, erase_scale_max=0.2)
    on = sample_params(on_cfg, 4000, 28, 28, gen(cpu, 3), cpu)
    for f in dataclasses.fields(off):
        if f.name not in ("erase", "erase_value"):
            assert torch.equal(getattr(off, f.name), getattr(on, f.name)), f.name
    assert off.erase is not None and not off.erase.any()
    assert on.erase is not None
    x0, y0, w, h = on.erase.unbind(1)
    used = w > 0
    assert abs(float(used.float().mean()) - 0.5) < 0.03  # 4000 draws: standard error 0.008
    area, ratio = (w * h)[used], (h / w)[used]
    assert float(area.min()) >= 0.05 - 1e-6 and float(area.max()) <= 0.2 + 1e-6
    assert float(ratio.min()) >= 0.3 - 1e-5 and float(ratio.max()) <= 1 / 0.3 + 1e-4
    assert bool(((x0 >= 0) & (y0 >= 0) & (x0 + w <= 1 + 1e-6) & (y0 + h <= 1 + 1e-6)).all())
    big = sample_erase_boxes(AugmentConfig(erase_p=1.0, erase_scale_min=0.99, erase_scale_max=0.999), 500, gen(cpu, 0),
                             cpu)
    assert bool((big[:, 2] < 1).all())  # a rectangle that cannot fit is never drawn at full size


@pytest.mark.parametrize("n", [7, 100])
def test_erasing_off_draws_nothing_and_on_draws_its_count(n: int) -> None:
    """The generator is left exactly where the count of uniform numbers each view needs leaves it:
    crops take 2 per candidate (area, log ratio) x 10 candidates + 2 (x0, y0), then flip, jitter,
    brightness, contrast, saturation, hue, grayscale, blur, sigma and solarisation one each: 32;
    erasing adds 2 x 10 candidates + on, x0, y0 and the grey level: 24 more, and none when off.
    (The CPU generator's uniform draws consume its stream one number at a time, so k numbers in one
    call leave it where the same k numbers in several calls do.)"""
    cpu = torch.device("cpu")
    for erase_p, per_view in ((0.0, 32), (0.25, 32 + 24)):
        drawn = gen(cpu, 3)
        sample_params(AugmentConfig(erase_p=erase_p), n, 28, 28, drawn, cpu)
        counted = gen(cpu, 3)
        torch.rand(per_view * n, generator=counted)
        assert torch.equal(drawn.get_state(), counted.get_state()), erase_p


def test_resampling_rows_are_convex_weights_and_crop_of_constant_is_constant(device: torch.device) -> None:
    n = 50
    g = gen(device, 0)
    start = torch.rand(n, generator=g, device=device) * 10
    length = 1 + torch.rand(n, generator=g, device=device) * 20
    m = resample_matrix(start, length, 32, 16, torch.rand(n, generator=g, device=device) < 0.5)
    assert (m >= 0).all()
    torch.testing.assert_close(m.sum(2), torch.ones(n, 16, device=device))
    x = torch.full((n, 1, 32, 32), 0.37, device=device)
    box = torch.stack([start, start, length, length], 1)
    torch.testing.assert_close(crop_resize_flip(x, box, torch.zeros(n, dtype=torch.bool, device=device), 16),
                               torch.full((n, 1, 16, 16), 0.37, device=device))


def test_crop_of_a_linear_ramp_samples_pixel_centres(device: torch.device) -> None:
    # x[i, j] = j. Cropping columns [4, 12) to 16 samples (upsampling: bilinear) gives the source
    # coordinates u_j = 4 + (j + 0.5) / 2 - 0.5 exactly (no clamp is hit inside the image).
    ramp = torch.arange(32.0, device=device).expand(1, 1, 32, 32).clone()
    box = torch.tensor([[4.0, 0.0, 8.0, 32.0]], device=device)
    out = crop_resize_flip(ramp, box, torch.zeros(1, dtype=torch.bool, device=device), 16)
    expected = 4 + (torch.arange(16.0, device=device) + 0.5) / 2 - 0.5
    torch.testing.assert_close(out[0, 0, 5], expected)


def test_blur_preserves_constant_images_and_sigma_zero_is_identity(device: torch.device) -> None:
    k = blur_matrix(torch.tensor([0.0, 0.5, 2.0], device=device), 28)
    torch.testing.assert_close(k[0], torch.eye(28, device=device))
    torch.testing.assert_close(k.sum(2), torch.ones(3, 28, device=device))
    # wider sigma spreads more weight off the diagonal
    assert float(k[2].diagonal().mean()) < float(k[1].diagonal().mean()) < 1


@pytest.mark.parametrize(("size", "radius"), [(40, 2), (100, 5), (10, 1)])
def test_blur_rows_are_the_truncated_normalised_gaussian(size: int, radius: int, device: torch.device) -> None:
    """Row i of the blur matrix is exp(-d^2 / (2 sigma^2)) at d = j - i for |d| <= radius, exactly 0
    beyond, normalised to sum 1, with radius = max(1, round(5% of the side)) as the module documents
    (2 px at 40, 5 at 100, at least 1 at 10); a border row keeps the part inside the image,
    renormalised. Float64 transcription, per image: sigma 1.5 and 0.8 in one batch."""
    sigmas = [1.5, 0.8]
    k = blur_matrix(torch.tensor(sigmas, device=device), size).double().cpu()
    for n, sigma in enumerate(sigmas):
        for i in (size // 2, 0):  # an interior row, and the first row (its left half is outside)
            d = torch.arange(size, dtype=torch.float64) - i
            w = torch.exp(-(d**2) / (2 * sigma**2)) * (d.abs() <= radius)
            want = w / w.sum()
            torch.testing.assert_close(k[n, i], want, atol=1e-6, rtol=0)
            assert bool((k[n, i][d.abs() > radius] == 0).all())


def test_hsv_round_trip_and_hue_shift_of_one_is_identity(device: torch.device) -> None:
    """Hue is an angle in turns: RGB -> HSV -> RGB gives the image back, and so does colour jitter
    with brightness, contrast and saturation factors 1 and a hue shift of a whole turn, +1 or -1
    (the zero shift is there too, the plain round trip through the jitter)."""
    x = torch.rand(10, 3, 5, 5, generator=gen(device, 0), device=device)
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    p = sample_params(dataclasses.replace(OFF, jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0), 10, 5, 5,
                      gen(device, 0), device)
    assert bool((p.brightness == 1).all() and (p.contrast == 1).all() and (p.saturation == 1).all())
    p.hue = torch.tensor([1.0, -1.0, 0.0] * 3 + [1.0], device=device)
    torch.testing.assert_close(color_jitter(x, p), x, atol=1e-5, rtol=0)


def test_pure_hue_rotation_of_red_by_a_third_is_green(device: torch.device) -> None:
    red = torch.zeros(1, 3, 2, 2, device=device)
    red[:, 0] = 1.0
    p = sample_params(dataclasses.replace(OFF, jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0), 1, 2, 2,
                      gen(device, 0), device)
    p.hue = torch.tensor([1 / 3], device=device)
    out = color_jitter(red, p)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0], device=device), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("hue", "rgb"), [(1 / 3, (0.0, 1.0, 0.0)), (-1 / 3, (0.0, 0.0, 1.0)), (2 / 3, (0.0, 0.0, 1.0)),
                                          (1 / 6, (1.0, 1.0, 0.0)), (-1 / 6, (1.0, 0.0, 1.0))])
def test_hue_shift_adds_to_the_hue_angle_in_turns(hue: float, rgb: tuple[float, float, float],
                                                  device: torch.device) -> None:
    """torchvision's convention (adjust_hue: h <- (h + hue_factor) mod 1): red is hue 0, yellow 1/6,
    green 1/3, blue 2/3, magenta 5/6, so pure red shifted by -1/3 is pure blue, by -1/6 magenta."""
    red = torch.zeros(1, 3, 2, 2, device=device)
    red[:, 0] = 1.0
    p = sample_params(dataclasses.replace(OFF, jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0), 1, 2, 2,
                      gen(device, 0), device)
    p.hue = torch.tensor([hue], device=device)
    want = torch.tensor(rgb, device=device)[:, None, None].expand(3, 2, 2)
    torch.testing.assert_close(color_jitter(red, p)[0], want, atol=1e-5, rtol=0)


def colourful(b: int, side: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(b, 3, side, side) random RGB whose channel means differ (R and B high, G low), so that the
    luma of an image and the plain average of its channels are far apart (about 0.37 against 0.53)."""
    x = torch.rand(b, 3, side, side, generator=gen(device, seed), device=device)
    lo = torch.tensor([0.5, 0.0, 0.5], device=device)[:, None, None]
    width = torch.tensor([0.5, 0.2, 0.5], device=device)[:, None, None]
    return lo + width * x


def jitter_params(device: torch.device, **factors: list[float]) -> ViewParams:
    """View parameters for len(factors' lists) views, with the colour factors given and the others
    at 1 (hue at 0)."""
    b = len(next(iter(factors.values())))
    p = sample_params(dataclasses.replace(OFF, jitter_p=1.0), b, 4, 4, gen(device, 0), device)
    for name in ("brightness", "contrast", "saturation", "hue"):
        default = 0.0 if name == "hue" else 1.0
        setattr(p, name, torch.tensor(factors.get(name, [default] * b), device=device))
    return p


def jitter_reference(x: torch.Tensor, brightness: list[float], contrast: list[float], saturation: list[float],
                     hue: list[float]) -> torch.Tensor:
    """torchvision's ColorJitter on RGB in float64, one image and one pixel at a time, in the order
    the module documents (brightness, contrast, saturation, hue, each clamped to [0, 1]):
    brightness x * b; contrast blends with the mean of the image's luma 0.299 R + 0.587 G + 0.114 B;
    saturation blends with the luma image; hue rotates the HSV hue by `hue` turns (colorsys)."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for n, img in enumerate(x.double().cpu()):
        img = (img * brightness[n]).clamp(0, 1)
        mean = float((0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).mean())
        img = (mean + contrast[n] * (img - mean)).clamp(0, 1)
        luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
        img = (luma + saturation[n] * (img - luma)).clamp(0, 1)
        for i in range(img.shape[1]):
            for j in range(img.shape[2]):
                h, s, v = colorsys.rgb_to_hsv(*img[:, i, j].tolist())
                out[n, :, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + hue[n]) % 1.0, s, v), dtype=torch.float64)
    return out


def test_colour_jitter_on_rgb_matches_a_float64_transcription_of_torchvision(device: torch.device) -> None:
    """Per-image brightness, contrast, saturation and hue on colourful RGB images equal the float64
    transcription of torchvision's blend definitions (`jitter_reference`): the contrast mean and the
    saturation grey are the luma, the saturation factor blends as given (0 grey, 0.5 half, 2 twice
    the colour), the hue shift turns both ways, and each operation is clamped in turn."""
    factors = dict(brightness=[1.0, 1.0, 1.0, 0.7, 1.3, 1.0, 1.2],
                   contrast=[1.0, 1.0, 1.0, 0.5, 1.6, 0.3, 1.0],
                   saturation=[0.0, 0.5, 2.0, 1.0, 0.6, 1.8, 1.0],
                   hue=[0.0, 0.0, 0.0, -0.3, 0.15, 0.45, -0.1])
    x = colourful(7, 4, device)
    out = color_jitter(x, jitter_params(device, **factors))
    torch.testing.assert_close(out.double().cpu(), jitter_reference(x, **factors), atol=2e-6, rtol=0)


def test_contrast_zero_gives_the_mean_luma_and_saturation_zero_the_luma_image(device: torch.device) -> None:
    """Closed forms on RGB: contrast 0 makes every channel of every pixel the image's mean luma
    (torchvision blends with the mean of the grayscale image, not of the three channels);
    saturation 0 makes every channel the pixel's luma."""
    x = colourful(3, 6, device)
    luma = 0.299 * x[:, 0].double() + 0.587 * x[:, 1].double() + 0.114 * x[:, 2].double()  # (3, 6, 6)
    flat = color_jitter(x, jitter_params(device, contrast=[0.0, 0.0, 0.0]))
    want = luma.mean(dim=(1, 2))[:, None, None, None].expand(3, 3, 6, 6)
    torch.testing.assert_close(flat.double(), want, atol=2e-6, rtol=0)
    grey = color_jitter(x, jitter_params(device, saturation=[0.0, 0.0, 0.0]))
    torch.testing.assert_close(grey.double(), luma[:, None].expand(3, 3, 6, 6), atol=2e-6, rtol=0)


def test_colour_factors_are_drawn_uniformly_over_their_documented_ranges(device: torch.device) -> None:
    """torchvision's ranges: brightness, contrast and saturation factors ~ U(max(0, 1 - s), 1 + s), hue
    ~ U(-hue, hue). Each is the affine image of the generator's uniform at its place in the stream
    (after the crop, flip and jitter draws), so the values are checked exactly, and over 4000 draws
    the hue takes both signs and comes within 1% of both ends."""
    cfg = dataclasses.replace(OFF, jitter_p=1.0, brightness=0.4, contrast=1.5, saturation=0.8, hue=0.4)
    n = 4000
    p = sample_params(cfg, n, 8, 8, gen(device, 7), device)
    g = gen(device, 7)
    sample_crop_boxes(cfg, n, 8, 8, g, device)
    for _ in ("flip", "jitter"):
        torch.rand(n, generator=g, device=device)
    u = {name: torch.rand(n, generator=g, device=device).double()
         for name in ("brightness", "contrast", "saturation", "hue")}
    torch.testing.assert_close(p.brightness.double(), 0.6 + 0.8 * u["brightness"], atol=1e-6, rtol=0)
    torch.testing.assert_close(p.contrast.double(), 0.0 + 2.5 * u["contrast"], atol=1e-6, rtol=0)
    torch.testing.assert_close(p.saturation.double(), 0.2 + 1.6 * u["saturation"], atol=1e-6, rtol=0)
    torch.testing.assert_close(p.hue.double(), -0.4 + 0.8 * u["hue"], atol=1e-6, rtol=0)
    assert float(p.hue.min()) >= -0.4 and float(p.hue.max()) <= 0.4
    assert float(p.hue.min()) < -0.396 and float(p.hue.max()) > 0.396
    assert abs(float((p.hue < 0).double().mean()) - 0.5) < 0.03  # 4000 draws: standard error 0.008


def test_brightness_and_contrast_follow_torchvision_blend_formulas(device: torch.device) -> None:
    x = torch.rand(3, 1, 6, 6, generator=gen(device, 0), device=device) * 0.5
    p = sample_params(dataclasses.replace(OFF, jitter_p=1.0), 3, 6, 6, gen(device, 0), device)
    p.brightness = torch.tensor([1.2, 0.5, 1.0], device=device)
    p.contrast = torch.tensor([1.0, 1.0, 0.0], device=device)
    out = color_jitter(x, p)
    torch.testing.assert_close(out[0], (x[0] * 1.2).clamp(0, 1))
    torch.testing.assert_close(out[1], x[1] * 0.5)
    torch.testing.assert_close(out[2], x[2].mean().expand_as(x[2]))  # contrast 0: the mean grey


def test_augment_probability_zero_ops_are_skipped_statically(device: torch.device) -> None:
    # With every probability 0 the full pipeline is exactly crop-resize-flip.
    x = to_float(images(4, 16, 3, device=device))
    cfg = AugmentConfig(jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    p = sample_params(cfg, 4, 16, 16, gen(device, 0), device)
    torch.testing.assert_close(augment(x, p, 16, cfg), crop_resize_flip(x, p.box, p.flip, 16).clamp(0, 1))
    assert math.isfinite(float(augment(x, p, 16, cfg).sum()))


@pytest.mark.parametrize("crop_size", [0, 24])
def test_same_parameters_give_the_same_views_on_every_device(crop_size: int, device: torch.device) -> None:
    """The same images and the same drawn parameters give the same views on `device` as on the CPU:
    random streams differ between devices, the deterministic part of the pipeline must not.

    Parameters are drawn once, on the CPU, and moved. The default recipe on 3-channel images runs
    crop-resize-flip, colour jitter (hue included), grayscale and blur; solarize is off by default,
    so it is switched on here. crop_size 24 also resamples 32 px images to another size."""
    cfg = dataclasses.replace(config_for("stl10").augment, crop_size=crop_size, solarize_p=0.5)
    n, side = 32, 32
    x = to_float(images(n, side, 3, seed=4))
    size = crop_size or side
    p = sample_params(cfg, n, side, side, gen(torch.device("cpu"), 0), torch.device("cpu"))
    # Every per-image operation fires for some views and not for others, so each is compared.
    for mask in (p.flip, p.jitter, p.gray, p.blur_sigma > 0, p.solarize):
        assert 0 < int(mask.sum()) < n
    on_device = ViewParams(**{f.name: getattr(p, f.name).to(device) for f in dataclasses.fields(p)})
    want = augment(x, p, size, cfg)
    got = augment(x.to(device), on_device, size, cfg)
    assert got.device.type == device.type and got.shape == (n, 3, size, size)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=0)
