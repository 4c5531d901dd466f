"""A timeline picture of a trace: a row per lane, a colour per span kind, lines where steps start."""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from m2cache.errors import ConfigError
from m2cache.trace.layout import assign_lanes, lane_name, ordered, span_label, steps
from m2cache.trace.recorder import Span
from m2cache.trace.summary import summary_line

STALL_COLOR = "#d62728"
STEP_COLOR = "#555555"
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d")
MIN_WIDTH_PX = 2  # a span shorter than this is drawn this wide: never dropped for being short


def label_colors(spans: Sequence[Span]) -> dict[str, str]:
    """A colour per `span_label` ("actor kind"), stalls in red; the same order in PNG and HTML."""
    labels = sorted({span_label(s) for s in spans} - {"executor stall"})
    colors = {label: _COLORS[i % len(_COLORS)] for i, label in enumerate(labels)}
    if any(span_label(s) == "executor stall" for s in spans):
        colors["executor stall"] = STALL_COLOR
    return colors


def step_window(spans: Sequence[Span], step: int) -> tuple[int, int]:
    """(start_ns, end_ns) of step `step`; ConfigError naming the steps there are if it is not one."""
    found = {st.number: st for st in steps(spans)}
    if step not in found:
        numbers = sorted(found)
        have = f"steps {numbers[0]}..{numbers[-1]}" if numbers else "no steps"
        raise ConfigError(f"the trace has no step {step} (it has {have})")
    return found[step].start_ns, found[step].end_ns


def to_png(recorded: Iterable[Span], metadata: Mapping[str, Any], path: str | os.PathLike[str],
           dropped: int = 0, step: int | None = None) -> None:
    """Draw the timeline (all of it, or zoomed to one step) to a PNG file.

    Uses matplotlib's Agg canvas directly, not pyplot, so it never touches the global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    spans = ordered(recorded)
    lanes, lane_of = assign_lanes(spans)
    colors = label_colors(spans)
    t0 = spans[0].start_ns if spans else 0
    lo_ns, hi_ns = step_window(spans, step) if step is not None else (
        t0, max((s.end_ns for s in spans), default=t0))
    margin = (hi_ns - lo_ns) // 50
    lo_ms, hi_ms = (lo_ns - margin - t0) / 1e6, max((hi_ns + margin - t0) / 1e6, 1e-6)
    width_in, dpi = 15.0, 110
    min_ms = MIN_WIDTH_PX * (hi_ms - lo_ms) / (width_in * dpi * 0.72)  # the axes are ~72% wide
    bars: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for s, lane in zip(spans, lane_of):
        bars[(lane, span_label(s))].append(
            ((s.start_ns - t0) / 1e6, max((s.end_ns - s.start_ns) / 1e6, min_ms)))
    fig = Figure(figsize=(width_in, 1.6 + 0.32 * max(1, len(lanes))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (lane, label), xranges in bars.items():
        row = len(lanes) - 1 - lane  # first lane at the top
        ax.broken_barh(xranges, (row + 0.12, 0.76), facecolors=colors[label], edgecolor="none")
    for st in steps(spans):
        x = (st.start_ns - t0) / 1e6
        if lo_ms <= x <= hi_ms:
            ax.axvline(x, color=STEP_COLOR, linestyle="--", linewidth=0.8)
            ax.text(x, len(lanes), f" step {st.number}" + (" (prefill)" if st.prefill else ""),
                    fontsize=7, va="bottom", ha="left", color=STEP_COLOR, clip_on=True)
    ax.set_yticks([len(lanes) - 1 - i + 0.5 for i in range(len(lanes))],
                  [lane_name(group, sub) for group, sub in lanes], fontsize=8)
    ax.set_ylim(0, max(1, len(lanes)) + 0.6)
    ax.set_xlim(lo_ms, hi_ms)
    ax.set_xlabel("time (ms) after the first span")
    title = summary_line(spans, metadata, dropped)
    ax.set_title(title if step is None else f"step {step}: {title}", fontsize=8, wrap=True)
    handles: list[Any] = [Patch(color=c, label=k) for k, c in colors.items()]
    handles.append(Line2D([], [], color=STEP_COLOR, linestyle="--", label="step starts"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7,
              title=f"spans (at least {MIN_WIDTH_PX} px wide)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", dpi=dpi)
