"""Batch-invariant steps: each sequence of a batch keeps the neurons it would keep alone.

Under ``EngineConfig.batch_invariant`` (the default) a sequence's neurons are ranked and cut from its own
scores; the predictor asks for the union of the batch's cuts, so a layer's bundles make one trip up the
tiers whatever the number of sequences that need them (the bytes grow with the union, not with the batch);
and each sequence's FFN computes over its own cut only, through the very call it would make alone
(``row_view``). Attention and the LM head run per sequence too: the C kernels give a row the same bits
whatever else they compute, torch's batched products do not. A request's greedy tokens are then the
same alone and in any batch. ``batch_invariant=False`` shares one cut (ranked by the largest score any
sequence gives) and batched products: fewer bytes and fewer passes over the weights per step, at the
price of a text that depends on its neighbours.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from m2cache.actors.messages import WeightsReady
from m2cache.actors.precisions import served_at

Cut = dict[str, np.ndarray]  # per precision, ascending neuron ids


@dataclass(frozen=True, slots=True)
class RowCuts:
    """A batch-invariant layer request, cut on the compute thread (the event loop only routes it)."""

    union: Cut  # what the batch fetches
    cuts: tuple[Cut, ...]  # each sequence's own


def split_rows(policy: Any, layer: int, orders: list[np.ndarray | None]) -> RowCuts:
    """Each sequence's ranking cut by the policy's shares, and the union the batch fetches (per precision:
    a neuron one sequence keeps at FP16 and another at INT4 is fetched at both)."""
    cuts = tuple(policy.split(layer, order) for order in orders)
    if len(cuts) == 1:
        return RowCuts(cuts[0], cuts)
    union = {}
    for p in cuts[0]:
        held = np.zeros(policy.num_neurons, dtype=bool)  # O(F + kept), where sorting unions is O(kept log kept)
        for c in cuts:
            held[c[p]] = True
        union[p] = np.flatnonzero(held)
    return RowCuts(union, cuts)


def row_view(ready: WeightsReady, cut: Cut) -> WeightsReady:
    """``ready`` restricted to one sequence's ``cut``: its neurons' slots (or DRAM rows), per precision in
    the order ``ready`` serves them and ascending by id, exactly what ``ready`` would hold had the sequence
    run alone, so its FFN makes the same call."""
    served = ready.ids
    assert served is not None, "a batch-invariant step needs the served neuron ids"
    mine: dict[str, list[np.ndarray]] = {q: [] for q in served}
    for p, wanted in cut.items():
        left = wanted
        for q in served_at(p):
            if q not in served or not left.size:
                continue
            hit = np.isin(left, served[q], assume_unique=True)
            if hit.any():
                mine[q].append(left[hit])
                left = left[~hit]
        if left.size:
            raise RuntimeError(f"layer {ready.layer}: {left.size} neurons of a sequence's {p} cut were not served; "
                               "the batch's union must cover every sequence's cut")
    ids: dict[str, np.ndarray] = {}
    slots: dict[str, torch.Tensor] = {}
    direct: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = {} if ready.direct is not None else None
    for q, parts in mine.items():
        own = np.sort(np.concatenate(parts)) if len(parts) > 1 else parts[0] if parts else np.empty(0, np.int64)
        pos = torch.from_numpy(np.searchsorted(served[q], own))
        ids[q] = own
        if direct is not None:
            assert ready.direct is not None
            src, rows = ready.direct[q]
            direct[q] = (src, pos if rows is None else rows[pos])
        else:
            slots[q] = ready.slots[q][pos]
    return dataclasses.replace(ready, slots=slots, direct=direct, ids=ids, rows=None)
