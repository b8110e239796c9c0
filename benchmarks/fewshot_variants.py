"""Variants of the few-label probe on one trained run and the same network untrained.

The features of the 60k training and 10k test images are extracted once per network (as
`fastclr evaluate` extracts them); each variant then fits the few-label probe
(`fastclr.evaluation.fewshot.fewshot_fit`, L2 chosen on a class-balanced fifth of the subset) on the same
stratified subsets:

    base        as `fastclr evaluate` runs it: standardised with the labelled subset's own mean and std
    unlabelled  standardised with the mean and std of all 60k training features (no label read:
                the images a user pretrained on are at hand when a few of them get labels)
    l2norm      every row scaled to unit length first, then as base
    cl2n        centred on the 60k training features' mean and scaled to unit length (SimpleShot's
                CL2N, Wang et al. 2019), then as base

    python benchmarks/fewshot_variants.py runs/RUN --per-class 10,100 --seeds 0-9 --out fewshot.jsonl
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fastclr.data import load_data
from fastclr.evaluation.features import extract_features
from fastclr.evaluation.fewshot import fewshot_fit
from fastclr.evaluation.reference import untrained_encoder
from fastclr.evaluation.subsets import stratified_subset
from fastclr.pretrained import load_run

from harness import describe, record

VARIANTS = ("base", "unlabelled", "l2norm", "cl2n")


def seeds_of(text: str) -> list[int]:
    """"0-9" or "0,1,2" -> a list of seeds."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def network_features(run_dir: Path, names: Sequence[str]
                     ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, Iterator[tuple[str, torch.Tensor, torch.Tensor]]]:
    """The run's training labels (numpy, for `stratified_subset`; and as a tensor), its test labels, and,
    one network at a time, (name, float32 train h, float32 test h) for each of `names` ("trained",
    "untrained": the same network at its initial weights), extracted as `fastclr evaluate` extracts them."""
    run = load_run(run_dir, log=lambda s: None)
    device = torch.device("cpu")
    ds = load_data(run.config.data)
    train, test = ds.train, ds.test
    assert train is not None and test is not None and train.labels is not None and test.labels is not None

    def each() -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for name in names:
            encoder = run.encoder if name == "trained" else untrained_encoder(run.spec, run.config.train.seed, device)
            tr, te = (extract_features(encoder, images, run.mean, run.std, device, precision=run.precision,
                                       size=run.spec.image_size).float() for images in (train.images, test.images))
            yield name, tr, te

    return train.labels, torch.from_numpy(train.labels), torch.from_numpy(test.labels), each()


def variant_features(name: str, tr: torch.Tensor, te: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Training and test features as the variant transforms them, and the standardisation
    statistics it passes to the probe (None: the labelled subset's own)."""
    if name == "base":
        return tr, te, None
    if name == "unlabelled":
        return tr, te, (tr.mean(0), tr.std(0))
    if name == "l2norm":
        return torch.nn.functional.normalize(tr, dim=1), torch.nn.functional.normalize(te, dim=1), None
    if name == "cl2n":
        mu = tr.mean(0)
        return torch.nn.functional.normalize(tr - mu, dim=1), torch.nn.functional.normalize(te - mu, dim=1), None
    raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def main() -> None:
    """One JSON line per (network, variant, labels per class): mean and spread over the subset seeds."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--per-class", default="10,100")
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    labels, ytr, yte, networks = network_features(a.run_dir, ("trained", "untrained"))
    seeds = seeds_of(a.seeds)
    for which, feats_tr, feats_te in networks:
        for name in a.variants.split(","):
            tr, te, stats = variant_features(name, feats_tr, feats_te)
            for n in (int(s) for s in a.per_class.split(",")):
                t0 = time.perf_counter()
                accs = []
                for seed in seeds:
                    idx = torch.from_numpy(stratified_subset(labels, n, seed))
                    accs.append(100 * fewshot_fit(tr[idx], ytr[idx], te, yte, seed, stats=stats).accuracy)
                record(a.out, {
                    "benchmark": "fewshot_variants", "machine": describe(), "run": str(a.run_dir), "network": which,
                    "variant": name, "per_class": n, "seeds": len(seeds), "mean": round(float(np.mean(accs)), 2),
                    "std": round(float(np.std(accs, ddof=1)), 2) if len(accs) > 1 else 0.0,
                    "accuracies": [round(x, 2) for x in accs], "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
