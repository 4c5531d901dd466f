"""Predictor actor: turns a layer's neuron ranking into the ids to fetch at each precision.

The scoring itself (a small matmul) runs on the compute thread next to the layer that produced the
input, so no thread hop is spent on it; this actor applies the policy's shares and routes the request.
Prefill is dense: a long prompt activates nearly every neuron, so it asks for every neuron at FP16 —
unless ``dense_prefill`` is off (under a tight memory limit), when prefill takes the policy's split too.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from m2cache.actors.base import Actor, Channel
from m2cache.actors.messages import LayerInput, NeuronRequest
from m2cache.actors.rows import RowCuts
from m2cache.model.policy import Policy


class PredictorActor(Actor):
    name = "predictor"

    def __init__(self, policy: Policy, hbm: Channel, bundle_bytes: dict[str, int], recorder, inbox_size: int = 8,
                 dense_prefill: bool = True) -> None:
        super().__init__(inbox_size)
        self.policy, self.hbm, self.recorder, self.dense_prefill = policy, hbm, recorder, dense_prefill
        self.bundle_bytes = bundle_bytes
        self._all = np.arange(policy.num_neurons, dtype=np.int64)
        self.kept = 0
        self.requests = 0
        self.decode_bytes = 0  # FFN bytes decode steps asked the tiers for (a batch's union, or its shared cut)

    async def handle(self, msg: Any) -> None:
        if not isinstance(msg, LayerInput):
            raise RuntimeError(f"predictor got an unknown message {type(msg).__name__}")
        t0 = time.perf_counter_ns()
        dense = msg.prefill and self.dense_prefill
        rows = None
        if dense:
            ids = {"fp16": self._all}
        elif isinstance(msg.order, RowCuts):  # batch-invariant: each sequence's own cut, the union fetched
            ids, rows = msg.order.union, msg.order.cuts
        else:
            ids = self.policy.split(msg.layer, msg.order)
        self.requests += 1
        self.kept += sum(len(v) for v in ids.values())
        if not msg.prefill:
            self.decode_bytes += sum(len(v) * self.bundle_bytes[p] for p, v in ids.items())
        self.recorder.add("predictor", "predict", t0, time.perf_counter_ns(), layer=msg.layer, step=msg.step)
        await self.hbm.send(NeuronRequest(msg.layer, msg.step, ids, msg.reply, msg.ahead, rows))

    def stats(self) -> dict:
        return {**super().stats(), "policy": self.policy.name,
                "kept_per_layer": self.kept / self.requests if self.requests else 0.0, "decode_bytes": self.decode_bytes}
