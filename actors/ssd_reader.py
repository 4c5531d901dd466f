"""SSD reader: reads whole layers or neuron bundles off the event loop, verified, with retries.

Reads run in a thread pool (``io_threads`` at once); the store's reader verifies every block's CRC,
retries transient errors with bounded backoff, reads a corrupt block again until it reads right or
proves damaged (the same wrong bytes three reads in a row: ``ChecksumError``; wrong bytes that keep
changing: ``UnstableReadError``), and raises a typed error naming the file, layer and neuron range
otherwise — which fails exactly that read's reply.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from m2cache.actors.base import Actor, fail, resolve
from m2cache.actors.messages import ReadRequest
from m2cache.errors import M2CacheError, SSDError
from m2cache.storage.reader import Store


RUN_THREADS = 8  # the disk's queue depth for one neuron-level read's runs


def _shutdown(pool: ThreadPoolExecutor) -> None:
    pool.shutdown(wait=True, cancel_futures=True)


class SSDReader(Actor):
    name = "ssd"

    def __init__(self, store: Store, backend, io_threads: int, recorder, inbox_size: int = 64) -> None:
        super().__init__(inbox_size)
        self.store, self.backend, self.recorder = store, backend, recorder
        self.io_threads = io_threads
        self.pool: ThreadPoolExecutor | None = None
        self.run_pool: ThreadPoolExecutor | None = None  # the runs of one neuron-level read, at once
        self.slots = asyncio.Semaphore(io_threads * 2)  # reads queued in the pool at most
        self.bytes_read = 0
        self.bytes_by_kind: dict[str, int] = {}
        self.reads = 0
        self.errors = 0
        self.busy_s = 0.0

    async def setup(self) -> None:
        self.pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="m2cache-ssd")
        self.run_pool = ThreadPoolExecutor(RUN_THREADS, thread_name_prefix="m2cache-ssd-run")

    async def teardown(self, error: BaseException | None) -> None:
        for pool in (self.pool, self.run_pool):
            if pool is not None:
                # waiting for reads in flight (a slow or stalled SSD: up to a read's latency) must not
                # block the event loop: wait in a helper thread
                await asyncio.get_running_loop().run_in_executor(None, _shutdown, pool)

    async def handle(self, msg: ReadRequest) -> None:
        await self.slots.acquire()
        loop = asyncio.get_running_loop()
        assert self.pool is not None, "SSD reader used before setup"
        try:
            cf = self.pool.submit(self._read, msg)
        except RuntimeError as e:  # pool shut down
            self.slots.release()
            fail(msg.reply, SSDError(f"the SSD reader is closed: {e}"))
            return
        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(self._done, msg, f))

    def _read(self, msg: ReadRequest):
        t0 = time.perf_counter_ns()
        try:
            if msg.ids is None:
                data = self.store.read_layer(msg.layer, msg.precision, self.backend)
                nbytes = self.store.layer_bytes(msg.precision)
            else:
                data = self.store.read_neurons(msg.layer, msg.precision, msg.ids, self.backend, self.run_pool)
                nbytes = self.store.run_bytes(msg.precision, msg.ids)
        except SSDError as e:
            where = f"FFN layer {msg.layer} {msg.precision}"
            if where in str(e):
                raise
            # the backend names only the file and byte range: say which layer and neurons needed it
            lo, hi = (0, self.store.num_neurons - 1) if msg.ids is None else (int(msg.ids.min()), int(msg.ids.max()))
            raise type(e)(f"{where} neurons {lo}-{hi}: {e}") from e
        t1 = time.perf_counter_ns()
        self.recorder.add("ssd", msg.kind, t0, t1, layer=msg.layer, step=msg.step, nbytes=nbytes)
        return data, nbytes, (t1 - t0) / 1e9

    def _done(self, msg: ReadRequest, cf) -> None:
        self.slots.release()
        exc = cf.exception() if not cf.cancelled() else SSDError("read cancelled at shutdown")
        if exc is not None:
            self.errors += 1
            fail(msg.reply, exc if isinstance(exc, M2CacheError) else SSDError(
                f"reading FFN layer {msg.layer} {msg.precision} failed: {exc!r}"))
            return
        data, nbytes, seconds = cf.result()
        # counted even when the requester gave up: the bytes were read (the trace has them too)
        self.reads += 1
        self.bytes_read += nbytes
        self.bytes_by_kind[msg.kind] = self.bytes_by_kind.get(msg.kind, 0) + nbytes
        self.busy_s += seconds
        resolve(msg.reply, data)

    def stats(self) -> dict:
        return {**super().stats(), "reads": self.reads, "bytes_read": self.bytes_read,
                "bytes_by_kind": dict(self.bytes_by_kind), "errors": self.errors, "busy_s": self.busy_s}
