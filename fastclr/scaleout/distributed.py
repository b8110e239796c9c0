"""Data parallelism under torchrun: the process group, the gather of negatives, agreed decisions.

`torchrun --nproc_per_node=N -m fastclr pretrain ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment; `setup` joins them into one process
group (NCCL on CUDA, gloo on CPU). Without those variables (or WORLD_SIZE=1) nothing is
initialised and every function here is the identity, so one process runs the plain code path.

Why the gradients are right. Each rank r embeds its B local images (2B views, z_r), gathers all
W ranks' embeddings with `gather_with_grad`, and takes L_r = mean over its 2B anchors of the
NT-Xent against all 2WB candidates. The global loss is L = (1/2WB) sum of all anchors = (1/W)
sum_s L_s. The backward of the gather all-reduces (sums) the gradient of every rank's L_s with
respect to the gathered rows and keeps rank r's slice, so together with the direct (anchor) path
z_r receives sum_s dL_s/dz_r; DDP then averages parameter gradients over ranks, giving
(1/W) sum_r sum_s dL_s/dz_r dz_r/dtheta = dL/dtheta: exactly one process on the global batch.
(A gather without gradient drops the candidate path; a loss summed instead of averaged, or a
gather backward without the all-reduce, is off by a factor of W: the bugs the peers shipped.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fastclr.errors import FastclrError, PeerFailure
from fastclr.runtime import missing_kernels
from fastclr.scaleout.start import check_in, job_store, restartable

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True when `setup` created the process group (and `teardown` should destroy it)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside torchrun. A
    value torchrun would not set is one line (it was a traceback, or a wait for the timeout)."""
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or (world > 1 and not (0 <= rank < world and local >= 0)):
        raise FastclrError(f"RANK={rank}, LOCAL_RANK={local} and WORLD_SIZE={world} are not a process of the group "
                           "(0 <= RANK < WORLD_SIZE); start the processes with torchrun or fastclr-torchrun, which set "
                           "them, or unset them for one process")
    return rank, world, local


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it, 1 where unset or not a number (`env_world` then says so)."""
    try:
        return _env_int("WORLD_SIZE", 1)
    except FastclrError:
        return 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise FastclrError(f"{name}={text!r} is not a whole number; start the processes with torchrun or "
                           f"fastclr-torchrun, which set it, or unset {name} for one process") from None


def setup(device: torch.device, timeout_s: float, stopping: Callable[[], bool] | None = None) -> DistContext:
    """Join the process group described by the environment (or adopt one the caller made).

    device: this rank's device (cuda:LOCAL_RANK or cpu); it picks the backend, NCCL for CUDA and
    gloo otherwise. timeout_s bounds every collective: a rank whose peer stopped answering
    raises (`PeerFailure`) instead of waiting forever. Before the group forms every rank checks in
    (`start.check_in`): a rank that stopped first is named with its reason, and `stopping` (True
    once a stop signal came) ends the wait.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), env_world()[2], owns_group=False)
    rank, world, local = env_world()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise FastclrError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; install a standard build")
    # NCCL where the build has it; Windows builds have none, and gloo carries CUDA tensors there too
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    try:
        if restartable():  # torchrun may start the ranks again on this store: the check-in's keys would be stale
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        else:
            store = job_store(rank, world, timeout_s)
            check_in(store, rank, world, timeout_s, stopping)
            # the keys of the group apart from the check-in's, as torch's own rendezvous keeps them
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                    store=dist.PrefixStore("default_pg", store),
                                    device_id=device if device.type == "cuda" else None)
    except FastclrError:
        raise
    except (RuntimeError, ValueError) as e:
        raise PeerFailure(f"rank {rank}: cannot join the {world}-process group via {backend} "
                          f"({first_line(e)}); check MASTER_ADDR/MASTER_PORT and that every rank started") from None
    return DistContext(rank, world, local, owns_group=True)


