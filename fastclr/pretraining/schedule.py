"""Learning-rate schedule and batch-size scaling, as pure functions."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """The peak learning rate for a global batch size.

    linear: base_lr * B / 256 (Goyal et al. 2017; SimCLR uses 0.3 * B / 256 with LARS);
    sqrt: base_lr * sqrt(B) (SimCLR appendix B.1: 0.075 * sqrt(B), better for small B / long runs);
    none: base_lr.
    """
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr_scaling {rule!r}; choose linear, sqrt or none")


def decay_progress(step: int, total_steps: int, warmup_steps: int, anchor: tuple[int, float] | None = None) -> float:
    """How far the cosine has gone at `step` (0 at the end of the warm-up, 1 at `total_steps`):
    linear in the step from `anchor` = (step, progress there) on, (warmup_steps, 0) when None.
    A time budget re-anchors where a refit changes the run's length, so the learning rate goes on
    falling from where it was to the new end instead of following a cosine drawn from the warm-up
    to it, which rises when the run is lengthened."""
    start, done = anchor if anchor is not None else (warmup_steps, 0.0)
    return min(1.0, done + (1.0 - done) * (step - start) / max(1, total_steps - start))


def ramp_fraction(step: int, warmup_steps: int, ramp: tuple[int, float] | None = None) -> float:
    """The warm-up's share of the peak at `step` < `warmup_steps`: (step + 1) / warmup_steps, or,
    from `ramp` = (step, share there) on, linear from that share to 1 at `warmup_steps`
    (`shortened_warmup`)."""
    if ramp is None:
        return (step + 1) / warmup_steps
    start, done = ramp
    return done + (1.0 - done) * (step - start) / max(1, warmup_steps - start)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_ratio: float = 0.0,
          anchor: tuple[int, float] | None = None, ramp: tuple[int, float] | None = None) -> float:
    """Linear warmup from ~0 to `peak_lr` over `warmup_steps`, then cosine decay to
    `peak_lr * min_ratio` at `total_steps` (per step, as in SimCLR); `anchor`: see `decay_progress`,
    `ramp`: see `ramp_fraction`."""
    if step < warmup_steps:
        return peak_lr * ramp_fraction(step, warmup_steps, ramp)
    progress = decay_progress(step, total_steps, warmup_steps, anchor)
    floor = peak_lr * min_ratio
    return floor + (peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_for(warmup_steps: int, total_steps: int) -> int:
    """The warm-up a run of `total_steps` gets: the configured one, unless it is not shorter than
    the run (few epochs of small data, or a time budget that fits few steps on a slow machine),
    which would never reach the peak learning rate: then a tenth of the run."""
    return max(1, total_steps // 10) if warmup_steps >= total_steps >= 1 else warmup_steps


def shortened_warmup(step: int, warmup_steps: int, total_steps: int,
                     ramp: tuple[int, float] | None = None) -> tuple[int, tuple[int, float] | None]:
    """The warm-up (its last step + 1, and its `ramp`) of a run whose length a time budget has just
    fitted at `step` to `total_steps`, not more than its `warmup_steps`: a tenth of the run
    (`warmup_for`), or a tenth of the steps left where that ends later. A ramp already under
    way goes on from the share of the peak it has reached: ending it where the run's tenth has
    passed would take the learning rate from that share to the cosine's top in one step (16% ->
    93% of the peak at a 1-minute budget's first fit, step 15 of a 100-step warm-up)."""
    if step >= warmup_steps or warmup_steps < total_steps:
        return warmup_steps, ramp
    tenth = warmup_for(warmup_steps, total_steps)
    if step == 0:
        return tenth, None
    # never fewer steps than a tenth of those left: a tenth of the run one step ahead would jump
    end = max(tenth, step + max(1, math.ceil((total_steps - step) / 10)))
    return end, (step, ramp_fraction(step, warmup_steps, ramp))


# Below this many epochs a run is flagged as barely trained: the default Fashion-MNIST run probes
# 88.4% after 6 epochs against 89.9% after 32 (docs/benchmarks.md section 3), and a full-width
# ResNet-18 at 32 px fits half an epoch in 9.5 minutes on 2 CPU cores (section 6).
FEW_EPOCHS = 5.0


def epochs_text(epochs: float) -> str:
    """Epochs as the logs show them, cut (not rounded) to one decimal, or to one significant digit
    below 0.1: 4.96 epochs is not "5.0 epochs, too few", and 0.04 is not "0.0 epochs"."""
    digits = 1 if epochs >= 0.1 or epochs <= 0 else -math.floor(math.log10(epochs))
    return f"{math.floor(epochs * 10**digits) / 10**digits:.{digits}f}"


def few_epochs_warning(epochs: float, budget_min: float, ms_per_step: float, on_cpu: bool = True) -> str | None:
    """The one-line warning of a time budget that fits fewer than `FEW_EPOCHS` epochs, else None."""
    if epochs >= FEW_EPOCHS:
        return None
    shown = epochs_text(epochs)
    return (f"warning: only {shown} epochs fit in {budget_min:g} min at {ms_per_step:.0f} ms/step on this "
            f"machine, too few for SimCLR to learn much: give it more time (--time-budget) or a smaller encoder "
            f"(--width, --encoder cnn){' or a GPU' if on_cpu else ''}")


