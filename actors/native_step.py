"""The executor's decode token in one native call, when the DRAM tier holds every layer it needs for good.

With whole layers of every precision the policy uses kept in DRAM (``TierPlan.fixed_keys`` covering the model:
the store fits the DRAM budget), the actors have nothing to do per layer: no neuron to plan, read or copy, no
layer to preload. The layer-by-layer step still hands every layer through them (a thread hop and several
event-loop turns a layer); here a token of one sequence is one job on the compute thread: one call of
``m2c_decode`` (``m2cache.model.native_decode``) for every layer and the LM head, with no Python between
layers. The actors keep reading, keeping and planning ahead where the weights are not all there: until every
entry is loaded, and for batches of several sequences, steps take the layer-by-layer path.

The executor learns that every entry is in by one message: its ``KeptLayers`` request, sent at its start, which
the DRAM manager answers with the entries' tensors once it holds them all (kept for good: never evicted, so
they serve every later token without a message). The figures stay what the layer-by-layer step would count:
each layer's precisions served by DRAM (``served``, added to the DRAM manager's by the engine's figures), the
predictor's kept neurons; with a trace, each layer's ``attention``, ``select`` (gate scores and choice) and
``ffn`` spans from the call's own clock.
"""
from __future__ import annotations

import asyncio
import time

import torch

from m2cache.model.llama import rope_slice
from m2cache.model.native_decode import STAMPS, NativeDecoder, applies


class NativeSteps:
    def __init__(self, decoder: NativeDecoder, *, predictor, recorder, embed, rope, dtype: torch.dtype) -> None:
        self.decoder, self.predictor, self.recorder = decoder, predictor, recorder
        self.embed, self.rope, self.dtype = embed, rope, dtype
        policy, n = decoder.policy, decoder.n
        self.needed = [(L, p) for L in range(n) for p in decoder.used if policy.counts(L)[p]]
        self.kept = sum(sum(policy.counts(L).values()) for L in range(n))
        self.tokens = 0  # decode tokens computed here
        self.served = 0  # DRAM entries the tokens computed here read (what the DRAM manager would have served)
        self.in_dram: asyncio.Future | None = None  # the DRAM manager's answer to ``KeptLayers(needed)``
        self._tables: list[dict[str, torch.Tensor]] | None = None

    @classmethod
    def build(cls, *, cfg, res, policy, store, dtype: torch.dtype, device: torch.device,
              fixed_keys: tuple[tuple[int, str], ...], predictor, recorder, embed, rope) -> "NativeSteps | None":
        """The native step for this engine, or None where it never applies (the model or policy outside what
        the call takes, or a DRAM tier that does not keep every entry the policy uses for good)."""
        if not applies(cfg, res, policy, device=device, dtype=dtype, parts=store.parts):
            return None
        decoder = NativeDecoder(cfg, res, policy, parts=store.parts, groups=store.groups,
                                bundle_bytes={p: store.bundle_bytes(p) for p in store.geometry}, dtype=dtype)
        steps = cls(decoder, predictor=predictor, recorder=recorder, embed=embed, rope=rope, dtype=dtype)
        return steps if set(steps.needed) <= set(fixed_keys) else None

    def tables(self) -> list[dict[str, torch.Tensor]] | None:
        """On the event loop: every layer's whole-layer tensors per precision once the DRAM manager has answered
        that it holds them all (else None), counted as the layer-by-layer step's serves and requests would be."""
        if self._tables is None:
            answer = self.in_dram
            if answer is None or not answer.done() or answer.cancelled() or answer.exception() is not None:
                return None
            held = answer.result()
            self._tables = [{} for _ in range(self.decoder.n)]
            for L, p in self.needed:
                self._tables[L][p] = held[L, p]
        self.served += len(self.needed)
        self.predictor.requests += self.decoder.n
        self.predictor.kept += self.kept
        return self._tables

    def token(self, seq, tables: list[dict[str, torch.Tensor]], step: int) -> list[torch.Tensor]:
        """On the compute thread: the sequence's next token's logits ([V] float32), its KV cache moved on."""
        assert seq.kv is not None and seq.last is not None, "a decode step follows the prefill's token"
        self.decoder.bind(tables)
        t0 = time.perf_counter_ns()
        x = self.embed[torch.as_tensor([int(seq.last)], dtype=torch.long)]
        cos, sin = rope_slice(self.rope, seq.kv.length, 1, self.dtype)
        timed = self.recorder.enabled
        logits = self.decoder.step(x, seq.kv, cos, sin, timed=timed)
        seq.kv.length += 1
        seq.x = seq.h = None
        self.tokens += 1
        if timed:
            self._spans(step, t0)
        return [logits]

    def _spans(self, step: int, t0: int) -> None:
        st = self.decoder.stamps.tolist()
        n = self.decoder.n
        self.recorder.add("executor", "embed", t0, st[0], step=step)
        for L in range(n):
            a, b, c, d = st[STAMPS * L:STAMPS * (L + 1)]
            self.recorder.add("executor", "attention", a, b, layer=L, step=step)
            self.recorder.add("executor", "select", b, c, layer=L, step=step)
            self.recorder.add("executor", "ffn", c, d, layer=L, step=step, flow=step * 1000 + L)
        self.recorder.add("executor", "lm_head", st[STAMPS * n], st[STAMPS * n + 1], step=step)
