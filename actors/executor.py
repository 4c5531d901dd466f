"""Layer executor: runs sequences step by step, layer by layer, on one compute thread.

The event loop never computes: every tensor operation runs in ``compute`` (one worker thread; on
CUDA that thread launches kernels on the compute stream, after the event of the copies the HBM manager
made on its copy stream). One job per layer computes the FFN of layer L, then attention of layer L+1 and
its predictor scores, so a layer costs one thread hop (the message flow: ``m2cache.actors``).

Batched decode: the sequences past their prefill step together, up to ``max_batch`` of them (rotating
when more are ready), layer by layer, with one plan and one fetch per layer for all of them — the
neurons are ranked by the largest score any of them gives, so one trip of a layer's weights up the
tiers serves every waiting token. Attention runs per sequence over its own KV cache. Newcomers'
prefills run as their own step between decode steps (several newcomers together, up to
``PREFILL_ROWS`` prompt tokens), so they delay the running streams by one prefill and never freeze them. Under the exact ``dense-fp16`` policy every product is computed per sequence
as it would be alone (a batched matrix product rounds differently), so a request's tokens do not
depend on what it is batched with; other policies use batched products.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from m2cache.actors.base import Actor
from m2cache.actors.layer_ffn import LayerFFN, kernels_apply
from m2cache.actors.messages import LayerInput, Progress, Release, Stop, WeightsReady
from m2cache.actors.native_step import NativeSteps
from m2cache.errors import ConfigError, EngineClosedError, M2CacheError
from m2cache.model.llama import (KVCache, LayerWeights, attention_and_norm, attention_rows, lm_head, lm_head_rows, rms_norm,
                                 rope_slice)
from m2cache.storage.attention_stream import AttentionStream
from m2cache.model.sampling import sample

_DONE = object()  # end of a sequence's output


@dataclass(eq=False)
class Sequence:
    """One request: its prompt, sampling, KV cache and output channel (bounded)."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    out: asyncio.Queue
    kv: KVCache | None = None
    generated: int = 0
    last: int | None = None
    cancelled: bool = False
    x: torch.Tensor | None = None  # hidden state between jobs; only the compute thread touches it
    h: torch.Tensor | None = None
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None

    @property
    def prefilled(self) -> bool:
        return self.kv is not None


