"""A module in eval mode for a while, every submodule's own mode restored after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def in_eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode (BatchNorm's running statistics, no dropout) inside; after, each
    submodule has the mode it had before. Restoring the outer module's flag alone with `train(flag)`
    is recursive: a wrapper made for the occasion (a new `nn.Sequential` of a classifier's encoder
    and neck starts in train mode) switched the eval-mode modules it wraps to train mode. Instead
    each module's `train()` is called with its own flag, parents before children (`modules()`
    order): a child's own call comes after its parent's, and a module's `train()` override (a
    user's encoder that keeps its BatchNorm frozen, say) runs again on the way out."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.train(training)
