"""Trace recorder, file format, exports (Chrome JSON, summary, PNG, HTML) and tools/trace.py."""
from __future__ import annotations

import importlib.util
import json
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from m2cache.errors import M2CacheError
from m2cache.trace.recorder import NullRecorder, Span, TraceFormatError, TraceRecorder
from m2cache.trace.export import (assign_lanes, summary, summary_line, to_chrome, to_html,
                                  to_png)

REPO = Path(__file__).resolve().parent.parent
MS = 1_000_000


def _decode_run() -> TraceRecorder:
    """A hand-built run: a prefill, then 2 steps x 2 layers, each with two concurrent SSD reads
    (overlapping: they need sub-lanes), a serve, a copy, a stall, attention and an FFN."""
    r = TraceRecorder()
    r.add("executor", "prefill", 0, 10 * MS)
    t, flow = 10 * MS, 0
    for step in range(2):
        for layer in range(2):
            flow += 1
            r.add("predictor", "predict", t, t + MS, layer=layer, step=step, flow=flow)
            r.add("ssd", "read_neurons", t + MS, t + 3 * MS, layer=layer, step=step, nbytes=1000,
                  flow=flow)
            r.add("ssd", "read_neurons", t + 2 * MS, t + 4 * MS, layer=layer, step=step, nbytes=500,
                  flow=flow)
            r.add("dram", "serve", t + 4 * MS, t + 5 * MS, layer=layer, step=step, nbytes=300,
                  flow=flow)
            r.add("hbm", "copy", t + 5 * MS, t + 6 * MS, layer=layer, step=step, nbytes=200,
                  flow=flow)
            r.add("executor", "stall", t, t + 6 * MS, layer=layer, step=step)
            r.add("executor", "attention", t + 6 * MS, t + 8 * MS, layer=layer, step=step)
            r.add("executor", "ffn", t + 8 * MS, t + 10 * MS, layer=layer, step=step, flow=flow)
            t += 10 * MS
    r.mark("tokens", 2)
    r.mark("hit_ratio", {"hbm": 0.75, "dram": 0.5})
    r.mark("device", "cpu")
    return r


# -- recorder -----------------------------------------------------------------------------------


def test_spans_come_back_in_start_order_with_all_fields() -> None:
    r = TraceRecorder()
    r.add("hbm", "copy", 50, 60, layer=2, step=3, nbytes=7, flow=9)
    r.add("ssd", "read_layer", 10, 40)
    assert r.spans() == [Span("ssd", "read_layer", -1, -1, 0, 10, 40, 0),
                         Span("hbm", "copy", 2, 3, 7, 50, 60, 9)]


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
    lambda p: _zstd_msgpack(p, {"format": "m2cache-trace", "version": 1, "names": []},
                            {"n": 1, "cols": [b"x"]}),
])
def test_load_of_a_file_that_is_not_a_trace_raises_trace_format_error(
        tmp_path: Path, make: Any) -> None:
    with pytest.raises(TraceFormatError) as info:
        TraceRecorder.load(make(tmp_path / "bad.trace"))
    assert isinstance(info.value, M2CacheError) and isinstance(info.value, ValueError)


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


# -- Chrome trace-event JSON ----------------------------------------------------------------------


def test_chrome_json_has_the_required_fields_and_survives_a_json_round_trip() -> None:
    r = _decode_run()
    trace = to_chrome(r.spans(), r.metadata)
    assert json.loads(json.dumps(trace)) == trace
    for event in trace["traceEvents"]:
        assert {"name", "ph", "ts", "pid", "tid"} <= event.keys()
        if event["ph"] == "X":
            assert event["dur"] >= 0 and {"layer", "step", "bytes"} <= event["args"].keys()
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert {"ssd", "ssd #2", "dram", "hbm", "predictor", "executor"} <= names


def test_chrome_events_are_in_time_order_and_never_overlap_within_a_lane() -> None:
    r = _decode_run()
    events = to_chrome(r.spans(), r.metadata)["traceEvents"]
    timed = [e["ts"] for e in events if e["ph"] != "M"]
    assert timed == sorted(timed)
    by_lane: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            by_lane[e["tid"]].append(e)
    for lane in by_lane.values():
        for a, b in zip(lane, lane[1:]):
            assert a["ts"] + a["dur"] <= b["ts"]
    assert sum(1 for e in events if e["ph"] == "X") == len(r.spans())


