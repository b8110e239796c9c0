"""Pairs/s of the whole SimCLR training step, and how close it runs to the machine's limit.

The step is the one `fastclr pretrain` runs (benchmarks/harness.real_step builds the package's
`TrainStep` as `pretrain` does): gather a batch of stored uint8 images, two views
augmented on the device, both views through encoder and head as one batch, NT-Xent in fp32,
backward, gradient norm, optimiser step. Measured for the default Fashion-MNIST model and batch
at the precision `pretrain` resolves on this machine and in fp32, on CPU and on CUDA when present; on CPU also the usual PyTorch
recipe (benchmarks/reference_recipe.py: per-image PIL transforms in a 2-worker DataLoader
feeding an fp32 model) side by side in the same run, and the achieved FLOP/s of the step against
the measured matmul peak of the same dtype (fastclr.info.matmul_rate).

    python benchmarks/throughput.py                 # the default Fashion-MNIST model and batch
    python benchmarks/throughput.py --keep-memory   # with pretrain's allocator setting (both recipes)
    python benchmarks/throughput.py --steps 30 --no-reference
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable

import torch

from fastclr.data import load_data
from fastclr.info import matmul_rate
from fastclr.pretraining.losses import nt_xent_logits
from fastclr.pretraining.model import build_model
from fastclr.pretraining.optim import build_optimizer, param_groups
from fastclr.presets import apply_preset
from fastclr.runtime import resolve_precision

from harness import add_keep_memory, at_least, keep_memory_if, real_step, report, timed


def reference_step(cfg, dataset, device: torch.device, workers: int, plain: bool = True) -> Callable[[int], None]:  # type: ignore[no-untyped-def]
    """The usual recipe: PIL views from a DataLoader with `workers` processes, fp32 model.

    plain=True is what a plain PyTorch loop gets by default: the model in the default (NCHW)
    memory format and torch.optim.AdamW with its default implementation (on CPU the per-parameter
    loop). plain=False hands the reference fastclr's model-level settings (channels_last, the
    fused AdamW), so that ratio isolates the data path and the arithmetic precision. Both build
    fastclr's encoder module itself, the pooled convolution that leaves out the row its pool never
    reads included (`FloorPooledConv`): the same function, so neither ratio credits fastclr with it."""
    from reference_recipe import batches

    torch.manual_seed(0)
    ref_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, channels_last=not plain and cfg.train.channels_last))
    model = build_model(ref_cfg, dataset, device)
    enc, head = model.encoder, model.head
    if plain:
        groups = [{k: v for k, v in g.items() if k != "lars"} for g in param_groups([enc, head], cfg.optim.weight_decay)]
        opt = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    else:
        opt = build_optimizer(cfg.optim.optimizer, [enc, head], cfg.optim.lr, cfg.optim.weight_decay)
    it = batches(dataset.pretrain.images, cfg.augment, cfg.train.batch_size, workers)

    def step(i: int) -> None:
        v = next(it).to(device)
        z = head(enc(v))
        logits, target = nt_xent_logits(*z.chunk(2), cfg.train.temperature)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    """Measure and print one JSON line per configuration, then a summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--batch-size", type=int, default=0, help="0: the default config's batch")
    p.add_argument("--steps", type=at_least(1), default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference recipe")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--precisions", default="auto,fp32",
                   help="precisions of the fastclr step; auto is what `pretrain` resolves on this machine")
    p.add_argument("--rounds", type=int, default=3, help="alternate the recipes this many times; ratios of the medians")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. model.width=2")
    add_keep_memory(p, "; process-wide, so the reference recipe (and its forked DataLoader workers) "
                       "gets it too: a conservative ratio")
    a = p.parse_args()
    keep_memory_if(a.keep_memory)
    overrides = {"data.name": a.data, **dict(kv.split("=", 1) for kv in a.set)}
    if a.batch_size:
        overrides["train.batch_size"] = a.batch_size
    cfg = apply_preset(overrides)
    dataset = load_data(cfg.data)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rounds: list[dict[str, float]] = []
    peaks: dict[tuple[str, str], float] = {}  # measured once per device and dtype: TFLOP/s
    for r in range(a.rounds):
        # Rounds alternate the recipes: on a shared machine whose CPU steal moves within a minute
        # (0-75% CPU steal within minutes, seen on a shared 2-core machine), a single pass of each can compare
        # two different machines.
        results: dict[str, float] = {}
        for device in devices:
            for precision in precisions(device, a.precisions):
                step = real_step(cfg, dataset, device, precision)
                times = timed(step, a.warmup, a.steps, device)
                sec = statistics.median(times)
                flops = step.flops()
                peak = peaks.setdefault((device.type, precision), matmul_rate(DTYPES[precision], device) / 1e3)
                rec = {"what": "fastclr step", "round": r, "device": device.type, "precision": precision,
                       "encoder": cfg.model.encoder, "width": step.width, "cnn_stages": cfg.model.cnn_stages,
                       "batch_pairs": cfg.train.batch_size,
                       "pairs_per_s": cfg.train.batch_size / sec, "step_ms": sec * 1e3,
                       "step_gflop": flops / 1e9, "achieved_tflops": flops / sec / 1e12,
                       "matmul_peak_tflops": peak, "share_of_peak": flops / sec / 1e12 / peak,
                       "threads": torch.get_num_threads(), "keep_memory": a.keep_memory}
                results[f"{device.type}-{precision}"] = rec["pairs_per_s"]
                report("throughput", rec)
            if device.type == "cpu" and not a.no_reference:
                for plain, key, what in ((True, "cpu-reference", "reference recipe (PIL + DataLoader workers, fp32, PyTorch defaults)"),
                                         (False, "cpu-reference-tuned", "reference recipe with fastclr's channels_last + fused AdamW")):
                    times = timed(reference_step(cfg, dataset, device, a.workers, plain), a.warmup, a.steps, device)
                    sec = statistics.median(times)
                    rec = {"what": what, "round": r, "device": "cpu", "workers": a.workers,
                           "pairs_per_s": cfg.train.batch_size / sec, "step_ms": sec * 1e3}
                    results[key] = rec["pairs_per_s"]
                    report("throughput", rec)
        if "cpu-reference" in results:
            report("throughput", {"what": "ratio, same round", "round": r, **_ratios(results)})
        rounds.append(results)
    if len(rounds) > 1 and "cpu-reference" in rounds[0]:
        medians = {k: statistics.median(res[k] for res in rounds) for k in rounds[0]}
        report("throughput", {"what": f"ratio of the medians over {len(rounds)} rounds",
                              **{f"median_pairs_per_s_{k}": v for k, v in medians.items()}, **_ratios(medians)})


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precisions(device: torch.device, wanted: str) -> list[str]:
    """The resolved names of `wanted` (auto -> this machine's choice), without repeats, in order."""
    out: list[str] = []
    for w in wanted.split(","):
        name = resolve_precision(w.strip(), device, warn=lambda s: None).name
        if name not in out:
            out.append(name)
    return out


def _ratios(results: dict[str, float]) -> dict[str, float]:
    """fastclr's pairs/s over the reference recipe's, from figures of one run."""
    return {f"fastclr_{k.removeprefix('cpu-')}_over_{ref.removeprefix('cpu-')}": v / results[ref]
            for ref in ("cpu-reference", "cpu-reference-tuned") if ref in results
            for k, v in results.items() if k.startswith("cpu-") and not k.startswith("cpu-reference")}


if __name__ == "__main__":
    main()
