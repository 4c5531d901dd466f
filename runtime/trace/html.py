"""One self-contained page of a trace (canvas and inline JS, no external URLs).

Lanes as in `m2cache.trace.layout`, a legend, dashed lines where steps start, arrows following each
layer of each step (when zoomed in enough to read them; always for the span under the mouse), zoom on
the wheel, pan by dragging, details on hover. Every span is drawn at least `MIN_WIDTH_PX` wide.

The page opens zoomed to a step when its URL ends in ``#step=N``. It reports how loading went in
``<div id="status" data-state="ok|error">`` and in its title ("m2cache trace: ok" or
"m2cache trace: error: ..."), which a headless browser check reads (``m2cache.trace.browser``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from m2cache.trace.layout import assign_lanes, flows, lane_name, micros, ordered, span_label, steps
from m2cache.trace.png import MIN_WIDTH_PX, STEP_COLOR, label_colors
from m2cache.trace.recorder import Span
from m2cache.trace.summary import summary_line

_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>m2cache trace: loading</title>
<style>body{font:13px sans-serif;margin:8px}#c{width:100%;border:1px solid #ccc;cursor:grab}
#tip{position:fixed;background:#fffbe6;border:1px solid #999;padding:3px 6px;display:none;
pointer-events:none;white-space:pre}#legend span.sw{display:inline-block;width:12px;height:10px;
margin:0 3px 0 10px;vertical-align:middle}#legend{margin:4px 0;line-height:18px}
#status{color:#666;font-size:11px}#status[data-state=error]{color:#d62728;font-weight:bold}</style>
</head><body>
<div id="title"></div>
<div>wheel: zoom, drag: pan, double-click: whole run; <code>#step=N</code> in the URL zooms to step N</div>
<div id="legend"></div>
<canvas id="c"></canvas><div id="tip"></div><div id="status" data-state="loading">loading</div>
<script>
const statusEl = document.getElementById("status");
function report(state, text) {
  statusEl.dataset.state = state; statusEl.textContent = text;
  document.title = "m2cache trace: " + (state === "ok" ? "ok" : state + ": " + text);
}
window.addEventListener("error", e => report("error", String(e.message)));
const D = __DATA__;
const MINW = __MINW__, LW = 170, LH = 22, TOP = 16, AXIS = 22;
const c = document.getElementById("c"), g = c.getContext("2d"), tip = document.getElementById("tip");
const end = D.spans.reduce((m, s) => Math.max(m, s[2] + s[3]), 1);
const chainOf = new Map();
D.flows.forEach((chain, k) => chain.forEach(i => chainOf.set(i, k)));
let v0 = 0, v1 = end, drag = null, hover = null, shown = "the whole run";
document.getElementById("title").textContent = D.title;
const legend = document.getElementById("legend");
D.labels.forEach((l, i) => {
  const sw = document.createElement("span"); sw.className = "sw"; sw.style.background = D.colors[i];
  legend.append(sw, document.createTextNode(l === "executor stall" ? l + " (waiting for weights)" : l));
});
legend.append(document.createElement("br"), document.createTextNode(
  "- - - step starts (dashed)   \\u2192 flow: one layer of one step, attention \\u2192 predict \\u2192 plan " +
  "\\u2192 read \\u2192 serve \\u2192 copy \\u2192 FFN   lanes: one per thread; '\\u00b7 ... waits' = awaits " +
  "on the event loop (the thread ran other work meanwhile)"));
c.height = TOP + D.lanes.length * LH + AXIS;
function x(t) { return LW + (t - v0) / (v1 - v0) * (c.width - LW); }
function rect(s) {  // drawn clipped to the plot, right of the lane names
  const a = x(s[2]);
  return [a, TOP + s[0] * LH + 3, Math.max(MINW, x(s[2] + s[3]) - a), LH - 7];
}
function arrow(p, q) {
  const [ax, ay] = [p[0] + p[2] / 2, p[1] + p[3] / 2], [bx, by] = [q[0] + q[2] / 2, q[1] + q[3] / 2];
  g.beginPath(); g.moveTo(ax, ay); g.lineTo(bx, by); g.stroke();
  const h = Math.atan2(by - ay, bx - ax);
  g.beginPath(); g.moveTo(bx, by);
  g.lineTo(bx - 7 * Math.cos(h - 0.4), by - 7 * Math.sin(h - 0.4));
  g.lineTo(bx - 7 * Math.cos(h + 0.4), by - 7 * Math.sin(h + 0.4)); g.fill();
}
function drawChain(k, color, width) {
  const chain = D.flows[k];
  g.strokeStyle = color; g.fillStyle = color; g.lineWidth = width;
  for (let j = 1; j < chain.length; j++) arrow(rect(D.spans[chain[j - 1]]), rect(D.spans[chain[j]]));
}
function visible(s) { return s[2] + s[3] >= v0 && s[2] <= v1; }
function draw() {
  c.width = c.clientWidth;
  g.clearRect(0, 0, c.width, c.height);
  g.font = "11px sans-serif";
  D.lanes.forEach((l, i) => {
    g.fillStyle = i % 2 ? "#f7f7f7" : "#eee"; g.fillRect(0, TOP + i * LH, c.width, LH - 1);
    g.fillStyle = "#000"; g.fillText(l, 4, TOP + i * LH + 15);
  });
  g.save(); g.beginPath(); g.rect(LW, 0, c.width - LW, c.height); g.clip();
  for (const s of D.spans) {
    if (!visible(s)) continue;
    const r = rect(s);
    g.fillStyle = D.colors[s[1]]; g.fillRect(r[0], r[1], r[2], r[3]);
  }
  g.strokeStyle = "__STEP__"; g.fillStyle = "__STEP__"; g.setLineDash([5, 4]); g.lineWidth = 1;
  for (const st of D.steps) {
    const sx = x(st[1]);
    if (sx < LW || sx > c.width) continue;
    g.beginPath(); g.moveTo(sx, TOP - 2); g.lineTo(sx, c.height - AXIS); g.stroke();
    const label = "step " + st[0] + (st[3] ? " (prefill)" : "");
    const right = sx + 3 + g.measureText(label).width > c.width;
    g.fillText(label, right ? sx - 3 - g.measureText(label).width : sx + 3, TOP - 4);
  }
  g.setLineDash([]);
  const inView = D.flows.map((ch, k) => k).filter(k => visible(D.spans[D.flows[k][D.flows[k].length - 1]]));
  if (inView.length <= 200) inView.forEach(k => drawChain(k, "rgba(0,0,0,0.35)", 1));
  if (hover !== null && chainOf.has(hover)) drawChain(chainOf.get(hover), "#000", 2);
  g.restore();
  g.fillStyle = "#000";
  for (let k = 0; k <= 10; k++) {
    const t = v0 + (v1 - v0) * k / 10;
    g.fillText((t / 1000).toFixed(3) + " ms", LW + (c.width - LW) * k / 10 - (k === 10 ? 60 : 0), c.height - 6);
  }
}
function at(e) {
  const b = c.getBoundingClientRect(), px = e.clientX - b.left, lane = Math.floor((e.clientY - b.top - TOP) / LH);
  let best = null;
  D.spans.forEach((s, i) => {
    if (s[0] !== lane || !visible(s)) return;
    const r = rect(s);
    if (r[0] - 2 <= px && px <= r[0] + r[2] + 2) best = i;
  });
  return best;
}
function zoomToHash() {
  const m = /step=(-?\\d+)/.exec(location.hash);
  if (!m) { v0 = 0; v1 = end; shown = "the whole run"; return true; }
  const st = D.steps.find(s => s[0] === Number(m[1]));
  if (!st) { report("error", "no step " + m[1] + " in this trace"); return false; }
  const pad = Math.max(1, (st[2] - st[1]) * 0.02);
  v0 = st[1] - pad; v1 = st[2] + pad; shown = "step " + st[0];
  return true;
}
c.addEventListener("wheel", e => {
  e.preventDefault();
  const b = c.getBoundingClientRect(), t = v0 + (e.clientX - b.left - LW) / (c.width - LW) * (v1 - v0);
  const f = e.deltaY < 0 ? 0.8 : 1.25;
  v0 = t - (t - v0) * f; v1 = t + (v1 - t) * f; draw();
}, {passive: false});
c.addEventListener("mousedown", e => { drag = {x: e.clientX, v0, v1}; });
window.addEventListener("mouseup", () => { drag = null; });
c.addEventListener("mousemove", e => {
  if (drag) {
    const dt = (e.clientX - drag.x) / (c.width - LW) * (drag.v1 - drag.v0);
    v0 = drag.v0 - dt; v1 = drag.v1 - dt; draw(); return;
  }
  const i = at(e);
  if (i !== hover) { hover = i; draw(); }
  if (i === null) { tip.style.display = "none"; return; }
  const s = D.spans[i];
  tip.textContent = `${D.labels[s[1]]} on ${D.lanes[s[0]]}\\nstep ${s[5]} layer ${s[4]}\\n${s[6]} bytes\\n` +
    `${(s[3] / 1000).toFixed(3)} ms at ${(s[2] / 1000).toFixed(3)} ms`;
  tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px";
  tip.style.display = "block";
});
c.addEventListener("dblclick", () => { v0 = 0; v1 = end; draw(); });
window.addEventListener("resize", draw);
window.addEventListener("hashchange", () => { if (zoomToHash()) { draw(); loaded(); } });
function loaded() {
  report("ok", `${D.spans.length} spans, ${D.lanes.length} lanes, ${D.steps.length} steps; showing ${shown}`);
}
if (zoomToHash()) { draw(); loaded(); }
</script></body></html>
"""


