"""The supervised baseline: the run's encoder architecture trained from scratch with labels only,
on fixed subsets the few-label probe also uses (by default the first three of its ten), so the
label-efficiency curve shows where
self-supervised pretraining pays off and where labels alone do as well."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fastclr.evaluation.classifier import LabelledSetup, fit_and_test
from fastclr.evaluation.curve import label_sweep
from fastclr.evaluation.reference import untrained_encoder
from fastclr.models import EncoderSpec


def scratch_network(spec: EncoderSpec, setup: LabelledSetup, seed: int,
                    make_neck: Callable[[], nn.Module] | None = None, neck_dim: int = 0) -> tuple[nn.Module, nn.Module]:
    """A fresh encoder (the run's initial weights for `seed`) and a linear head on it, drawn as
    pretrain draws a network: the seed, the encoder, then the head from where the encoder's draws
    ended, and the training draws after those. With `make_neck` (building a module of output width
    `neck_dim`), the head is a new neck then the linear layer: the architecture of a classifier
    fine-tuned from a projection head's hidden layer. (The head was drawn from the seed's start
    again, the encoder's own draws: its weights a scaled copy of the first convolution's, and a
    neck's, drawn by the caller, of those too.)"""
    torch.manual_seed(seed)  # the GPUs' generators too: the training draws that follow may be theirs
    enc = untrained_encoder(spec, seed, setup.device, continue_stream=True)
    neck = make_neck() if make_neck is not None else None
    linear = nn.Linear(neck_dim if neck is not None else spec.feature_dim, len(setup.classes))
    head = nn.Sequential(neck, linear) if neck is not None else linear
    return enc, head.to(setup.device)


def train_from_scratch(spec: EncoderSpec, setup: LabelledSetup, idx: np.ndarray, seed: int,
                       make_neck: Callable[[], nn.Module] | None = None, neck_dim: int = 0) -> dict[str, float]:
    """Test accuracy of a fresh encoder plus linear head (after a neck `make_neck` builds, when
    given) trained on the labelled images `idx`."""
    enc, head = scratch_network(spec, setup, seed, make_neck, neck_dim)
    return fit_and_test(enc, head, setup, idx, seed)


def supervised_baseline(
    spec: EncoderSpec,
    setup: LabelledSetup,
    per_class: tuple[int, ...],
    seeds: tuple[int, ...],
    log: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """From-scratch test accuracy for every (labels per class, seed) subset."""
    return label_sweep(setup.train_labels, per_class, seeds, setup.classes,
                       lambda idx, seed: train_from_scratch(spec, setup, idx, seed), log, "supervised baseline")
