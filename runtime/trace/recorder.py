"""The trace recorder: every actor records its spans here, cheaply enough to leave on in benchmarks.

A span is one piece of work by one actor, on one thread: a read, a copy, a prediction, a layer's
compute, or an await on the event loop (the executor waiting for weights, the DRAM manager waiting
for a read). `tools/trace.py` turns a saved trace into a Chrome trace-event file, a picture, a page
and a summary (see `m2cache.trace.export`).

Actors and the span kinds the runtime records (the actor is a span's category, the kind its name):

| actor       | kinds                                                                  | thread         |
| ----------- | ---------------------------------------------------------------------- | -------------- |
| `ssd`       | `read_layer` (a whole layer off the SSD), `read_neurons` (bundles)      | an I/O thread  |
| `dram`      | `serve` (a fetch, to its reply), `preload` / `load` (a layer, to held) | event loop (*) |
| `hbm`       | `plan` (LRU lookup, slot assignment)                                   | event loop     |
| `hbm`       | `direct` (on the CPU from DRAM: the fetch, to its reply)               | event loop (*) |
| `hbm`       | `copy` (the batched copy up)                                           | copy           |
| `predictor` | `predict` (pick the active set and precisions)                         | compute        |
| `executor`  | `attention`, `ffn`, `prefill` (a prefill step's FFN), `lm_head`        | compute        |
| `executor`  | `stall` (waiting for the layer's weights)                              | event loop (*) |

(*) an await: the thread was free meanwhile (`WAITS`); exporters draw these on a lane of their own.
Every span of a step carries its `step` (the executor's step number; the prefill is a step) and every
span of a layer its `layer`; a read issued ahead (a preload) carries the step it is for. Exporters
follow one layer of one step from its attention through predict, plan, read, serve and copy to its
FFN by those two numbers. `flow` (nonzero) is an older explicit link, used where step or layer is
missing. Other actor and kind names are allowed.

The thread is recorded as a label: "event loop" for the thread running the asyncio loop (the main
thread; another thread's loop adds its name), otherwise the thread's name (`m2cache-compute_0`,
`m2cache-ssd_1`, ...), taken at the thread's first span.

File format (version 2): a zstd-compressed stream of msgpack records. The first is the header
`{format: "m2cache-trace", version: 2, metadata, dropped, names, columns}`; then span chunks, each
`{n, cols}` where `cols` holds one little-endian int64 array (as bytes) per column, in `columns`
order. Actor, kind and thread columns are indices into `names`. Version 1 files (no thread column)
still load, their spans' thread "" (exporters then give each actor a lane, as version 1 did).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from array import array
from asyncio.events import _get_running_loop  # C-fast, no exception when there is no loop
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np
import zstandard

from m2cache.errors import M2CacheError

logger = logging.getLogger(__name__)

ACTORS = ("ssd", "dram", "hbm", "predictor", "executor")

TRACE_FORMAT = "m2cache-trace"
TRACE_VERSION = 2
READABLE_VERSIONS = (1, 2)
COLUMNS = ("actor", "kind", "layer", "step", "nbytes", "start_ns", "end_ns", "flow", "thread")
_NAME_COLUMNS = (0, 1, 8)  # columns holding indices into `names`
# (actor, kind) of spans across an await on the event loop: the thread did other work meanwhile
WAITS = frozenset({("executor", "stall"), ("dram", "serve"), ("dram", "preload"), ("dram", "load"),
                   ("hbm", "direct")})
_CHUNK_SPANS = 1 << 16  # spans per msgpack record: bounds the memory one record needs on load


class TraceFormatError(M2CacheError, ValueError):
    """A file is not an m2cache trace, or was written by an incompatible version."""


@dataclass(frozen=True, slots=True)
class Span:
    """One recorded piece of work. Times are `time.perf_counter_ns` values; `flow` 0 means none;
    `thread` "" means unknown (a version 1 trace)."""

    actor: str
    kind: str
    layer: int
    step: int
    nbytes: int
    start_ns: int
    end_ns: int
    flow: int
    thread: str = ""

    @property
    def is_wait(self) -> bool:
        """An await on the event loop (see `WAITS`), not work that kept its thread busy."""
        return (self.actor, self.kind) in WAITS

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


class Recorder(Protocol):
    """What actors need from a recorder; `TraceRecorder` and `NullRecorder` both provide it."""

    enabled: bool

    def add(self, actor: str, kind: str, start_ns: int, end_ns: int, *, layer: int = -1,
            step: int = -1, nbytes: int = 0, flow: int = 0, thread: str | None = None) -> None: ...

    def span(self, actor: str, kind: str, *, layer: int = -1, step: int = -1, nbytes: int = 0,
             flow: int = 0) -> Any: ...

    def mark(self, name: str, value: Any) -> None: ...


class _SpanTimer:
    """Context manager behind `TraceRecorder.span`; `nbytes` may be set inside the block, once the
    size of a read is known. The span is recorded even if the block raises: a failed read took time.
    """

    __slots__ = ("_recorder", "actor", "kind", "layer", "step", "nbytes", "flow", "_start_ns")

    def __init__(self, recorder: TraceRecorder, actor: str, kind: str, layer: int, step: int,
                 nbytes: int, flow: int) -> None:
        self._recorder = recorder
        self.actor = actor
        self.kind = kind
        self.layer = layer
        self.step = step
        self.nbytes = nbytes
        self.flow = flow
        self._start_ns = 0

    def __enter__(self) -> _SpanTimer:
        self._start_ns = time.perf_counter_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        self._recorder.add(self.actor, self.kind, self._start_ns, time.perf_counter_ns(),
                           layer=self.layer, step=self.step, nbytes=self.nbytes, flow=self.flow)


class TraceRecorder:
    """Records spans into a bounded ring of int64 columns.

    Memory is bounded by `capacity` spans (9 int64 each, about 72 bytes): when full, the oldest span is
    overwritten and counted in `dropped`. Columns are `array('q')`, grown on demand up to capacity, so a
    short run does not pay for a million-span buffer. Actor and kind strings are interned to small
    ints. `add` takes a lock because the compute thread records too; it costs well under a
    microsecond.
    """

    enabled = True

    def __init__(self, capacity: int = 1_000_000) -> None:
        if capacity < 1:
            raise ValueError(f"trace capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.metadata: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._names: list[str] = []  # interned actor and kind strings; the columns hold indices
        self._name_ids: dict[str, int] = {}
        self._thread_ids: dict[threading.Thread, int] = {}  # a thread's label, interned at its first span
        self._cols = tuple(array("q") for _ in COLUMNS)
        self._next = 0  # slot the next span goes to once the ring is full
        self._total = 0  # spans ever added (recorded + dropped)
        self._dropped_before_load = 0  # spans dropped by the run a loaded trace came from

    @property
    def dropped(self) -> int:
        """Spans lost because the ring was full (oldest first)."""
        return self._dropped_before_load + max(0, self._total - self.capacity)

    def __len__(self) -> int:
        return len(self._cols[0])

    def _intern(self, name: str) -> int:
        index = self._name_ids.get(name)
        if index is None:
            index = len(self._names)
            self._names.append(name)
            self._name_ids[name] = index
        return index

    def _thread_label(self, thread: threading.Thread) -> str:
        if _get_running_loop() is None:
            return thread.name
        return "event loop" if thread is threading.main_thread() else f"event loop {thread.name}"

    def add(self, actor: str, kind: str, start_ns: int, end_ns: int, *, layer: int = -1,
            step: int = -1, nbytes: int = 0, flow: int = 0, thread: str | None = None) -> None:
        """Record one span, on the calling thread unless `thread` names another lane.

        Hot path: no allocation beyond the columns' amortized growth.
        """
        ids = self._name_ids
        current = threading.current_thread() if thread is None else None
        with self._lock:
            actor_id = ids.get(actor)
            if actor_id is None:
                actor_id = self._intern(actor)
            kind_id = ids.get(kind)
            if kind_id is None:
                kind_id = self._intern(kind)
            if current is not None:
                thread_id = self._thread_ids.get(current)
                if thread_id is None:
                    thread_id = self._thread_ids[current] = self._intern(self._thread_label(current))
            else:
                assert thread is not None
                thread_id = ids.get(thread)
                if thread_id is None:
                    thread_id = self._intern(thread)
            c_actor, c_kind, c_layer, c_step, c_nbytes, c_start, c_end, c_flow, c_thread = self._cols
            if self._total < self.capacity:
                c_actor.append(actor_id)
                c_kind.append(kind_id)
                c_layer.append(layer)
                c_step.append(step)
                c_nbytes.append(nbytes)
                c_start.append(start_ns)
                c_end.append(end_ns)
                c_flow.append(flow)
                c_thread.append(thread_id)
            else:
                slot = self._next
                c_actor[slot] = actor_id
                c_kind[slot] = kind_id
                c_layer[slot] = layer
                c_step[slot] = step
                c_nbytes[slot] = nbytes
                c_start[slot] = start_ns
                c_end[slot] = end_ns
                c_flow[slot] = flow
                c_thread[slot] = thread_id
                self._next = (slot + 1) % self.capacity
            self._total += 1

    def span(self, actor: str, kind: str, *, layer: int = -1, step: int = -1, nbytes: int = 0,
             flow: int = 0) -> _SpanTimer:
        """`with recorder.span("ssd", "read_layer", layer=3) as s: ...; s.nbytes = n`."""
        return _SpanTimer(self, actor, kind, layer, step, nbytes, flow)

    def mark(self, name: str, value: Any) -> None:
        """Record run metadata (tokens, prompt, config, hit ratios...), saved in the header.

        Values should be msgpack-serializable; anything else is saved as its `str()`.
        """
        self.metadata[name] = value

    def _ordered_columns(self) -> list[np.ndarray]:
        """The columns oldest first (undoing the ring rotation), as int64 arrays."""
        with self._lock:
            cols = [np.frombuffer(col, dtype=np.int64).copy() for col in self._cols]
            shift = self._next if len(cols[0]) == self.capacity else 0
        if shift:
            cols = [np.roll(col, -shift) for col in cols]
        return cols

    def spans(self) -> list[Span]:
        """All recorded spans, in start order (ties by end)."""
        cols = self._ordered_columns()
        order = np.lexsort((cols[6], cols[5]))
        names = self._names
        actor, kind, layer, step, nbytes, start, end, flow, thread = (col[order].tolist()
                                                                      for col in cols)
        return [Span(names[a], names[k], la, st, nb, s, e, f, names[t])
                for a, k, la, st, nb, s, e, f, t in zip(actor, kind, layer, step, nbytes, start, end,
                                                         flow, thread)]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace (header, then span chunks) as zstd-compressed msgpack."""
        cols = self._ordered_columns()
        header = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "metadata": self.metadata,
                  "dropped": self.dropped, "names": list(self._names), "columns": list(COLUMNS)}
        packer = msgpack.Packer(default=str, use_bin_type=True)
        with open(path, "wb") as file, zstandard.ZstdCompressor(level=3).stream_writer(file) as out:
            out.write(packer.pack(header))
            for begin in range(0, len(cols[0]), _CHUNK_SPANS):
                chunk = [col[begin:begin + _CHUNK_SPANS].astype("<i8").tobytes() for col in cols]
                out.write(packer.pack({"n": len(cols[0][begin:begin + _CHUNK_SPANS]),
                                       "cols": chunk}))
        logger.info("saved trace %s: %d spans, %d dropped", path, len(cols[0]), self.dropped)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TraceRecorder:
        """Read a trace written by `save`.

        Raises FileNotFoundError (or another OSError) if the file cannot be opened, and
        TraceFormatError if it is not an m2cache trace of a version this code reads.
        """
        with open(path, "rb") as file:
            try:
                reader = zstandard.ZstdDecompressor().stream_reader(file)
                records = list(msgpack.Unpacker(reader, raw=False, strict_map_key=False))
            except (zstandard.ZstdError, ValueError, msgpack.UnpackException) as error:
                raise TraceFormatError(
                    f"{path} is not an m2cache trace (cannot decode it: {error}); "
                    "pass a file written by TraceRecorder.save") from error
        return cls._from_records(records, path)

    @classmethod
    def _from_records(cls, records: list[Any], path: str | os.PathLike[str]) -> TraceRecorder:
        header = records[0] if records else None
        if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
            raise TraceFormatError(f"{path} is not an m2cache trace (no m2cache-trace header); "
                                   "pass a file written by TraceRecorder.save")
        version = header.get("version")
        if version not in READABLE_VERSIONS:
            raise TraceFormatError(f"{path} is trace format version {version}, this m2cache reads "
                                   f"versions {', '.join(map(str, READABLE_VERSIONS))}; use the "
                                   "m2cache that wrote it")
        try:
            names = [str(name) for name in header["names"]]
            saved = list(header["columns"])
            if version == 1:  # no thread column: every span's thread is "" (unknown)
                names.append("")
                unknown = len(names) - 1
                columns = [saved.index(name) for name in COLUMNS[:-1]]
                chunks = [[np.frombuffer(record["cols"][i], dtype="<i8") for i in columns]
                          + [np.full(int(record["n"]), unknown, dtype="<i8")]
                          for record in records[1:]]
            else:
                columns = [saved.index(name) for name in COLUMNS]
                chunks = [[np.frombuffer(record["cols"][i], dtype="<i8") for i in columns]
                          for record in records[1:]]
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise TraceFormatError(f"{path}: the trace is damaged ({error!r}); record it again") \
                from error
        cols = [np.concatenate([chunk[i] for chunk in chunks]) if chunks else np.empty(0, "<i8")
                for i in range(len(COLUMNS))]
        if len({len(col) for col in cols}) > 1 or (len(cols[0]) and max(
                cols[i].max() for i in _NAME_COLUMNS) >= len(names)) or (len(cols[0]) and min(
                cols[i].min() for i in _NAME_COLUMNS) < 0):
            raise TraceFormatError(f"{path}: the trace is damaged (inconsistent columns); "
                                   "record it again")
        recorder = cls(capacity=max(1, len(cols[0])))
        recorder.metadata = dict(header.get("metadata") or {})
        recorder._names = names
        recorder._name_ids = {name: i for i, name in enumerate(names)}
        for target, col in zip(recorder._cols, cols):
            target.frombytes(col.astype(np.int64).tobytes())
        recorder._total = len(cols[0])
        recorder._dropped_before_load = int(header.get("dropped", 0))
        return recorder


class _NullSpan:
    """The shared do-nothing context manager `NullRecorder.span` returns."""

    __slots__ = ("nbytes",)

    def __init__(self) -> None:
        self.nbytes = 0

    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_SPAN = _NullSpan()


class NullRecorder:
    """The recorder used when tracing is off: every method does nothing, as cheaply as possible.

    Callers that would compute something only for the trace can check `recorder.enabled`.
    """

    enabled = False
    dropped = 0
    capacity = 0

    def __init__(self) -> None:
        self.metadata: dict[str, Any] = {}

    def __len__(self) -> int:
        return 0

    def add(self, actor: str, kind: str, start_ns: int, end_ns: int, *, layer: int = -1,
            step: int = -1, nbytes: int = 0, flow: int = 0, thread: str | None = None) -> None:
        return None

    def span(self, actor: str, kind: str, *, layer: int = -1, step: int = -1, nbytes: int = 0,
             flow: int = 0) -> _NullSpan:
        return _NULL_SPAN

    def mark(self, name: str, value: Any) -> None:
        return None

    def spans(self) -> list[Span]:
        return []

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes nothing: tracing was off, so there is no trace to save."""
        logger.info("tracing is off; no trace written to %s", path)
