"""Chrome trace-event JSON (object form), which Perfetto and chrome://tracing open."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from m2cache.trace.layout import assign_lanes, flows, lane_name, micros, ordered, steps
from m2cache.trace.recorder import Span


def _json_safe(value: Any) -> Any:
    """Metadata as JSON can hold it (msgpack allows bytes and int keys; JSON does not)."""
    return json.loads(json.dumps(value, default=str))


def to_chrome(recorded: Iterable[Span], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """One process; one thread per lane (see `m2cache.trace.layout`: a lane per thread, awaits
    apart, sub-lanes where spans would overlap); complete events ("X") named by kind, categorised by
    actor, with integer microsecond ts/dur after the first span; a global instant event ("i") where
    each step starts; flow events ("s", "t", "f") following each layer of each step through its
    spans (in the order they ended), each inside its slice and bound to it (the last with bp "e").
    """
    spans = ordered(recorded)
    lanes, lane_of = assign_lanes(spans)
    t0 = spans[0].start_ns if spans else 0
    meta: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "ts": 0, "pid": 1, "tid": 0,
                                   "args": {"name": "m2cache"}}]
    for i, (group, sub) in enumerate(lanes):
        meta.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": 1, "tid": i + 1,
                     "args": {"name": lane_name(group, sub)}})
        meta.append({"name": "thread_sort_index", "ph": "M", "ts": 0, "pid": 1, "tid": i + 1,
                     "args": {"sort_index": i}})
    timed: list[dict[str, Any]] = []
    times = [micros(s.start_ns, s.end_ns, t0) for s in spans]
    for s, lane, (ts, dur) in zip(spans, lane_of, times):
        args: dict[str, Any] = {"layer": s.layer, "step": s.step, "bytes": s.nbytes,
                                "thread": s.thread}
        if s.flow:
            args["flow"] = s.flow
        timed.append({"name": s.kind, "cat": s.actor, "ph": "X", "ts": ts, "dur": dur, "pid": 1,
                      "tid": lane + 1, "args": args})
    for step in steps(spans):
        ts, _ = micros(step.start_ns, step.end_ns, t0)
        timed.append({"name": f"step {step.number}", "cat": "step", "ph": "i", "s": "g", "ts": ts,
                      "pid": 1, "tid": 0, "args": {"step": step.number, "prefill": step.prefill}})
    for flow_id, chain in enumerate(flows(spans), start=1):
        # at each slice's middle, or later where the previous event is: a viewer orders a flow's
        # events by time. Still inside the slice, as the chain is in end order.
        last = 0
        for position, i in enumerate(chain):
            ts, dur = times[i]
            at = last = max(ts + dur // 2, last)
            ph = "s" if position == 0 else "f" if position == len(chain) - 1 else "t"
            event: dict[str, Any] = {"name": "layer", "cat": "flow", "ph": ph, "id": flow_id, "ts": at,
                                     "pid": 1, "tid": lane_of[i] + 1,
                                     "args": {"step": spans[i].step, "layer": spans[i].layer}}
            if ph == "f":
                event["bp"] = "e"
            timed.append(event)
    timed.sort(key=lambda e: e["ts"])  # stable: a slice stays ahead of flow events at its ts
    other = {"origin_perf_counter_ns": t0, **_json_safe(dict(metadata))}
    return {"traceEvents": meta + timed, "displayTimeUnit": "ms", "otherData": other}
