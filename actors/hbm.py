"""HBM manager: the device neuron pool — slots per precision, per-layer LRU, adjacent-token update.

For each layer and step it looks the requested (neuron, precision) pairs up, keeps the hits, picks
slots for the misses (``m2cache.storage.lru.DeviceCache`` decides what to evict), asks the DRAM
manager for the missing bundles, copies them up into the pool on its copy thread and answers the
executor with where everything sits (on CUDA with the event of the copies). The pool tensors themselves
are preallocated once, one per precision; the executor's compute thread reads them at the slots it is told.
It talks to the DRAM manager through the channel it was given (``dram``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from m2cache.actors.base import Actor, Channel, fail, resolve
from m2cache.actors.messages import Copy, Fetch, NeuronRequest, Release, WeightsReady
from m2cache.actors.precisions import serve_higher
from m2cache.actors.uploads import Uploader
from m2cache.errors import M2CacheError
from m2cache.storage.device_cache import DeviceCache


class HBMManager(Actor):
    name = "hbm"

    def __init__(self, *, num_layers: int, num_neurons: int, slots: dict[str, int], bundle_bytes: dict[str, int],
                 device: torch.device, dram: Channel, recorder, inbox_size: int = 8, upgrade: bool = True,
                 direct_from_dram: bool = False, compute_stream: Any = None,
                 kernels: bool = True) -> None:
        super().__init__(inbox_size)
        self.cache = DeviceCache(num_layers, num_neurons, {p: n for p, n in slots.items() if n > 0})
        self.bundle_bytes, self.dram, self.recorder, self.device = bundle_bytes, dram, recorder, device
        # one contiguous tensor per precision: the device pool (the HBM tier's bytes)
        self.pools = {p: torch.zeros((n, bundle_bytes[p]), dtype=torch.uint8, device=device)
                      for p, n in slots.items() if n > 0}
        self.budget_bytes = sum(n * bundle_bytes[p] for p, n in slots.items())
        self.hits = 0
        self.misses = 0
        self.bytes_copied = 0
        self.upgrade = upgrade  # serve lower-precision requests from higher-precision copies held
        self.direct_from_dram = direct_from_dram  # see _direct
        # the copies up run on a thread of their own, so with lookahead they overlap the layer computing
        self.uploader = Uploader(self.pools, device, recorder, compute_stream, kernels=kernels)
        self.copier: ThreadPoolExecutor | None = None
        self.upgraded = 0

    async def setup(self) -> None:
        self.copier = ThreadPoolExecutor(1, thread_name_prefix="m2cache-copy")

    async def teardown(self, error: BaseException | None) -> None:
        if self.copier is not None:  # a copy in flight finishes in a helper thread, not on the loop
            await asyncio.get_running_loop().run_in_executor(None, self._finish_copies)

    def _finish_copies(self) -> None:
        assert self.copier is not None
        self.copier.shutdown(True)
        self.uploader.finish()

    @property
    def pool_bytes(self) -> int:
        return sum(t.numel() for t in self.pools.values())

    async def handle(self, msg: Any) -> None:
        if not isinstance(msg, NeuronRequest):
            raise RuntimeError(f"HBM manager got an unknown message {type(msg).__name__}")
        try:
            ready = await self._prepare(msg)
        except M2CacheError as e:
            fail(msg.reply, e)
            return
        if msg.reply.done():  # the step was abandoned: the copies will never run
            await self._give_back(ready)
        else:
            resolve(msg.reply, ready)

    async def _give_back(self, ready: WeightsReady) -> None:
        if ready.release or ready.staged_bytes:
            await self.dram.send(Release(ready.release, ready.staged_bytes))

    def _upgrade(self, layer: int, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Neurons asked for at a lower precision but already held at a higher one are served from
        the higher one (``precisions.serve_higher``): more exact, and no bytes moved. Under a mixed policy a
        neuron's rank moves a little from token to token, so it often changes precision group; without this
        its copy at the old precision would be a miss."""
        def held(_low: str, high: str, req: np.ndarray) -> np.ndarray | None:
            return self.cache.lru(layer, high).slot_of[req] >= 0 if high in self.pools else None

        out, moved = serve_higher(ids, held)
        self.upgraded += moved
        return out

    async def _direct(self, msg: NeuronRequest) -> WeightsReady:
        """On the CPU with whole layers preloaded, the pool and DRAM are the same memory and the layer
        already sits in DRAM: the kernels compute from there, so no slot is planned and nothing is
        copied. The DRAM manager pins what it serves (or reads the bundles a layer not yet in DRAM
        needs) until the executor releases it."""
        t0 = time.perf_counter_ns()
        fut = asyncio.get_running_loop().create_future()
        await self.dram.send(Fetch(msg.layer, msg.step, dict(msg.ids), fut, upgrade=True, planned_only=msg.rows is not None))
        reply = await fut
        self.recorder.add("hbm", "direct", t0, time.perf_counter_ns(), layer=msg.layer, step=msg.step)
        return WeightsReady(msg.layer, msg.step, {}, (), reply.release, 0, reply.staged_bytes, direct=reply.sources,
                            ids=dict(reply.ids if reply.ids is not None else msg.ids), rows=msg.rows)

    async def _prepare(self, msg: NeuronRequest) -> WeightsReady:
        if self.direct_from_dram:
            return await self._direct(msg)
        t0 = time.perf_counter_ns()
        # a batch-invariant request keeps each neuron at the precision its sequences asked for: an upgrade hangs
        # on what the pool happens to hold, so a sequence's text would hang on its neighbours and its past
        upgrade = self.upgrade and msg.rows is None and len(msg.ids) > 1
        ids = self._upgrade(msg.layer, msg.ids) if upgrade else msg.ids
        busy = {msg.layer, msg.layer - 1} if msg.ahead and msg.layer else {msg.layer}
        plan = self.cache.plan(msg.layer, msg.step, ids, protected=frozenset(busy))
        missing = {p: pp.miss_ids for p, pp in plan.precisions.items() if pp.miss_ids.size}
        n_miss = sum(len(v) for v in missing.values())
        n_req = sum(len(v) for v in ids.values())
        self.misses += n_miss
        self.hits += n_req - n_miss
        self.recorder.add("hbm", "plan", t0, time.perf_counter_ns(), layer=msg.layer, step=msg.step)
        copies: list[Copy] = []
        release: tuple = ()
        copy_bytes = staged = 0
        if missing:
            fut = asyncio.get_running_loop().create_future()
            try:
                await self.dram.send(Fetch(msg.layer, msg.step, missing, fut))
                reply = await fut
            except BaseException:
                for p, lost in missing.items():  # the slots were promised but never filled
                    self.cache.forget(msg.layer, p, lost)
                raise
            release, staged = reply.release, reply.staged_bytes
            for p, (src, rows) in reply.sources.items():
                dst = torch.from_numpy(plan.precisions[p].miss_slots)
                copies.append(Copy(p, dst, src, rows))
                copy_bytes += len(dst) * self.bundle_bytes[p]
        self.bytes_copied += copy_bytes
        slots = {p: torch.from_numpy(pp.slots) for p, pp in plan.precisions.items()}
        ready = WeightsReady(msg.layer, msg.step, slots, tuple(copies), release, copy_bytes, staged, ids=dict(ids),
                             rows=msg.rows)
        if not copies:
            return dataclasses.replace(ready, copied=self.uploader.last)
        assert self.copier is not None, "HBM manager used before setup"
        try:
            copied = await asyncio.get_running_loop().run_in_executor(self.copier, self.uploader.apply, ready,
                                                                      msg.layer, msg.step, not msg.ahead)
        except BaseException:
            for p, lost in missing.items():  # the slots may hold part of a copy: never served as filled
                self.cache.forget(msg.layer, p, lost)
            await self._give_back(ready)
            raise
        return dataclasses.replace(ready, copied=copied)

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {**super().stats(), "hits": self.hits, "misses": self.misses,
                "hit_ratio": self.hits / total if total else 0.0, "bytes_copied": self.bytes_copied,
                "upgraded": self.upgraded,
                "pool_bytes": self.pool_bytes, "budget": self.budget_bytes, "cache": self.cache.stats()}