def test_chrome_flows_are_paired_and_sit_inside_their_slices() -> None:
    r = _decode_run()
    events = to_chrome(r.spans(), r.metadata)["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    finishes = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts and starts.keys() == finishes.keys()
    for flow_id, start in starts.items():
        finish = finishes[flow_id]
        assert finish["bp"] == "e" and start["ts"] <= finish["ts"]
        for end in (start, finish):
            assert any(s["tid"] == end["tid"] and s["ts"] <= end["ts"] <= s["ts"] + s["dur"]
                       for s in slices)
        (target,) = [s for s in slices if s["tid"] == finish["tid"]
                     and s["ts"] <= finish["ts"] <= s["ts"] + s["dur"]]
        assert target["cat"] == "executor" and target["name"] == "ffn"
    # every request span of the 4 flows (predict, 2 reads, serve, copy) points at its FFN
    assert len(starts) == 4 * 5


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 30)), max_size=40))
def test_lanes_never_overlap_and_use_no_more_sub_lanes_than_the_peak_concurrency(
        intervals: list[tuple[int, int]]) -> None:
    spans = sorted((Span("ssd", "read_neurons", -1, -1, 0, s, s + d, 0) for s, d in intervals),
                   key=lambda s: (s.start_ns, s.end_ns))
    lanes, lane_of = assign_lanes(spans)
    last_end: dict[int, int] = {}
    for span, lane in zip(spans, lane_of):
        assert last_end.get(lane, -1) <= span.start_ns
        last_end[lane] = span.end_ns
    # spans live as s starts: s itself, and the ones before it in start order still running (so a
    # zero-length span inside another needs a second lane, one at another's end does not)
    peak = max((1 + sum(1 for o in spans[:i] if s.start_ns < o.end_ns)
                for i, s in enumerate(spans)), default=0)
    assert len(lanes) == max(peak, 1 if spans else 0)


# -- summary ------------------------------------------------------------------------------------


def test_summary_numbers_on_a_hand_built_run() -> None:
    r = _decode_run()
    s = summary(r.spans(), r.metadata)
    assert s["decode_seconds"] == pytest.approx(0.040)  # 4 layer-steps x 10 ms after prefill
    assert s["tokens_per_s"] == pytest.approx(2 / 0.040)
    assert s["stall_fraction"] == pytest.approx(6 / 10)
    assert s["bytes_by_edge"] == {"ssd_to_dram": 4 * 1500, "dram_to_hbm": 4 * 200}
    assert s["bytes_per_token"] == {"ssd_to_dram": 3000, "dram_to_hbm": 400}
    assert s["hit_ratio"] == {"hbm": 0.75, "dram": 0.5}
    assert s["carbon_g_per_1k_tokens"] > 0
    line = summary_line(r.spans(), r.metadata)
    assert "50.00 tok/s" in line and "stall 60.0%" in line and "hit hbm 75% dram 50%" in line


def test_summary_without_tokens_or_spans_still_gives_a_line() -> None:
    assert summary([], {})["tokens_per_s"] is None
    assert "0 spans" in summary_line([], {})


# -- pictures -----------------------------------------------------------------------------------


def test_png_is_written(tmp_path: Path) -> None:
    r = _decode_run()
    to_png(r.spans(), r.metadata, tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_is_written_and_self_contained(tmp_path: Path) -> None:
    r = _decode_run()
    r.add("executor", "</script>odd kind", 0, 1)  # must not end the page's script early
    to_html(r.spans(), r.metadata, tmp_path / "run.html")
    page = (tmp_path / "run.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<canvas" in page and "wheel" in page
    assert "http://" not in page and "https://" not in page
    assert page.count("</script>") == 1
    assert "stall" in page and "tok/s" in page


# -- tools/trace.py -----------------------------------------------------------------------------


def _tool_main() -> Any:
    spec = importlib.util.spec_from_file_location("trace_tool", REPO / "tools" / "trace.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_tool_prints_the_summary_and_writes_what_is_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _decode_run().save(tmp_path / "run.trace")
    out = tmp_path / "out"
    rc = _tool_main()([str(tmp_path / "run.trace"), "--json", f"{out}.json", "--png",
                       f"{out}.png", "--html", f"{out}.html"])
    assert rc == 0 and "tok/s" in capsys.readouterr().out
    assert json.loads(Path(f"{out}.json").read_text())["traceEvents"]
    assert Path(f"{out}.png").exists() and Path(f"{out}.html").exists()


@pytest.mark.parametrize("content", [None, b"hello"])
def test_tool_exits_2_with_one_line_for_a_missing_or_non_trace_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None) -> None:
    path = tmp_path / "x.trace"
    if content is not None:
        path.write_bytes(content)
    assert _tool_main()([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err