def process_device(name: str, local_rank: int, world_size: int) -> str:
    """The device setting a rank should use: under several processes any CUDA setting (auto with
    a GPU, cuda, cuda:N) means this rank's own GPU, cuda:LOCAL_RANK, as torchrun intends."""
    if world_size <= 1 or not name.startswith(("auto", "cuda")):
        return name
    if name == "auto" and not torch.cuda.is_available():
        return "cpu"
    visible = torch.cuda.device_count()
    if local_rank >= visible:  # more ranks on the node than GPUs, or one GPU made visible to each rank
        raise FastclrError(f"LOCAL_RANK {local_rank} has no GPU of its own: {visible} visible to it; start at most "
                           f"{visible} process{'es' if visible != 1 else ''} a node (--nproc_per_node) with every "
                           "GPU visible to each, or use --device cpu")
    # Every rank asks about every GPU the node's ranks use (cuda:0 to cuda:LOCAL_WORLD_SIZE - 1), so
    # that all take the same way: one rank alone on the CPU would join gloo while the others join
    # NCCL, and wait until the timeout. A GPU no rank uses (a display card beside them) is not asked.
    used = min(visible, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    missing = [why for why in (missing_kernels(i) for i in range(used)) if why]
    if missing and len(missing) < used:
        raise FastclrError(f"{missing[0]}, and other GPUs of this node have kernels: one process a GPU would run some "
                           "ranks on the CPU; make only the GPUs this torch runs on visible (CUDA_VISIBLE_DEVICES) "
                           "and start that many processes a node")
    if name == "auto" and missing:
        return "cpu"  # select_device("auto") says why on a single process; here every rank agrees on the CPU
    return f"cuda:{local_rank}"


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if `setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception raised during a step came from the communication layer (gloo/NCCL
    report a dead or hung peer as a plain RuntimeError, see `PeerFailure`)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "nccl", "connection", "timed out", "peer"))


def peer_failure(ctx: DistContext, e: BaseException, after: str) -> PeerFailure:
    """The one-line error a surviving rank exits with; `after`: what is kept and how to go on."""
    return PeerFailure(
        f"rank {ctx.rank} of {ctx.world_size}: lost contact with another rank ({first_line(e)}); that rank's log "
        f"says why it stopped. {after}"
    )


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name where it has none), 300 characters at most."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather + cat forward; backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (W * rows, ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        # Every rank's loss depends on every gathered row: this rank's rows get the sum over ranks.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Rows of every rank, rank 0 first: (W * rows, ...), differentiable (see the module notes).
    The identity with one process. Half-precision rows are gathered as float32: the loss reads
    them in float32 anyway, and the backward's sum over ranks in bf16 rounded each rank's share
    first and then every partial sum (NCCL's ring adds in the tensor's dtype), where one process
    adds them in float32 inside the matmul."""
    if not ctx.active:
        return x
    return _GatherWithGrad.apply(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)


def all_gather(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Rows of every rank, rank 0 first, without gradient (ids, labels): (W * rows, ...)."""
    if not ctx.active:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce(x: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """The element-wise sum, min or max of `x` over ranks (a new tensor; no gradient)."""
    if not ctx.active:
        return x
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    out = x.detach().clone()
    dist.all_reduce(out, op=ops[op])
    return out


def share_outcome(failure: Exception | None, ctx: DistContext, device: torch.device, others_say: str,
                  wait_s: float | None = None) -> None:
    """After work only some ranks do (rank 0 writes, a node's first rank downloads): every rank
    learns whether it failed anywhere. The failed rank raises its own error, the others one line,
    "rank R: `others_say`". Without it they went on into collectives rank 0 never joined and
    waited there until the timeout, then blamed a lost peer. `wait_s`: how long the others may
    wait for the work (a download can outlast the collectives' timeout, --dist-timeout): the
    answer then goes through a gloo group of its own with that timeout."""
    if ctx.active:
        mine = torch.tensor([int(failure is None)])
        if wait_s is None:
            done = all_reduce(mine.to(device), ctx, "min")
        else:
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
            try:
                dist.all_reduce(mine, op=dist.ReduceOp.MIN, group=group)
            finally:
                dist.destroy_process_group(group)
            done = mine
        if failure is None and not bool(done[0]):
            raise FastclrError(f"rank {ctx.rank}: {others_say}")
    if failure is not None:
        raise failure


def shared(doer: bool, work: Callable[[], T], ctx: DistContext, device: torch.device, others_say: str,
           wait_s: float | None = None) -> T | None:
    """`work()` where `doer` (rank 0, a node's first rank), then `share_outcome` of it on every
    rank; its result where it ran, else None."""
    result, failure = None, None
    if doer:
        try:
            result = work()
        except Exception as e:  # told to the other ranks before it is raised here
            failure = e
    share_outcome(failure, ctx, device, others_say, wait_s)
    return result


def gather_objects(obj: T, ctx: DistContext) -> list[T]:
    """Every rank's `obj` (picklable, small), in rank order, on every rank."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's `obj` (picklable, small: a path, a step count) on every rank."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
