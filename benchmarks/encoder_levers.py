"""`levers.py` with the cnn encoder's building blocks changed: a recipe lever measured, not a
fastclr option (docs/benchmarks.md section 3, "Activation, pooling kind and kernel size").

Four keys in an arm's spec change the network `fastclr.models.cnn.SmallCNN` builds, for the
trained run and its untrained reference alike (both are built inside the arm):
- `act=silu` or `act=gelu`: as the stage spec's `silu:` or `gelu:` (fastclr.models.cnn), every
  ReLU of the encoder (the convolutions' and the fc readout's; an attn readout keeps its own)
  becomes that activation (SiLU: Elfwing et al. 2018 / Ramachandran et al. 2017; GELU: Hendrycks
  and Gimpel 2016); the projection head keeps its ReLU; `acth=` gives the readout's (the one
  that makes h) its own: `act=silu,acth=relu` changes the convolutions' alone;
- `pool=avg`: every max-pool of the encoder (between stages and the readout's) becomes an average
  pool of the same window, stride and padding;
- `k5=N`: the first N 3x3 convolutions become 5x5 (padding 2: the same map size).
Everything else is `levers.py`.

    python benchmarks/encoder_levers.py --budget 9.5 --seeds 0 --out enc.jsonl \
        "base:" "silu:act=silu" "avgpool:pool=avg" "k5x3:k5=3"
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn

from fastclr.models.cnn import ACTIVATIONS, AttentionPool, SmallCNN, activation

import levers


class Blocks(NamedTuple):
    """What an arm changes in the encoder."""
    act: str = "relu"
    pool: str = "max"
    k5: int = 0
    acth: str = ""
    """The readout's activation; empty: `act`."""


def split_spec(spec: str) -> tuple[str, Blocks]:
    """The `levers.py` spec without this script's keys, and the blocks they ask for."""
    items = dict(levers.spec_items(spec))
    blocks = Blocks(items.pop("act", "relu"), items.pop("pool", "max"), int(items.pop("k5", 0)), items.pop("acth", ""))
    if {blocks.act, blocks.acth or blocks.act} - set(ACTIVATIONS) or blocks.pool not in ("max", "avg") or blocks.k5 < 0:
        raise SystemExit(f"{spec!r}: act= and acth= take {', '.join(ACTIVATIONS)}; pool= max or avg; k5= a count of convs")
    return ",".join(f"{k}={v}" for k, v in items.items()), blocks


def _replace(root: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> None:
    """Every submodule m of `root` for which swap(m) gives a module is replaced by it, in place."""
    for name, child in root.named_children():
        new = swap(child)
        if new is not None:
            setattr(root, name, new)
        else:
            _replace(child, swap)


def _activate(part: nn.Module, act: str) -> None:
    """Every ReLU in `part` becomes a fresh `act`, in place, unless `part` is an attention readout
    (SmallCNN's whole `pool` when it has one), whose ReLU the stage spec's `silu:` keeps too."""
    if act != "relu" and not isinstance(part, AttentionPool):
        _replace(part, lambda m: activation(act) if isinstance(m, nn.ReLU) else None)


def rebuild(encoder: SmallCNN, blocks: Blocks) -> None:
    """`encoder` (freshly built) with the blocks `blocks` asks for, in place; the replaced
    convolutions are new, freshly initialised modules."""
    _activate(encoder.features, blocks.act)
    _activate(encoder.pool, blocks.acth or blocks.act)
    if blocks.pool == "avg":
        _replace(encoder, lambda m: nn.AvgPool2d(m.kernel_size, m.stride, m.padding, count_include_pad=False)
                 if isinstance(m, nn.MaxPool2d) else None)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]  # in the order they run
    if blocks.k5 > len(convs):
        raise SystemExit(f"k5={blocks.k5}: the encoder has {len(convs)} convolutions")
    first = {id(m) for m in convs[:blocks.k5]}
    with torch.random.fork_rng(devices=[]):  # the new convs' draws leave the generator as `base` leaves it,
        _replace(encoder, lambda m: nn.Conv2d(m.in_channels, m.out_channels, 5, padding=2, bias=m.bias is not None)
                 if id(m) in first else None)  # so the head built next starts as in the base arm


@contextmanager
def built_with(blocks: Blocks) -> Iterator[None]:
    """Within: every SmallCNN is built with `blocks` (`rebuild` at the end of its __init__)."""
    original = SmallCNN.__init__

    def init(self: SmallCNN, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        rebuild(self, blocks)

    SmallCNN.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        SmallCNN.__init__ = original  # type: ignore[method-assign]


def encoder_arm(spec: str) -> tuple[str, Callable[[], AbstractContextManager[object]], dict[str, Any]]:
    """`levers.Arm`: an arm with act=, pool= or k5= trains within `built_with` and records them."""
    spec, blocks = split_spec(spec)
    if blocks == Blocks():
        return spec, nullcontext, {}
    return spec, lambda: built_with(blocks), blocks._asdict()


if __name__ == "__main__":
    levers.main(arm=encoder_arm, doc=__doc__)
