"""Trace exports on a hand-built run: lanes, Chrome JSON (times, flows, steps), summary, PNG, HTML, the tool."""
from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2cache.figures import Counters, figures
from m2cache.errors import ConfigError
from m2cache.trace.export import assign_lanes, summary, summary_line, to_chrome, to_html, to_png
from m2cache.trace.html import page_data
from m2cache.trace.png import STALL_COLOR
from m2cache.trace.recorder import Span, TraceRecorder

REPO = Path(__file__).resolve().parent.parent
MS = 1_000_000
LOOP, COMPUTE, IO = "event loop", "m2cache-compute_0", ("m2cache-ssd_0", "m2cache-ssd_1")
COUNTERS = Counters(tokens=3, decode_tokens=2, first_tokens=1, prefill_s=0.010, decode_s=0.040, stall_s=0.020,
                    ttft_s_sum=0.012, ssd_to_dram_bytes=6000, dram_to_hbm_bytes=800, hbm_hits=3, hbm_misses=1,
                    dram_served=1, dram_neuron_reads=1)
CHAIN = ["attention", "predict", "plan", "read_neurons", "read_neurons", "serve", "copy", "ffn"]


def _decode_run() -> TraceRecorder:
    """A hand-built run on the runtime's threads: a prefill (step 1), then steps 2 and 3 of 2 layers each;
    per layer attention, predict, plan, two concurrent SSD reads inside a serve (an await), the copy and
    the FFN, with the executor's stall (an await) from predict to the copy; the engine's counters saved."""
    r = TraceRecorder()
    r.add("executor", "prefill", 0, 10 * MS, layer=0, step=1, thread=COMPUTE)
    t = 10 * MS
    for step in (2, 3):
        for layer in range(2):
            at: dict[str, Any] = {"layer": layer, "step": step}
            r.add("executor", "attention", t, t + MS, **at, thread=COMPUTE)
            r.add("executor", "stall", t + MS, t + 6 * MS, **at, thread=LOOP)
            r.add("predictor", "predict", t + MS, t + 2 * MS, **at, thread=LOOP)
            r.add("hbm", "plan", t + 2 * MS, t + 3 * MS, **at, thread=LOOP)
            r.add("dram", "serve", t + 3 * MS, t + 5 * MS + 500, **at, nbytes=1500, thread=LOOP)
            r.add("ssd", "read_neurons", t + 3 * MS, t + 5 * MS, **at, nbytes=1000, thread=IO[0])
            r.add("ssd", "read_neurons", t + 3 * MS + 100, t + 4 * MS, **at, nbytes=500, thread=IO[1])
            r.add("hbm", "copy", t + 6 * MS, t + 7 * MS, **at, nbytes=200, thread=COMPUTE)
            r.add("executor", "ffn", t + 7 * MS, t + 10 * MS, **at, thread=COMPUTE)
            t += 10 * MS
    r.mark("stats", {"counters": COUNTERS.to_dict(), "device": "cpu"})
    return r


def _lane_names(trace: dict[str, Any]) -> list[str]:
    return [e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"]


# -- lanes --------------------------------------------------------------------------------------


def test_lanes_are_threads_with_the_event_loops_awaits_on_lanes_of_their_own() -> None:
    r = _decode_run()
    assert _lane_names(to_chrome(r.spans(), r.metadata)) == [
        "event loop", "event loop · executor waits", "event loop · dram waits", COMPUTE, *IO]


def test_spans_without_a_thread_get_a_lane_per_actor_as_version_1_drew_them() -> None:
    spans = [Span("executor", "ffn", 0, 1, 0, 50, 60, 0), Span("ssd", "read_layer", 0, 1, 9, 10, 40, 0)]
    assert _lane_names(to_chrome(spans, {})) == ["ssd", "executor"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 30)), max_size=40))
