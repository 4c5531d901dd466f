"""The trace's HTML page of a real engine run, rendered in a real headless browser (Chromium).

Skipped where Chromium is not installed (CI does not need it); `make trace-check` installs it, sets
M2CACHE_REQUIRE_CHROMIUM=1 (so a missing browser fails instead) and keeps the screenshot at
M2CACHE_TRACE_SCREENSHOT.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from m2cache.engine.config import EngineConfig
from m2cache.engine.engine import Engine
from m2cache.trace.browser import check_page, find_chromium
from m2cache.trace.html import to_html
from m2cache.trace.png import STALL_COLOR
from m2cache.trace.recorder import TraceRecorder
from stress.scenarios import SLOW_SSD, build_tiny, one_torch_thread

STEP = 3  # a decode step: step 1 is the prefill
pytestmark = pytest.mark.skipif(
    find_chromium() is None and os.environ.get("M2CACHE_REQUIRE_CHROMIUM") != "1",
    reason="no Chromium to render the trace page in (apt-get install -y chromium, or run make trace-check)")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML page of a short real run: a tiny 12-layer model over a slow simulated SSD, 6 tokens."""
    root = tmp_path_factory.mktemp("browser")
    with one_torch_thread():
        model = build_tiny(root, layers=12)

    async def run() -> None:
        cfg = EngineConfig(hbm_budget=int(0.2 * model.ffn_bytes), dram_budget=int(0.3 * model.ffn_bytes),
                           policy="dense-fp16", ssd_sim=SLOW_SSD, trace=str(root / "run.trace"), prefetch=2)
        with one_torch_thread():
            async with asyncio.timeout(60), Engine.open(model.store, cfg) as engine:
                assert len([t async for t in engine.generate_ids(model.prompts[0], 6)]) == 6

    asyncio.run(run())
    trace = TraceRecorder.load(root / "run.trace")
    to_html(trace.spans(), trace.metadata, root / "run.html", trace.dropped)
    return root / "run.html"


def test_the_page_of_a_real_run_loads_in_headless_chromium_zoomed_to_a_decode_step(
        page: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    shot = Path(os.environ.get("M2CACHE_TRACE_SCREENSHOT") or tmp_path / "step.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    state = check_page(page, f"step={STEP}", screenshot=shot, size=(1800, 440))
    assert (state.state, state.title) == ("ok", "m2cache trace: ok"), state.text
    assert state.text.endswith(f"showing step {STEP}")
    image = imread(shot)[..., :3]
    red = tuple(int(STALL_COLOR[i:i + 2], 16) / 255 for i in (1, 3, 5))
    assert (abs(image - red).max(axis=-1) < 0.02).sum() > 1000  # the stalls were drawn, not just the legend


def test_the_page_reports_an_error_for_a_step_the_trace_does_not_have(page: Path) -> None:
    state = check_page(page, "step=999")
    assert state.state == "error" and "no step 999" in state.text and state.title.startswith("m2cache trace: error")
