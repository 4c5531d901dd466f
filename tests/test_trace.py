"""Trace recorder and its file format: spans with their thread, the ring, save and load (versions 1, 2)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard

from m2cache.errors import M2CacheError
from m2cache.trace.recorder import NullRecorder, Span, TraceFormatError, TraceRecorder

# -- recorder -----------------------------------------------------------------------------------


def test_spans_come_back_in_start_order_with_all_fields() -> None:
    r = TraceRecorder()
    r.add("hbm", "copy", 50, 60, layer=2, step=3, nbytes=7, flow=9, thread="m2cache-compute_0")
    r.add("ssd", "read_layer", 10, 40, thread="m2cache-ssd_0")
    assert r.spans() == [Span("ssd", "read_layer", -1, -1, 0, 10, 40, 0, "m2cache-ssd_0"),
                         Span("hbm", "copy", 2, 3, 7, 50, 60, 9, "m2cache-compute_0")]


def test_each_span_records_the_name_of_the_thread_that_added_it() -> None:
    r = TraceRecorder()
    worker = threading.Thread(target=lambda: r.add("ssd", "read_layer", 1, 2), name="m2cache-ssd_7")
    worker.start()
    worker.join()
    r.add("executor", "ffn", 3, 4)
    assert [s.thread for s in r.spans()] == ["m2cache-ssd_7", threading.current_thread().name]


async def test_a_span_added_on_the_event_loop_is_on_the_event_loop_lane() -> None:
    r = TraceRecorder()
    r.add("predictor", "predict", 1, 2)  # from this coroutine, on the loop's thread
    (span,) = r.spans()
    assert span.thread == "event loop"


def test_ring_drops_the_oldest_spans_and_counts_them() -> None:
    r = TraceRecorder(capacity=3)
    for i in range(5):
        r.add("ssd", "read_layer", i, i + 1, layer=i)
    assert [s.layer for s in r.spans()] == [2, 3, 4]
    assert r.dropped == 2 and len(r) == 3


def test_span_context_manager_times_the_block_and_takes_late_nbytes() -> None:
    r = TraceRecorder()
    with r.span("ssd", "read_layer", layer=1, step=2) as s:
        s.nbytes = 4096
    (span,) = r.spans()
    assert (span.actor, span.kind, span.layer, span.step, span.nbytes) == (
        "ssd", "read_layer", 1, 2, 4096)
    assert span.end_ns >= span.start_ns > 0


def test_span_is_recorded_even_when_the_block_raises() -> None:
    r = TraceRecorder()
    with pytest.raises(OSError):
        with r.span("ssd", "read_neurons"):
            raise OSError("disk gone")
    assert len(r.spans()) == 1


def test_concurrent_adds_from_threads_keep_every_span_whole() -> None:
    r = TraceRecorder()

    def record(actor: str, base: int) -> None:
        for i in range(2000):
            r.add(actor, "k", base + i, base + i + 1, layer=base, nbytes=base + i)

    threads = [threading.Thread(target=record, args=(a, b))
               for a, b in (("ssd", 0), ("executor", 10**6))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans = r.spans()
    assert len(spans) == 4000
    assert all(s.nbytes == s.start_ns and s.actor == ("ssd" if s.layer == 0 else "executor")
               for s in spans)


def test_save_then_load_gives_back_spans_metadata_and_dropped(tmp_path: Path) -> None:
    r = TraceRecorder(capacity=4)
    for i in range(6):  # wraps the ring: the saved order must undo the rotation
        r.add("ssd" if i % 2 else "executor", "k", 100 * i, 100 * i + 50, layer=i,
              nbytes=2**40 + i, flow=i)
    r.mark("tokens", 64)
    r.mark("config", {"hbm_budget": "48MB", "lookahead": 1})
    r.save(tmp_path / "run.trace")
    loaded = TraceRecorder.load(tmp_path / "run.trace")
    assert loaded.spans() == r.spans()
    assert loaded.metadata == {"tokens": 64, "config": {"hbm_budget": "48MB", "lookahead": 1}}
    assert loaded.dropped == 2


def test_metadata_that_msgpack_cannot_hold_is_saved_as_text(tmp_path: Path) -> None:
    r = TraceRecorder()
    r.mark("path", tmp_path)
    r.save(tmp_path / "run.trace")
    assert TraceRecorder.load(tmp_path / "run.trace").metadata == {"path": str(tmp_path)}


_V1_COLUMNS = ("actor", "kind", "layer", "step", "nbytes", "start_ns", "end_ns", "flow")


def _zstd_msgpack(path: Path, *records: Any) -> Path:
    path.write_bytes(zstandard.ZstdCompressor().compress(
        b"".join(msgpack.packb(record) for record in records)))
    return path


@pytest.mark.parametrize("make", [
    lambda p: (p.write_bytes(b"not a trace at all"), p)[1],
    lambda p: (p.write_bytes(b""), p)[1],
    lambda p: _zstd_msgpack(p, [1, 2, 3]),
    lambda p: _zstd_msgpack(p, {"format": "something-else", "version": 1}),
    lambda p: _zstd_msgpack(p, {"format": "m2cache-trace", "version": 99}),
    lambda p: _zstd_msgpack(p, {"format": "m2cache-trace", "version": 2, "names": ["a"], "columns": _V1_COLUMNS},
                            {"n": 0, "cols": [b""] * len(_V1_COLUMNS)}),  # version 2 without its thread column
    lambda p: _zstd_msgpack(p, {"format": "m2cache-trace", "version": 1, "names": []},
                            {"n": 1, "cols": [b"x"]}),
])
def test_load_of_a_file_that_is_not_a_trace_raises_trace_format_error(
        tmp_path: Path, make: Any) -> None:
    with pytest.raises(TraceFormatError) as info:
        TraceRecorder.load(make(tmp_path / "bad.trace"))
    assert isinstance(info.value, M2CacheError) and isinstance(info.value, ValueError)


def test_a_version_1_trace_loads_with_every_span_on_an_unknown_thread(tmp_path: Path) -> None:
    cols = {"actor": [0], "kind": [1], "layer": [3], "step": [2], "nbytes": [4096], "start_ns": [10],
            "end_ns": [20], "flow": [0]}
    path = _zstd_msgpack(tmp_path / "v1.trace",
                         {"format": "m2cache-trace", "version": 1, "metadata": {"tokens": 1}, "dropped": 0,
                          "names": ["ssd", "read_layer"], "columns": list(_V1_COLUMNS)},
                         {"n": 1, "cols": [np.array(cols[c], "<i8").tobytes() for c in _V1_COLUMNS]})
    loaded = TraceRecorder.load(path)
    assert loaded.spans() == [Span("ssd", "read_layer", 3, 2, 4096, 10, 20, 0, "")]
    assert loaded.metadata == {"tokens": 1}


def test_a_saved_trace_is_version_2_with_a_thread_column(tmp_path: Path) -> None:
    r = TraceRecorder()
    r.add("ssd", "read_layer", 1, 2)
    r.save(tmp_path / "run.trace")
    raw = zstandard.ZstdDecompressor().stream_reader((tmp_path / "run.trace").open("rb"))
    header = next(iter(msgpack.Unpacker(raw, raw=False)))
    assert header["version"] == 2 and header["columns"][-1] == "thread"


def test_load_of_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        TraceRecorder.load(tmp_path / "missing.trace")


def test_null_recorder_records_nothing_and_writes_nothing(tmp_path: Path) -> None:
    r = NullRecorder()
    r.add("ssd", "read_layer", 0, 1, layer=1)
    with r.span("ssd", "read_layer") as s:
        s.nbytes = 5
    r.mark("tokens", 3)
    r.save(tmp_path / "off.trace")
    assert r.spans() == [] and r.dropped == 0 and not r.enabled
    assert not (tmp_path / "off.trace").exists()