def test_lanes_never_overlap_and_use_no_more_sub_lanes_than_the_peak_concurrency(
        intervals: list[tuple[int, int]]) -> None:
    spans = sorted((Span("ssd", "read_neurons", -1, -1, 0, s, s + d, 0, IO[0]) for s, d in intervals),
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


# -- Chrome trace-event JSON ----------------------------------------------------------------------


def test_chrome_json_names_slices_by_kind_in_their_actors_category_and_survives_a_json_round_trip() -> None:
    r = _decode_run()
    trace = to_chrome(r.spans(), r.metadata)
    assert json.loads(json.dumps(trace)) == trace
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert sorted((e["cat"], e["name"]) for e in slices) == sorted((s.actor, s.kind) for s in r.spans())
    for event in trace["traceEvents"]:
        assert {"name", "ph", "ts", "pid", "tid"} <= event.keys()
    assert all({"layer", "step", "bytes", "thread"} <= e["args"].keys() for e in slices)


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


def test_chrome_times_are_whole_microseconds_so_back_to_back_spans_never_overlap() -> None:
    r = TraceRecorder()
    for start, end in ((1_500, 2_999), (2_999, 4_001), (4_001, 4_002), (4_002, 9_999)):
        r.add("executor", "ffn", start, end, thread=COMPUTE)
    slices = [e for e in to_chrome(r.spans(), {})["traceEvents"] if e["ph"] == "X"]
    assert all(type(e["ts"]) is int and type(e["dur"]) is int for e in slices)
    assert [(e["ts"], e["dur"]) for e in slices] == [(0, 1), (1, 1), (2, 0), (2, 6)]


def test_chrome_flows_follow_each_layer_of_each_step_from_its_attention_to_its_ffn() -> None:
    r = _decode_run()
    events = to_chrome(r.spans(), r.metadata)["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    flows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["ph"] in ("s", "t", "f"):
            flows[e["id"]].append(e)
    assert len(flows) == 4  # 2 decode steps x 2 layers; the prefill's one span is no flow
    for chain in flows.values():
        assert [e["ph"] for e in chain] == ["s"] + ["t"] * (len(CHAIN) - 2) + ["f"]
        assert chain[-1]["bp"] == "e" and [e["ts"] for e in chain] == sorted(e["ts"] for e in chain)
        bound = [[s for s in slices if s["tid"] == e["tid"] and s["ts"] <= e["ts"] <= s["ts"] + s["dur"]]
                 for e in chain]
        assert all(len(b) == 1 for b in bound)  # each event sits inside exactly one slice of its lane
        assert [b[0]["name"] for b in bound] == CHAIN
        assert len({(b[0]["args"]["step"], b[0]["args"]["layer"]) for b in bound}) == 1


def test_chrome_marks_where_each_step_starts_with_a_global_instant_event() -> None:
    r = _decode_run()
    instants = [e for e in to_chrome(r.spans(), r.metadata)["traceEvents"] if e["ph"] == "i"]
    assert [(e["name"], e["s"], e["ts"]) for e in instants] == [
        ("step 1", "g", 0), ("step 2", "g", 10_000), ("step 3", "g", 30_000)]
    assert [e["args"]["prefill"] for e in instants] == [True, False, False]


# -- summary ------------------------------------------------------------------------------------


def test_summary_gives_the_engine_figures_of_the_counters_saved_with_the_trace() -> None:
    r = _decode_run()
    s = summary(r.spans(), r.metadata)
    expected = figures(COUNTERS, device="cpu")
    assert {k: s[k] for k in expected} == expected
    assert s["figures_from"] == "engine counters" and s["stall_fraction"] == pytest.approx(0.020 / 0.050)
    assert s["bytes_per_token"] == {"ssd_to_dram": 2000, "dram_to_hbm": 800 / 3}


def test_summary_of_a_trace_without_counters_gives_only_what_its_spans_show() -> None:
    r = _decode_run()
    s = summary(r.spans(), {})
    assert s["figures_from"] is None and "stall_fraction" not in s
    assert s["span_bytes"] == {"ssd_to_dram": 4 * 1500, "dram_to_hbm": 4 * 200} and s["steps"] == 3
    assert "no engine counters" in summary_line(r.spans(), {})


def test_summary_line_says_what_per_token_means() -> None:
    r = _decode_run()
    line = summary_line(r.spans(), r.metadata)
    assert "per generated token (the prefill's first token included): SSD->DRAM 0.00 MB" in line
    assert "50.00 tok/s" in line and "stall 40.0% of step time" in line and "hit hbm 75% dram 50%" in line


def test_summary_of_nothing_still_gives_a_line() -> None:
    assert summary([], {})["spans"] == 0
    assert "0 spans" in summary_line([], {})


# -- pictures -----------------------------------------------------------------------------------


def test_png_of_the_whole_run_and_of_one_step_are_written(tmp_path: Path) -> None:
    r = _decode_run()
    to_png(r.spans(), r.metadata, tmp_path / "run.png")
    to_png(r.spans(), r.metadata, tmp_path / "step.png", step=2)
    for name in ("run.png", "step.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_of_a_step_the_trace_lacks_names_the_steps_it_has(tmp_path: Path) -> None:
    r = _decode_run()
    with pytest.raises(ConfigError, match=r"no step 9 \(it has steps 1\.\.3\)"):
        to_png(r.spans(), r.metadata, tmp_path / "step.png", step=9)


def test_a_span_shorter_than_a_pixel_is_still_drawn_in_the_png(tmp_path: Path) -> None:
    from matplotlib.image import imread

    r = TraceRecorder()
    r.add("dram", "serve", 0, 1000 * MS, thread=LOOP)
    r.add("executor", "stall", 500 * MS, 500 * MS + 1000, thread=COMPUTE)  # 1 us of a second: 0.001 px
    to_png(r.spans(), {}, tmp_path / "run.png")
    image = imread(tmp_path / "run.png")[:, : int(0.6 * 1650), :3]  # the axes, not the legend at the right
    red = tuple(int(STALL_COLOR[i:i + 2], 16) / 255 for i in (1, 3, 5))
    assert (abs(image - red).max(axis=-1) < 0.02).sum() > 10


def test_html_is_written_and_self_contained(tmp_path: Path) -> None:
    r = _decode_run()
    r.add("executor", "</script>odd kind", 0, 1)  # must not end the page's script early
    to_html(r.spans(), r.metadata, tmp_path / "run.html")
    page = (tmp_path / "run.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<canvas" in page and "wheel" in page
    assert "http://" not in page and "https://" not in page
    assert page.count("</script>") == 1
    assert 'id="legend"' in page and 'id="status"' in page and "step=" in page


def test_html_page_data_carries_steps_flows_and_a_colour_for_every_kind() -> None:
    r = _decode_run()
    data = page_data(r.spans(), r.metadata)
    assert data["steps"] == [[1, 0, 10_000, 1], [2, 10_000, 30_000, 0], [3, 30_000, 50_000, 0]]
    assert [[data["labels"][data["spans"][i][1]].split()[1] for i in chain] for chain in data["flows"]] == [CHAIN] * 4
    assert set(data["labels"]) == {f"{s.actor} {s.kind}" for s in r.spans()}
    assert data["colors"][data["labels"].index("executor stall")] == STALL_COLOR


# -- tools/trace.py -----------------------------------------------------------------------------


def _tool_main() -> Any:
    spec = importlib.util.spec_from_file_location("trace_tool", REPO / "tools" / "trace.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_m2cache_trace_is_the_tool_as_a_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from m2cache.cli.main import main

    _decode_run().save(tmp_path / "run.trace")
    assert main(["trace", str(tmp_path / "run.trace"), "--html", str(tmp_path / "out.html")]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and str(tmp_path / "out.html") in out and (tmp_path / "out.html").exists()
    assert main(["trace", str(tmp_path / "missing.trace")]) == 2
    assert "m2cache trace: no such file" in capsys.readouterr().err


def test_tool_prints_the_summary_and_writes_what_is_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _decode_run().save(tmp_path / "run.trace")
    out = tmp_path / "out"
    rc = _tool_main()([str(tmp_path / "run.trace"), "--json", f"{out}.json", "--png",
                       f"{out}.png", "--html", f"{out}.html", "--step", "2"])
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
