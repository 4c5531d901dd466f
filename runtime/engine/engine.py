"""The Engine: opens a store, sizes the tiers, starts the actors and serves ``generate`` calls.

::

    async with Engine.open(store_dir, EngineConfig(hbm_budget="48MB", dram_budget="96MB")) as engine:
        async for text in engine.generate("Why is the sky blue?", max_new_tokens=64):
            print(text, end="", flush=True)
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import torch

from m2cache.actors.dram import DRAMManager
from m2cache.actors.executor import Executor
from m2cache.actors.sequence import Sequence
from m2cache.actors.layer_ffn import kernels_apply
from m2cache.actors.hbm import HBMManager
from m2cache.actors.messages import Cancel, Resume, Submit
from m2cache.actors.ssd_reader import SSDReader
from m2cache.engine.config import EngineConfig
from m2cache.engine.metrics import engine_stats
from m2cache.errors import ConfigError, EngineClosedError
from m2cache.engine.loading import auto_form, load_resident, load_tokenizer
from m2cache.model import cpu_kernels
from m2cache.model.llama import DenseModel
from m2cache.formats.shares import PRECISION_ORDER
from m2cache.model.tokenizer import StreamDecoder
from m2cache.engine.policies import fetched_bytes, load_policy, store_for_policy
from m2cache.model.sampling import check_sampling
from m2cache.engine.memory import STREAM_DEPTH, MemoryPlan, plan_memory, return_freed_memory
from m2cache.engine.sizing import TierPlan, plan_tiers
from m2cache.storage.attention_stream import AttentionStream
from m2cache.storage.rows import EmbeddingRows
from m2cache.storage.reader import Store
from m2cache.storage.ssd import FileBackend
from m2cache.storage.ssd_sim import SimulatedSSD
from m2cache.trace.recorder import NullRecorder, TraceRecorder

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """Counters the executor owns; the engine turns them into ``stats()``."""

    decode_tokens: int = 0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    stall_s: float = 0.0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    refused: int = 0  # waited longer than admit_timeout for room in the KV cache
    step_retries: int = 0  # steps that failed and were run again sequence by sequence
    batch_splits: int = 0  # steps whose batch's union did not fit the tiers, run in halves
    ttft: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, store: Store, config: EngineConfig) -> None:
        self.store, self.config = store, config
        self.tokenizer = load_tokenizer(store)
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.recorder = TraceRecorder() if config.trace else NullRecorder()
        self.run_stats = RunStats()
        self._supervisor: asyncio.Task | None = None
        self._torch_threads: int | None = None  # torch's setting before open, restored at close
        self._kernel_threads: int | None = None  # the kernels' threads before this engine set them
        self._closed = False
        self._error: BaseException | None = None
        self.attention: AttentionStream | None = None  # resident="stream": the projections read per layer
        self.resident_form = "full"  # the form the resident weights were loaded in (set at open)
        self.t_open = time.perf_counter()

    @classmethod
    def open(cls, store_dir: str | Path, config: EngineConfig | None = None) -> "_Opening":
        """``async with Engine.open(...) as engine`` (or ``engine = await Engine.open(...)``)."""
        return _Opening(store_dir, config or EngineConfig())

    # ---- lifecycle -----------------------------------------------------------------------------
    async def _start(self) -> None:
        cfg = self.config
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but PyTorch sees no CUDA device; use device='cpu'")
        # the tiers hold the bundles the policy fetches: a gate policy's up and down only, where the store
        # keeps its gate rows apart
        store = self.store = store_for_policy(self.store, cfg.policy)
        self.policy = load_policy(store, cfg.policy, self.dtype, self.device, kernels=cfg.cpu_kernels)
        # CPU and its kernels: decode can compute straight from DRAM's whole layers (see plan_tiers)
        direct = (cfg.compute_from_dram and cfg.cpu_kernels
                  and kernels_apply(self.policy, store, store.config, self.device))
        self.memory: MemoryPlan | None = None
        if cfg.memory is not None:  # one limit: the budgets, resident form and KV reserve come from it
            return_freed_memory(large_allocations_mapped=True)  # what the process holds is what it uses
            self.memory = plan_memory(store, cfg, self.policy, cpu_direct=direct)
            cfg = self.config = cfg.replace(hbm_budget=self.memory.hbm_budget, dram_budget=self.memory.dram_budget,
                                            resident=self.memory.resident_form, kv_tokens=self.memory.kv_tokens,
                                            dense_prefill=self.memory.dense_prefill)
            log.info("m2cache %s", self.memory.describe())
        self.plan: TierPlan = plan_tiers(store, cfg, self.policy, cpu_direct=direct)  # BudgetError before any work
        if self.device.type == "cpu" and cfg.compute_threads is not None:
            self._torch_threads = torch.get_num_threads()
            threads = compute_threads(cfg, self.plan, fetched_bytes(store, self.policy))
            torch.set_num_threads(threads)
            self._kernel_threads = cpu_kernels.set_threads(threads)  # the C kernels share each product too
        loop = asyncio.get_running_loop()
        form = self.resident_form = (auto_form(self.policy.exact, self.device) if cfg.resident == "auto"
                                     else cfg.resident)
        self.res = await loop.run_in_executor(None, load_resident, store, self.dtype, self.device, form)
        if self.memory is not None:
            return_freed_memory()  # the load's transients
        self.model = DenseModel(store.config, self.res, [], self.device)
        self.backend = FileBackend(direct=cfg.direct_io)
        if cfg.ssd_sim:
            self.backend = SimulatedSSD(self.backend, cfg.ssd_sim)
        if form == "stream":  # the attention projections read per layer, one layer ahead
            int8 = store.manifest.get("attention_int8")
            if not int8:
                log.warning("%s has no INT8 attention file (stores converted before it have none): streaming the "
                            "resident file's 16-bit projections, twice the bytes; convert the model again", store.path)
            self.attention = AttentionStream(store.path / store.manifest["resident"]["path"], store.config,
                                             self.dtype, self.backend, depth=STREAM_DEPTH, int8=int8 or None)
        self._wire_actors(store, cfg)
        self._supervisor = asyncio.create_task(self._supervise(), name="m2cache-engine")
        ready = asyncio.gather(*(a.ready.wait() for a in self.actors))
        done, _ = await asyncio.wait({ready, self._supervisor}, return_when=asyncio.FIRST_COMPLETED)
        if self._supervisor in done:
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)
            self._supervisor.result()  # raises the actor's setup error
            raise EngineClosedError("the engine's actors stopped during start-up")

    def _wire_actors(self, store: Store, cfg: EngineConfig) -> None:
        """The four actors (the predictor is the executor's: ``m2cache.actors``), each given the channels of the
        actors it sends to, and the engine's own to the executor."""
        n, F = store.config.num_layers, store.num_neurons
        self.reader = SSDReader(store, self.backend, cfg.io_threads, self.recorder)
        self.dram = DRAMManager(
            num_layers=n, num_neurons=F, layer_bytes={p: store.layer_bytes(p) for p in PRECISION_ORDER},
            budget=self.plan.dram_budget, staging_reserve=self.plan.staging_reserve, preload=self.plan.preload,
            prefetch=self.plan.prefetch, fixed_keys=self.plan.fixed_keys, precisions=self.plan.dram_precisions,
            reader=self.reader.channel("dram"), recorder=self.recorder, pin_memory=self.device.type == "cuda",
            window_slots=self.plan.window_slots)
        # CUDA: the executor computes on one stream, the HBM manager copies up on another and tells it when
        compute_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.hbm = HBMManager(num_layers=n, num_neurons=F, slots=self.plan.hbm_slots,
                              bundle_bytes={p: store.bundle_bytes(p) for p in PRECISION_ORDER},
                              device=self.device, dram=self.dram.channel("hbm"), recorder=self.recorder,
                              direct_from_dram=self.plan.direct, compute_stream=compute_stream,
                              kernels=cfg.cpu_kernels)
        self.executor = Executor(model=self.model, res=self.res, policy=self.policy, dram=self.dram.channel("executor"),
                                 hbm=self.hbm.channel("executor"), pools=self.hbm.pools, direct_from_dram=self.plan.direct,
                                 fixed_keys=self.plan.fixed_keys, store=store, dtype=self.dtype, device=self.device,
                                 recorder=self.recorder, stats=self.run_stats, max_queued=cfg.max_queued_tokens,
                                 kernels=cfg.cpu_kernels, max_batch=cfg.max_batch, kv_tokens=cfg.kv_tokens,
                                 attention=self.attention, lookahead=cfg.lookahead, compute_stream=compute_stream,
                                 dense_prefill=cfg.dense_prefill is not False, batch_invariant=cfg.batch_invariant,
                                 prefill_chunk=cfg.prefill_chunk, admit_timeout=cfg.admit_timeout,
                                 native=cfg.native_decode)
        self.predictor = self.executor.predictor
        self.requests = self.executor.channel("engine")  # Submit, Cancel and Resume
        self.actors = [self.reader, self.dram, self.hbm, self.executor]

    async def _supervise(self) -> None:
        """Runs every actor in one task group; an actor that crashes closes the engine with its cause."""
        try:
            async with asyncio.TaskGroup() as tg:
                for actor in self.actors:
                    tg.create_task(actor.run(), name=f"m2cache-{actor.name}")
        except BaseException as e:
            self._error = e
            self._closed = True
            log.error("m2cache engine stopped: %r", e)
            raise

    async def close(self) -> None:
        """Stops the actors in pipeline order (each after its earlier work) and releases the tiers."""
        if self._supervisor is None:  # start-up failed half way: release what it opened
            self._restore_threads()
            self._release()
            return
        self._closed = True
        sup = self._supervisor
        if not sup.done():
            for actor in (self.executor, self.hbm, self.dram, self.reader):
                await actor.stop()
        await asyncio.gather(sup, return_exceptions=True)
        self._restore_threads()  # once no kernel runs: resizing the kernels' pool waits for a run in flight
        self._release()
        if isinstance(self.config.trace, (str, Path)) and self.config.trace is not True:
            self.save_trace(self.config.trace)

    def _restore_threads(self) -> None:
        """torch's threads and the kernels' as they were before this engine set them (both process-wide)."""
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None
        if self._kernel_threads is not None:
            cpu_kernels.set_threads(self._kernel_threads)
            self._kernel_threads = None

    def _release(self) -> None:
        """Closes what start-up opened, readers of the store first (a read ahead still in flight reopens
        nothing once they are closed), then the backend."""
        res, backend = getattr(self, "res", None), getattr(self, "backend", None)  # set as start-up gets there
        if self.attention is not None:
            self.attention.close()
        if res is not None and isinstance(res.embed, EmbeddingRows):
            res.embed.close()
        if backend is not None:
            backend.close()

    # ---- generation ----------------------------------------------------------------------------
    async def generate(self, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, raw: bool = False, repetition_penalty: float = 1.0
                       ) -> AsyncIterator[str]:
        """Streams the generated text. Cancelling the consumer stops this request only."""
        ids = self.tokenizer.encode(prompt, raw=raw)
        dec = StreamDecoder(self.tokenizer)
        eos = set(self.store.config.eos_token_ids)
        async for tok in self.generate_ids(ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                           repetition_penalty=repetition_penalty):
            if tok in eos:
                break
            text = dec.push(tok)
            if text:
                yield text
        tail = dec.flush()
        if tail:
            yield tail

    async def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                           top_p: float = 1.0, seed: int | None = None, repetition_penalty: float = 1.0
                           ) -> AsyncIterator[int]:
        check_sampling(temperature, top_p, max_new_tokens, repetition_penalty)
        if self._closed or self._supervisor is None:
            raise EngineClosedError(f"the engine is closed{f' ({self._error!r})' if self._error else ''}; "
                                    "open a new one")
        if not prompt_ids:
            raise ConfigError("the prompt is empty: give at least one token")
        if max_new_tokens == 0:
            return
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        seq = Sequence(list(prompt_ids), max_new_tokens, temperature, top_p, gen,
                       asyncio.Queue(self.config.max_queued_tokens + 1), repetition_penalty=repetition_penalty,
                       history=list(prompt_ids) if repetition_penalty != 1.0 else [])
        await self.requests.send(Submit(seq))
        try:
            while (tok := await seq.receive()) is not None:
                if seq.out.qsize() + 1 >= self.config.max_queued_tokens:  # it was full: the executor waits for it
                    self._tell_executor(Resume(seq))
                yield tok
        finally:
            if not seq.out.empty() or seq.generated < max_new_tokens:
                seq.cancelled = True
                self._tell_executor(Cancel(seq))

    def _tell_executor(self, msg: Cancel | Resume) -> None:
        """A wake-up for the executor about ``msg.seq``, which carries the news itself (its output, its
        ``cancelled``): when the inbox is full the executor is busy, and its next pass sees it anyway."""
        try:
            self.requests.send_nowait(msg)
        except asyncio.QueueFull:
            pass

    # ---- figures -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return engine_stats(self)

    def save_trace(self, path: str | Path) -> None:
        """Writes the trace with the run's figures as metadata (what tools/trace.py summarises)."""
        st = self.stats()
        for key, value in (("tokens", st["decode_tokens"]), ("decode_seconds", self.run_stats.decode_s),
                           ("ttft_seconds", st["ttft_s"]), ("hit_ratio", st["hit_ratio"]),
                           ("device", self.device.type), ("policy", st["policy"]), ("stats", st)):
            self.recorder.mark(key, value)
        self.recorder.save(path)


