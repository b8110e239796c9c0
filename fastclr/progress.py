"""The one progress line of fastclr (training steps, files prepared): count, metrics, rate, ETA."""

from __future__ import annotations

import io
import os
import sys
import time
from typing import TextIO


def counted(n: int, noun: str) -> str:
    """1, 'step' -> '1 step'; 2, 'step' -> '2 steps' (regular plurals only)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_seconds(s: float) -> str:
    """7.0 -> '0:07', 3725 -> '1:02:05'."""
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Rewrites one line on a terminal (at most every `tty_every` seconds); prints a line every
    `every` seconds otherwise. With `rate_of` (e.g. "files") the line shows that rate per second."""

    def __init__(self, total: int | None, start: int = 0, stream: TextIO | None = None, every: float = 30.0, enabled: bool = True,
                 unit: str = "step", rate_of: str = "", tty_every: float = 0.0):
        self.total, self.start, self.unit, self.rate_of = total, start, unit, rate_of
        self.stream = stream or sys.stderr
        # A terminal that cannot move the cursor (TERM=dumb: Emacs' shell, some CI logs) gets lines, not rewrites
        self.tty = self.stream.isatty() and os.environ.get("TERM") != "dumb"
        self.every, self.tty_every = every, tty_every
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._last_print = -float("inf")

    def restart(self) -> None:
        """Count the rate from now (a run's loop begins: its set-up, a checkpoint's restore and the
        trackers' start are no steps, and were in every eta it showed)."""
        self.t0 = time.perf_counter()

    def update(self, step: int, text: str = "") -> None:
        """Show progress after `step` steps; `text` holds the metrics."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last_print < (self.tty_every if self.tty else self.every) and (self.total is None or step < self.total):
            return
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        # An unknown total (a time budget not fitted yet): the step alone, no eta.
        eta = "" if self.total is None else f"eta {format_seconds((self.total - step) / max(rate, 1e-9))}"
        head = " ".join(p for p in (f"{self.unit} {step}" + ("" if self.total is None else f"/{self.total}"),
                                    f"{self.rate_of}, {rate:.0f} {self.rate_of}/s" if self.rate_of else "") if p)
        width = self._width() if self.tty else 0
        if self.tty:
            # Within the terminal's width (a longer line wraps, and the next "\r" rewrites only the
            # wrapped row: a line left behind at each update), the metrics cut before the eta, the
            # rest of the row cleared (ESC [K).
            room = width - len(head) - len(eta) - 2
            text = text if len(text) <= room else text[:max(room - 1, 0)] + "\u2026" if room > 0 else ""
        line = " ".join(p for p in (head, text, eta) if p)
        self.stream.write("\r" + line[:width] + "\x1b[K" if self.tty else line + "\n")
        self.stream.flush()
        self._last_print = now

    def _width(self) -> int:
        """The columns the line may take on the terminal it is written to (its stream's own: stdout
        may be a pipe to tee while the progress goes to a terminal on stderr), 99 where unknown."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            columns = 100
        return max(columns - 1, 20)

    def close(self) -> None:
        """End the progress line."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
