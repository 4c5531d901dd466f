"""What a step computes, on the executor's compute thread: embedding, attention, the predictor's choice of
neurons, the FFN over the fetched neurons, the LM head and sampling (:class:`StepMath`, mixed into
:class:`m2cache.actors.executor.Executor`). It changes with the model's arithmetic; the executor's own module
changes with scheduling (admission, batching, chunked prefill, retries) and the message flow.

A step's path is decided once, at its start (``step_plan.StepPlan``, from the routes decided when the weights
were known and the step's batch); the methods here run what it says. A method here reads the executor's model,
predictor and tier state (``cfg``, ``res``, ``rope``, ``ffn``, ``predictor``, ``planner``, ``recorder``,
``step_no``) and never awaits: the executor hops to the compute thread once per layer and calls one of them.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from m2cache.actors.messages import WeightsReady
from m2cache.actors.predictor import Choice
from m2cache.actors.sequence import Sequence
from m2cache.actors.step_plan import StepPlan, layer_step
from m2cache.model.llama import (KVCache, LayerWeights, attend_as, attention_rows_torch, embed, ffn_residual,
                                 lm_head_as, lm_head_rows, rms_norm, rope_slice)
from m2cache.model.sampling import sample


class StepMath:
    """The compute-thread half of the executor (see the module's docstring)."""

    cfg: Any
    res: Any
    rope: Any
    ffn: Any
    predictor: Any
    planner: Any
    recorder: Any
    attention: Any
    compute_stream: Any
    dtype: torch.dtype
    device: torch.device
    step_no: int

    def _begin(self, batch: list[Sequence], tokens: list[list[int]], prefill: bool
               ) -> tuple[StepPlan, list[Choice | None]]:
        """The step's plan, attention 0, and the first layers' choices: layer 0's (and layer 1's, looking ahead)."""
        self.ffn.forget()
        with self._streams():
            t0 = time.perf_counter_ns()
            for seq in batch if prefill else ():  # zeroing the caches here, not on the event loop (first chunk)
                if seq.kv is None:
                    seq.kv = KVCache(self.cfg, self.dtype, self.device, capacity=len(seq.prompt) + seq.max_new_tokens)
            for seq, toks in zip(batch, tokens):
                ids = torch.as_tensor(toks, dtype=torch.long, device=self.device)
                seq.x = embed(self.cfg, self.res, ids)  # [T, D]
                assert seq.kv is not None
                seq.cos_sin = rope_slice(self.rope, seq.kv.length, len(toks), self.dtype)
            plan = self.planner.step([(s.kv.length, len(t)) for s, t in zip(batch, tokens)],  # type: ignore[union-attr]
                                     [len(s.prompt) for s in batch], prefill)
            choice = self._attend(batch, plan, 0, t0)
            if not plan.ahead:
                return plan, [choice]
            # looking ahead, attention 0 chose layer 1's neurons; layer 0's come from its own input
            own = self.predictor.choose(plan.predict, 0, [s.h for s in batch], self.step_no, decode=True)
            return plan, [own, choice]

    def _attend(self, batch: list[Sequence], plan: StepPlan, layer: int, t0: int) -> Choice | None:
        """Attention of `layer` per sequence, the FFN inputs, and the predictor's choice for the layer (looking
        ahead: for the layer after, None past the last)."""
        w = self._weights(layer)
        ls = plan.layers[layer]
        if ls is None:  # streamed projections: routed by the weights they arrived as
            ls = layer_step(self.planner.route(layer, w), plan.chunks, plan.alone)
        eps = self.cfg.rms_norm_eps
        if ls.paths is None:  # the projections as one product for the batch: the attention weights read once
            xs = attention_rows_torch(self.cfg, w, [s.x for s in batch], layer, [s.kv for s in batch],  # type: ignore[misc]
                                      [s.kv.length for s in batch], [s.cos_sin for s in batch])  # type: ignore[union-attr, misc]
            for seq, x in zip(batch, xs):
                seq.x, seq.h = x, rms_norm(x, w.ffn_norm, eps)
        else:  # each sequence as the dense reference computes it
            for seq, path in zip(batch, ls.paths):
                assert seq.kv is not None and seq.x is not None
                x, h = attend_as(path, self.cfg, w, seq.x, layer, seq.kv, seq.kv.length, seq.cos_sin, ls.fused)  # type: ignore[arg-type]
                seq.x, seq.h = x, h if h is not None else rms_norm(x, w.ffn_norm, eps)
        # steps run one at a time (``_schedule`` awaits each), so step_no is this attention's step
        self.recorder.add("executor", "attention", t0, time.perf_counter_ns(), layer=layer, step=self.step_no)
        if plan.ahead:  # the choice for layer + 1, from this layer's residual under that layer's FFN norm
            if layer + 1 >= self.cfg.num_layers:
                return None
            norm = self.res.layers[layer + 1].ffn_norm
            hs = [rms_norm(s.x, norm, eps) for s in batch]  # type: ignore[arg-type]
            return self.predictor.choose(plan.predict, layer + 1, hs, self.step_no, decode=True, keep=False)
        return self.predictor.choose(plan.predict, layer, [s.h for s in batch], self.step_no,  # type: ignore[misc]
                                     decode=not plan.prefill)

    def _weights(self, layer: int) -> LayerWeights:
        """The layer's resident weights; streamed projections are waited for here (a stall, recorded)."""
        w = self.res.layers[layer]
        if self.attention is None:
            return w
        t0 = time.perf_counter_ns()
        wqkv, wo = self.attention.weights(layer)
        self.recorder.add("executor", "attention_wait", t0, time.perf_counter_ns(), layer=layer, step=self.step_no)
        return dataclasses.replace(w, wqkv=wqkv, wo=wo)

    def _layer(self, batch: list[Sequence], plan: StepPlan, layer: int, ready: WeightsReady, step: int):
        """Layer ``layer``'s FFN, then attention of the next layer and its choice (after the last: the logits)."""
        with self._streams():
            if ready.copied is not None:  # the HBM manager's copies up, on its copy stream
                assert self.compute_stream is not None
                self.compute_stream.wait_event(ready.copied)
            t0 = time.perf_counter_ns()
            hs = [s.h for s in batch]
            assert all(h is not None for h in hs), "attention ran before this layer's FFN"
            if plan.ffn == "rows":  # each sequence over its own cut, as alone
                outs = self.ffn.each_row(hs, ready, plan.prefill)  # type: ignore[arg-type]
            elif plan.ffn == "batch":  # one product for the batch's rows: [sum T, D]
                out = self.ffn.compute(torch.cat(hs) if len(hs) > 1 else hs[0], ready, plan.prefill)  # type: ignore[arg-type]
                outs = out.split([h.shape[0] for h in hs])  # type: ignore[union-attr]
            else:  # exact: each sequence's product as it would run alone
                outs = self.ffn.each(hs, ready)  # type: ignore[arg-type]
            w = self.res.layers[layer]
            for seq, o in zip(batch, outs):
                seq.x = ffn_residual(self.cfg, w, seq.x, o)  # type: ignore[arg-type]
            t1 = time.perf_counter_ns()
            kind = "prefill" if plan.prefill else "ffn"
            self.recorder.add("executor", kind, t0, t1, layer=layer, step=step, flow=step * 1000 + layer)
            if layer + 1 < self.cfg.num_layers:
                return self._attend(batch, plan, layer + 1, t1)
            logits = self._lm_head(batch, plan)
            self.recorder.add("executor", "lm_head", t1, time.perf_counter_ns(), step=step)
            return logits

    def _lm_head(self, batch: list[Sequence], plan: StepPlan) -> list[torch.Tensor | None]:
        """Each sequence's logits of its last position ([V] float32, on the host); None for a prefill chunk
        before the prompt's last (no token follows it)."""
        for seq in batch:
            assert seq.kv is not None and seq.x is not None
            seq.kv.length += seq.x.shape[0]
        wanted = [s for s in batch if s.kv.length >= len(s.prompt)]  # type: ignore[union-attr]
        if plan.head == "each":
            logits = [lm_head_as(plan.head_kernel, self.cfg, self.res, s.x) for s in wanted]  # type: ignore[arg-type]
        elif wanted:
            last = torch.cat([s.x[-1:] for s in wanted])  # type: ignore[index]
            logits = list(lm_head_rows(self.cfg, self.res, last))
        got = {id(s): x.cpu() for s, x in zip(wanted, logits)} if wanted else {}
        for seq in batch:
            seq.x = seq.h = None
        return [got.get(id(s)) for s in batch]

    def _sample(self, batch: list[Sequence], logits: list[torch.Tensor | None]) -> list[int | None]:
        return [None if x is None else sample(x, s.temperature, s.top_p, s.generator,
                                              repetition_penalty=s.repetition_penalty, history=s.history)
                for s, x in zip(batch, logits)]

    def _streams(self):
        if self.compute_stream is None:
            return _NoStream()
        return torch.cuda.stream(self.compute_stream)


class _NoStream:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
