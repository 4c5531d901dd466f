"""A real engine's trace: its summary gives exactly the engine's figures, every span has its step, flows
follow each layer from predict to its FFN, and it exports to Chrome JSON and pictures."""
from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from m2cache.cli.main import print_stats
from m2cache.engine.config import EngineConfig
from m2cache.engine.engine import Engine
from m2cache.figures import FIGURE_KEYS
from m2cache.trace.export import flows, steps, summary, summary_line, to_chrome, to_html, to_png
from m2cache.trace.recorder import TraceRecorder
from stress.scenarios import SLOW_SSD, Model, build_tiny, one_torch_thread


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    with one_torch_thread():
        return build_tiny(tmp_path_factory.mktemp("trace"), layers=12)


async def traced_run(model: Model, path: Path, **overrides: Any) -> dict[str, Any]:
    """Two requests of 6 tokens; the stats once the engine closed, as its trace was saved."""
    cfg = EngineConfig(hbm_budget=int(0.2 * model.ffn_bytes), dram_budget=int(0.3 * model.ffn_bytes),
                       policy="dense-fp16", ssd_sim=SLOW_SSD, trace=str(path), **overrides)
    with one_torch_thread():
        async with asyncio.timeout(60):
            async with Engine.open(model.store, cfg) as engine:
                for prompt in model.prompts[:2]:
                    assert len([t async for t in engine.generate_ids(prompt, 6)]) == 6
    return engine.stats()


async def test_the_trace_summary_gives_exactly_the_figures_engine_stats_gives(model: Model, tmp_path: Path) -> None:
    stats = await traced_run(model, tmp_path / "run.trace")
    trace = TraceRecorder.load(tmp_path / "run.trace")
    summarised = summary(trace.spans(), trace.metadata)
    assert stats["tokens"] == 12 and stats["bytes"]["ssd_to_dram"] > 0 and stats["stall_s"] > 0
    assert {k: summarised.get(k) for k in FIGURE_KEYS} == {k: stats.get(k) for k in FIGURE_KEYS}


async def test_generate_stats_and_the_trace_summary_line_print_the_same_figures(model: Model, tmp_path: Path) -> None:
    stats = await traced_run(model, tmp_path / "run.trace")
    trace = TraceRecorder.load(tmp_path / "run.trace")
    printed = io.StringIO()
    print_stats(stats, printed)
    line = summary_line(trace.spans(), trace.metadata)
    per_token = stats["bytes_per_token"]
    for figure in (f"{stats['stall_fraction']:.1%} of step time", "per generated token",
                   f"SSD->DRAM {per_token['ssd_to_dram'] / 1e6:.2f} MB"):
        assert figure in printed.getvalue() and figure in line


async def test_bytes_and_stall_time_summed_from_the_spans_equal_the_counters(model: Model, tmp_path: Path) -> None:
    stats = await traced_run(model, tmp_path / "run.trace")
    spans = TraceRecorder.load(tmp_path / "run.trace").spans()
    ssd = sum(s.nbytes for s in spans if s.actor == "ssd")
    copied = sum(s.nbytes for s in spans if s.actor == "hbm" and s.kind == "copy")
    stall = sum(s.end_ns - s.start_ns for s in spans if s.actor == "executor" and s.kind == "stall") / 1e9
    assert ssd == stats["bytes"]["ssd_to_dram"] and copied == stats["bytes"]["dram_to_hbm"]
    assert stall == pytest.approx(stats["stall_s"], rel=1e-9)


async def test_every_span_carries_its_step_and_every_span_of_a_layer_its_layer(model: Model, tmp_path: Path) -> None:
    await traced_run(model, tmp_path / "run.trace", prefetch=2)
    spans = TraceRecorder.load(tmp_path / "run.trace").spans()
    assert {(s.actor, s.kind) for s in spans} >= {
        ("executor", "attention"), ("executor", "stall"), ("executor", "ffn"), ("predictor", "predict"),
        ("hbm", "plan"), ("hbm", "copy"), ("dram", "serve"), ("dram", "preload"), ("ssd", "read_layer")}
    assert all(s.step >= 1 for s in spans)
    assert all(s.layer >= 0 for s in spans if s.kind != "lm_head")


async def test_each_layer_of_each_step_flows_through_attention_predict_plan_serve_and_copy_to_its_ffn(
        model: Model, tmp_path: Path) -> None:
    await traced_run(model, tmp_path / "run.trace", prefetch=2)
    spans = TraceRecorder.load(tmp_path / "run.trace").spans()
    chains = {(spans[c[0]].step, spans[c[0]].layer): [spans[i] for i in c] for c in flows(spans)}
    ran = [st.number for st in steps(spans)]
    assert set(chains) >= {(step, layer) for step in ran for layer in range(12)}
    for step in ran:
        for layer in range(12):
            chain = chains[(step, layer)]
            kinds = [s.kind for s in chain]  # in end order: a preload's read may end before the attention
            assert kinds[-1] in ("ffn", "prefill")
            stages = [kinds.index(k) for k in ("attention", "predict", "plan", "serve", "copy")]
            assert stages == sorted(stages)
            assert [s.end_ns for s in chain] == sorted(s.end_ns for s in chain)
    assert any(s.actor == "ssd" for chain in chains.values() for s in chain)


async def test_an_engine_trace_exports_to_chrome_json_with_a_lane_per_thread_and_to_pictures(
        model: Model, tmp_path: Path) -> None:
    await traced_run(model, tmp_path / "run.trace", prefetch=2)
    rec = TraceRecorder.load(tmp_path / "run.trace")
    spans, meta = rec.spans(), rec.metadata
    doc = json.loads(json.dumps(to_chrome(spans, meta)))
    events = doc["traceEvents"]
    lanes = [e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"]
    assert lanes[:2] == ["event loop", "event loop · executor waits"]
    assert "m2cache-compute_0" in lanes and any(lane.startswith("m2cache-ssd_") for lane in lanes)
    by_lane: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e["ph"] == "X":
            by_lane.setdefault(e["tid"], []).append(e)
    for lane_events in by_lane.values():
        for a, b in zip(lane_events, lane_events[1:]):
            assert a["ts"] + a["dur"] <= b["ts"]  # whole microseconds: complete events in a lane never overlap
    to_png(spans, meta, tmp_path / "run.png", step=3)
    to_html(spans, meta, tmp_path / "run.html")
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<canvas" in (tmp_path / "run.html").read_text()
