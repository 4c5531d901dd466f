"""The predictor: which neurons a layer needs this step, and at which precision — scored, ranked and cut by
the policy on the executor's compute thread.

The design draws the predictor as an actor of its own. Here it is the executor's, for a data reason: its input
is the hidden state the layer before has just produced on the compute thread (and on a split store the gate
activations that score the neurons are the very ones that layer's FFN then uses), so predicting anywhere else
would add a thread hop and a message to every layer of every token, costing more than the prediction itself
on the demo model. Each of the executor's layer jobs ends with this predictor's choice, which the executor
sends to the HBM manager as that layer's ``NeuronRequest``. Its figures (requests, neurons kept, decode bytes
asked for) are kept here; its spans are the trace's ``predictor`` lane, on the compute thread.

Prefill is dense: a long prompt activates nearly every neuron, so it asks for every neuron at FP16 — unless
``dense_prefill`` is off (under a tight memory limit), when prefill takes the policy's split too. What a step
asks for (``StepPlan.predict``) is decided once per step.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from m2cache.actors.rows import Cut, split_rows
from m2cache.model.policy import Policy

Choice = tuple[Cut, tuple[Cut, ...] | None]  # ids per precision (ascending), and batch-invariant each row's own cut


class Predictor:
    """Owned by the executor; ``choose`` runs on its compute thread."""

    def __init__(self, policy: Policy, ffn: Any, bundle_bytes: dict[str, int], recorder, *, invariant: bool) -> None:
        self.policy, self.ffn, self.bundle_bytes, self.recorder = policy, ffn, bundle_bytes, recorder
        self.invariant = invariant  # each sequence its own cut (``rows.py``), the union fetched
        self._all = np.arange(policy.num_neurons, dtype=np.int64)
        self.kept = 0
        self.requests = 0
        self.decode_bytes = 0  # FFN bytes decode steps asked the tiers for (a batch's union, or its shared cut)

    def choose(self, how: str, layer: int, hs: list[torch.Tensor], step: int, *, decode: bool,
               keep: bool = True) -> Choice:
        """Layer ``layer``'s neurons from the sequences' FFN inputs ``hs`` (decode: each one row; a sparse prefill:
        every row of its chunk), by ``how`` (``StepPlan.predict``): ``dense`` every neuron at FP16, ``fixed`` the
        policy's cut without scores, ``scores`` the policy's cut of a ranking. ``keep``: a split store keeps the
        gate activations for the layer's FFN (not for a lookahead's rows, which are not its input)."""
        t0 = time.perf_counter_ns()
        rows = None
        if how == "dense":
            ids = {"fp16": self._all}
        elif how == "fixed":
            ids = self.policy.split(layer, None)
        elif self.invariant:  # one ranking per sequence, from its own rows alone
            cuts = split_rows(self.policy, layer,
                              [self.policy.rank(layer, sc) for sc in self.ffn.score_rows(layer, hs, keep)])
            ids, rows = cuts.union, cuts.cuts
        else:  # one for the batch, the largest score any row gives
            flat = [row for h in hs for row in h.split(1)] if any(h.shape[0] > 1 for h in hs) else hs
            ids = self.policy.split(layer, self.policy.rank(layer, self.ffn.score(layer, flat, keep)))
        self.requests += 1
        self.kept += sum(len(v) for v in ids.values())
        if decode:
            self.decode_bytes += sum(len(v) * self.bundle_bytes[p] for p, v in ids.items())
        self.recorder.add("predictor", "predict", t0, time.perf_counter_ns(), layer=layer, step=step)
        return ids, rows

    def stats(self) -> dict:
        return {"policy": self.policy.name, "requests": self.requests,
                "kept_per_layer": self.kept / self.requests if self.requests else 0.0, "decode_bytes": self.decode_bytes}
