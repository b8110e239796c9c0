"""SimCLRv2's semi-supervised pipeline (Chen et al. 2020b): fine-tune a run on few labels, then
distil the fine-tuned classifier into a student with every unlabelled image."""

from fastclr.semisup.distill import distill, distillation_loss, soft_target_loss
from fastclr.semisup.network import Classifier, load_classifier, save_classifier
from fastclr.semisup.pipeline import DistillOptions, FinetuneOptions, distill_run, finetune_run

__all__ = ["Classifier", "DistillOptions", "FinetuneOptions", "distill", "distill_run", "distillation_loss",
           "finetune_run", "load_classifier", "save_classifier", "soft_target_loss"]
