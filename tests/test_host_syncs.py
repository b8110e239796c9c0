"""Steps that never wait for the GPU: the operators inside them whose CUDA kernels make the host
wait (an output sized from the data, a value read back, host data copied in) are counted on the
CPU, where the same operators run, so the property is checked without a GPU."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastclr.config import TrainConfig
from fastclr.evaluation.features import prepare_images
from fastclr.models import ProjectionHead, SmallCNN
from fastclr.pretraining.objective import LearnedTemperature, Objective
from fastclr.pretraining.optim import build_optimizer
from fastclr.pretraining.queue import KeyNetwork, RowQueue
from fastclr.pretraining.step import SimCLRNet, TrainStep
from fastclr.runtime import FP32

CPU = torch.device("cpu")
# nonzero and masked_select size their output from the data; _local_scalar_dense is .item(), bool()
# and float() of a tensor; lift_fresh is a tensor made from Python data (a copy from the host).
WAITING = {"nonzero", "masked_select", "_local_scalar_dense", "lift_fresh", "unique", "_unique2",
           "unique_consecutive", "unique_dim", "repeat_interleave", "equal", "bincount", "histc"}
READ_BACK = ("cpu", "numpy", "tolist", "__array__")
"""Tensor methods that bring values to the host: below them no operator shows on the CPU."""


class HostWaits(TorchDispatchMode):
    """Counts the aten operators below autograd that would make the host wait for a GPU, and the
    calls of the Tensor methods that read values back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> HostWaits:
        for name in READ_BACK:
            method = self._saved[name] = getattr(torch.Tensor, name)

            def counted(t: torch.Tensor, *args: Any, _name: str = name, _method: Any = method, **kwargs: Any) -> Any:
                self.seen[f"Tensor.{_name}"] += 1
                return _method(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        if name in WAITING:
            self.seen[name] += 1
        if name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1]):
            self.seen[f"{name} by a boolean mask"] += 1  # nonzero inside
        return func(*args, **(kwargs or {}))


def _objective_step(option: str) -> tuple[TrainStep, Objective | None, int]:
    torch.manual_seed(0)
    enc = SmallCNN(1, 0.125, "32|64")
    learned = LearnedTemperature(0.2) if option == "learn_temperature" else None
    net = SimCLRNet(enc, ProjectionHead(enc.feature_dim, 16, 8), learned)
    opt = build_optimizer("adamw", [net.encoder, net.head] + ([learned] if learned else []), 1e-3, 5e-4)
    views = 3 if option == "views" else 2
    if option == "plain":
        return TrainStep(net, opt, FP32, CPU, temperature=0.2), None, views
    settings: dict[str, Any] = {"views": 3} if option == "views" else {"local_views": 2} if option == "local_views" \
        else {option: True} if option in ("supcon", "learn_temperature") else {option: 24}
    cfg = TrainConfig(temperature=0.2, **settings)
    keys = KeyNetwork(net, 0.9) if option == "queue" else None
    queue = RowQueue(24, 8, CPU) if option == "queue" else None
    support = RowQueue(24, 8, CPU) if option == "nn_support" else None
    labels = [i % 3 if i % 4 else -1 for i in range(8)] if option == "supcon" else None
    objective = Objective(cfg, labels, CPU, learned, keys, queue, support)
    return TrainStep(net, opt, FP32, CPU, temperature=0.2, objective=objective), objective, views


@pytest.mark.parametrize("option", ["plain", "views", "local_views", "supcon", "learn_temperature", "queue",
                                    "nn_support"])
def test_a_training_step_has_no_operator_that_waits_for_the_gpu(option: str) -> None:
    """The step of every objective (a queue and a support set already holding rows) leaves the
    host free to queue the next step: each of these operators in it cost a wait on a GPU, and with
    --check-sync an error."""
    step, objective, k = _objective_step(option)
    g = torch.Generator().manual_seed(1)
    idx = torch.arange(8)
    groups = objective.groups(idx) if objective is not None else None
    def views() -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        full = torch.randn(k * 8, 1, 28, 28, generator=g)
        return (full, torch.randn(2 * 8, 1, 14, 14, generator=g)) if option == "local_views" else full

    for _ in range(2):  # the first fills the queue and the support set
        step(views(), groups)
    if objective is not None and objective.support is not None:
        assert objective.support.held() is not None  # the neighbour search runs in the counted step
    batch = views()
    with HostWaits() as waits:
        step(batch, groups)
    assert dict(waits.seen) == {}


def test_resizing_stored_images_for_the_encoder_has_no_operator_that_waits_for_the_gpu() -> None:
    """`prepare_images` runs at every step of the baseline, fine-tuning and distillation when the
    run's input side differs from the stored images'."""
    images = torch.randint(0, 256, (4, 28, 28, 1), dtype=torch.uint8)
    mean, std = torch.zeros(1), torch.ones(1)
    with HostWaits() as waits:
        x = prepare_images(images, mean, std, 32)
    assert x.shape == (4, 1, 32, 32) and dict(waits.seen) == {}


@pytest.mark.parametrize("optimizer", ["adamw", "lars"])
def test_a_loss_scaled_step_decides_an_overflow_on_the_device(optimizer: str) -> None:
    """fp16 (auto's choice on compute capability 7.x GPUs): GradScaler reads the overflow flag on
    the host for an optimiser that cannot take it (a wait at every step); fused AdamW and fastclr's
    LARS take it on the device. Torch's SGD cannot, and waits."""
    from fastclr.runtime import Precision

    torch.manual_seed(0)
    enc = SmallCNN(1, 0.125, "32|64")
    net = SimCLRNet(enc, ProjectionHead(enc.feature_dim, 16, 8))
    step = TrainStep(net, build_optimizer(optimizer, [net.encoder, net.head], 1e-3, 5e-4), Precision("fp16", "test"), CPU,
                     temperature=0.2)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        step(torch.randn(16, 1, 28, 28, generator=g))
    with HostWaits() as waits:
        step(torch.randn(16, 1, 28, 28, generator=g))
    assert dict(waits.seen) == {}
