"""DRAM manager: the layer-aware FIFO of whole layers, preloading ahead of the executor.

It keeps ``(layer, precision)`` entries — a whole layer's bundles at one precision — in a
:class:`~m2cache.storage.fifo.LayerFIFO` under the DRAM budget: the first layers for good (the fixed
area), the next ones in a ring filled from the SSD ``prefetch`` layers ahead of the executor.
Fetches of bundles the device lacks are served from those entries; a layer not in DRAM is read
whole (``layer``) or just its missing bundles are read (``neuron``, and ``hybrid`` for a layer whose
preload has not started). Entries are pinned while a copy up still needs them. It reads through the
channel it was given to the SSD reader (``reader``); the executor learns once, by ``KeptLayers``, when the
entries kept for good are all in.

The window (``window_slots``; the CPU computing from DRAM under a limit): neurons read one by one are kept, at
the precision they were read at, in one pool per precision of the DRAM budget, by the device cache's rules
(``storage.device_cache``: per-layer LRU, the layers in use protected), so a token reads only the neurons the
last few did not; a neuron asked for at INT8 and held at FP16 is served from FP16 where the request allows it
(a shared cut; a batch-invariant one keeps its plan's precisions). The executor computes from the pool's rows,
which stay in use until it releases the layer (``(layer, WINDOW)`` among the keys).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import torch

from m2cache.actors.base import Actor, Channel, fail, resolve
from m2cache.actors.messages import Fetch, FetchReply, KeptLayers, Progress, ReadRequest, Release
from m2cache.actors.precisions import serve_higher
from m2cache.errors import BudgetError, ChecksumError, EngineClosedError, M2CacheError, PermanentSSDError
from m2cache.storage.device_cache import DeviceCache
from m2cache.storage.fifo import LayerFIFO


log = logging.getLogger(__name__)

FIXED_AHEAD = 2  # layers ahead whose entries kept for good are read before the executor asks
WINDOW = "window"  # (layer, WINDOW) in a reply's release keys: the window's rows of that layer are in use


def _int8_from_fp16(low: str, high: str, req: np.ndarray) -> np.ndarray | None:
    """A whole FP16 entry serves every INT8 neuron of its layer (``_upgraded`` decides that it is there)."""
    return np.ones(req.size, dtype=bool) if (low, high) == ("int8", "fp16") else None


class DRAMManager(Actor):
    name = "dram"

    def __init__(self, *, num_layers: int, num_neurons: int, layer_bytes: dict[str, int], budget: int, staging_reserve: int,
                 preload: str, prefetch: int, fixed_keys: tuple[tuple[int, str], ...], precisions: tuple[str, ...],
                 reader: Channel, recorder, pin_memory: bool = False, window_slots: dict[str, int] | None = None,
                 inbox_size: int = 64) -> None:
        super().__init__(inbox_size)
        self.num_layers, self.num_neurons, self.layer_bytes = num_layers, num_neurons, layer_bytes
        self.preload, self.prefetch, self.precisions = preload, prefetch, precisions
        self.reader, self.recorder, self.pin_memory = reader, recorder, pin_memory
        self.budget, self.staging_reserve = budget, staging_reserve
        self.fixed_keys = frozenset(fixed_keys)  # (layer, precision) entries kept for good, read whole when first used
        fixed_bytes = sum(layer_bytes[p] for _, p in self.fixed_keys)
        slots = {p: n for p, n in (window_slots or {}).items() if n > 0}
        self.window = DeviceCache(num_layers, num_neurons, slots) if slots else None
        # allocated now, filled as neurons are read (untouched pages cost nothing until then)
        self.window_pools = {p: torch.empty((n, layer_bytes[p] // num_neurons), dtype=torch.uint8) for p, n in slots.items()}
        self.window_bytes = sum(t.numel() for t in self.window_pools.values())
        self.window_busy: dict[int, int] = {}  # layer -> replies whose window rows the executor still reads
        self.fifo = LayerFIFO(budget - staging_reserve - self.window_bytes, 0, fixed_budget_bytes=fixed_bytes,
                              fixed_keys=self.fixed_keys)
        self.data: dict[tuple[int, str], torch.Tensor] = {}
        self.loading: dict[tuple[int, str], asyncio.Future] = {}
        self.staged = 0  # bytes of neuron-level reads held until their copies are applied
        self.peak_staged = 0
        self.peak_total = 0
        self.counts = {"served": 0, "waited": 0, "neuron_reads": 0, "layer_reads": 0, "preloads": 0, "upgraded": 0,
                       "preload_skipped": 0, "window_upgraded": 0, "window_bypassed": 0}
        self.wait_s = 0.0
        # (layer, precision) entries whose whole read hit a damaged block: served by neuron-level reads from
        # then on, so only the requests that need the damaged block's neurons fail
        self.damaged: set[tuple[int, str]] = set()
        self.kept_waiters: list[KeptLayers] = []  # asked for entries kept for good not all in yet

    # ---- messages ------------------------------------------------------------------------------
    async def handle(self, msg: Any) -> None:
        if isinstance(msg, Progress):
            self._preload_after(msg.layer, msg.step)
        elif isinstance(msg, Fetch):
            # a fetch cancelled (at close) before it started never runs _serve's handlers: whatever
            # way it ends, a reply still pending then gets a typed error
            self.spawn(self._serve(msg)).add_done_callback(lambda _t, reply=msg.reply, layer=msg.layer: fail(
                reply, EngineClosedError(f"the engine closed while layer {layer} was being fetched")))
        elif isinstance(msg, Release):
            self._release(msg.keys, msg.staged_bytes)
        elif isinstance(msg, KeptLayers):
            if not set(msg.keys) <= self.fixed_keys:
                raise RuntimeError("KeptLayers asked for entries DRAM does not keep for good (never evicted)")
            self.kept_waiters.append(msg)
            self._answer_kept()
        else:
            raise RuntimeError(f"DRAM manager got an unknown message {type(msg).__name__}")

    def _preload_after(self, layer: int, step: int = -1) -> None:
        """Starts the reads ahead of the executor: whole layers ``prefetch`` deep (not in ``neuron`` mode),
        and the entries kept for good (``fixed_keys``) at least FIXED_AHEAD deep, so their first reads
        overlap compute instead of stalling the first tokens."""
        ahead = max(self.prefetch if self.preload != "neuron" else 0, FIXED_AHEAD if self.fixed_keys else 0)
        for j in range(1, ahead + 1):
            target = (layer + j) % self.num_layers
            for p in self.precisions:  # a layer past the last is the next step's
                key = (target, p)
                whole = key in self.fixed_keys or (self.preload != "neuron" and j <= self.prefetch)
                if whole and not self._start_layer_read(key, preload=True, step=step + (layer + j) // self.num_layers):
                    return  # no room ahead: later layers would evict nearer ones

    def _start_layer_read(self, key: tuple[int, str], preload: bool, step: int = -1) -> bool:
        """Admits a whole layer into the FIFO (pinned while loading) and starts its read. A layer found
        damaged is never read whole again: its neurons are read by the blocks they need."""
        if key in self.fifo or key in self.damaged:
            return True
        try:
            evicted = self.fifo.admit(key, key[0], self.layer_bytes[key[1]])
        except BudgetError:
            if preload:
                self.counts["preload_skipped"] += 1
                return False
            raise
        for old in evicted:
            self.data.pop(old, None)
        self.fifo.pin(key)
        self._note_peak()
        loop = asyncio.get_running_loop()
        # two futures: the read's reply, and `loaded`, which waiters in `loading` await; it completes
        # only after `data` holds the layer (a reply already done but not yet recorded is not loaded)
        read, loaded = loop.create_future(), loop.create_future()
        self.loading[key] = loaded
        self.counts["preloads" if preload else "layer_reads"] += 1
        request = ReadRequest(key[0], key[1], None, read, "read_layer", step)
        t0 = time.perf_counter_ns()  # the trace's preload/load span: from the read's start to the layer held
        loaded.add_done_callback(lambda _f: self.recorder.add(
            "dram", "preload" if preload else "load", t0, time.perf_counter_ns(), layer=key[0], step=step,
            nbytes=self.layer_bytes[key[1]]))
        try:
            self.reader.send_nowait(request)
        except asyncio.QueueFull:
            self.spawn(self.reader.send(request))
        self.spawn(self._finish_load(key, read, loaded))
        return True

    async def _finish_load(self, key: tuple[int, str], read: asyncio.Future, loaded: asyncio.Future) -> None:
        try:
            data = await read
            if self.pin_memory:
                # page-locking a layer (hundreds of MB on a 7B shape) takes tens of ms: never on the
                # event loop, where it would stall every actor (the executor's steps included)
                data = await asyncio.to_thread(data.pin_memory)
            self.data[key] = data
        except M2CacheError as e:
            # the read failed: forget the entry; whoever waits on it sees the error on `loaded`
            self.fifo.unpin(key)
            self.fifo.remove(key)
            fail(loaded, e)
            return
        finally:
            self.loading.pop(key, None)
        self.fifo.unpin(key)
        resolve(loaded, None)
        if self.kept_waiters:
            self._answer_kept()

    def _answer_kept(self) -> None:
        """``KeptLayers`` asked for entries that are now all held in the fixed area: their tensors (never evicted)."""
        for msg in [m for m in self.kept_waiters if all(k in self.data and self.fifo.is_fixed(k) for k in m.keys)]:
            self.kept_waiters.remove(msg)
            resolve(msg.reply, {k: self.data[k] for k in msg.keys})

    async def _serve(self, msg: Fetch) -> None:
        try:
            reply = await self._gather(msg)
        except M2CacheError as e:
            fail(msg.reply, e)
            return
        except asyncio.CancelledError:
            # only teardown cancels a fetch; the HBM manager waiting on it must see a typed error
            # (a bare CancelledError would end that actor without failing the executor's step)
            fail(msg.reply, EngineClosedError(f"the engine closed while layer {msg.layer} was being fetched"))
            raise
        if msg.reply.done():  # nobody waits any more: give back what was pinned
            self._release(reply.release, reply.staged_bytes)
        else:
            resolve(msg.reply, reply)

    async def _gather(self, msg: Fetch) -> FetchReply:
        sources: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        pinned: list[tuple[int, str]] = []
        reads: dict[str, asyncio.Future] = {}
        staged = 0
        t0 = time.perf_counter_ns()
        asked = self._upgraded(msg) if msg.upgrade else msg.ids
        windowed: dict[str, np.ndarray] = {}

        async def read_plain(p: str, ids: np.ndarray, failed: M2CacheError | None = None) -> None:
            """A neuron-level read of just the missing bundles, awaited with the others below."""
            nonlocal staged
            # awaited together below: the precisions' reads run in parallel
            reads[p], nbytes = await self._read_neurons(msg, p, ids, staged, failed)
            staged += nbytes

        try:
            for p, ids in asked.items():
                key = (msg.layer, p)
                if key not in self.fifo and (self.preload == "layer" or key in self.fixed_keys):
                    self._start_layer_read(key, preload=False, step=msg.step)
                failed: M2CacheError | None = None
                if key in self.loading:
                    self.counts["waited"] += 1
                    w0 = time.perf_counter()
                    try:
                        await asyncio.shield(self.loading[key])
                    except (ChecksumError, PermanentSSDError) as e:  # one bad block: read what is needed
                        failed = e
                        self._mark_damaged(key, e)
                    self.wait_s += time.perf_counter() - w0
                if key in self.data:
                    self.fifo.pin(key)
                    pinned.append(key)
                    sources[p] = (self.data[key], torch.from_numpy(np.ascontiguousarray(ids)))
                    self.counts["served"] += 1
                elif p in self.window_pools and failed is None:
                    windowed[p] = ids  # through the window, below: the neurons the last tokens did not read
                else:
                    await read_plain(p, ids, failed)
            if windowed:
                through = await self._through_window(msg, asked, windowed)
                if through is None:  # more than the window can hold now (a prefill's): read as without it
                    for p, ids in windowed.items():
                        await read_plain(p, ids)
                else:
                    asked, got = through
                    sources.update(got)
                    pinned.append((msg.layer, WINDOW))
            for p, fut in reads.items():
                sources[p] = (await fut, None)
        except BaseException:
            for fut in reads.values():
                if not fut.done():
                    fut.cancel()
            self._release(tuple(pinned), 0)
            raise
        self.staged += staged
        self.peak_staged = max(self.peak_staged, self.staged)
        self._note_peak()
        self.recorder.add("dram", "serve", t0, time.perf_counter_ns(), layer=msg.layer, step=msg.step,
                          nbytes=staged)
        return FetchReply(sources, tuple(pinned), staged, ids=asked if asked is not msg.ids else None)

    async def _through_window(self, msg: Fetch, asked: dict[str, np.ndarray], windowed: dict[str, np.ndarray]
                              ) -> tuple[dict[str, np.ndarray], dict[str, tuple[torch.Tensor, torch.Tensor]]] | None:
        """``windowed``'s neurons from the window: the ones held there as they are (an INT8 one held at FP16 from
        FP16, unless the plan alone decides: ``Fetch.planned_only``), the others read off the store into the slots
        the window's rules give them. (the ids as served, {precision: (pool, rows)}); the layer's rows stay in
        use (``window_busy``) until released. None when the window cannot hold them now: more than a third of a
        pool (a prefill's), or the layers in use hold the slots they would need."""
        assert self.window is not None
        if any(3 * len(ids) > self.window.capacity[p] for p, ids in windowed.items()):
            self.counts["window_bypassed"] += 1
            return None
        if not msg.planned_only and {"fp16", "int8"} <= windowed.keys():
            fp16 = self.window.lru(msg.layer, "fp16")
            moved, n = serve_higher({p: windowed[p] for p in ("fp16", "int8")},
                                    lambda low, high, req: fp16.slot_of[req] >= 0 if high == "fp16" else None)
            if n:
                windowed = {**windowed, **moved}
                asked = {**asked, **moved}
                self.counts["window_upgraded"] += n
        busy = frozenset(layer for layer, n in self.window_busy.items() if n) | {msg.layer}
        try:
            plan = self.window.plan(msg.layer, max(msg.step, 0), windowed, protected=busy)
        except BudgetError:  # nothing changed (DeviceCache.plan checks before it moves anything)
            self.counts["window_bypassed"] += 1
            return None
        self.window_busy[msg.layer] = self.window_busy.get(msg.layer, 0) + 1
        reads: dict[str, asyncio.Future] = {}
        staged = 0  # the reads' bytes, held until copied into the window
        try:
            for p, pp in plan.precisions.items():
                if pp.miss_ids.size:
                    reads[p], nbytes = await self._read_neurons(msg, p, pp.miss_ids, 0)
                    staged += nbytes
                    self.staged += nbytes
            self._note_peak()
            for p, fut in reads.items():  # each read's bundles into the slots the window gave them (numpy's
                # row copy: torch's index_put of uint8 rows measured 10x slower, 3-5 ms for 5.5 MB, on the loop)
                self.window_pools[p].numpy()[plan.precisions[p].miss_slots] = (await fut).numpy()
        except BaseException:
            for fut in reads.values():
                if not fut.done():
                    fut.cancel()
            for p, pp in plan.precisions.items():  # slots promised to bytes that may never have come
                self.window.forget(msg.layer, p, pp.miss_ids)
            self._release(((msg.layer, WINDOW),), staged)
            raise
        self._release((), staged)
        return asked, {p: (self.window_pools[p], torch.from_numpy(pp.slots)) for p, pp in plan.precisions.items()}

    async def _read_neurons(self, msg: Fetch, p: str, ids: np.ndarray, pending: int,
                            failed: M2CacheError | None = None) -> tuple[asyncio.Future, int]:
        """Sends the SSD reader a neuron-level read of ``ids`` at ``p``: (its reply, the bytes it stages), refused
        (``failed``, the error that sent it here, or BudgetError) when they and ``pending`` bytes not yet counted
        in ``staged`` would pass the staging reserve."""
        nbytes = len(ids) * (self.layer_bytes[p] // self.num_neurons)
        if self.staged + pending + nbytes > self.staging_reserve:
            if failed is not None:
                raise failed
            raise BudgetError(f"DRAM staging for layer {msg.layer} needs {nbytes} bytes; the reserve is "
                              f"{self.staging_reserve}: raise dram_budget")
        fut = asyncio.get_running_loop().create_future()
        await self.reader.send(ReadRequest(msg.layer, p, ids, fut, "read_neurons", msg.step))
        self.counts["neuron_reads"] += 1
        return fut, nbytes

    def _mark_damaged(self, key: tuple[int, str], error: M2CacheError) -> None:
        if key not in self.damaged:
            self.damaged.add(key)
            log.warning("layer %d %s is not read whole any more (%s); its neurons are read by block", *key, error)

    def _upgraded(self, msg: Fetch) -> dict[str, np.ndarray]:
        """The ids per precision to serve: a layer's INT8 ids go to its FP16 entry (``precisions.serve_higher``)
        when DRAM keeps that one (or holds it) and neither holds nor keeps the INT8 one: no read, and more exact."""
        low, high = (msg.layer, "int8"), (msg.layer, "fp16")
        int8 = msg.ids.get("int8")
        if int8 is None or not len(int8) or low in self.fixed_keys:
            return msg.ids
        if msg.planned_only:  # by the plan alone (``Fetch.planned_only``)
            if high not in self.fixed_keys:
                return msg.ids
        elif low in self.data or low in self.loading or not (
                high in self.fixed_keys or high in self.data or high in self.loading):
            return msg.ids
        out, moved = serve_higher(msg.ids, _int8_from_fp16)
        del out["int8"]  # every INT8 id moved
        self.counts["upgraded"] += moved
        return out

    def _release(self, keys: tuple, staged: int) -> None:
        for key in keys:
            if key[1] == WINDOW:
                self.window_busy[key[0]] -= 1
                assert self.window_busy[key[0]] >= 0, "window rows released more often than served"
            elif key in self.fifo:
                self.fifo.unpin(key)
        self.staged -= staged
        assert self.staged >= 0, "DRAM staging accounting went negative"

    def _note_peak(self) -> None:
        total = self.held_bytes()
        assert total <= self.budget, f"DRAM tier holds {total} bytes over its budget {self.budget}"
        self.peak_total = max(self.peak_total, total)

    async def teardown(self, error: BaseException | None) -> None:
        for fut in self.loading.values():
            fail(fut, M2CacheError("the engine closed while a layer was loading"))
        for msg in self.kept_waiters:
            fail(msg.reply, EngineClosedError("the engine closed before DRAM held every layer kept for good"))
        self.data.clear()

    def held_bytes(self) -> int:
        return self.fifo.bytes_held + self.staged + self.window_bytes

    def stats(self) -> dict:
        return {**super().stats(), **self.counts, "bytes_held": self.held_bytes(), "peak_bytes": self.peak_total,
                "fifo_peak": self.fifo.peak_bytes, "staged_peak": self.peak_staged, "budget": self.budget,
                "wait_s": self.wait_s, "layers_held": len(self.data), "window_bytes": self.window_bytes,
                "window": self.window.stats() if self.window is not None else {}}

    def window_counts(self) -> tuple[int, int]:
        """(hits, misses) of the window's lookups so far, every precision together."""
        st = self.window.stats() if self.window is not None else {}
        return sum(c["hits"] for c in st.values()), sum(c["misses"] for c in st.values())