class TimeBudget:
    """The step count that fits a wall-clock budget, fitted early and refitted as the pace drifts.

    The first fit (at step `first_fit`) uses the pace of steps `pace_from`..`first_fit`, because
    the first steps pay one-off allocation and warm-up costs. Then `fit` is called again every
    `refit_every` steps and at epoch ends (`due`) with the pace measured since `pace_from`, and the
    cosine is stretched or shrunk to end on time: on a shared machine the pace drifts and stalls
    (CPU steal; docs/benchmarks.md shows a 9.5-minute budget overshooting by 34 s with one early
    fit, and a run ending 24 s early when a stall fell on its last epoch-end fit). Frequent refits
    also make the budget a cap: once spent, the run ends at the next refit. Before the first fit,
    a fit that would come too late for the budget at the pace so far comes at once (`overdue`).
    All times are the training loop's wall-clock seconds, the same clock as the logs: steps,
    checkpoints and kNN monitor passes alike, so a budget of 9.5 minutes is 9.5 minutes of the loop.
    """

    def __init__(self, budget_s: float, pace_from: int = 5, first_fit: int = 15, refit_every: int = 25) -> None:
        if budget_s <= 0:
            raise ValueError("a time budget must be positive")
        self.budget_s = budget_s
        self.pace_from = pace_from
        self.first_fit = first_fit
        self.refit_every = refit_every
        self._mark_at = pace_from
        self._mark: tuple[int, float] = (0, 0.0)
        self._start = 0
        """The step this process started from: its first step pays one-off costs (a compile)."""
        self._after_first: tuple[int, float] | None = None
        """(step, training seconds) after this process's first step."""
        self.first_fit_at = first_fit
        """The step of this process's first fit (later for a resumed process, `resume_at`)."""

    def resume_at(self, step: int, mark: tuple[int, float] | None = None) -> None:
        """A resumed process measures its own pace from `pace_from` steps after `step`, and fits no
        earlier than `first_fit` steps after it: its first steps pay the one-off costs again, and it
        may run on another machine than the steps before. Until then its pace is the one since the
        checkpoint's `mark` (`mark`), as the process that wrote it measured it."""
        self._mark_at = step + self.pace_from
        self.first_fit_at = step + self.first_fit
        self._start, self._after_first = step, None
        if mark is not None:
            self._mark = (int(mark[0]), float(mark[1]))

    @property
    def mark(self) -> tuple[int, float]:
        """Where the pace is measured from: (step, training seconds there); a checkpoint keeps it."""
        return self._mark

    def due(self, step: int, total_steps: int, end_of_epoch: bool, fitted: bool = False) -> bool:
        """Whether the loop fits (the first fit, unless an earlier process of the run `fitted`) or
        refits the step count after `step`. A deterministic function of the step, so every rank of
        a distributed run agrees."""
        if step == self.first_fit_at and not fitted:
            return True
        return self.first_fit_at < step < total_steps and (end_of_epoch or step % self.refit_every == 0)

    @property
    def mark_at(self) -> int:
        """The step after which this process takes the pace's mark (`observe`)."""
        return self._mark_at

    def observe(self, step: int, train_seconds: float) -> None:
        """Call after every step; remembers where the steady-pace measurement starts."""
        if step == self._mark_at:
            self._mark = (step, train_seconds)
        if step == self._start + 1:
            self._after_first = (step, train_seconds)

    def pace(self, step: int, train_seconds: float) -> float:
        """Seconds per step since this process's mark; before it, since this process's first step
        (whose one-off costs, a compile, are no pace); at that step, since a resumed run's
        checkpoint mark, or step 0."""
        if self._mark[0] >= self._mark_at and step > self._mark[0]:
            s0, t0 = self._mark
        elif self._after_first is not None and step > self._after_first[0]:
            s0, t0 = self._after_first
        else:
            s0, t0 = self._mark if step > self._mark[0] else (0, 0.0)
        return max(train_seconds - t0, 1e-9) / max(step - s0, 1)

    def overdue(self, step: int, train_seconds: float) -> bool:
        """Whether the first fit, still ahead at `first_fit_at`, would come after the budget is spent
        at the pace since this process's first step (steps of many seconds: a ResNet on a laptop CPU,
        a kNN pass that took the budget); the loop then makes `step` its `first_fit_at`, so the budget
        caps a run from its second step (from its first when that step alone spent the budget)."""
        ahead = self.first_fit_at - step
        if ahead <= 0:
            return False
        if self._after_first is None or step <= self._after_first[0]:
            # This process's first step alone: what it cost (a torch.compile of minutes on a GPU) is no
            # pace, and taken as one it ended a 9.5-minute run after 2 steps; only a spent budget counts.
            return train_seconds >= self.budget_s
        return train_seconds + self.pace(step, train_seconds) * ahead > self.budget_s

    def fit(self, step: int, train_seconds: float, first: bool) -> int:
        """Total steps so that training ends at the budget at the current pace; never below `step`
        (a spent budget ends the run now), and one more step at a `first` fit made at the process's
        first step (a refit a resumed process owes, before its own first fit, is a refit: it may end
        the run)."""
        left = self.budget_s - train_seconds
        extra = int(left / self.pace(step, train_seconds)) if left > 0 else 0
        # One more step where the first fit comes at the process's first step (it alone spent the
        # budget); a fit after it grants what the budget holds, which may be none.
        return step + (max(1, extra) if first and step <= self._start + 1 else extra)
