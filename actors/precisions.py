"""Serving a lower precision from a higher copy, written once for both tiers that do it.

A neuron asked for at a lower precision and held at a higher one is served from there: more exact, and no
bytes moved. The HBM manager finds such neurons in the slots it holds (``HBMManager._upgrade``); the DRAM
manager serves a layer's INT8 neurons from the whole FP16 entry it keeps (``DRAMManager._upgraded``). Each
decides what it holds; ``serve_higher`` moves the ids. ``served_at`` is the other side of it: where a neuron
asked for at one precision may have been served.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from m2cache.formats.shares import PRECISION_ORDER

# (low, high, ids asked for at low) -> which of them are served at high (a bool mask), or None: none are
Finder = Callable[[str, str, np.ndarray], "np.ndarray | None"]


def serve_higher(ids: dict[str, np.ndarray], find: Finder) -> tuple[dict[str, np.ndarray], int]:
    """``ids`` (per precision, ascending) with every neuron ``find`` places at a higher precision moved there,
    the highest first; and how many moved. Each precision's ids stay ascending and unique; a precision
    asked for keeps its key even when all its neurons moved."""
    out = dict(ids)
    moved = 0
    for i, low in enumerate(PRECISION_ORDER):
        req = out.get(low)
        if req is None or not req.size:
            continue
        for high in PRECISION_ORDER[:i]:
            found = find(low, high, req)
            if found is None or not found.any():
                continue
            up = req[found]
            have = out.get(high)
            # a batch's union may ask for a neuron at both precisions: union1d keeps the ids unique and sorted
            out[high] = up if have is None or not have.size else np.union1d(have, up)
            req = req[~found]
            moved += int(up.size)
        out[low] = req
    return {p: v for p, v in out.items() if v.size or p in ids}, moved


def served_at(p: str) -> tuple[str, ...]:
    """Where a neuron asked for at ``p`` may be served: ``p``, then the precisions above it, nearest first
    (the DRAM tier serves INT8 neurons from an FP16 entry it keeps for good)."""
    i = PRECISION_ORDER.index(p)
    return (p, *reversed(PRECISION_ORDER[:i]))
