"""Turn recorded spans into things people look at: Chrome trace-event JSON, a summary, PNG and HTML.

Everything here is a pure function of `(spans, metadata)`, so it works the same on a live
`TraceRecorder` and on one loaded from a file. The conventions it relies on are in
`m2cache.trace.recorder`: actor lanes, span kinds, and the metadata keys below.

Metadata keys read by `summary` (all optional): `tokens` (decode tokens generated), `decode_seconds`
(overrides the decode time measured from the spans), `ttft_seconds`, `hit_ratio` (tier name ->
fraction), `device` (for the carbon estimate), `carbon` (a `CarbonModel.from_string` spec).
"""
from __future__ import annotations

import heapq
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from m2cache.engine.carbon import CarbonModel
from m2cache.errors import ConfigError
from m2cache.trace.recorder import ACTORS, Span

logger = logging.getLogger(__name__)

STALL_COLOR = "#d62728"
_KIND_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a")


def _ordered(spans: Iterable[Span]) -> list[Span]:
    return sorted(spans, key=lambda s: (s.start_ns, s.end_ns))


def assign_lanes(spans: Sequence[Span]) -> tuple[list[tuple[str, int]], list[int]]:
    """Give every span a lane so that no two spans of one lane overlap.

    Returns the lanes as `(actor, sub_lane)` in display order (known actors first, in `ACTORS` order,
    then others by name) and, per span of `spans` (which must be in start order), its lane index.
    Concurrent spans of one actor (parallel reads) go to sub-lanes 1, 2, ...; greedy assignment in
    start order uses the fewest sub-lanes possible.
    """
    present = {s.actor for s in spans}
    actors = [a for a in ACTORS if a in present] + sorted(present - set(ACTORS))
    sub_of = [0] * len(spans)
    subs_per_actor: dict[str, int] = {}
    for actor in actors:
        busy: list[tuple[int, int]] = []  # (end_ns, sub) of sub-lanes in use
        free: list[int] = []
        count = 0
        for i, s in enumerate(spans):
            if s.actor != actor:
                continue
            while busy and busy[0][0] <= s.start_ns:
                heapq.heappush(free, heapq.heappop(busy)[1])
            if free:
                sub = heapq.heappop(free)
            else:
                sub, count = count, count + 1
            heapq.heappush(busy, (max(s.end_ns, s.start_ns), sub))
            sub_of[i] = sub
        subs_per_actor[actor] = count
    lanes = [(actor, sub) for actor in actors for sub in range(subs_per_actor[actor])]
    index = {lane: i for i, lane in enumerate(lanes)}
    return lanes, [index[(s.actor, sub)] for s, sub in zip(spans, sub_of)]


def _lane_name(actor: str, sub: int) -> str:
    return actor if sub == 0 else f"{actor} #{sub + 1}"


