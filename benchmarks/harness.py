"""What every benchmark here shares: the machine it ran on, the package's own training step, a
timer, a fresh-process runner and a peak-memory measure.

- `report(name, fields)` prints one JSON line with the exact command and `describe()` of the
  machine (CPU model with its ISA level and bf16 support, cores, OS, Python, torch, GPU).
- `real_step(cfg, dataset, device, precision)` is `fastclr.pretraining.step.TrainStep` built as
  `pretrain` builds it (seeded model, optimiser, the views of step i), so a benchmark times the
  step users run, never a copy of it; its options exist for the step-lever variants.
- `timed(step, warmup, steps, device)`: seconds of each step after untimed warm-up steps.
- `run_child(script, args)` / `emit(result)`: one configuration in a fresh process, its answer
  the JSON on its last line (peak memory and the allocator are per process).
- `measure(work, device, repeats)`: peak memory a piece of work adds, and its median seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastclr.config import Config
from fastclr.data import Dataset
from fastclr.data.loader import BatchSampler, ImageSource
from fastclr.pretraining.model import build_model
from fastclr.pretraining.optim import build_optimizer, param_groups
from fastclr.augment import render_views
from fastclr.pretraining.step import SimCLRNet, StepResult, TrainStep
from fastclr.pretraining.objective import Objective, is_plain
from fastclr.pretraining.queue import RowQueue
from fastclr.pretraining.views import ViewMaker, Views
from fastclr.cpu_memory import keep_freed_memory
from fastclr.cpus import usable_cpus
from fastclr.runtime import cpu_features, resolve_precision


def describe() -> str:
    """e.g. 'AMD EPYC (family 25, model 17) [AVX512_BF16; oneDNN bf16 on] x 2 CPUs, Linux, Python
    3.11.7, torch 2.13.0+cpu, no GPU': the CPU with its ISA level, which decides whether bf16 is
    native, and whether oneDNN's ISA was capped (ONEDNN_MAX_CPU_ISA) to stand in for another class."""
    c = cpu_features()
    cap = c.onednn_isa_cap
    isa = f"{c.isa}; oneDNN bf16 {'on' if c.onednn_bf16 else 'off'}" + (f"; ISA capped to {cap}" if cap else "")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{c.model} [{isa}] x {usable_cpus()} CPUs, {platform.system()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {gpu}")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum` (0 steps measured nothing and said so only
    as an empty record, or a statistics error after the training)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}, the fewest this measures with")
        return value

    return parse


