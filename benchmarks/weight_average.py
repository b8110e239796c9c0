"""An exponential moving average of the encoder's weights: is the averaged encoder's h better than
the last step's?

One pretraining run through `fastclr.pretrain` (the encoder built under the seed as `pretrain` builds
it and handed in, so the head's first draw differs from the CLI's; kNN monitor off) keeps, beside the
encoder it trains, copies whose parameters and BatchNorm statistics follow it as
w_avg <- d * w_avg + (1 - d) * w after every step, for each decay d given (Polyak averaging, as the
key encoders of MoCo and BYOL's targets keep it; here it is only read out at the end). The trained
encoder and every average are then measured on frozen h exactly as `fastclr evaluate` measures
(linear probe, weighted kNN k = 20 tau = 0.07, 10 labels per class over 3 subset seeds): a paired
comparison, the same run read out several ways.

    python benchmarks/weight_average.py --budget 9.5 --decays 0.99,0.999,0.9998 --out weight-average.jsonl
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastclr.data import load_data
from fastclr.presets import apply_preset
from fastclr.pretraining.loop import pretrain
from fastclr.pretraining.model import named_encoder
from fastclr.runtime import Precision

from harness import describe, record
from levers import quality


class Averages:
    """Copies of `encoder` whose floating-point state follows it with each decay, one update per step."""

    def __init__(self, encoder: nn.Module, decays: list[float]) -> None:
        self.encoder, self.decays = encoder, decays
        self.copies = [copy.deepcopy(encoder).eval() for _ in decays]
        self.last = -1
        """The step of the weights the averages took last (never the same step twice)."""

    @staticmethod
    def _state(net: nn.Module) -> list[torch.Tensor]:
        return [t for t in net.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> bool:
        if step == self.last:
            return False
        self.last = step
        live = self._state(self.encoder)
        for d, net in zip(self.decays, self.copies):
            torch._foreach_lerp_(self._state(net), live, 1.0 - d)
        return False  # never asks the run to stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.0, help="minutes of training (0: --epochs)")
    ap.add_argument("--epochs", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decays", default="0.99,0.999,0.9998")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    overrides: dict[str, Any] = {"eval.monitor_every": 0, "eval.probe": False, "train.seed": a.seed,
                                 "train.run_dir": f"runs/levers/ema-s{a.seed}-{time.strftime('%Y%m%d-%H%M%S')}"}
    overrides["train.time_budget" if a.budget > 0 else "train.epochs"] = a.budget if a.budget > 0 else a.epochs
    cfg = apply_preset(overrides)
    ds = load_data(cfg.data)
    torch.manual_seed(a.seed)  # as pretrain seeds it: the same initial weights as the product's run
    encoder, _, _ = named_encoder(cfg, ds.image_shape, "cpu")  # the 28 px cnn: width 1 on any device
    decays = [float(d) for d in a.decays.split(",")]
    averages = Averages(encoder, decays)
    res = pretrain(cfg, dataset=ds, encoder=encoder, progress=False, log=lambda s: None, stop=averages.update)
    assert res.model is not None and res.model.encoder is encoder
    averages.update(res.steps)  # `stop` is asked after each step but the last: its weights join here
    spec = res.model.spec
    precision = res.precision or Precision("fp32", "not resolved")
    base = {"benchmark": "weight_average", "machine": describe(), "seed": a.seed, "budget_min": a.budget,
            "epochs": None if a.budget else a.epochs, "steps": res.steps, "train_s": round(res.train_seconds, 1), "precision": precision.name}
    for name, net in [("last", encoder)] + [(f"ema{d:g}", n) for d, n in zip(decays, averages.copies)]:
        record(a.out, {**base, "weights": name,
                       **quality(net.eval(), ds, spec.mean_tensor(), spec.std_tensor(), spec.image_size, precision)})


if __name__ == "__main__":
    main()
