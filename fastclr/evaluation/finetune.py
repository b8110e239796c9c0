"""Fine-tuning: the whole pretrained encoder plus a linear head trained on 1% and 10% of the
labels, SimCLR's semi-supervised protocol (Chen et al. 2020, §6 and appendix B.5), on
class-balanced subsets.

The head starts from the logistic regression fitted on the subset's frozen features, then
everything is trained together (LP-FT, Kumar et al. 2022: a random head's early gradients distort
the pretrained features; with a short step budget this start matters). BatchNorm keeps the
statistics the probe's features were computed with: in train mode, batch statistics changed h
so much that the probe's head started at a loss of 2.9 (chance is 2.3) and fine-tuning ended
below the probe. Each subset is also trained from scratch with the supervised baseline's recipe
(the same steps, optimiser and learning rate; its BatchNorm in train mode and 2 px shifts, which
it needs and fine-tuning does not: `EvaluateOptions.finetune_shift_fraction`), and the probe the
head starts from is reported beside both, so what fine-tuning adds to the frozen features is read
off too.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fastclr.evaluation.classifier import LabelledSetup, TrainRecipe, fit_and_test
from fastclr.evaluation.curve import label_sweep
from fastclr.evaluation.fewshot import fewshot_fit
from fastclr.evaluation.subsets import fraction_per_class
from fastclr.evaluation.supervised import train_from_scratch
from fastclr.evaluation.probe import LogisticModel
from fastclr.models import EncoderSpec


def linear_head(model: LogisticModel, device: torch.device) -> nn.Linear:
    """An nn.Linear computing the same logits as `model` on raw features (standardisation folded in):
    W' = W / std, b' = b - W' mean."""
    w = model.weight / model.std  # (K, D)
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(model.bias - w @ model.mean)
    return head.to(device)


def probe_then_finetune(backbone: nn.Module, subset_x: torch.Tensor, test_x: torch.Tensor, setup: LabelledSetup,
                        idx: np.ndarray, seed: int) -> tuple[nn.Linear, dict[str, Any]]:
    """LP-FT on the labelled images `idx`: the few-label probe on their frozen features `subset_x`
    (L2 chosen on a fifth of them), its logistic regression as the linear head's start, then
    `backbone` (trained in place, BatchNorm statistics frozen) and head trained with `setup.recipe`.
    Returns the head and the test accuracies of the probe ("linear_accuracy") and of the whole."""
    ys, yte = torch.from_numpy(setup.train_labels[idx]), torch.from_numpy(setup.test_labels)
    probe = fewshot_fit(subset_x, ys, test_x, yte, seed)
    assert probe.model is not None and len(probe.model.bias) == len(setup.classes)  # a subset holds every class
    head = linear_head(probe.model, setup.device)  # the very model whose accuracy is reported
    out: dict[str, Any] = fit_and_test(backbone, head, setup, idx, seed, frozen_bn=True)
    out.update(l2=probe.l2, linear_accuracy=probe.accuracy)
    return head, out


def finetune(
    encoder: nn.Module,
    spec: EncoderSpec,
    train_x: torch.Tensor,
    test_x: torch.Tensor,
    setup: LabelledSetup,
    recipe: TrainRecipe,
    fractions: tuple[float, ...],
    seeds: tuple[int, ...],
    scratch: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """Fine-tuned test accuracy (and, with `scratch`, from-scratch accuracy) per label fraction
    (fractions that give the same labels per class measured once, the first of them named).

    train_x, test_x: frozen features of the training and test images: the head's starting point,
    whose test accuracy is recorded as "linear_accuracy". `recipe` trains the fine-tuned runs;
    the from-scratch runs use `setup.recipe`, as the supervised baseline does.
    `encoder` itself is never modified: each run trains a copy.
    """
    k = len(setup.classes)
    tuned = dataclasses.replace(setup, recipe=recipe)

    def one(idx: np.ndarray, seed: int) -> dict[str, Any]:
        _, out = probe_then_finetune(copy.deepcopy(encoder), train_x[torch.from_numpy(idx)], test_x, tuned, idx, seed)
        if scratch:
            out["scratch_accuracy"] = train_from_scratch(spec, setup, idx, seed)["accuracy"]
        return out

    results: list[dict[str, Any]] = []
    for f in fractions:
        n = fraction_per_class(setup.train_labels, f, k)
        same = next((r for r in results if r["labels_per_class"] == n), None)
        if same is not None:  # few labels per class: at least one each makes both fractions one subset
            log(f"note: label fractions {same['fraction']:g} and {f:g} both give {n} per class here: measured once")
            continue
        entry = label_sweep(setup.train_labels, [n], seeds, setup.classes, one, log, f"fine-tuning {f:g} of labels:")[0]
        if scratch:
            entry["scratch_mean"] = float(np.mean([r["scratch_accuracy"] for r in entry["runs"]]))
        # the share of the labels the subsets hold: the fraction asked for, rounded to whole labels per class
        results.append({"fraction": f, "label_fraction": n * k / len(setup.train_labels), **entry})
    return results