@functools.cache
def commit() -> str:
    """The source's commit, "-dirty" after it where tracked files differ from it ("unknown" outside a
    clone): a result names the code that produced it."""
    here = str(Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + "-dirty" * bool(changed)


def provenance() -> dict[str, str]:
    """What every result line names: the exact command, the commit, the time (UTC) and the machine."""
    return {"command": " ".join([sys.executable, *sys.argv]), "commit": commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": describe()}


def report(benchmark: str, fields: dict[str, Any]) -> None:
    """Print one JSON line: the benchmark's name, its `provenance`, then `fields`."""
    print(json.dumps({"benchmark": benchmark, **provenance(), **fields}), flush=True)


def add_keep_memory(parser: argparse.ArgumentParser, why: str = "") -> None:
    """`--keep-memory`: keep freed memory as `pretrain` does (train.keep_memory); `why` adds to its help.
    Apply it with `keep_memory_if(args.keep_memory)` before the first large allocation."""
    parser.add_argument("--keep-memory", action="store_true",
                        help="keep freed memory as `pretrain` does (train.keep_memory)" + why)


def keep_memory_if(wanted: bool) -> None:
    """Make this process keep freed memory (fastclr.cpu_memory) when `wanted`."""
    if wanted:
        keep_freed_memory()


def record(out: str | Path, rec: dict[str, Any]) -> None:
    """Print `rec`, with its `provenance` where it does not name its own, as one JSON line and append
    it to the results file `out`."""
    rec = {**provenance(), **rec}
    print(json.dumps(rec), flush=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


@dataclass
class RealStep:
    """The package's training step for one config, and how to feed it."""

    train_step: TrainStep
    batch: Callable[[int], tuple[Views, torch.Tensor | None]]
    """The standardised views (2B, C, S, S) of step i, drawn as `pretrain` draws them (and the
    small views with train.local_views), and their group ids under an objective other than
    NT-Xent (--views, --local-views; else None), from one draw of the batch's indices."""
    last: StepResult | None = None
    """What the latest step returned (loss and metrics, on the device)."""
    width: float = 1.0
    """The encoder's channel multiplier as built (`--width` auto resolved for the device)."""

    def __call__(self, i: int) -> None:
        """Step i: views, forward, loss, backward, update."""
        self.last = self.train_step(*self.batch(i))

    def flops(self) -> float:
        """FLOPs of one step (matmuls and convolutions, as torch's counter sees them)."""
        v, groups = self.batch(0)
        with FlopCounterMode(display=False) as counter:
            self.train_step(v, groups)
        return float(counter.get_total_flops())


def real_step(cfg: Config, dataset: Dataset, device: torch.device, precision: str,
              encoder: torch.nn.Module | None = None, fused: bool = True, compiled: bool = False) -> RealStep:
    """`TrainStep` for `cfg` at `precision` (auto, bf16, fp16, fp32), built as `pretrain` builds it
    (seed 0). Variants: `encoder` (a module instead of the named one), `fused=False` (AdamW's
    foreach kernels), `compiled` (torch.compile of encoder, head and the views' pixel work, as --compile on)."""
    torch.manual_seed(0)
    model = build_model(cfg, dataset, device, encoder=encoder)
    if fused:
        opt = build_optimizer(cfg.optim.optimizer, [model.encoder, model.head], cfg.optim.lr, cfg.optim.weight_decay)
    else:
        opt = torch.optim.AdamW(param_groups([model.encoder, model.head], cfg.optim.weight_decay), lr=cfg.optim.lr,
                                foreach=True)
    net: torch.nn.Module = SimCLRNet(model.encoder, model.head)
    if compiled:
        net = torch.compile(net)
    t = cfg.train
    # More views, small views or nearest-neighbour positives (no labels, fixed temperature): the
    # multi-positive objective. The support set starts full (random unit rows), as a run's is after
    # its first S / B steps, so every timed step pays for the whole neighbour search.
    support = None
    if t.nn_support:
        support = RowQueue(t.nn_support, cfg.model.proj_dim, device)
        support.enqueue(torch.randn(t.nn_support, cfg.model.proj_dim, device=device))
    objective = None if is_plain(t) else Objective(t, None, device, None, support=support)
    step = TrainStep(net, opt, resolve_precision(precision, device, warn=lambda s: None), device,
                     temperature=t.temperature, loss_block=t.loss_block, objective=objective)
    source = ImageSource(dataset.pretrain.images, device)
    sampler = BatchSampler(len(source), t.batch_size, 0, device)
    make = ViewMaker(cfg.augment, model.spec.mean_tensor(), model.spec.std_tensor(), device, seed=0,
                     channels_last=t.channels_last, global_batch=t.batch_size,
                     render=torch.compile(render_views) if compiled else render_views, views=t.views,
                     local_views=t.local_views)

    def batch(i: int) -> tuple[Views, torch.Tensor | None]:
        idx = sampler.indices(i)
        return make(source.gather(idx), i), None if objective is None else objective.groups(idx)

    return RealStep(step, batch, width=model.spec.width)


def timed(step: Callable[[int], None], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` steps after `warmup` untimed ones (CUDA synchronised around each)."""
    for i in range(warmup):
        step(i)
    out = []
    for i in range(warmup, warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t)
    return out


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(work: Callable[[], object], device: torch.device, repeats: int) -> dict[str, float]:
    """Run `work` `repeats` times; the peak memory it added (bytes) and the median seconds per run.

    On CPU the measure is the process's peak resident set (ru_maxrss) above a baseline taken after
    imports and inputs: ru_maxrss never goes down, so each configuration needs its own process
    (`run_child`). On CUDA it is torch.cuda.max_memory_allocated above the memory allocated before,
    after one unmeasured run that takes the one-off allocations (cuBLAS workspace, allocator pools)."""
    if device.type == "cuda":
        work()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = max_rss_bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss_bytes()
    return {"peak_bytes": peak - base, "peak_gib": round((peak - base) / 2**30, 4),
            "seconds": sorted(times)[len(times) // 2]}


def run_child(script: str, args: list[str], timeout: float = 3600.0, env: dict[str, str] | None = None,
              cgroup: Path | None = None) -> dict[str, Any]:
    """Run `python script args` in a fresh process (started inside the cgroup folder `cgroup` when
    given) and return the JSON object on its last stdout line, or the reason it gave none (killed
    for memory, timed out)."""
    def join() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    try:
        r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                           env=env, preexec_fn=join)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        why = "killed (out of memory?)" if r.returncode in (-9, 137) else f"exit {r.returncode}"
        return {"error": why, "stderr": r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else []}
    return json.loads(lines[-1])


def emit(result: dict[str, Any]) -> None:
    """A child's answer to `run_child`: one JSON line."""
    print(json.dumps(result), flush=True)
