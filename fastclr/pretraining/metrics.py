"""What the loop keeps of each step between log steps, on the device so a step never waits for it:
the metrics summed over the window, and the health of the run (the first non-finite step)."""

from __future__ import annotations

from pathlib import Path

import torch

from fastclr.checkpoint import list_checkpoints
from fastclr.config import Config
from fastclr.errors import FastclrError
from fastclr.pretraining.step import StepResult
from fastclr.scaleout.distributed import DistContext, all_reduce

MAX_SKIP_STREAK = 30
"""Updates skipped in a row by loss scaling before the run stops: each halves the scale, so by
then it has fallen 2^30-fold and the gradients are not overflowing but broken."""


class NonFiniteLoss(FastclrError):
    """The loss or gradient became NaN/inf."""


class Health:
    """The first step (1-based, as the logs count) whose loss or gradient was non-finite; -1: none.

    Under loss scaling (fp16) an overflowing gradient is an expected, skipped step; a non-finite
    loss, or MAX_SKIP_STREAK skipped steps in a row, is not."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.tensor(-1, device=device)
        self.skip_streak = torch.zeros((), device=device)

    def update(self, out: StepResult, step: int) -> None:
        """Record step `step` (0-based) without waiting for the device."""
        self.skip_streak = (self.skip_streak + 1) * out.skipped
        finite = (torch.isfinite(out.loss) & (torch.isfinite(out.grad_norm) | (out.skipped > 0))
                  & (self.skip_streak < MAX_SKIP_STREAK))
        self.first_bad = torch.where((~finite) & (self.first_bad < 0), step + 1, self.first_bad)

    def agree(self, stop_vote: bool, ctx: DistContext, step_s: float = 0.0) -> tuple[bool, float]:
        """Under several processes: take the earliest bad step of any rank, and return whether any
        rank votes to stop and the slowest rank's seconds a step (`step_s`: this rank's), in one
        collective."""
        never = torch.iinfo(torch.long).max
        device = self.first_bad.device
        mine = torch.stack([torch.where(self.first_bad < 0, never, self.first_bad),
                            torch.tensor(-int(stop_vote), device=device),
                            torch.tensor(-round(step_s * 1e6), device=device)])
        low = all_reduce(mine, ctx, "min")  # (3,)
        self.first_bad = torch.where(low[0] == never, -1, low[0])
        return bool(low[1] < 0), -int(low[2]) / 1e6

    def check(self, cfg: Config, run_dir: Path) -> None:
        """Raise NonFiniteLoss (naming the step and what to try) if any step was bad; waits for the device."""
        bad = int(self.first_bad)
        if bad >= 0:
            kept = list_checkpoints(run_dir)
            # Before the first checkpoint there is nothing to resume (--resume refused it): the run starts over
            kept_and_then = (f"the last good checkpoint, {kept[-1].name} in {run_dir}, is kept", "then resume with "
                             f"--resume {run_dir} --allow-config-change") if kept else \
                (f"no checkpoint of {run_dir} was written yet", "then run the command again with them (the run starts "
                 "over)")
            raise NonFiniteLoss(
                f"non-finite loss or gradient at step {bad}; {kept_and_then[0]}. Try a higher temperature (now "
                f"{cfg.train.temperature}), a lower learning rate (now {cfg.optim.lr}) or --precision fp32 (now "
                f"{cfg.train.precision}), {kept_and_then[1]}")


class MetricsWindow:
    """Step metrics summed on the device since the last log step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, out: StepResult) -> None:
        """Add one step's loss, gradient norm (0 for a skipped step), skip flag and contrastive metrics."""
        grad_norm = torch.where(out.skipped > 0, torch.zeros_like(out.grad_norm), out.grad_norm)
        for k, v in {"loss": out.loss, "grad_norm": grad_norm, "skipped": out.skipped, **out.metrics}.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.steps += 1

    def close(self, ctx: DistContext) -> dict[str, float]:
        """The window's means (averaged over ranks: each rank's loss is the mean over its anchors, so
        the average is the global batch's), `skipped` as a count of steps, `grad_norm` over the steps
        not skipped; then start a new window."""
        sums = self.sums
        if ctx.active and sums:
            keys = sorted(sums)
            total = all_reduce(torch.stack([sums[k].float() for k in keys]), ctx, "sum") / ctx.world_size
            sums = dict(zip(keys, total.unbind()))
        rec = {k: float(v) / max(self.steps, 1) for k, v in sums.items()}
        if "skipped" in rec:
            rec["skipped"] = round(rec["skipped"] * self.steps)
            # The mean norm of the updates applied (a skipped step's is not finite and added 0);
            # a window of skipped steps only has none.
            applied = self.steps - rec["skipped"]
            if applied > 0:
                rec["grad_norm"] = float(sums["grad_norm"]) / applied
            else:
                del rec["grad_norm"]
        self.sums, self.steps = {}, 0
        return rec
