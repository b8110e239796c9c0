"""Self-distillation with unlabelled data, SimCLRv2's third step (Chen et al. 2020b, section 2).

A fine-tuned teacher, fixed, gives every training image its class distribution at temperature t;
a student learns to match it on all images, labelled or not:

    L = -(1 - a) sum_{(x, y) labelled} log P_S(y | x)  -  a sum_{x} sum_y P_T(y | x; t) log P_S(y | x; t)

(the paper's equations 2 and 3; a = 1 is distillation alone, the paper's ImageNet choice). With
batches drawn uniformly from all images, the per-image loss a * soft(x) + (1 - a) * [x labelled]
* CE(x), averaged over the batch, is an unbiased estimate of L / |images|: no second sampler is
needed for the labelled images. The teacher runs in eval mode and without gradients, on the
student's augmented batch (as the paper's code does) or once on the clean images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastclr.errors import FastclrError
from fastclr.evaluation.classifier import LabelledSetup, Objective, classifier_accuracy, train_classifier
from fastclr.evaluation.features import extract_features
from fastclr.semisup.network import Classifier
from fastclr.models.modes import in_eval_mode


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per image, -sum_y softmax(teacher / t)_y * log softmax(student / t)_y: (B, K), (B, K) -> (B,)
    in float32. Its gradient in the student's logits is (softmax(student / t) - softmax(teacher / t)) / t."""
    target = F.softmax(teacher_logits.float() / temperature, dim=1)
    return -(target * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, label_weight: float) -> torch.Tensor:
    """The batch mean of (1 - w) * soft_target_loss + w * [labelled] * cross-entropy (at t = 1),
    where `labels` (B,) holds -1 for an image without a label and w = `label_weight` = 1 - a."""
    per_image = (1 - label_weight) * soft_target_loss(student_logits, teacher_logits, temperature)
    if label_weight > 0:
        known = labels >= 0
        ce = F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction="none")
        per_image = per_image + label_weight * torch.where(known, ce, torch.zeros_like(ce))
    return per_image.mean()


def known_labels(n: int, labelled: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """int64 (n,): the label of each image in `labelled` (positions in the training set), -1 elsewhere.
    `labels` holds the labels of `labelled`, in its order: the others are never asked for."""
    out = np.full(n, -1, dtype=np.int64)
    out[labelled] = labels
    return out


TEACHER_VIEWS = ("same", "clean")


def check_distill_options(temperature: float, label_weight: float, teacher_views: str) -> None:
    """One line for a distillation setting out of range (checked before anything is loaded)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise FastclrError(f"--temperature must be a finite number above 0, got {temperature}; SimCLRv2 uses 1")
    if not 0 <= label_weight <= 1:
        raise FastclrError(f"--label-weight must be in [0, 1], got {label_weight}; 0 is distillation alone")
    if teacher_views not in TEACHER_VIEWS:
        raise FastclrError(f"--teacher-views {teacher_views!r}: choose one of {', '.join(TEACHER_VIEWS)}")


def distillation_objective(teacher: Classifier, known: np.ndarray, temperature: float, label_weight: float,
                           setup: LabelledSetup, teacher_views: str = "same") -> Objective:
    """The loss of one student batch against the teacher's logits, and the labels of those of its
    images that are labelled (-1 for the others).

    teacher_views "same": the teacher sees the student's augmented batch (SimCLRv2's code);
    "clean": the teacher's logits on the un-augmented training images, computed once, so the
    student alone sees the augmentation (the noisy student of Xie et al. 2020), and a step costs
    no teacher forward pass."""
    if teacher_views not in TEACHER_VIEWS:
        raise FastclrError(f"--teacher-views {teacher_views!r}: choose one of {', '.join(TEACHER_VIEWS)}")
    y = torch.from_numpy(known).to(setup.device)
    teacher.eval()
    table = None
    if teacher_views == "clean":
        table = extract_features(teacher, setup.train_images, setup.mean, setup.std, setup.device,
                                 precision=setup.precision, size=setup.size).to(setup.device)  # (N, K) logits

    def loss(x: torch.Tensor, logits: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if table is not None:
            target = table[b]
        else:
            with torch.no_grad(), setup.precision.autocast(setup.device):
                target = teacher(x)
        return distillation_loss(logits, target, y[b], temperature, label_weight)

    return loss


@dataclass
class DistillResult:
    """What a distillation gave: the student's test accuracy, its final loss and the teacher's."""

    accuracy: float
    final_loss: float
    teacher_accuracy: float


def distill(teacher: Classifier, student: Classifier, setup: LabelledSetup, labelled: np.ndarray, temperature: float,
            label_weight: float, seed: int, teacher_views: str = "same") -> DistillResult:
    """Train `student` in place on every training image of `setup` against `teacher`'s soft targets
    (and, with `label_weight` > 0, the labels of the images `labelled`), with `setup.recipe`.

    Only the labels of `labelled` are read; test images and labels are used after training, to
    measure. The teacher is not modified.
    """
    check_distill_options(temperature, label_weight, teacher_views)
    n = len(setup.train_images)
    known = known_labels(n, labelled, setup.train_labels[labelled])
    with in_eval_mode(teacher):  # the objective reads it in eval mode; the caller's modes come back after
        objective = distillation_objective(teacher, known, temperature, label_weight, setup, teacher_views)
        loss = train_classifier(student.backbone(), student.fc, setup, np.arange(n), seed, objective=objective)
    return DistillResult(accuracy=classifier_accuracy(student.backbone(), student.fc, setup), final_loss=loss,
                         teacher_accuracy=classifier_accuracy(teacher.backbone(), teacher.fc, setup))
