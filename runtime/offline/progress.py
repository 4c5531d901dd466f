"""A small progress bar on stderr for long steps (convert, fetch, train-predictor)."""
from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, label: str, total: int, *, stream=None, width: int = 30) -> None:
        self.label, self.total, self.width = label, max(total, 1), width
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = -1

    def __call__(self, done: int, total: int | None = None) -> None:
        if total:
            self.total = total
        frac = min(done / self.total, 1.0)
        pct = int(frac * 100)
        if not self.tty and pct // 10 == self._last // 10 and done < self.total:
            return  # in logs, one line per 10%
        self._last = pct
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.monotonic() - self.t0
        line = f"{self.label} [{bar}] {done}/{self.total} {elapsed:.1f}s"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
