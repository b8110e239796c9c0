"""Small CNNs for 28 px images (MNIST, Fashion-MNIST): the encoder f of the CPU recipe."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastclr.config import ModelConfig
from fastclr.errors import FastclrError

CNN_STAGES = ModelConfig().cnn_stages
"""The cnn encoder's default shape, defined once in the config (docs/benchmarks.md section 3)."""


ACTIVATIONS = ("relu", "silu", "gelu")
"""The activations a stage spec may name before a colon ("silu:32|256|fc512"); relu if none."""


def activation(name: str) -> nn.Module:
    """A fresh activation module: ReLU, SiLU (Elfwing et al. 2018) or GELU (Hendrycks and Gimpel
    2016)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r}: one of {', '.join(ACTIVATIONS)}")
    if name == "silu":
        return nn.SiLU()
    return nn.GELU() if name == "gelu" else nn.ReLU(inplace=True)


class FloorPooledConv(nn.Conv2d):
    """A 3x3 convolution (padding 1, no bias) whose output goes straight into a 2x2 max-pool of
    stride 2 (a stage written with a 'p'). On an odd side that pool never reads the last row and
    column, so they are not computed: the map gets one zero row and column at the top and left only
    and is convolved unpadded, which gives the same numbers at every row and column the pool reads,
    and the same gradients (the rows left out had none). For the default's 7 x 7 map that is 13/49
    fewer multiply-adds in its largest convolution (docs/benchmarks.md section 4, "The pooled
    convolution's unread row"). The weights and their names are nn.Conv2d's, so checkpoints load
    either way. `keep`: a side the pool passes as it is (`PoolTo`), where every row is read;
    `trim`: False computes the whole map (the reference the benchmark and tests compare with)."""

    def __init__(self, cin: int, cout: int, keep: int = 0) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=False)
        self.keep, self.trim = keep, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, cout, H - H % 2, W - W % 2), or (B, cout, H, W) where the pool reads all."""
        h, w = x.shape[-2:]
        # the pool passes a map of side `keep` as it is; a trimmed map of that side would pass too
        if not self.trim or (h % 2 == 0 and w % 2 == 0) or self.keep in (w, w - 1):
            return super().forward(x)
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1 - w % 2, 1, 1 - h % 2)), self.weight)


def trim_pooled(module: nn.Module, on: bool) -> nn.Module:
    """`module` with each `FloorPooledConv` in it computing only what its pool reads (`on`, as built)
    or its whole map (the reference the benchmark and tests compare with)."""
    for m in module.modules():
        if isinstance(m, FloorPooledConv):
            m.trim = on
    return module


def floor_pool_keep(pool: nn.Module) -> int | None:
    """For a 2x2 max-pool of stride 2, unpadded, undilated, rounding down (plain or in `PoolTo`): the
    side it passes as it is (0: none). None for any other pool, which may read every row (sfc's padded
    3x3, a pool rounding up)."""
    inner = pool.pool if isinstance(pool, PoolTo) else pool
    if not isinstance(inner, nn.MaxPool2d) or inner.ceil_mode or (
            inner.kernel_size, inner.stride, inner.padding, inner.dilation) not in ((2, 2, 0, 1), ((2, 2), (2, 2), (0, 0), (1, 1))):
        return None
    return pool.side if isinstance(pool, PoolTo) else 0


def conv_bn_act(cin: int, cout: int, pool: nn.Module | None = None, act: str = "relu") -> list[nn.Module]:
    """3x3 convolution (no bias: BatchNorm follows), then `pool` if given, BatchNorm, activation.

    Pooling before the BatchNorm and activation runs them on a map 4x (2x2 pool) smaller; on the
    CPU they and their backward are memory-bound passes that cost more than the convolution
    (docs/benchmarks.md section 4). A convolution that a 2x2 pool follows directly computes only
    the rows and columns that pool reads (`FloorPooledConv`)."""
    keep = floor_pool_keep(pool) if pool is not None else None
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False) if keep is None else FloorPooledConv(cin, cout, keep)
    return [conv, *([pool] if pool is not None else []), nn.BatchNorm2d(cout), activation(act)]


