"""Turn recorded spans into things people look at: Chrome trace-event JSON, a summary, PNG and HTML.

Everything here is a pure function of `(spans, metadata)`, so it works the same on a live
`TraceRecorder` and on one loaded from a file. The conventions it relies on are in
`m2cache.trace.recorder` (actors, span kinds, threads, steps); where spans go on a timeline is
`m2cache.trace.layout`; each format has its module, gathered here:

- `to_chrome` (`m2cache.trace.chrome`): Chrome trace-event JSON for Perfetto or chrome://tracing;
- `summary`, `summary_line` (`m2cache.trace.summary`): the run's figures, as `engine.stats()` gives them;
- `to_png` (`m2cache.trace.png`) and `to_html` (`m2cache.trace.html`): a picture and a zoomable page;
- `m2cache.trace.browser` renders the page in a headless Chromium to check it loads.
"""
from __future__ import annotations

from m2cache.trace.chrome import to_chrome
from m2cache.trace.html import to_html
from m2cache.trace.layout import assign_lanes, flows, steps
from m2cache.trace.png import to_png
from m2cache.trace.summary import summary, summary_line

__all__ = ["assign_lanes", "flows", "steps", "summary", "summary_line", "to_chrome", "to_html", "to_png"]
