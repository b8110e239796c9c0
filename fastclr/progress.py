"""A dependency-free progress line: step, loss, contrastive accuracy, images/s and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(s: float) -> str:
    """7.0 -> '0:07', 3725 -> '1:02:05'."""
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Rewrites one line on a terminal; prints a line every `every` seconds otherwise."""

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, every: float = 30.0, enabled: bool = True,
                 unit: str = "step"):
        self.total, self.start, self.unit = total, start, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._last_print = 0.0

    def update(self, step: int, text: str) -> None:
        """Show progress after `step` steps; `text` holds the metrics."""
        if not self.enabled:
            return
        now = time.perf_counter()
        done = step - self.start
        eta = (now - self.t0) / max(done, 1) * (self.total - step)
        line = f"{self.unit} {step}/{self.total} {text} eta {format_seconds(eta)}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(100))
            self.stream.flush()
        elif now - self._last_print >= self.every or step >= self.total:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        """End the progress line."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