# ``compute_threads="auto"`` takes every core while a decode token reads at most this share of the FFN
# bytes it computes from off the store. Measured on 2 cores, 7B shape, split store under a limit: at
# 3.6 GiB (5% read) 2 threads decode 1.74x one; at 2.26 GB (61% read) 1.1x, within the noise; reading
# every byte (dense-fp16 from the page cache) one thread was 1.3x two: the I/O threads need the core.
THREADS_READ_SHARE = 0.25


def compute_threads(cfg: EngineConfig, plan: TierPlan, fetched: int) -> int:
    """torch's threads for this engine: ``auto`` takes every core when decode reads little off the store
    (at most ``THREADS_READ_SHARE`` of the ``fetched`` FFN bytes a token computes from), else 1."""
    if cfg.compute_threads != "auto":
        return int(cfg.compute_threads)  # type: ignore[arg-type]
    reads = plan.decode_read_bytes > THREADS_READ_SHARE * fetched or plan.decode_read_bytes < 0
    reads = reads or cfg.resident == "stream"  # streamed attention is read every token
    return 1 if reads else (os.cpu_count() or 1)


class _Opening:
    """What ``Engine.open`` returns: awaitable, and an async context manager that closes the engine."""

    def __init__(self, store_dir: str | Path, config: EngineConfig) -> None:
        self.store_dir, self.config = store_dir, config
        self.engine: Engine | None = None

    async def _open(self) -> Engine:
        store = Store(self.store_dir)
        engine = Engine(store, self.config)
        try:
            await engine._start()
        except BaseException:
            await engine.close()
            raise
        self.engine = engine
        return engine

    def __await__(self):
        return self._open().__await__()

    async def __aenter__(self) -> Engine:
        return await self._open()

    async def __aexit__(self, *exc) -> None:
        if self.engine is not None:
            await self.engine.close()
