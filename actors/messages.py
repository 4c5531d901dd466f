"""Messages between the actors: small frozen slotted dataclasses, one per layer and step, ids as arrays.

Request/reply pairs carry an ``asyncio.Future`` that the receiver completes (with a result, or a
typed exception from ``m2cache.errors`` when the data could not be had), so a failure reaches exactly
the requests that depended on it. A request answered another way (``Submit``: through the sequence's
output) says in ``refuse`` how it is failed.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from m2cache.actors.sequence import Sequence, finish


@dataclass(frozen=True, slots=True)
class Submit:
    """Engine -> executor: a new request; its tokens, or its error, come out of ``seq.out``."""

    seq: Sequence

    def refuse(self, exc: BaseException) -> None:
        finish(self.seq, exc)


@dataclass(frozen=True, slots=True)
class Cancel:
    """Engine -> executor: the request's consumer is gone (``seq.cancelled`` is set, as a future is cancelled
    by whoever waits on it); the executor drops it at its next pass."""

    seq: Sequence


@dataclass(frozen=True, slots=True)
class Resume:
    """Engine -> executor: the consumer took a token from a full output: the sequence may step again."""

    seq: Sequence


@dataclass(frozen=True, slots=True)
class NeuronRequest:
    """Executor -> HBM manager: the ids this layer needs at each precision, each sorted ascending (the predictor's
    choice, made on the compute thread)."""

    layer: int
    step: int
    ids: dict[str, np.ndarray]
    reply: asyncio.Future  # -> WeightsReady
    ahead: bool = False  # the layer before still computes from its slots: they stay
    rows: tuple[dict[str, np.ndarray], ...] | None = None  # batch-invariant: each sequence's own cut (ids the union)


@dataclass(frozen=True, slots=True)
class Copy:
    """Bundles to write into device slots: ``pool[dst_slots] = src[rows]`` (rows None: all of src)."""

    precision: str
    dst_slots: torch.Tensor  # int64 [n]
    src: torch.Tensor  # uint8 [m, bundle_bytes], in DRAM (pinned on CUDA)
    rows: torch.Tensor | None  # int64 [n] rows of src, or None


@dataclass(frozen=True, slots=True)
class WeightsReady:
    """HBM manager -> executor: where this layer's neurons sit. The HBM manager made the copies up before
    answering (``copies`` lists them; ``copied``: on CUDA the event the compute stream waits on first)."""

    layer: int
    step: int
    slots: dict[str, torch.Tensor]  # per precision, int64 slots in ascending neuron-id order
    copies: tuple[Copy, ...]
    release: tuple = ()  # DRAM keys pinned for the copies (and direct rows); released after the layer computed
    copy_bytes: int = 0
    staged_bytes: int = 0  # the DRAM manager's staging held for these copies (from FetchReply)
    # CPU, whole layers preloaded: compute straight from DRAM, per precision (tensor, rows or None)
    direct: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
    # per precision, the neuron ids of the slots (or the direct rows), in their order
    ids: dict[str, np.ndarray] | None = None
    copied: Any = None  # torch.cuda.Event of the copies, or None
    rows: tuple[dict[str, np.ndarray], ...] | None = None  # batch-invariant: each sequence's own cut (``rows.py``)


@dataclass(frozen=True, slots=True)
class Fetch:
    """HBM manager -> DRAM manager: bundles missing from the device, per precision."""

    layer: int
    step: int
    ids: dict[str, np.ndarray]
    reply: asyncio.Future  # -> FetchReply
    # INT8 ids of a layer whose INT8 entry DRAM does not hold but whose FP16 entry it keeps are served
    # from the FP16 rows (no read, more exact); only the CPU computing from DRAM asks for it
    upgrade: bool = False
    # batch-invariant: upgrade only by the plan (an FP16 entry kept for good), never by what happens to be held
    # or loading, so a sequence's precisions never hang on timing or on its neighbours
    planned_only: bool = False


@dataclass(frozen=True, slots=True)
class FetchReply:
    sources: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # precision -> (DRAM tensor, rows or None)
    release: tuple = ()  # keys pinned until the executor applied the copies
    staged_bytes: int = 0  # transient bytes of neuron-level reads held until then
    ids: dict[str, np.ndarray] | None = None  # the ids per precision as served, where they moved (``Fetch.upgrade``)


@dataclass(frozen=True, slots=True)
class Progress:
    """Executor -> DRAM manager: the executor reached ``layer``; preload what follows."""

    layer: int
    step: int


@dataclass(frozen=True, slots=True)
class Release:
    """Executor (or HBM manager, for an answer never used) -> DRAM manager: these pinned entries and
    staged bytes are no longer read."""

    keys: tuple
    staged_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """DRAM manager -> SSD reader: a whole layer (ids None) or some neurons at one precision."""

    layer: int
    precision: str
    ids: np.ndarray | None
    reply: asyncio.Future  # -> torch.Tensor uint8 [n, bundle_bytes]
    kind: str = "read_layer"
    step: int = -1  # the executor step it is for (a preload: the step that will use it), for the trace


@dataclass(frozen=True, slots=True)
class KeptLayers:
    """Executor -> DRAM manager, once: answered with the tensor of every listed ``(layer, precision)`` entry
    once DRAM holds them all. They are entries kept for good (never evicted), so the native decode step
    (``native_step``) reads them from then on without a message a layer."""

    keys: tuple[tuple[int, str], ...]
    reply: asyncio.Future  # -> dict[(layer, precision), torch.Tensor]


@dataclass(frozen=True, slots=True)
class Stop:
    """Ends an actor's loop after the messages before it (pykka-style: stop is ordered)."""

    reason: str = "close"