def _flow_arrows(spans: Sequence[Span]) -> list[tuple[int, int]]:
    """(source, target) index pairs: each request span of a flow points at the compute it fed.

    Targets are the flow's executor spans other than stalls; each request span points at the first
    that ends no earlier than it does. A flow without executor spans is drawn as a chain.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(spans):
        if s.flow:
            groups[s.flow].append(i)
    arrows: list[tuple[int, int]] = []
    for members in groups.values():
        targets = [i for i in members if spans[i].actor == "executor" and spans[i].kind != "stall"]
        sources = [i for i in members if spans[i].actor != "executor"]
        if not targets:
            arrows.extend(zip(members, members[1:]))
            continue
        for source in sources:
            target = next((t for t in targets if spans[t].end_ns >= spans[source].end_ns), None)
            if target is not None:
                arrows.append((source, target))
    return arrows


def _json_safe(value: Any) -> Any:
    """Metadata as JSON can hold it (msgpack allows bytes and int keys; JSON does not)."""
    return json.loads(json.dumps(value, default=str))


def to_chrome(spans: Iterable[Span], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Chrome trace-event JSON (object form) that Perfetto and chrome://tracing open.

    One process; one thread per lane (sub-lanes for overlapping spans of one actor, so events in a
    lane never overlap); complete events ("X") with microsecond ts/dur relative to the first span;
    flow events ("s"/"f", bound to the enclosing slices) from request spans to compute spans.
    """
    ordered = _ordered(spans)
    lanes, lane_of = assign_lanes(ordered)
    t0 = ordered[0].start_ns if ordered else 0
    meta: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "ts": 0, "pid": 1, "tid": 0,
                                   "args": {"name": "m2cache"}}]
    for i, (actor, sub) in enumerate(lanes):
        meta.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": 1, "tid": i + 1,
                     "args": {"name": _lane_name(actor, sub)}})
        meta.append({"name": "thread_sort_index", "ph": "M", "ts": 0, "pid": 1, "tid": i + 1,
                     "args": {"sort_index": i}})
    timed: list[dict[str, Any]] = []
    for s, lane in zip(ordered, lane_of):
        args: dict[str, Any] = {"layer": s.layer, "step": s.step, "bytes": s.nbytes}
        if s.flow:
            args["flow"] = s.flow
        timed.append({"name": s.kind, "cat": s.actor, "ph": "X", "ts": (s.start_ns - t0) / 1e3,
                      "dur": max(0, s.end_ns - s.start_ns) / 1e3, "pid": 1, "tid": lane + 1,
                      "args": args})
    for arrow_id, (source, target) in enumerate(_flow_arrows(ordered), start=1):
        for ph, i in (("s", source), ("f", target)):
            s = ordered[i]
            mid_us = (s.start_ns + max(0, s.end_ns - s.start_ns) / 2 - t0) / 1e3
            event = {"name": "flow", "cat": "flow", "ph": ph, "id": arrow_id, "ts": mid_us,
                     "pid": 1, "tid": lane_of[i] + 1, "args": {"flow": s.flow}}
            if ph == "f":
                event["bp"] = "e"
            timed.append(event)
    timed.sort(key=lambda e: e["ts"])  # stable: a slice stays ahead of flow events at its ts
    other = {"origin_perf_counter_ns": t0, **_json_safe(dict(metadata))}
    return {"traceEvents": meta + timed, "displayTimeUnit": "ms", "otherData": other}


def _union_ns(intervals: Iterable[tuple[int, int]]) -> int:
    """Total length covered by intervals (nested or overlapping spans counted once)."""
    total, cur_start, cur_end = 0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total


def _edge_bytes(spans: Iterable[Span]) -> dict[str, int]:
    """Bytes moved per edge: SSD->DRAM is every SSD span's bytes; DRAM->HBM is HBM "copy" bytes."""
    edges = {"ssd_to_dram": 0, "dram_to_hbm": 0}
    for s in spans:
        if s.actor == "ssd":
            edges["ssd_to_dram"] += s.nbytes
        elif s.actor == "hbm" and s.kind == "copy":
            edges["dram_to_hbm"] += s.nbytes
    return edges


