"""fastclr: SimCLR for PyTorch, fast on a laptop CPU, one GPU or many.

The pieces, in the order data flows through them:

    load_builtin / load_data      stored uint8 images (N, H, W, C) and labels
    prepare_store / open_store    the user's own image folder as a memory-mapped store
    two_views                     batched, per-image random augmentation on the device
    build_encoder / ResNet / SmallCNN   encoder f: views -> h
    ProjectionHead                head g: h -> z
    nt_xent                       the contrastive loss on z
    build_optimizer, LARS, lr_at  optimisation
    pretrain                      the whole loop, with runs, checkpoints and the probe
    extract_features, linear_probe, knn_accuracy   evaluation on frozen h
    evaluate / build_report       `fastclr evaluate` (every protocol) and `fastclr report` (report.html)
    export_encoder                h in torchvision's names or as a torch.export program
    finetune_run, distill_run     SimCLRv2: fine-tune on few labels, distil with unlabelled images
    load_classifier               a fine-tuned or distilled classifier: images -> logits
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from fastclr.version import __version__

if TYPE_CHECKING:
    from fastclr.augment import two_views
    from fastclr.config import AugmentConfig, Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig
    from fastclr.presets import config_for
    from fastclr.data import Dataset, ImageSet, load_builtin, load_data, open_store
    from fastclr.errors import FastclrError
    from fastclr.export import export_encoder, load_encoder, save_encoder
    from fastclr.ingest import DecodeOptions, prepare_store
    from fastclr.evaluation.knn import knn_accuracy
    from fastclr.pretraining.losses import contrastive_metrics, nt_xent
    from fastclr.models import ProjectionHead, ResNet, SmallCNN, build_encoder
    from fastclr.pretraining.optim import LARS, build_optimizer
    from fastclr.evaluation.probe import linear_probe
    from fastclr.evaluation.features import extract_features
    from fastclr.pretraining.schedule import lr_at, scaled_lr
    from fastclr.pretraining.loop import pretrain
    from fastclr.evaluation import EvaluateOptions, evaluate
    from fastclr.report import build_report
    from fastclr.semisup import DistillOptions, FinetuneOptions, distill_run, finetune_run, load_classifier

# Each name is imported on first use (PEP 562): `import fastclr` (and so the `fastclr` command's
# start, before it can catch Ctrl-C) does not wait about 2 s for torch.
_WHERE = {name: module for module, names in {
    "fastclr.augment": ("two_views",),
    "fastclr.config": ("AugmentConfig", "Config", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "TrainConfig"),
    "fastclr.presets": ("config_for",),
    "fastclr.data": ("Dataset", "ImageSet", "load_builtin", "load_data", "open_store"),
    "fastclr.errors": ("FastclrError",),
    "fastclr.export": ("export_encoder", "load_encoder", "save_encoder"),
    "fastclr.ingest": ("DecodeOptions", "prepare_store"),
    "fastclr.evaluation.knn": ("knn_accuracy",),
    "fastclr.pretraining.losses": ("contrastive_metrics", "nt_xent"),
    "fastclr.models": ("ProjectionHead", "ResNet", "SmallCNN", "build_encoder"),
    "fastclr.pretraining.optim": ("LARS", "build_optimizer"),
    "fastclr.evaluation.probe": ("linear_probe",),
    "fastclr.evaluation.features": ("extract_features",),
    "fastclr.pretraining.schedule": ("lr_at", "scaled_lr"),
    "fastclr.pretraining.loop": ("pretrain",),
    "fastclr.evaluation": ("EvaluateOptions", "evaluate"),
    "fastclr.report": ("build_report",),
    "fastclr.semisup": ("DistillOptions", "FinetuneOptions", "distill_run", "finetune_run", "load_classifier"),
}.items() for name in names}


def _lazy(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"fastclr.{name}") is not None:  # `fastclr.models.ResNet` after `import fastclr`
        value = importlib.import_module(f"fastclr.{name}")
    else:
        raise AttributeError(f"module 'fastclr' has no attribute {name!r}")
    globals()[name] = value
    return value


# Defined for the interpreter only: a module-level __getattr__ that a type checker sees makes every
# name an `Any` attribute of fastclr, so a user's misspelt `from fastclr import ...` would pass mypy.
if not TYPE_CHECKING:
    __getattr__ = _lazy


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "LARS", "AugmentConfig", "Config", "DataConfig", "Dataset", "DecodeOptions", "EvalConfig", "FastclrError", "ImageSet",
    "ModelConfig", "OptimConfig", "ProjectionHead", "ResNet", "SmallCNN", "TrainConfig", "__version__",
    "build_encoder", "build_optimizer", "config_for", "contrastive_metrics", "extract_features", "knn_accuracy", "linear_probe",
    "load_builtin", "load_data", "load_encoder", "lr_at", "nt_xent", "open_store", "prepare_store", "pretrain",
    "save_encoder", "scaled_lr", "two_views",
]
__all__ += ["DistillOptions", "EvaluateOptions", "FinetuneOptions", "build_report", "distill_run", "evaluate",
            "export_encoder", "finetune_run", "load_classifier"]
