"""The reference every quality figure is reported beside: the run's own architecture at its own
initial weights, never trained. The lift (trained minus untrained) is what pretraining added; a
wide random feature map can probe well on easy data by itself (the 12544-d Fashion-MNIST readout
probed 89.9% untrained), so a figure without its reference can credit SimCLR with the architecture's
work.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from fastclr.models import EncoderSpec, encoder_from_spec
from fastclr.runtime import to_channels_last

SMALL_LIFT = 0.05
"""A linear-probe lift below 5 points is flagged: most of the accuracy is the architecture's."""


def small_lift(lift: float) -> bool:
    """Whether `lift` is below SMALL_LIFT. Accuracies are float32 means (9000/10000 - 8500/10000
    gives 0.04999995), so a lift at the threshold to within 1e-6 (a hundredth of a test image
    in 10k) counts as reaching it."""
    return lift < SMALL_LIFT - 1e-6


def untrained_encoder(spec: EncoderSpec, seed: int, device: torch.device, continue_stream: bool = False) -> nn.Module:
    """The architecture `spec` describes, initialised as `pretrain` initialises it with `seed`
    (torch.manual_seed(seed), then the encoder is the first thing built): for the run's own seed,
    exactly its weights before the first step, which are drawn on the CPU. The global random state
    is left as it was: the CPU's is restored, and CUDA's never seeded (torch.manual_seed would
    reseed every GPU's, and restoring those would start a CUDA context on each). With
    `continue_stream` the CPU's is left seeded and past the encoder's draws instead, as pretrain
    leaves it for its head: a network built next on it starts from draws of its own."""
    with nullcontext() if continue_stream else torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        enc: nn.Module = encoder_from_spec(spec)
    enc = to_channels_last(enc.to(device))
    return enc.eval()


def lift_summary(protocols: dict[str, Any]) -> dict[str, Any]:
    """Trained minus untrained accuracy for every protocol that measured both, from the figures
    the protocols reported (no second computation), and whether the linear-probe lift is small."""
    out: dict[str, Any] = {}
    for name in ("linear", "knn"):
        entry = protocols.get(name, {})
        if "random_init" in entry:
            out[name] = entry["accuracy"] - entry["random_init"]["accuracy"]
    few = protocols.get("fewshot", {})
    if "random_init_curve" in few:
        untrained = {e["labels_per_class"]: e["mean"] for e in few["random_init_curve"]}
        out["fewshot"] = {str(e["labels_per_class"]): e["mean"] - untrained[e["labels_per_class"]]
                          for e in few["curve"] if e["labels_per_class"] in untrained}
    if "linear" in out:
        out["small"] = small_lift(out["linear"])
        out["threshold"] = SMALL_LIFT
    return out
