"""Layer executor: runs sequences step by step, layer by layer, on one compute thread.

The event loop never computes: every tensor operation runs in ``compute`` (one worker thread; on
CUDA that thread launches kernels on the compute stream and copies on the copy stream). One job per
layer does the copies the HBM manager asked for, the FFN of layer L, then attention of layer L+1 and
its predictor scores, so a layer costs one thread hop. Requests are served fairly: one step of one
sequence at a time, round-robin.
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
from m2cache.actors.messages import LayerInput, Progress, Release, Stop, WeightsReady
from m2cache.errors import EngineClosedError, M2CacheError
from m2cache.model import cpu_kernels
from m2cache.model.llama import KVCache, attention_block, lm_head, rms_norm, rope_slice
from m2cache.model.sparse_ffn import ffn_groups
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


class Executor(Actor):
    name = "executor"

    def __init__(self, *, model, res, policy, predictor, dram, hbm, store, dtype: torch.dtype, device: torch.device,
                 recorder, stats, max_queued: int, max_pending: int = 1024, kernels: bool = True) -> None:
        super().__init__(1)
        self.cfg, self.res, self.rope, self.act = model.cfg, res, model.rope, model.act
        self.policy, self.predictor, self.dram, self.hbm = policy, predictor, dram, hbm
        self.parts, self.dim, self.group = store.parts, store.hidden, store.int4_group
        self.dtype, self.device, self.recorder, self.run_stats = dtype, device, recorder, stats
        self.pending: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.max_pending, self.max_queued = max_pending, max_queued
        self.wake = asyncio.Event()
        self.stopping = False
        self.worker: ThreadPoolExecutor | None = None
        self.step_no = 0
        self.eos = set(self.cfg.eos_token_ids)
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.compute_stream = torch.cuda.Stream(device) if cuda else None
        # decode FFNs through the C kernels: CPU, a gated FFN, and a policy that is not the exact
        # every-neuron-FP16 one (whose tokens must equal the dense model's, so it keeps torch's code)
        self.use_kernels = kernels and kernels_apply(policy, store, model.cfg, device)
        # CPU copies into the pool through the C row copy (any policy: it moves bytes, computes nothing)
        self.row_copy = kernels and device.type == "cpu" and cpu_kernels.available()
        self._staging_bufs: dict[str, torch.Tensor] = {}  # host buffers of gathered rows, reused (pinned on CUDA)
        self._staging_done: dict[str, Any] = {}  # per buffer: the event of its last copy

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        if self.stopping:
            raise EngineClosedError("the engine is closed; open a new one")
        if len(self.pending) >= self.max_pending:
            raise M2CacheError(f"{self.max_pending} requests are already waiting; try again later")
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
            worker = self.worker
            await asyncio.get_running_loop().run_in_executor(None, lambda: worker.shutdown(wait=True))

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
        turn = 0
        while True:
            while not self.inbox.empty():
                if isinstance(self.inbox.get_nowait(), Stop):
                    return
            while self.pending:
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
            seq = runnable[turn % len(runnable)]
            turn += 1
            await self._advance(seq)

    def _drop_if_cancelled(self, seq: Sequence) -> bool:
        if seq.cancelled:
            self.run_stats.cancelled += 1
        return seq.cancelled

    async def _advance(self, seq: Sequence) -> None:
        """One step of one sequence: the prefill, or one decode token."""
        prefill = seq.kv is None
        try:
            if prefill:
                seq.kv = KVCache(self.cfg, self.dtype, self.device, capacity=len(seq.prompt) + seq.max_new_tokens)
            assert prefill or seq.last is not None, "a decode step follows the prefill's token"
            tokens = seq.prompt if prefill else [int(seq.last)]  # type: ignore[arg-type]
            logits = await self._step(seq, tokens, prefill)
            token = await self._compute(sample, logits, seq.temperature, seq.top_p, seq.generator)
        except M2CacheError as e:
            self.run_stats.failed += 1
            self.active.remove(seq)
            _finish(seq, e)
            return
        now = time.perf_counter()
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

    async def _step(self, seq: Sequence, tokens: list[int], prefill: bool) -> torch.Tensor:
        self.step_no += 1
        step, t_step = self.step_no, time.perf_counter()
        loop = asyncio.get_running_loop()
        order = await self._compute(self._begin, seq, tokens, prefill)
        n = self.cfg.num_layers
        out: Any = None
        for layer in range(n):
            if not self.dram.inbox.full():
                self.dram.inbox.put_nowait(Progress(layer, step))
            fut = loop.create_future()
            t0 = time.perf_counter_ns()
            await self.predictor.send(LayerInput(layer, step, order, prefill, fut))
            ready: WeightsReady = await fut
            t1 = time.perf_counter_ns()
            self.recorder.add("executor", "stall", t0, t1, layer=layer, step=step, flow=step * 1000 + layer)
            self.run_stats.stall_s += (t1 - t0) / 1e9
            try:
                out = await self._compute(self._layer, seq, layer, ready, prefill, step)
            finally:
                if ready.release or ready.staged_bytes:
                    await self.dram.send(Release(ready.release, ready.staged_bytes))
            order = out
        dt = time.perf_counter() - t_step
        if prefill:
            self.run_stats.prefill_s += dt
        else:
            self.run_stats.decode_s += dt
        return out

    async def _compute(self, fn, *args):
        assert self.worker is not None, "executor used before setup"
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    # ---- compute thread ------------------------------------------------------------------------
    def _begin(self, seq: Sequence, tokens: list[int], prefill: bool):
        with self._streams():
            t0 = time.perf_counter_ns()
            ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
            seq.x = self.res.embed[ids]  # [T, D]
            assert seq.kv is not None
            seq.cos_sin = rope_slice(self.rope, seq.kv.length, len(tokens), self.dtype)
            return self._attend(seq, 0, prefill, t0)

    def _attend(self, seq: Sequence, layer: int, prefill: bool, t0: int):
        """Attention of `layer`, the FFN input, and (when the policy scores) the neuron ranking."""
        assert seq.kv is not None and seq.x is not None
        w = self.res.layers[layer]
        seq.x = attention_block(self.cfg, w, seq.x, layer, seq.kv, seq.kv.length, seq.cos_sin)
        seq.h = rms_norm(seq.x, w.ffn_norm, self.cfg.rms_norm_eps)
        order = None
        if self.policy.needs_scores and not prefill:
            scores = self.policy.score(layer, seq.h)
            order = self.policy.rank(layer, scores)
        self.recorder.add("executor", "attention", t0, time.perf_counter_ns(), layer=layer)
        return order

    def _layer(self, seq: Sequence, layer: int, ready: WeightsReady, prefill: bool, step: int):
        with self._streams():
            t0 = time.perf_counter_ns()
            self._apply_copies(ready, layer, step)
            assert seq.x is not None and seq.h is not None, "attention ran before this layer's FFN"
            seq.x = seq.x + self._ffn(seq.h, ready, prefill)
            t1 = time.perf_counter_ns()
            kind = "prefill" if prefill else "ffn"
            self.recorder.add("executor", kind, t0, t1, layer=layer, step=step, flow=step * 1000 + layer)
            if layer + 1 < self.cfg.num_layers:
                return self._attend(seq, layer + 1, prefill, t1)
            assert seq.kv is not None
            seq.kv.length += seq.x.shape[0]
            logits = lm_head(self.cfg, self.res, seq.x)
            seq.x = seq.h = None
            self.recorder.add("executor", "lm_head", t1, time.perf_counter_ns(), step=step)
            return logits.cpu()

    def _ffn(self, h: torch.Tensor, ready: WeightsReady, prefill: bool) -> torch.Tensor:
        """The layer's FFN. h: [T, D] -> [T, D]. Its rows sit in the device pool at ``ready.slots``, or,
        on the CPU computing from DRAM (``HBMManager._direct``), in DRAM tensors at ``ready.direct``'s
        rows (None: the tensor holds exactly the requested bundles).

        Decode steps on the CPU run the C kernels straight over those rows (no gather, no dequantised
        copy); prefill, CUDA and the exact ``dense-fp16`` policy gather the rows and use torch (the FP16
        torch path is the dense model's own code, bit for bit)."""
        if ready.direct is not None:
            sources = ready.direct
        else:
            sources = {p: (self.hbm.pools[p], slots) for p, slots in ready.slots.items()}
        if self.use_kernels and not prefill and h.shape[0] <= cpu_kernels.MAX_TOKENS:
            hf = h.float().contiguous()
            out = torch.zeros_like(hf)
            for p, (src, rows) in sources.items():
                slots = torch.arange(src.shape[0]) if rows is None else rows
                cpu_kernels.ffn_group(p, src, slots, hf, out, self.dim, self.group, self.cfg.hidden_act)
            return out.to(self.dtype)
        # DRAM rows are ascending neuron ids: a whole layer asked for whole is used as it is
        whole = ready.direct is not None
        raw = {p: src if rows is None or whole and _all_rows(rows, src)
               else wide(src).index_select(0, rows.to(src.device)).view(torch.uint8)
               for p, (src, rows) in sources.items() if rows is None or len(rows)}
        return ffn_groups(h, raw, self.parts, self.dim, self.group, self.act, self.dtype)

    def _apply_copies(self, ready: WeightsReady, layer: int, step: int) -> None:
        """The one batched copy up per precision: pool[slots] = DRAM bundles (CPU: a gather; CUDA: see
        ``_upload``, on the copy stream, which the compute stream then waits on)."""
        if not ready.copies:
            return
        t0 = time.perf_counter_ns()
        for c in ready.copies:
            pool = self.hbm.pools[c.precision]
            if self.copy_stream is None and self.row_copy:  # one pass, DRAM rows straight into the pool
                rows = None if c.rows is None else c.rows.contiguous()
                cpu_kernels.copy_rows(pool, c.dst_slots.contiguous(), c.src.contiguous(), rows)
                continue
            if self.copy_stream is None:
                src = c.src if c.rows is None else self._gather(c)
                wide(pool).index_copy_(0, c.dst_slots, wide(src))
                continue
            assert self.compute_stream is not None
            self.copy_stream.wait_stream(self.compute_stream)  # slots may still be read by earlier layers
            with torch.cuda.stream(self.copy_stream):
                dev = self._upload(c)
                wide(pool).index_copy_(0, c.dst_slots.to(self.device, non_blocking=True), wide(dev))
            self.compute_stream.wait_stream(self.copy_stream)
        self.recorder.add("hbm", "copy", t0, time.perf_counter_ns(), layer=layer, step=step, nbytes=ready.copy_bytes,
                          flow=step * 1000 + layer)

    def _upload(self, c) -> torch.Tensor:
        """Bundles to the device, on the copy stream. A small share of a DRAM layer is gathered on the
        host into a reused pinned staging buffer and sent once; a large share is cheaper sent whole
        from its pinned DRAM copy (55 GB/s) and gathered on the device than gathered by the CPU."""
        src, rows = c.src, c.rows
        if rows is None:
            return src.to(self.device, non_blocking=src.is_pinned())
        if len(rows) * 4 >= src.shape[0] and src.is_pinned():
            return src.to(self.device, non_blocking=True).index_select(0, rows.to(self.device, non_blocking=True))
        dev = self._gather(c).to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        self._staging_done[c.precision] = event  # the buffer is free again once this fires
        return dev

    def _gather(self, c) -> torch.Tensor:
        """``c.src[c.rows]`` into this precision's staging buffer, reused from copy to copy (pinned on
        CUDA): a fresh tensor per copy would cost the CPU a page fault per 4 KiB of it, about 3x the
        gather itself (7B shape: 2.4 against 15-20 GB/s)."""
        assert c.rows is not None, "a whole-tensor copy needs no gather"
        buf = self._staging(c.precision, len(c.rows), c.src.shape[0], c.src.shape[1])
        torch.index_select(wide(c.src), 0, c.rows, out=wide(buf))
        return buf

    def _staging(self, precision: str, n: int, layer_rows: int, width: int) -> torch.Tensor:
        done = self._staging_done.get(precision)
        if done is not None:
            done.synchronize()  # the previous copy out of this buffer has finished
        buf = self._staging_bufs.get(precision)
        if buf is None or buf.shape[0] < n:
            # room for a quarter of a layer at once (above that, CUDA sends pinned layers whole), so the
            # buffer is not regrown, and re-pinned, step after step
            buf = torch.empty((max(n, 1024, layer_rows // 4), width), dtype=torch.uint8)
            if self.copy_stream is not None:
                buf = buf.pin_memory()
            self._staging_bufs[precision] = buf
        return buf[:n]

    def _streams(self):
        if self.compute_stream is None:
            return _NoStream()
        return torch.cuda.stream(self.compute_stream)


class _NoStream:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _all_rows(rows: torch.Tensor, src: torch.Tensor) -> bool:
    """Ascending unique rows that cover all of src."""
    n = src.shape[0]
    return len(rows) == n and int(rows[0]) == 0 and int(rows[-1]) == n - 1


def kernels_apply(policy, store, cfg, device: torch.device) -> bool:
    """Whether decode FFNs run through the C kernels: the CPU, a gated FFN with a supported activation,
    the kernels built, and a policy other than the exact every-neuron-FP16 one (whose tokens must equal
    the dense model's, so it keeps torch's code)."""
    return (device.type == "cpu" and policy.name != "dense-fp16" and store.parts == 3
            and cfg.hidden_act in cpu_kernels.ACTIVATIONS and cpu_kernels.available())


def wide(rows: torch.Tensor) -> torch.Tensor:
    """uint8 rows [n, B] viewed with the widest integer element dividing B: gathers and scatters of
    whole rows then move 8-byte elements (index_copy_ of uint8 rows is ~3x slower on the CPU)."""
    width = rows.shape[-1]
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if width % size == 0:
            return rows.view(dtype)
    return rows


def _finish(seq: Sequence, error: BaseException | None) -> None:
    """Ends a sequence's output channel; its queue keeps one slot beyond the token limit for this."""
    seq.out.put_nowait(_DONE if error is None else error)
