"""SimCLR pretraining: the views of each step, the loss and its memory-saving forms, the step, the
optimiser and schedule, the run's state and checkpoints, and the loop that ties them together."""

from fastclr.pretraining.loop import NonFiniteLoss, PretrainResult, pretrain

__all__ = ["NonFiniteLoss", "PretrainResult", "pretrain"]