def summary(spans: Iterable[Span], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The run's headline numbers.

    Decode is the time after the last executor "prefill" span ends (or after the first span starts,
    if there is none) up to the last executor span's end; `metadata["decode_seconds"]` overrides it.
    Stall fraction is executor "stall" time over all executor time in decode (unions, so nested spans
    count once). Per-token bytes count spans that start in decode; `bytes_by_edge` counts all spans.
    """
    ordered = _ordered(spans)
    executor = [s for s in ordered if s.actor == "executor"]
    prefill_ends = [s.end_ns for s in executor if s.kind == "prefill"]
    start_ns = max(prefill_ends) if prefill_ends else (ordered[0].start_ns if ordered else 0)
    end_ns = max((s.end_ns for s in executor or ordered), default=start_ns)
    decode_s = float(metadata.get("decode_seconds") or max(0, end_ns - start_ns) / 1e9)
    tokens = int(metadata.get("tokens") or 0)
    decode = [s for s in ordered if s.start_ns >= start_ns]
    decode_exec = [(s.start_ns, s.end_ns) for s in decode
                   if s.actor == "executor" and s.kind != "prefill"]
    exec_ns = _union_ns(decode_exec)
    stall_ns = _union_ns((s.start_ns, s.end_ns) for s in decode
                         if s.actor == "executor" and s.kind == "stall")
    decode_bytes = _edge_bytes(decode)
    result: dict[str, Any] = {
        "tokens": tokens,
        "decode_seconds": decode_s,
        "tokens_per_s": tokens / decode_s if tokens and decode_s > 0 else None,
        "stall_fraction": stall_ns / exec_ns if exec_ns else None,
        "bytes_by_edge": _edge_bytes(ordered),
        "bytes_per_token": ({edge: n / tokens for edge, n in decode_bytes.items()}
                            if tokens else None),
        "hit_ratio": dict(metadata.get("hit_ratio") or {}),
        "ttft_seconds": metadata.get("ttft_seconds"),
        "spans": len(ordered),
        "wall_seconds": (max(s.end_ns for s in ordered) - ordered[0].start_ns) / 1e9
        if ordered else 0.0,
        "carbon_g_per_1k_tokens": None,
    }
    if tokens and decode_s > 0:
        try:
            model = CarbonModel.from_string(str(metadata.get("carbon") or ""))
            estimate = model.estimate(decode_s, tokens, decode_bytes,
                                      str(metadata.get("device") or "cpu"))
            result["carbon_g_per_1k_tokens"] = estimate.grams_per_1k_tokens
        except ConfigError as error:
            logger.warning("no carbon estimate: %s", error)
    return result


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def summary_line(spans: Iterable[Span], metadata: Mapping[str, Any],
                 dropped: int = 0) -> str:
    """One line for a terminal or a plot title."""
    s = summary(spans, metadata)
    parts = []
    if s["tokens_per_s"] is not None:
        parts.append(f"decode {s['tokens_per_s']:.2f} tok/s ({s['tokens']} tok, "
                     f"{s['decode_seconds']:.2f} s)")
    else:
        parts.append(f"{s['spans']} spans over {s['wall_seconds']:.3f} s")
    if s["stall_fraction"] is not None:
        parts.append(f"stall {100 * s['stall_fraction']:.1f}%")
    per_token = s["bytes_per_token"]
    if per_token is not None:
        parts.append(f"SSD->DRAM {_mb(per_token['ssd_to_dram'])}/tok")
        parts.append(f"DRAM->HBM {_mb(per_token['dram_to_hbm'])}/tok")
    else:
        parts.append(f"SSD->DRAM {_mb(s['bytes_by_edge']['ssd_to_dram'])}")
        parts.append(f"DRAM->HBM {_mb(s['bytes_by_edge']['dram_to_hbm'])}")
    if s["hit_ratio"]:
        parts.append("hit " + " ".join(f"{tier} {100 * float(r):.0f}%"
                                       for tier, r in s["hit_ratio"].items()))
    if s["carbon_g_per_1k_tokens"] is not None:
        parts.append(f"{s['carbon_g_per_1k_tokens']:.3g} gCO2/1k tok")
    if dropped:
        parts.append(f"{dropped} spans dropped")
    return " | ".join(parts)


def _kind_colors(spans: Sequence[Span]) -> dict[str, str]:
    kinds = sorted({s.kind for s in spans} - {"stall"})
    colors = {kind: _KIND_COLORS[i % len(_KIND_COLORS)] for i, kind in enumerate(kinds)}
    colors["stall"] = STALL_COLOR
    return colors


def to_png(spans: Iterable[Span], metadata: Mapping[str, Any], path: str | os.PathLike[str],
           dropped: int = 0) -> None:
    """A timeline picture: one band per actor (split into sub-lanes), stalls in red.

    Uses matplotlib's Agg canvas directly, not pyplot, so it never touches the global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ordered = _ordered(spans)
    lanes, lane_of = assign_lanes(ordered)
    actors = list(dict.fromkeys(actor for actor, _ in lanes))
    subs: defaultdict[str, int] = defaultdict(int)
    for actor, _ in lanes:
        subs[actor] += 1
    colors = _kind_colors(ordered)
    t0 = ordered[0].start_ns if ordered else 0
    bars: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for s, lane in zip(ordered, lane_of):
        bars[(lane, s.kind)].append(((s.start_ns - t0) / 1e6, max(0, s.end_ns - s.start_ns) / 1e6))
    fig = Figure(figsize=(14, 1.2 + 0.8 * max(1, len(actors))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (lane, kind), xranges in bars.items():
        actor, sub = lanes[lane]
        band = len(actors) - 1 - actors.index(actor)  # first actor at the top
        height = 0.8 / subs[actor]
        y = band + 0.1 + (subs[actor] - 1 - sub) * height
        ax.broken_barh(xranges, (y, height * 0.9), facecolors=colors[kind],
                       edgecolor=colors[kind] if kind == "stall" else "none", linewidth=0.5)
    ax.set_yticks([len(actors) - 1 - i + 0.5 for i in range(len(actors))], actors)
    ax.set_ylim(0, max(1, len(actors)))
    ax.set_xlabel("time (ms)")
    ax.set_title(summary_line(ordered, metadata, dropped), fontsize=9)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", dpi=110)


_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>m2cache trace</title>
<style>body{font:13px sans-serif;margin:8px}#c{width:100%;border:1px solid #ccc;cursor:grab}
#tip{position:fixed;background:#fffbe6;border:1px solid #999;padding:3px 6px;display:none;
pointer-events:none;white-space:pre}</style></head><body>
<div id="title"></div><div>wheel: zoom, drag: pan, double-click: reset; red = executor stall</div>
<canvas id="c"></canvas><div id="tip"></div>
<script>
const D = __DATA__;
document.getElementById("title").textContent = D.title;
const c = document.getElementById("c"), g = c.getContext("2d"), tip = document.getElementById("tip");
const LW = 110, LH = 22, end = D.spans.reduce((m, s) => Math.max(m, s[2] + s[3]), 1);
let v0 = 0, v1 = end, drag = null;
c.height = D.lanes.length * LH + 20;
function x(t) { return LW + (t - v0) / (v1 - v0) * (c.width - LW); }
function draw() {
  c.width = c.clientWidth;
  g.clearRect(0, 0, c.width, c.height);
  D.lanes.forEach((l, i) => {
    g.fillStyle = l[1] === 0 ? "#eee" : "#f7f7f7"; g.fillRect(0, i * LH, c.width, LH - 1);
    g.fillStyle = "#000"; g.fillText(l[0], 4, i * LH + 15);
  });
  for (const s of D.spans) {
    const a = x(s[2]), b = x(s[2] + s[3]);
    if (b < LW || a > c.width) continue;
    g.fillStyle = D.colors[s[1]];
    g.fillRect(Math.max(a, LW), s[0] * LH + 3, Math.max(1, b - Math.max(a, LW)), LH - 7);
  }
  g.fillStyle = "#000";
  for (let k = 0; k <= 10; k++) {
    const t = v0 + (v1 - v0) * k / 10;
    g.fillText((t / 1000).toFixed(3) + " ms", x(t) - (k === 10 ? 60 : 0), c.height - 5);
  }
}
function at(e) {
  const r = c.getBoundingClientRect(), px = e.clientX - r.left, lane = Math.floor((e.clientY - r.top) / LH);
  const t = v0 + (px - LW) / (c.width - LW) * (v1 - v0), slack = (v1 - v0) / c.width * 2;
  return D.spans.find(s => s[0] === lane && s[2] - slack <= t && t <= s[2] + s[3] + slack);
}
c.addEventListener("wheel", e => {
  e.preventDefault();
  const r = c.getBoundingClientRect(), t = v0 + (e.clientX - r.left - LW) / (c.width - LW) * (v1 - v0);
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
  const s = at(e);
  if (!s) { tip.style.display = "none"; return; }
  tip.textContent = `${D.lanes[s[0]][0]} ${D.kinds[s[1]]}\\nlayer ${s[4]} step ${s[5]}\\n` +
    `${s[6]} bytes\\n${(s[3] / 1000).toFixed(3)} ms at ${(s[2] / 1000).toFixed(3)} ms`;
  tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px";
  tip.style.display = "block";
});
c.addEventListener("dblclick", () => { v0 = 0; v1 = end; draw(); });
window.addEventListener("resize", draw);
draw();
</script></body></html>
"""


def to_html(spans: Iterable[Span], metadata: Mapping[str, Any], path: str | os.PathLike[str],
            dropped: int = 0) -> None:
    """One self-contained page (canvas + inline JS, no external URLs): lanes, stalls in red,
    the summary line, zoom on the mouse wheel, pan by dragging, details on hover."""
    ordered = _ordered(spans)
    lanes, lane_of = assign_lanes(ordered)
    colors = _kind_colors(ordered)
    kinds = list(colors)
    kind_index = {kind: i for i, kind in enumerate(kinds)}
    t0 = ordered[0].start_ns if ordered else 0
    rows = [[lane, kind_index[s.kind], round((s.start_ns - t0) / 1e3, 3),
             round(max(0, s.end_ns - s.start_ns) / 1e3, 3), s.layer, s.step, s.nbytes]
            for s, lane in zip(ordered, lane_of)]
    data = {"title": summary_line(ordered, metadata, dropped),
            "lanes": [[_lane_name(actor, sub), sub] for actor, sub in lanes],
            "kinds": kinds, "colors": [colors[k] for k in kinds], "spans": rows}
    # "</" inside the JSON would end the <script> element early.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    with open(path, "w", encoding="utf-8") as file:
        file.write(_HTML.replace("__DATA__", payload))