def page_data(recorded: Iterable[Span], metadata: Mapping[str, Any], dropped: int = 0) -> dict[str, Any]:
    """What the page draws: lanes, span rows `[lane, label, ts_us, dur_us, layer, step, bytes]`,
    steps `[number, start_us, end_us, prefill]`, flows (chains of row indices), legend colours."""
    spans = ordered(recorded)
    lanes, lane_of = assign_lanes(spans)
    colors = label_colors(spans)
    labels = list(colors)
    label_index = {label: i for i, label in enumerate(labels)}
    t0 = spans[0].start_ns if spans else 0
    rows = [[lane, label_index[span_label(s)], *micros(s.start_ns, s.end_ns, t0), s.layer, s.step,
             s.nbytes] for s, lane in zip(spans, lane_of)]
    step_rows = [[st.number, *micros(st.start_ns, st.end_ns, t0), int(st.prefill)]
                 for st in steps(spans)]
    return {"title": summary_line(spans, metadata, dropped),
            "lanes": [lane_name(group, sub) for group, sub in lanes],
            "labels": labels, "colors": [colors[k] for k in labels], "spans": rows,
            "steps": [[n, ts, ts + dur, prefill] for n, ts, dur, prefill in step_rows],
            "flows": flows(spans)}


def to_html(spans: Iterable[Span], metadata: Mapping[str, Any], path: str | os.PathLike[str],
            dropped: int = 0) -> None:
    """Write the page (see the module's docstring)."""
    data = page_data(spans, metadata, dropped)
    # "</" inside the JSON would end the <script> element early.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = (_HTML.replace("__MINW__", str(MIN_WIDTH_PX)).replace("__STEP__", STEP_COLOR)
            .replace("__DATA__", payload))
    with open(path, "w", encoding="utf-8") as file:
        file.write(page)
