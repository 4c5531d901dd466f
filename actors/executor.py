"""Layer executor: runs sequences step by step, layer by layer, on one compute thread.

An actor like the others (``base.Actor``): requests arrive as messages on its inbox (``Submit``; ``Cancel`` and
``Resume`` wake it about one), and between messages it does its own work, one step at a time (``work``),
sending each layer's neuron request to the HBM manager and the DRAM manager's hints and releases through the
channels it was given. The event loop never computes: every tensor operation runs in ``compute`` (one worker
thread; on CUDA that thread launches kernels on the compute stream, after the event of the copies the HBM
manager made on its copy stream). One job per layer computes the FFN of layer L, then attention of layer L+1
and the predictor's choice of its neurons (``predictor.py``: the predictor is the executor's, for the data it
reads), so a layer costs one thread hop (the message flow: ``m2cache.actors``). What those jobs compute is
:mod:`m2cache.actors.step_math`, along a path decided once per step (``step_plan``); this module schedules them.

Batched decode: the sequences past their prefill step together, up to ``max_batch`` of them (rotating
when more are ready), layer by layer, with one plan and one fetch per layer for all of them, so one
trip of a layer's weights up the tiers serves every waiting token. Batch-invariant (the default: see
``m2cache.actors.rows``), each sequence keeps its own neurons, the batch fetches their union, and every
product of a sequence is computed as it would be alone (a batched matrix product rounds differently), so
a request's tokens do not depend on what it is batched with; with ``batch_invariant=False`` the batch
shares one cut, ranked by the largest score any of them gives, and batched products. Attention runs per
sequence over its own KV cache.

Chunked prefill: a prompt is prefilled ``prefill_chunk`` tokens at a time (its chunks cut at fixed
offsets of its own prompt, whatever else runs), each chunk a step of its own between decode steps, so a
long prompt delays the running streams by one chunk at a time, never by its whole prefill. Newcomers'
chunks share a prefill step while they fit one chunk's tokens. A request waiting for room in the KV
cache longer than ``admit_timeout`` is refused with ``OverloadedError`` (a server answers 503 with
Retry-After). A step that fails is retried sequence by sequence, so a fault fails only the requests
whose own weights cannot be had, and a transient one none.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from m2cache.actors.base import Actor, Channel
from m2cache.actors.layer_ffn import LayerFFN, kernels_apply
from m2cache.actors.messages import Cancel, KeptLayers, NeuronRequest, Progress, Release, Resume, Submit, WeightsReady
from m2cache.actors.native_step import NativeSteps
from m2cache.actors.predictor import Choice, Predictor
from m2cache.actors.sequence import Sequence, finish, kv_need, prefill_batch, prefill_tokens
from m2cache.actors.step_math import StepMath
from m2cache.actors.step_plan import Planner
from m2cache.errors import BudgetError, ConfigError, EngineClosedError, M2CacheError, OverloadedError, TransientSSDError
from m2cache.formats.shares import PRECISION_ORDER
from m2cache.storage.attention_stream import AttentionStream

CAP_PROBE = 64  # steps at a lowered batch cap before it is raised by one again


class Executor(StepMath, Actor):
    name = "executor"

    def __init__(self, *, model, res, policy, dram: Channel, hbm: Channel, pools: dict[str, torch.Tensor],
                 direct_from_dram: bool, fixed_keys: tuple[tuple[int, str], ...], store, dtype: torch.dtype,
                 device: torch.device, recorder, stats, max_queued: int, max_pending: int = 1024,
                 kernels: bool = True, max_batch: int = 16, kv_tokens: int | None = None, dense_prefill: bool = True,
                 attention: AttentionStream | None = None, lookahead: bool = False, compute_stream=None,
                 batch_invariant: bool = True, prefill_chunk: int | None = None,
                 admit_timeout: float | None = None, native: bool = True, inbox_size: int = 64) -> None:
        super().__init__(inbox_size)
        self.cfg, self.res, self.rope = model.cfg, res, model.rope
        self.policy, self.dram, self.hbm = policy, dram, hbm  # the DRAM and HBM managers' channels
        self.dtype, self.device, self.recorder, self.run_stats = dtype, device, recorder, stats
        self.pending: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.max_pending, self.max_queued, self.max_batch = max_pending, max_queued, max_batch
        self.kv_tokens = kv_tokens  # KV cache tokens the running sequences may hold together (None: no bound)
        self.dense_prefill = dense_prefill  # False: prefill is scored and split by the policy, as decode
        self.attention = attention  # resident="stream": each layer's projections, read ahead of their use
        self.exact = policy.exact  # the dense model's code, each sequence alone
        # each sequence its own cut (``rows.py``) and its own products: tokens independent of the batch
        self.invariant = batch_invariant and not policy.exact
        self.per_row = self.exact or self.invariant
        self.prefill_chunk = prefill_chunk or None  # prompt tokens a prefill step takes of one sequence (None: all)
        self.admit_timeout = admit_timeout  # seconds a request may wait for room in the KV cache (None: no bound)
        self.union_cap, self._at_cap = max_batch, 0  # sequences whose union the tiers held (``_halve``)
        self.lookahead = lookahead and policy.needs_scores  # decode asks for layer L+1 before layer L computes
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # decode steps per batch size
        self.turn, self.prefill_next = 0, True  # the decode batch's rotation; a prefill step's turn is next
        self.worker: ThreadPoolExecutor | None = None
        self.step_no = 0
        self.eos = set(self.cfg.eos_token_ids)
        self.compute_stream = compute_stream  # CUDA: the stream every kernel of the step runs on
        # decode FFNs through the C kernels: CPU, a gated FFN, and a policy that is not the exact
        # every-neuron-FP16 one (whose tokens must equal the dense model's, so it keeps torch's code)
        self.use_kernels = kernels and kernels_apply(policy, store, model.cfg, device)
        self.ffn = LayerFFN(store=store, policy=policy, pools=pools, act=model.act, dtype=dtype,
                            use_kernels=self.use_kernels, dense_prefill=dense_prefill)
        self.predictor = Predictor(policy, self.ffn, {p: store.bundle_bytes(p) for p in PRECISION_ORDER}, recorder,
                                   invariant=self.invariant)
        self.planner = Planner(model.cfg, res, dtype=dtype, device=device, streamed=attention is not None,
                               per_row=self.per_row, invariant=self.invariant, exact=self.exact,
                               dense_prefill=dense_prefill, needs_scores=policy.needs_scores, lookahead=self.lookahead)
        # a decode token of one sequence in one native call once DRAM holds every layer it needs (native_step)
        self.native = NativeSteps.build(cfg=model.cfg, res=res, policy=policy, store=store, dtype=dtype,
                                        device=device, fixed_keys=fixed_keys, predictor=self.predictor,
                                        recorder=recorder, embed=res.embed, rope=model.rope) \
            if native and self.use_kernels and direct_from_dram and attention is None and not self.lookahead else None

    # ---- messages ------------------------------------------------------------------------------
    async def handle(self, msg: Any) -> None:
        if isinstance(msg, Submit):
            self._admit(msg.seq)
        elif isinstance(msg, Cancel):
            msg.seq.cancelled = True  # dropped by the next pass (``work``)
        elif not isinstance(msg, Resume):  # Resume: the next pass finds the sequence runnable again
            raise RuntimeError(f"executor got an unknown message {type(msg).__name__}")

    def _admit(self, seq: Sequence) -> None:
        if len(self.pending) >= self.max_pending:
            return finish(seq, M2CacheError(f"{self.max_pending} requests are already waiting; try again later"))
        if self.kv_tokens is not None and kv_need(seq) > self.kv_tokens:
            return finish(seq, ConfigError(
                f"this request needs {kv_need(seq)} tokens of KV cache (a prompt of {len(seq.prompt)} + "
                f"max_new_tokens {seq.max_new_tokens}); the engine holds at most {self.kv_tokens} (kv_tokens): "
                "ask for fewer tokens, or give a larger kv_tokens"))
        self.pending.append(seq)

    # ---- the loop ------------------------------------------------------------------------------
    async def setup(self) -> None:
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="m2cache-compute")
        if self.native is not None:  # the DRAM manager answers once every layer the native step reads is in
            answer = asyncio.get_running_loop().create_future()
            await self.dram.send(KeptLayers(tuple(self.native.needed), answer))
            self.native.in_dram = answer

    async def teardown(self, error: BaseException | None) -> None:
        exc = EngineClosedError(f"the engine closed ({error!r})" if error else "the engine closed")
        for seq in list(self.active) + list(self.pending):
            finish(seq, exc)
        self.active.clear()
        self.pending.clear()
        if self.native is not None and self.native.in_dram is not None:
            self.native.in_dram.cancel()  # nobody waits for it any more
        if self.worker is not None:  # a job in flight finishes in a helper thread, not on the loop
            await asyncio.get_running_loop().run_in_executor(None, self.worker.shutdown, True)

    def idle_timeout(self) -> float | None:
        """Seconds until the oldest waiting request is overdue (None: nothing to refuse)."""
        if self.admit_timeout is None or not self.pending:
            return None
        return max(0.0, self.pending[0].t_submit + self.admit_timeout - time.perf_counter()) + 1e-3

    async def work(self) -> bool:
        """One pass between messages: admission, then one step (a prefill chunk or a decode batch); False when no
        sequence can step (none waits, or each waits for its consumer)."""
        self.pending = collections.deque(s for s in self.pending if not self._drop_if_cancelled(s))
        while self.pending and self._kv_fits(self.pending[0]):  # in order: none overtakes a waiting one
            self.active.append(self.pending.popleft())
        self._refuse_overdue()
        self.active = [s for s in self.active if not self._drop_if_cancelled(s)]
        runnable = [s for s in self.active if s.out.qsize() < self.max_queued]
        if not runnable:
            return False
        cap = min(self.max_batch, self.union_cap)
        newcomers = prefill_batch([s for s in runnable if not s.prefilled], cap, self.prefill_chunk)
        decoding = [s for s in runnable if s.prefilled]
        if newcomers and (self.prefill_next or not decoding):
            await self._advance(newcomers, prefill=True)
            self.prefill_next = False
            return True
        start = self.turn % len(decoding)  # more ready than max_batch: each waits its turn
        batch = (decoding[start:] + decoding[:start])[:cap]
        self.turn += len(batch)
        self.batch_sizes[len(batch)] += 1
        await self._advance(batch, prefill=False)
        self.prefill_next = True
        return True

    async def _halve(self, batch: list[Sequence], prefill: bool) -> None:
        """The tiers could not hold the union of the batch's cuts (a budget sized for one cut): the batch is
        run in halves, and later steps take at most that many sequences until the cap is probed again."""
        half = len(batch) // 2
        self.union_cap, self._at_cap = half, 0
        self.run_stats.batch_splits += 1
        for part in (batch[:half], batch[half:]):
            live = [s for s in part if s in self.active and not s.cancelled]
            if live:
                await self._advance(live, prefill=prefill)

    def _grow_cap(self) -> None:
        """After ``CAP_PROBE`` steps that fit, the batch cap grows by one (the union is data-dependent)."""
        if self.union_cap < self.max_batch:
            self._at_cap += 1
            if self._at_cap >= CAP_PROBE:
                self.union_cap, self._at_cap = self.union_cap + 1, 0

    def _fail(self, batch: list[Sequence], e: M2CacheError) -> None:
        for seq in batch:
            self.run_stats.failed += 1
            self.active.remove(seq)
            finish(seq, e)

    def _kv_fits(self, seq: Sequence) -> bool:
        if self.kv_tokens is None or not self.active:
            return True
        return sum(kv_need(s) for s in self.active) + kv_need(seq) <= self.kv_tokens

    def _drop_if_cancelled(self, seq: Sequence) -> bool:
        if seq.cancelled:
            self.run_stats.cancelled += 1
        return seq.cancelled

    def _refuse_overdue(self) -> None:
        """Requests that waited for room in the KV cache longer than ``admit_timeout`` are refused."""
        if self.admit_timeout is None:
            return
        now = time.perf_counter()
        while self.pending and now - self.pending[0].t_submit > self.admit_timeout:  # the oldest wait first
            seq = self.pending.popleft()
            self.run_stats.refused += 1
            finish(seq, OverloadedError(
                f"no room in the KV cache for {self.admit_timeout:g} s ({sum(kv_need(s) for s in self.active)} of "
                f"{self.kv_tokens} tokens held by {len(self.active)} running requests; this one needs "
                f"{kv_need(seq)}): try again shortly"))

    async def _advance(self, batch: list[Sequence], *, prefill: bool, again: bool = False) -> None:
        """One step: a prefill chunk of each newcomer of the batch, or one decode token of each sequence.

        A step whose weights could not be had is run again sequence by sequence (a step changes nothing
        until its last layer, so it can be), so the fault fails only the sequences that need what failed,
        and a transient one (``TransientSSDError``: retries exhausted, an unstable read) gets one more try."""
        try:
            assert prefill or all(s.last is not None for s in batch), "a decode step follows the prefill's token"
            tokens = [prefill_tokens(s, self.prefill_chunk) if prefill else [int(s.last)]  # type: ignore[arg-type]
                      for s in batch]
            logits = await self._step(batch, tokens, prefill)
            chosen = await self._compute(self._sample, batch, logits)
        except M2CacheError as e:
            if isinstance(e, BudgetError) and len(batch) > 1 and not self.stopped:
                return await self._halve(batch, prefill)
            if self.stopped or isinstance(e, EngineClosedError) or (len(batch) == 1 and again):
                return self._fail(batch, e)
            if len(batch) == 1 and not isinstance(e, TransientSSDError):
                return self._fail(batch, e)
            self.run_stats.step_retries += 1
            for seq in batch:  # alone: each fails only for its own weights
                if seq in self.active and not seq.cancelled:
                    await self._advance([seq], prefill=prefill, again=True)
            return
        self._grow_cap()
        now = time.perf_counter()
        for seq, token in zip(batch, chosen):
            if token is None:  # a prefill chunk before the prompt's last: no token yet
                continue
            if prefill:
                seq.t_first = now
                self.run_stats.ttft.append(now - seq.t_submit)
            else:
                self.run_stats.decode_tokens += 1
            seq.generated += 1
            seq.last = token
            if seq.repetition_penalty != 1.0:
                seq.history.append(token)
            seq.out.put_nowait(token)
            if token in self.eos or seq.generated >= seq.max_new_tokens:
                self.active.remove(seq)
                self.run_stats.completed += 1
                finish(seq, None)

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
        """The step layer by layer through the actors: each layer's job (its FFN, the next attention and the
        predictor's choice) on the compute thread, each layer's neurons asked of the HBM manager."""
        plan, first = await self._compute(self._begin, batch, tokens, prefill)
        n = self.cfg.num_layers
        out: Any = None
        asked: dict[int, asyncio.Future] = {}
        try:
            for layer, choice in enumerate(first):  # layer 0's choice, and layer 1's when looking ahead
                if layer < n:
                    asked[layer] = await self._ask(layer, step, choice, plan.ahead and layer > 0)
            for layer in range(n):
                t0 = time.perf_counter_ns()
                ready: WeightsReady = await asked.pop(layer)
                t1 = time.perf_counter_ns()
                self.recorder.add("executor", "stall", t0, t1, layer=layer, step=step, flow=step * 1000 + layer)
                self.run_stats.stall_s += (t1 - t0) / 1e9
                try:
                    out = await self._compute(self._layer, batch, plan, layer, ready, step)
                finally:
                    await self._release(ready)
                nxt = layer + 2 if plan.ahead else layer + 1
                if nxt < n:
                    asked[nxt] = await self._ask(nxt, step, out, plan.ahead)
        finally:
            for fut in asked.values():  # a step that failed: what was asked ahead goes back
                await self._drop(fut)
        return out

    async def _ask(self, layer: int, step: int, choice: Choice, ahead: bool = False) -> asyncio.Future:
        """Layer ``layer``'s neurons, as the predictor chose them: the future of their WeightsReady (``ahead``:
        asked while the layer before may still compute)."""
        # the DRAM manager preloads ahead of the layer computing: asked ahead, that is the one before; a hint,
        # skipped when its inbox is full
        try:
            self.dram.send_nowait(Progress(layer - 1 if ahead else layer, step))
        except asyncio.QueueFull:
            pass
        ids, rows = choice
        fut = asyncio.get_running_loop().create_future()
        await self.hbm.send(NeuronRequest(layer, step, ids, fut, ahead, rows))
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
