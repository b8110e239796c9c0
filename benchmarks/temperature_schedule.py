"""`levers.py` with a temperature that follows a cosine instead of staying fixed: a recipe lever
measured, not a fastclr option (docs/benchmarks.md section 3, "A temperature schedule").

Kukleva et al. 2023 (ICLR, "Temperature schedules for self-supervised contrastive methods on
long-tail data") move t of NT-Xent along t(p) = t_min + (t_max - t_min) (1 + cos(2 pi c p)) / 2,
p the run's progress: a high t weights the loss towards group-wise structure, a low one towards
telling instances apart, and the schedule alternates the two (their t_min 0.1, t_max 1.0). Here
p is step / total steps, the same progress as the learning rate's cosine (a time budget refits
the total as the pace drifts), t_min is the arm's `train.temperature`, and two more keys in an
arm's spec set the rest: `tmax=` (t_max; absent or 0: the fixed temperature, `levers.py` itself)
and `cycles=` (c, whole or half periods over the run; default 1). Everything else is `levers.py`,
and the schedule is set on the step before each update, as the learning rate is.

    python benchmarks/temperature_schedule.py --budget 9.5 --seeds 0 --out ts.jsonl \
        "base:" "ts0.1-1x1:train.temperature=0.1,tmax=1.0,cycles=1"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from fastclr.pretraining import setup

import levers


def temperature_at(step: int, total_steps: int, t_min: float, t_max: float, cycles: float) -> float:
    """t at `step` of `total_steps`: t_max at the start, t_min half a period later."""
    p = min(1.0, step / max(1, total_steps))
    return t_min + (t_max - t_min) * 0.5 * (1 + math.cos(2 * math.pi * cycles * p))


def split_spec(spec: str) -> tuple[str, float, float]:
    """The `levers.py` spec without the schedule's keys, and (t_max, cycles)."""
    items = dict(levers.spec_items(spec))
    t_max, cycles = float(items.pop("tmax", 0.0)), float(items.pop("cycles", 1.0))
    return ",".join(f"{k}={v}" for k, v in items.items()), t_max, cycles


@contextmanager
def scheduled(t_max: float, cycles: float) -> Iterator[None]:
    """Within: every run's step gets t from `temperature_at` before each update (its
    `train.temperature` as t_min). Plain NT-Xent only (the step's own temperature)."""
    original: Callable[[setup.Run], float] = setup.Run.set_lr

    def set_lr_and_temperature(self: setup.Run) -> float:
        lr = original(self)
        s, t_min = self.state, self.cfg.train.temperature
        if self.train_step.objective is not None:
            raise SystemExit("temperature_schedule.py schedules plain two-view NT-Xent only (no --views, --supcon, "
                             "--learn-temperature, --queue or --nn-support)")
        if t_max < t_min:
            raise SystemExit(f"tmax={t_max} is below train.temperature = {t_min}, the schedule's lower end; raise tmax")
        self.train_step.temperature = temperature_at(s.step, s.total_steps, t_min, t_max, cycles)
        return lr

    setup.Run.set_lr = set_lr_and_temperature
    try:
        yield
    finally:
        setup.Run.set_lr = original


def schedule_arm(spec: str) -> tuple[str, Callable[[], AbstractContextManager[object]], dict[str, Any]]:
    """`levers.Arm`: an arm with `tmax=` trains within `scheduled` and records t_max and cycles."""
    spec, t_max, cycles = split_spec(spec)
    if t_max <= 0:
        return spec, nullcontext, {}
    return spec, lambda: scheduled(t_max, cycles), {"t_max": t_max, "cycles": cycles}


if __name__ == "__main__":
    levers.main(arm=schedule_arm, doc=__doc__)
