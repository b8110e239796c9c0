"""Global BatchNorm: batch statistics over every rank's batch, as SimCLR does (Chen et al. 2020,
section 2: "we aggregate BN mean and variance over all devices").

Without it each rank normalises with its own B images, and (as the paper notes) the model can
exploit the per-device statistics to find the positive ("information leakage"), and 1 x 2B and
2 x B runs differ. On CUDA this is `torch.nn.SyncBatchNorm`. That module refuses CPU tensors
("SyncBatchNorm expected input tensor to be on GPU or XPU", torch/nn/modules/batchnorm.py), so
for CPU/gloo `GlobalBatchNorm` does the same with two differentiable all-reduces per layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, on every rank. Every rank's loss depends on y, so the gradient of
    the total with respect to this rank's x is the sum over ranks of dL_s/dy: again an all-reduce."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm{1,2}d whose training-mode statistics cover the batches of all ranks.

    Same parameters, buffers and state-dict keys as nn.BatchNorm2d, so checkpoints move freely
    between it and the plain layer. In eval mode, or with one process, it is exactly the plain
    layer. Statistics are computed in float32 in two passes (mean, then the mean squared
    deviation) rather than from sum and sum of squares, which cancel catastrophically when
    |mean| >> std.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, *) -> same shape, normalised per channel over N and * on every rank."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x if x.dtype == torch.float64 else x.float()  # float32 statistics under autocast
        local = torch.cat([xf.sum(dims), xf.new_tensor([x.numel() / x.shape[1]])])  # (C + 1,): sums, count
        total = _AllReduceSum.apply(local)
        n = total[-1].detach()
        mean = total[:-1] / n  # (C,)
        centered = xf - mean.view(shape)
        var = _AllReduceSum.apply(centered.square().sum(dims)) / n  # (C,) biased, as used to normalise
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if (self.track_running_stats and self.running_mean is not None and self.running_var is not None
                and self.num_batches_tracked is not None):
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), m)  # unbiased, like nn.BatchNorm
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of `module` made global across ranks: SyncBatchNorm on CUDA,
    GlobalBatchNorm elsewhere. Parameters and buffers are carried over (the same Parameter
    objects). Returns the module (a new one only when `module` itself is a BatchNorm layer)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, device))
    return module
