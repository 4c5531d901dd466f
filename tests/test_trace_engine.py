"""The engine's trace agrees with its stats, opens as Chrome trace-event JSON, and draws."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from m2cache.engine.config import EngineConfig
from m2cache.engine.engine import Engine
from m2cache.trace.recorder import TraceRecorder
from m2cache.trace.export import summary, to_chrome, to_html, to_png
from stress.scenarios import SLOW_SSD, Model, build_tiny, one_torch_thread


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    with one_torch_thread():
        return build_tiny(tmp_path_factory.mktemp("trace"), layers=12)


async def traced_run(model: Model, path: Path, **overrides) -> dict:
    cfg = EngineConfig(hbm_budget=int(0.2 * model.ffn_bytes), dram_budget=int(0.3 * model.ffn_bytes),
                       policy="dense-fp16", ssd_sim=SLOW_SSD, trace=str(path), **overrides)
    with one_torch_thread():
        async with asyncio.timeout(60):
            async with Engine.open(model.store, cfg) as engine:
                for prompt in model.prompts[:2]:
                    assert len([t async for t in engine.generate_ids(prompt, 6)]) == 6
                stats = engine.stats()
    return stats


async def test_bytes_and_stall_time_summed_from_the_trace_equal_the_stats(model: Model, tmp_path: Path) -> None:
    stats = await traced_run(model, tmp_path / "run.trace")
    spans = TraceRecorder.load(tmp_path / "run.trace").spans()
    ssd = sum(s.nbytes for s in spans if s.actor == "ssd")
    copied = sum(s.nbytes for s in spans if s.actor == "hbm" and s.kind == "copy")
    stall = sum(s.end_ns - s.start_ns for s in spans if s.actor == "executor" and s.kind == "stall") / 1e9
    assert ssd > 0 and copied > 0
    assert ssd == pytest.approx(stats["bytes"]["ssd_to_dram"], rel=0.01)
    assert copied == pytest.approx(stats["bytes"]["dram_to_hbm"], rel=0.01)
    assert stall == pytest.approx(stats["stall_s"], rel=0.01)


async def test_an_engine_trace_exports_to_valid_chrome_json_and_pictures(model: Model, tmp_path: Path) -> None:
    await traced_run(model, tmp_path / "run.trace", prefetch=2)
    rec = TraceRecorder.load(tmp_path / "run.trace")
    spans, meta = rec.spans(), rec.metadata
    doc = json.loads(json.dumps(to_chrome(spans, meta)))
    events = doc["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert {"ssd", "dram", "hbm", "predictor", "executor"} <= {
        e["args"]["name"].split(" #")[0] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    for e in complete:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= e.keys()
    by_lane: dict[int, list[dict]] = {}
    for e in complete:
        by_lane.setdefault(e["tid"], []).append(e)
    for lane in by_lane.values():
        lane.sort(key=lambda e: e["ts"])
        for a, b in zip(lane, lane[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3  # complete events in one lane never overlap
    assert summary(spans, meta)["tokens"] == meta["tokens"]
    to_png(spans, meta, tmp_path / "run.png")
    to_html(spans, meta, tmp_path / "run.html")
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "run.html").read_text() or "<canvas" in (tmp_path / "run.html").read_text()
