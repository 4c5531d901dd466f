"""Progress of long offline steps (convert, fetch, synth, train-predictor, tune, export-gguf) on stderr.

A thin callable over ``tqdm`` — the writers and loops report ``bar(done, total)`` and need not know tqdm.
"""
from __future__ import annotations

from typing import IO

from tqdm import tqdm


class ProgressBar:
    """``bar(done)`` or ``bar(done, total)``: moves the bar to ``done``; closes it once ``done >= total``."""

    def __init__(self, label: str, total: int, *, stream: IO[str] | None = None) -> None:
        self._bar = tqdm(total=max(total, 1), desc=label, file=stream, unit="step", leave=True,
                         dynamic_ncols=True)

    def __call__(self, done: int, total: int | None = None) -> None:
        if total and total != self._bar.total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)
        if done >= self._bar.total:
            self._bar.close()