class FlattenHWC(nn.Module):
    """(B, C, H, W) -> (B, H * W * C), flattened in (H, W, C) order.

    For a channels_last map this is a view, and its gradient comes back channels_last too. The
    usual (C, H, W) flatten of a channels_last map copies it, and hands the preceding ReLU a
    gradient in the other layout: that backward ran 5x slower than the conv before it (profile
    in docs/benchmarks.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H * W * C)."""
        return x.permute(0, 2, 3, 1).flatten(1)


class AttentionPool(nn.Module):
    """Multi-head attention pooling of a (B, C, S, S) map to h (B, dim): `heads` learned queries
    each attend over the S x S positions (keys from the features plus a learned position
    embedding) and return a weighted sum of their value projection; the heads are concatenated,
    then BatchNorm and ReLU (the pooling by multi-head attention of Lee et al. 2019, as in CLIP's
    attention pool). At initialisation the weights are near uniform: global average pooling of
    random projections; training can learn where to look."""

    def __init__(self, channels: int, side: int, dim: int, heads: int = 8, key_dim: int = 32) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention pooling width {dim} must be a multiple of {heads} heads")
        self.heads, self.key_dim = heads, key_dim
        self.position = nn.Parameter(torch.zeros(side * side, channels))
        nn.init.normal_(self.position, std=0.02)
        self.query = nn.Parameter(torch.randn(heads, key_dim) / key_dim**0.5)
        self.key = nn.Linear(channels, heads * key_dim, bias=False)
        self.value = nn.Linear(channels, dim, bias=False)
        self.out = nn.Sequential(nn.BatchNorm1d(dim), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, dim)."""
        b = x.shape[0]
        tokens = x.permute(0, 2, 3, 1).flatten(1, 2) + self.position  # (B, P, C); a view for channels_last
        keys = self.key(tokens).view(b, -1, self.heads, self.key_dim)  # (B, P, H, K)
        weights = torch.einsum("bphk,hk->bhp", keys, self.query).div(self.key_dim**0.5).softmax(-1)  # (B, H, P)
        values = self.value(tokens).view(b, -1, self.heads, self.value.out_features // self.heads)  # (B, P, H, V)
        return self.out(torch.einsum("bhp,bphv->bhv", weights, values).flatten(1))  # (B, H * V)


class PoolTo(nn.Module):
    """`pool` unless the map already has the side it pools to: the fc readout max-pools the 7 x 7
    map of a 28 px view to 3 x 3, and the map of a 14 px view (multi-crop's small views) ends at
    3 x 3 already, so the same linear layer reads both."""

    def __init__(self, pool: nn.Module, side: int) -> None:
        super().__init__()
        self.pool, self.side = pool, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, C, side, side) when the pool yields that side."""
        return x if x.shape[-1] == self.side else self.pool(x)


class Readout(NamedTuple):
    """How h is read off the last map: `kind` and, for fc, sfc and attn, the width `dim`."""

    kind: str  # gap, fc, sfc, attn, flat, flat0, cat0
    dim: int = 0


class Stages(NamedTuple):
    """A parsed stage spec: conv widths per stage, the readout, per stage whether the pool that
    follows it runs before its last conv's BatchNorm and activation, and the activation."""

    convs: list[list[int]]
    readout: Readout
    pool_first: tuple[bool, ...]
    activation: str = "relu"


# Readouts that max-pool the last stage's map first, so a 'p' on the last stage has a pool to move.
POOLED_READOUTS = ("fc", "sfc", "flat")


def parse_stages(spec: str) -> Stages:
    """"64|128,128p|fc512" -> Stages([[64], [128, 128]], Readout("fc", 512), (False, True), "relu").

    An activation's name and a colon may come first ("silu:64|128|fc512"): every conv and the fc,
    sfc readout use it instead of ReLU (an attn readout keeps its own ReLU). Stages are split by '|' (a 2x2 max-pool between stages),
    the output channels of each 3x3 conv of a stage by ','. A 'p' after a stage's last width
    ("256p") moves the pool that follows the stage (the next stage's, or the fc, sfc or flat
    readout's) between that conv and its BatchNorm: conv -> pool -> BatchNorm -> activation. The last part says how h is read off the final map:
    - "fcN": max-pooled 2x2 (stride 2; an odd side's last row and column fall outside every
      window: 7 x 7 -> 3 x 3), flattened, then a linear layer of N units with BatchNorm and ReLU;
    - "sfcN": the same with an overlapping 3x3 max-pool (stride 2, padded), which covers the whole
      map and treats its left and right edges alike, so a flipped image meets the mirrored
      windows (7 x 7 -> 4 x 4);
    - "attnN": pooled to N by attention (`AttentionPool`);
    - "flat": max-pooled 2x2 and flattened; "flat0": flattened as it is; "cat0": flattened
      together with every earlier stage's map max-pooled to its side (multi-scale h);
    - none of these: the final map is average-pooled (global pooling).
    """
    act, colon, shape = spec.rpartition(":")
    if colon and act not in ACTIVATIONS:
        raise ValueError(spec)
    parts = shape.split("|")
    last = parts[-1]
    readout = Readout("gap")
    for kind in ("sfc", "fc", "attn"):
        if last.startswith(kind):
            readout = Readout(kind, int(last[len(kind):]))
            if readout.dim < (8 if kind == "attn" else 1):  # "fc0" would silently build an 8-wide h
                raise ValueError(spec)
            if kind == "attn" and readout.dim % 8:  # 8 heads: attn12 would silently build a 16-wide h
                raise ValueError(spec)
            parts.pop()
            break
    else:
        if last in ("flat", "flat0", "cat0"):
            readout = Readout(parts.pop())
    widths = [stage.split(",") for stage in parts]
    pool_first = tuple(stage[-1].endswith("p") for stage in widths)
    widths = [stage[:-1] + [stage[-1].removesuffix("p")] for stage in widths]
    convs = [[int(c) for c in stage] for stage in widths]  # a 'p' anywhere else fails int()
    if any(c < 1 for stage in convs for c in stage):  # "0|256" would silently build 8 channels
        raise ValueError(spec)
    if pool_first and pool_first[-1] and readout.kind not in POOLED_READOUTS:  # no pool follows it
        raise ValueError(spec)
    return Stages(convs, readout, pool_first, act or "relu")


def check_stages(spec: str) -> None:
    """A one-line error unless `spec` parses as a stage spec (`parse_stages`)."""
    try:
        parse_stages(spec)
    except ValueError:
        raise FastclrError(f"cnn_stages {spec!r} is not a stage spec; write e.g. 32|256|fc512 "
                           f"(optionally {', '.join(ACTIVATIONS)} and a colon first, e.g. silu:32|256|fc512; conv widths, '|' between "
                           "stages, 'p' after a stage's last width to pool before its BatchNorm, but not before an "
                           "attn, gap, flat0 or cat0 readout; then fcN, sfcN, attnN, flat0, flat or cat0)") from None


def between_stages(side: int) -> tuple[nn.Module | None, int]:
    """The 2x2 max-pool between two stages and the side after it; none at 1 x 1 (tiny inputs)."""
    return (nn.MaxPool2d(2), side // 2) if side >= 2 else (None, side)


def readout_pool(kind: str, side: int) -> tuple[nn.Module | None, int]:
    """The max-pool a readout applies to the last map, and the side after it.

    fc: 2x2 (an odd side's last row and column fall outside every window); sfc: an overlapping
    3x3 / 2, padded; both through `PoolTo`, so a map already that small (multi-crop's 14 px views)
    passes as it is. flat: 2x2. The other readouts do not pool."""
    if side < 2 or kind not in POOLED_READOUTS:
        return None, side
    if kind == "flat":
        return nn.MaxPool2d(2), side // 2
    if kind == "fc":
        return PoolTo(nn.MaxPool2d(2), side // 2), side // 2
    return PoolTo(nn.MaxPool2d(3, stride=2, padding=1), (side + 1) // 2), (side + 1) // 2


class SmallCNN(nn.Module):
    """Optional 2x2 space-to-depth stem, stages of 3x3 conv-BN-ReLU (or the activation the stage
    spec names) with max-pooling between them (conv-pool-BN-ReLU for a stage written with a 'p'), then either global average pooling or
    a flatten + linear layer: (B, C, H, W) -> h.

    The space-to-depth stem (PixelUnshuffle(2): 1 x 28 x 28 -> 4 x 14 x 14) loses no pixel but
    halves the side before the first convolution. The linear last stage replaces a padded 3x3
    convolution on a 3 x 3 map, whose backward pass oneDNN runs ~6x slower than its forward;
    a dense matmul on the flattened map is both cheaper and gives a wide h for the probe.
    Measurements behind both choices are in docs/benchmarks.md.
    """

    def __init__(self, in_channels: int = 1, width: float = 1.0, stages: str = CNN_STAGES,
                 space_to_depth: bool = True, image_size: int = 28):
        super().__init__()
        convs, readout, pool_first, act = parse_stages(stages)
        layers: list[nn.Module] = []
        c, side = in_channels, image_size
        if space_to_depth:
            layers.append(nn.PixelUnshuffle(2))
            c, side = in_channels * 4, image_size // 2
        ends: list[tuple[int, int, int]] = []  # (index after the stage's last layer, channels, side)
        early = False  # whether the last stage's pool (its readout's) runs before its BatchNorm
        for s, stage in enumerate(convs):
            last = s == len(convs) - 1
            follower, after = readout_pool(readout.kind, side) if last else between_stages(side)
            early = pool_first[s] and follower is not None
            for i, channels in enumerate(stage):
                out = max(8, int(round(channels * width)))
                layers += conv_bn_act(c, out, follower if early and i == len(stage) - 1 else None, act)
                c = out
            side = after if early else side
            ends.append((len(layers), c, side))
            if not last and follower is not None and not early:
                layers.append(follower)
                side = after
        self.features = nn.Sequential(*layers)
        kind = readout.kind
        # cat0: the maps that end the earlier stages, max-pooled to the last map's side.
        self.taps = [(i, side_s // side) for i, _, side_s in ends[:-1]] if kind == "cat0" else []
        # fc, sfc and flat max-pool the last map here unless `features` already did (early)
        pool: nn.Module | None = None
        if not convs:  # a readout on the stem alone
            pool, side = readout_pool(kind, side)
        elif not early:  # the last stage's follower is the readout's pool
            pool, side = follower, after
        pooled = pool if pool is not None else nn.Identity()
        if kind == "attn":
            dim = max(8, int(round(readout.dim * width / 8)) * 8)
            self.pool: nn.Module = AttentionPool(c, side, dim)
            self.feature_dim = dim
        elif kind == "cat0":
            self.pool = FlattenHWC()
            self.feature_dim = (sum(ch for _, ch, _ in ends) if ends else c) * side * side  # no stages: the stem's map
        elif kind in ("flat", "flat0"):  # h is the last map flattened (max-pooled 2x2 first for "flat")
            self.pool = nn.Sequential(pooled, FlattenHWC())
            self.feature_dim = c * side * side
        elif kind in ("fc", "sfc"):
            layers_out = max(8, int(round(readout.dim * width)))
            self.pool = nn.Sequential(
                pooled, FlattenHWC(), nn.Linear(c * side * side, layers_out, bias=False), nn.BatchNorm1d(layers_out),
                activation(act))
            self.feature_dim = layers_out
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.feature_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> h (B, feature_dim)."""
        if not self.taps:
            return self.pool(self.features(x))
        parts, start = [], 0
        for end, factor in self.taps:
            x = self.features[start:end](x)
            parts.append(self.pool(nn.functional.max_pool2d(x, factor)))
            start = end
        parts.append(self.pool(self.features[start:](x)))
        return torch.cat(parts[::-1], dim=1)  # the last stage's features first