class Executor(Actor):
    name = "executor"

    def __init__(self, *, model, res, policy, predictor, dram, hbm, store, dtype: torch.dtype, device: torch.device,
                 recorder, stats, max_queued: int, max_pending: int = 1024, kernels: bool = True,
                 max_batch: int = 16, kv_tokens: int | None = None, dense_prefill: bool = True,
                 attention: AttentionStream | None = None, lookahead: bool = False, compute_stream=None,
                 native: bool = True) -> None:
        super().__init__(1)
        self.cfg, self.res, self.rope = model.cfg, res, model.rope
        self.policy, self.predictor, self.dram, self.hbm = policy, predictor, dram, hbm
        self.dtype, self.device, self.recorder, self.run_stats = dtype, device, recorder, stats
        self.pending: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.max_pending, self.max_queued, self.max_batch = max_pending, max_queued, max_batch
        self.kv_tokens = kv_tokens  # KV cache tokens the running sequences may hold together (None: no bound)
        self.dense_prefill = dense_prefill  # False: prefill is scored and split by the policy, as decode
        self.attention = attention  # resident="stream": each layer's projections, read ahead of their use
        self.exact = policy.exact  # products per sequence: tokens independent of the batch
        self.lookahead = lookahead and policy.needs_scores  # decode asks for layer L+1 before layer L computes
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # decode steps per batch size
        self.wake = asyncio.Event()
        self.stopping = False
        self.worker: ThreadPoolExecutor | None = None
        self.step_no = 0
        self.eos = set(self.cfg.eos_token_ids)
        self.compute_stream = compute_stream  # CUDA: the stream every kernel of the step runs on
        # decode FFNs through the C kernels: CPU, a gated FFN, and a policy that is not the exact
        # every-neuron-FP16 one (whose tokens must equal the dense model's, so it keeps torch's code)
        self.use_kernels = kernels and kernels_apply(policy, store, model.cfg, device)
        self.ffn = LayerFFN(store=store, policy=policy, pools=hbm.pools, act=model.act, dtype=dtype,
                            use_kernels=self.use_kernels, dense_prefill=dense_prefill)
        # a decode token of one sequence in one native call once DRAM holds every layer it needs (native_step)
        self.native = NativeSteps.build(cfg=model.cfg, res=res, policy=policy, store=store, dtype=dtype,
                                        device=device, dram=dram, predictor=predictor, recorder=recorder,
                                        embed=res.embed, rope=model.rope) \
            if native and self.use_kernels and hbm.direct_from_dram and attention is None and not self.lookahead else None

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        if self.stopping:
            raise EngineClosedError("the engine is closed; open a new one")
        if len(self.pending) >= self.max_pending:
            raise M2CacheError(f"{self.max_pending} requests are already waiting; try again later")
        if self.kv_tokens is not None and kv_need(seq) > self.kv_tokens:
            raise ConfigError(
                f"this request needs {kv_need(seq)} tokens of KV cache (a prompt of {len(seq.prompt)} + "
                f"max_new_tokens {seq.max_new_tokens}); the engine holds at most {self.kv_tokens} (kv_tokens): "
                "ask for fewer tokens, or give a larger kv_tokens")
        self.pending.append(seq)
        self.wake.set()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self.wake.set()

    # ---- the loop ------------------------------------------------------------------------------
    async def setup(self) -> None:
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="m2cache-compute")

    async def teardown(self, error: BaseException | None) -> None:
        exc = EngineClosedError(f"the engine closed ({error!r})" if error else "the engine closed")
        for seq in list(self.active) + list(self.pending):
            _finish(seq, exc)
        self.active.clear()
        self.pending.clear()
        if self.worker is not None:  # a job in flight finishes in a helper thread, not on the loop
            await asyncio.get_running_loop().run_in_executor(None, self.worker.shutdown, True)

    async def run(self) -> None:
        error: BaseException | None = None
        try:
            await self.setup()
            self.ready.set()
            await self._schedule()
        except BaseException as e:
            error = e
            raise
        finally:
            self.stopping = True
            await self.teardown(error)

    async def _schedule(self) -> None:
        turn, prefill_next = 0, True
        while True:
            while not self.inbox.empty():
                if isinstance(self.inbox.get_nowait(), Stop):
                    return
            while self.pending and self._kv_fits(self.pending[0]):  # in order: none overtakes a waiting one
                self.active.append(self.pending.popleft())
            self.active = [s for s in self.active if not self._drop_if_cancelled(s)]
            runnable = [s for s in self.active if s.out.qsize() < self.max_queued]
            if not runnable:
                self.wake.clear()
                waiter = asyncio.ensure_future(self.inbox.get())
                woken = asyncio.ensure_future(self.wake.wait())
                done, _ = await asyncio.wait({waiter, woken}, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if waiter in done:
                    if isinstance(waiter.result(), Stop):
                        return
                else:
                    waiter.cancel()
                    await asyncio.gather(waiter, woken, return_exceptions=True)
                continue
            newcomers = _prefill_batch([s for s in runnable if not s.prefilled], self.max_batch)
            decoding = [s for s in runnable if s.prefilled]
            if newcomers and (prefill_next or not decoding):
                await self._advance(newcomers, prefill=True)
                prefill_next = False
                continue
            start = turn % len(decoding)  # more ready than max_batch: each waits its turn
            batch = (decoding[start:] + decoding[:start])[:self.max_batch]
            turn += len(batch)
            self.batch_sizes[len(batch)] += 1
            await self._advance(batch, prefill=False)
            prefill_next = True

    def _kv_fits(self, seq: Sequence) -> bool:
        if self.kv_tokens is None or not self.active:
            return True
        return sum(kv_need(s) for s in self.active) + kv_need(seq) <= self.kv_tokens

    def _drop_if_cancelled(self, seq: Sequence) -> bool:
        if seq.cancelled:
            self.run_stats.cancelled += 1
        return seq.cancelled

    async def _advance(self, batch: list[Sequence], *, prefill: bool) -> None:
        """One step: the prefill of one sequence, or one decode token of each sequence of the batch."""
        try:
            assert prefill or all(s.last is not None for s in batch), "a decode step follows the prefill's token"
            tokens = [s.prompt if prefill else [int(s.last)] for s in batch]  # type: ignore[arg-type]
            logits = await self._step(batch, tokens, prefill)
            chosen = await self._compute(self._sample, batch, logits)
        except M2CacheError as e:  # the step's weights could not be had: every sequence of it fails
            for seq in batch:
                self.run_stats.failed += 1
                self.active.remove(seq)
                _finish(seq, e)
            return
        now = time.perf_counter()
        for seq, token in zip(batch, chosen):
            if prefill:
                seq.t_first = now
                self.run_stats.ttft.append(now - seq.t_submit)
            else:
                self.run_stats.decode_tokens += 1
            seq.generated += 1
            seq.last = token
            seq.out.put_nowait(token)
            if token in self.eos or seq.generated >= seq.max_new_tokens:
                self.active.remove(seq)
                self.run_stats.completed += 1
                _finish(seq, None)

    async def _step(self, batch: list[Sequence], tokens: list[list[int]], prefill: bool) -> list[torch.Tensor]:
        """One step through every layer. Without lookahead layer L's weights are asked for once its
        ranking exists, after layer L-1 computed; with it (decode) layer L+1's are asked for before
        layer L computes, from a ranking one layer ahead, so one request is always in flight."""
        self.step_no += 1
        step, t_step = self.step_no, time.perf_counter()
        tables = None if prefill or len(batch) != 1 or self.native is None else self.native.tables()
        if tables is not None:  # every weight in DRAM: the whole token in one native call
            out = await self._compute(self.native.token, batch[0], tables, step)  # type: ignore[union-attr]
        else:
            out = await self._layers(batch, tokens, prefill, step)
        dt = time.perf_counter() - t_step
        if prefill:
            self.run_stats.prefill_s += dt
        else:
            self.run_stats.decode_s += dt
        return out

    async def _layers(self, batch: list[Sequence], tokens: list[list[int]], prefill: bool, step: int) -> Any:
        """The step layer by layer through the actors."""
        ahead = self.lookahead and not prefill
        first = await self._compute(self._begin, batch, tokens, prefill)
        n = self.cfg.num_layers
        out: Any = None
        asked: dict[int, asyncio.Future] = {}
        try:
            for layer, order in enumerate(first):  # layer 0's ranking, and layer 1's when looking ahead
                if layer < n:
                    asked[layer] = await self._ask(layer, step, order, prefill, ahead and layer > 0)
            for layer in range(n):
                t0 = time.perf_counter_ns()
                ready: WeightsReady = await asked.pop(layer)
                t1 = time.perf_counter_ns()
                self.recorder.add("executor", "stall", t0, t1, layer=layer, step=step, flow=step * 1000 + layer)
                self.run_stats.stall_s += (t1 - t0) / 1e9
                try:
                    out = await self._compute(self._layer, batch, layer, ready, prefill, step)
                finally:
                    await self._release(ready)
                nxt = layer + 2 if ahead else layer + 1
                if nxt < n:
                    asked[nxt] = await self._ask(nxt, step, out, prefill, ahead)
        finally:
            for fut in asked.values():  # a step that failed: what was asked ahead goes back
                await self._drop(fut)
        return out

    async def _ask(self, layer: int, step: int, order, prefill: bool, ahead: bool = False) -> asyncio.Future:
        """Layer ``layer``'s weights, ranked by ``order``: the future of its WeightsReady (``ahead``: asked
        while the layer before may still compute)."""
        # the DRAM manager preloads ahead of the layer computing: asked ahead, that is the one before
        if not self.dram.inbox.full():
            self.dram.inbox.put_nowait(Progress(layer - 1 if ahead else layer, step))
        fut = asyncio.get_running_loop().create_future()
        await self.predictor.send(LayerInput(layer, step, order, prefill, fut, ahead))
        return fut

    async def _drop(self, fut: asyncio.Future) -> None:
        """Weights asked for but never used: the DRAM pins of an answer go back; an unanswered request is
        cancelled (the HBM manager gives back what it prepared for a future already done)."""
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled() and fut.exception() is None:
            await self._release(fut.result())

    async def _release(self, ready: WeightsReady) -> None:
        """The DRAM pins and staging an answer held go back."""
        if ready.release or ready.staged_bytes:
            await self.dram.send(Release(ready.release, ready.staged_bytes))

    async def _compute(self, fn, *args):
        assert self.worker is not None, "executor used before setup"
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    # ---- compute thread ------------------------------------------------------------------------
    def _begin(self, batch: list[Sequence], tokens: list[list[int]], prefill: bool):
        self.ffn.forget()
        with self._streams():
            t0 = time.perf_counter_ns()
            for seq in batch if prefill else ():  # zeroing the caches here, not on the event loop
                seq.kv = KVCache(self.cfg, self.dtype, self.device, capacity=len(seq.prompt) + seq.max_new_tokens)
            for seq, toks in zip(batch, tokens):
                ids = torch.as_tensor(toks, dtype=torch.long, device=self.device)
                seq.x = self.res.embed[ids]  # [T, D]
                assert seq.kv is not None
                seq.cos_sin = rope_slice(self.rope, seq.kv.length, len(toks), self.dtype)
            order = self._attend(batch, 0, prefill, t0)
            if not (self.lookahead and not prefill):
                return [order]
            # looking ahead, attention 0 ranked layer 1; layer 0 is ranked from its own input
            return [self.policy.rank(0, self.ffn.score(0, [s.h for s in batch])), order]  # type: ignore[misc]

    def _attend(self, batch: list[Sequence], layer: int, prefill: bool, t0: int):
        """Attention of `layer` per sequence, the FFN inputs, and (when the policy scores) the batch's
        neuron ranking."""
        w = self._weights(layer)
        if len(batch) == 1 or self.exact:  # as the dense reference computes it
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
            # decode scores each sequence's last position; a sparse prefill every position of the prompts
            hs = [row for s in batch for row in s.h.split(1)] if prefill else [s.h for s in batch]  # type: ignore[union-attr]
            order = self.policy.rank(layer, self.ffn.score(layer, hs))  # type: ignore[arg-type]
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
        return self.policy.rank(layer, self.ffn.score(layer, hs, keep=False))

    def _weights(self, layer: int) -> LayerWeights:
        """The layer's resident weights; streamed projections are waited for here (a stall, recorded)."""
        w = self.res.layers[layer]
        if self.attention is None:
            return w
        t0 = time.perf_counter_ns()
        wqkv, wo = self.attention.weights(layer)
        self.recorder.add("executor", "attention_wait", t0, time.perf_counter_ns(), layer=layer, step=self.step_no)
        return LayerWeights(w.attn_norm, wqkv, wo, w.ffn_norm)

    def _layer(self, batch: list[Sequence], layer: int, ready: WeightsReady, prefill: bool, step: int):
        with self._streams():
            if ready.copied is not None:  # the HBM manager's copies up, on its copy stream
                assert self.compute_stream is not None
                self.compute_stream.wait_event(ready.copied)
            t0 = time.perf_counter_ns()
            hs = [s.h for s in batch]
            assert all(h is not None for h in hs), "attention ran before this layer's FFN"
            if len(batch) == 1 or not self.exact:  # one product for the batch's rows: [sum T, D]
                out = self.ffn.compute(torch.cat(hs) if len(hs) > 1 else hs[0], ready, prefill)  # type: ignore[arg-type]
                outs = out.split([h.shape[0] for h in hs])  # type: ignore[union-attr]
            else:  # exact: each sequence's product as it would run alone
                outs = self.ffn.each(hs, ready)  # type: ignore[arg-type]
            for seq, o in zip(batch, outs):
                seq.x = seq.x + o  # type: ignore[operator]
            t1 = time.perf_counter_ns()
            kind = "prefill" if prefill else "ffn"
            self.recorder.add("executor", kind, t0, t1, layer=layer, step=step, flow=step * 1000 + layer)
            if layer + 1 < self.cfg.num_layers:
                return self._attend(batch, layer + 1, prefill, t1)
            logits = self._lm_head(batch)
            self.recorder.add("executor", "lm_head", t1, time.perf_counter_ns(), step=step)
            return logits

    def _lm_head(self, batch: list[Sequence]) -> list[torch.Tensor]:
        """Each sequence's logits of its last position ([V] float32, on the host)."""
        for seq in batch:
            assert seq.kv is not None and seq.x is not None
            seq.kv.length += seq.x.shape[0]
        if len(batch) == 1 or self.exact:
            logits = [lm_head(self.cfg, self.res, s.x) for s in batch]  # type: ignore[arg-type]
        else:
            last = torch.cat([s.x[-1:] for s in batch])  # type: ignore[index]
            logits = list(lm_head_rows(self.cfg, self.res, last))
        for seq in batch:
            seq.x = seq.h = None
        return [x.cpu() for x in logits]

    def _sample(self, batch: list[Sequence], logits: list[torch.Tensor]) -> list[int]:
        return [sample(x, s.temperature, s.top_p, s.generator) for s, x in zip(batch, logits)]

    def _streams(self):
        if self.compute_stream is None:
            return _NoStream()
        return torch.cuda.stream(self.compute_stream)


class _NoStream:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


PREFILL_ROWS = 2048  # prompt tokens one prefill step takes (its activations grow with them), one prompt at least


def _prefill_batch(newcomers: list[Sequence], max_batch: int) -> list[Sequence]:
    """The newcomers one prefill step takes: in arrival order, while their prompts fit ``PREFILL_ROWS``."""
    batch: list[Sequence] = []
    rows = 0
    for seq in newcomers[:max_batch]:
        if batch and rows + len(seq.prompt) > PREFILL_ROWS:
            break
        batch.append(seq)
        rows += len(seq.prompt)
    return batch


def kv_need(seq: Sequence) -> int:
    """Tokens of KV cache a sequence holds while it runs (allocated whole at its prefill)."""
    return len(seq.prompt) + seq.max_new_tokens


def _finish(seq: Sequence, error: BaseException | None) -> None:
    """Ends a sequence's output channel; its queue keeps one slot beyond the token limit for this."""
    seq.out.put_nowait(_DONE if error is None else error)
