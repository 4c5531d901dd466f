"""What a step computes, on the executor's compute thread: embedding, attention, the neuron ranking, the
FFN over the fetched neurons, the LM head and sampling (:class:`StepMath`, mixed into
:class:`m2cache.actors.executor.Executor`). It changes with the model's arithmetic; the executor's own module
changes with scheduling (admission, batching, chunked prefill, retries) and the message flow.

A method here reads the executor's model, policy and tier state (``cfg``, ``res``, ``rope``, ``policy``,
``ffn``, ``recorder``, ``step_no``, the batching flags) and never awaits: the executor hops to the compute
thread once per layer and calls one of them.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from m2cache.actors.rows import split_rows
from m2cache.actors.sequence import Sequence
from m2cache.actors.messages import WeightsReady
from m2cache.model.llama import (KVCache, LayerWeights, attention_and_norm, attention_rows, embed, ffn_residual, lm_head,
                                 lm_head_rows, rms_norm, rope_slice)
from m2cache.model.sampling import sample


class StepMath:
    """The compute-thread half of the executor (see the module's docstring)."""

    cfg: Any
    res: Any
    rope: Any
    policy: Any
    ffn: Any
    recorder: Any
    attention: Any
    compute_stream: Any
    dtype: torch.dtype
    device: torch.device
    lookahead: bool
    dense_prefill: bool
    invariant: bool
    per_row: bool
    exact: bool
    step_no: int

    def _begin(self, batch: list[Sequence], tokens: list[list[int]], prefill: bool):
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
            order = self._attend(batch, 0, prefill, t0)
            if not (self.lookahead and not prefill):
                return [order]
            # looking ahead, attention 0 ranked layer 1; layer 0 is ranked from its own input
            return [self._rank(0, batch, [s.h for s in batch]), order]  # type: ignore[misc]

    def _attend(self, batch: list[Sequence], layer: int, prefill: bool, t0: int):
        """Attention of `layer` per sequence, the FFN inputs, and (when the policy scores) the batch's
        neuron ranking."""
        w = self._weights(layer)
        if len(batch) == 1 or self.per_row:  # as the dense reference computes it
            for seq in batch:
                assert seq.kv is not None and seq.x is not None
                seq.x, seq.h = attention_and_norm(self.cfg, w, seq.x, layer, seq.kv, seq.kv.length, seq.cos_sin)
        else:  # the projections as one product for the batch: the attention weights read once
            xs = attention_rows(self.cfg, w, [s.x for s in batch], layer, [s.kv for s in batch],  # type: ignore[misc]
                                [s.kv.length for s in batch], [s.cos_sin for s in batch])  # type: ignore[union-attr, misc]
            for seq, x in zip(batch, xs):
                seq.x, seq.h = x, rms_norm(x, w.ffn_norm, self.cfg.rms_norm_eps)
        order = None
        if self.lookahead and not prefill:  # the ranking of layer + 1, from this layer's residual
            order = self._rank_ahead(batch, layer + 1)
        elif self.policy.needs_scores and not (prefill and self.dense_prefill):
            order = self._rank(layer, batch, [s.h for s in batch])  # type: ignore[misc]
        # steps run one at a time (``_schedule`` awaits each), so step_no is this attention's step
        self.recorder.add("executor", "attention", t0, time.perf_counter_ns(), layer=layer, step=self.step_no)
        return order

    def _rank_ahead(self, batch: list[Sequence], layer: int):
        """Layer ``layer``'s ranking from the residual the previous layer has after its attention, under
        this layer's FFN norm (None past the last layer)."""
        if layer >= self.cfg.num_layers:
            return None
        norm = self.res.layers[layer].ffn_norm
        hs = [rms_norm(s.x, norm, self.cfg.rms_norm_eps) for s in batch]  # type: ignore[arg-type]
        return self._rank(layer, batch, hs, keep=False)

    def _rank(self, layer: int, batch: list[Sequence], hs: list[torch.Tensor], keep: bool = True):
        """The layer's neuron ranking from the sequences' FFN inputs ``hs`` (decode: each one row; a sparse
        prefill: every row of its chunk, the largest score kept): batch-invariant, one ranking per sequence
        from its own rows alone; else one for the batch, the largest score any row gives."""
        if self.invariant:  # cut here too: the event loop only routes the request
            orders = [self.policy.rank(layer, sc) for sc in self.ffn.score_rows(layer, hs, keep)]
            return split_rows(self.policy, layer, orders)
        rows = [row for h in hs for row in h.split(1)] if any(h.shape[0] > 1 for h in hs) else hs
        return self.policy.rank(layer, self.ffn.score(layer, rows, keep))

    def _weights(self, layer: int) -> LayerWeights:
        """The layer's resident weights; streamed projections are waited for here (a stall, recorded)."""
        w = self.res.layers[layer]
        if self.attention is None:
            return w
        t0 = time.perf_counter_ns()
        wqkv, wo = self.attention.weights(layer)
        self.recorder.add("executor", "attention_wait", t0, time.perf_counter_ns(), layer=layer, step=self.step_no)
        return dataclasses.replace(w, wqkv=wqkv, wo=wo)

    def _layer(self, batch: list[Sequence], layer: int, ready: WeightsReady, prefill: bool, step: int):
        with self._streams():
            if ready.copied is not None:  # the HBM manager's copies up, on its copy stream
                assert self.compute_stream is not None
                self.compute_stream.wait_event(ready.copied)
            t0 = time.perf_counter_ns()
            hs = [s.h for s in batch]
            assert all(h is not None for h in hs), "attention ran before this layer's FFN"
            if self.invariant:  # each sequence over its own cut, as alone
                outs = self.ffn.each_row(hs, ready, prefill)  # type: ignore[arg-type]
            elif len(batch) == 1 or not self.exact:  # one product for the batch's rows: [sum T, D]
                out = self.ffn.compute(torch.cat(hs) if len(hs) > 1 else hs[0], ready, prefill)  # type: ignore[arg-type]
                outs = out.split([h.shape[0] for h in hs])  # type: ignore[union-attr]
            else:  # exact: each sequence's product as it would run alone
                outs = self.ffn.each(hs, ready)  # type: ignore[arg-type]
            w = self.res.layers[layer]
            for seq, o in zip(batch, outs):
                seq.x = ffn_residual(self.cfg, w, seq.x, o)  # type: ignore[arg-type]
            t1 = time.perf_counter_ns()
            kind = "prefill" if prefill else "ffn"
            self.recorder.add("executor", kind, t0, t1, layer=layer, step=step, flow=step * 1000 + layer)
            if layer + 1 < self.cfg.num_layers:
                return self._attend(batch, layer + 1, prefill, t1)
            logits = self._lm_head(batch)
            self.recorder.add("executor", "lm_head", t1, time.perf_counter_ns(), step=step)
            return logits

    def _lm_head(self, batch: list[Sequence]) -> list[torch.Tensor | None]:
        """Each sequence's logits of its last position ([V] float32, on the host); None for a prefill chunk
        before the prompt's last (no token follows it)."""
        for seq in batch:
            assert seq.kv is not None and seq.x is not None
            seq.kv.length += seq.x.shape[0]
        wanted = [s for s in batch if s.kv.length >= len(s.prompt)]  # type: ignore[union-attr]
        if len(wanted) == 1 or self.per_row:
            logits = [lm_head(self.cfg, self.res, s.x) for s in wanted]  # type: ignore[arg-type]
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
