"""Where spans go on a timeline, shared by every exporter: lanes, steps, flows and integer times.

- Lanes: one per thread (the event loop, the compute thread, each I/O thread); the event loop's
  awaits (`Span.is_wait`) get lanes of their own under it, one per actor ("event loop · dram
  waits"), since the loop ran other work meanwhile.
  Spans of one lane that still overlap (awaits, or a hand-built trace) go to sub-lanes. Spans with
  no thread (a version 1 trace) get a lane per actor, as version 1 drew them.
- Steps: a step runs from its first executor span's start to its last one's end.
- Flows: the spans of one layer of one step, from its attention through predict, plan, reads,
  serve and copy to its FFN, in the order they ended (a stage ends after what it waited on: a serve
  after its read, the FFN after its copy); stalls are the executor waiting on a flow, not part of it.
- Times: integer microseconds from the first span, computed from integer nanoseconds, so spans
  that do not overlap in nanoseconds never overlap in microseconds either.
"""
from __future__ import annotations

import heapq
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from m2cache.trace.recorder import ACTORS, Span

WAITS_MARK = " · "  # "event loop · executor waits"


def ordered(spans: Iterable[Span]) -> list[Span]:
    return sorted(spans, key=lambda s: (s.start_ns, s.end_ns))


def micros(start_ns: int, end_ns: int, t0: int) -> tuple[int, int]:
    """(ts, dur) in whole microseconds after t0: floor of both ends, so order and gaps survive."""
    ts = (start_ns - t0) // 1000
    return ts, max(ts, (end_ns - t0) // 1000) - ts


def _natural(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _group(s: Span) -> str:
    """The lane group of a span: its thread (awaits apart), or its actor where the thread is unknown."""
    if not s.thread:
        return s.actor
    return f"{s.thread}{WAITS_MARK}{s.actor} waits" if s.is_wait else s.thread


def _group_key(group: str, members: Sequence[Span]) -> tuple[object, ...]:
    """Display order: the event loop and its awaits, compute threads, then the rest (I/O) by name;
    version 1 lanes in `ACTORS` order."""
    if not members[0].thread:
        return (3, ACTORS.index(group) if group in ACTORS else len(ACTORS), group)
    base, _, waits = group.partition(WAITS_MARK)
    rank = 0 if base.startswith("event loop") else 1 if any(s.actor == "executor" for s in members) else 2
    # under each thread its waits, in pipeline order: the executor's, then hbm, dram
    return (rank, _natural(base), bool(waits), -ACTORS.index(members[0].actor)
            if members[0].actor in ACTORS else 0, waits)


def assign_lanes(spans: Sequence[Span]) -> tuple[list[tuple[str, int]], list[int]]:
    """Give every span a lane so that no two spans of one lane overlap.

    Returns the lanes as `(group, sub_lane)` in display order and, per span of `spans` (which must be
    in start order), its lane index. Greedy assignment in start order uses the fewest sub-lanes
    possible for each group.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(spans):
        members[_group(s)].append(i)
    groups = sorted(members, key=lambda g: _group_key(g, [spans[i] for i in members[g]]))
    sub_of = [0] * len(spans)
    lanes: list[tuple[str, int]] = []
    for group in groups:
        busy: list[tuple[int, int]] = []  # (end_ns, sub) of sub-lanes in use
        free: list[int] = []
        count = 0
        for i in members[group]:
            s = spans[i]
            while busy and busy[0][0] <= s.start_ns:
                heapq.heappush(free, heapq.heappop(busy)[1])
            if free:
                sub = heapq.heappop(free)
            else:
                sub, count = count, count + 1
            heapq.heappush(busy, (max(s.end_ns, s.start_ns), sub))
            sub_of[i] = sub
        lanes.extend((group, sub) for sub in range(count))
    index = {lane: i for i, lane in enumerate(lanes)}
    return lanes, [index[(_group(s), sub)] for s, sub in zip(spans, sub_of)]


def lane_name(group: str, sub: int) -> str:
    return group if sub == 0 else f"{group} #{sub + 1}"


@dataclass(frozen=True)
class Step:
    number: int
    start_ns: int
    end_ns: int
    prefill: bool


def steps(spans: Iterable[Span]) -> list[Step]:
    """The executor's steps, in order: from a step's first executor span to its last."""
    bounds: dict[int, list[int]] = {}
    prefill: set[int] = set()
    for s in spans:
        if s.actor != "executor" or s.step < 0:
            continue
        b = bounds.setdefault(s.step, [s.start_ns, s.end_ns])
        b[0], b[1] = min(b[0], s.start_ns), max(b[1], s.end_ns)
        if s.kind == "prefill":
            prefill.add(s.step)
    return sorted((Step(n, b[0], b[1], n in prefill) for n, b in bounds.items()),
                  key=lambda st: (st.start_ns, st.number))


def _flow_key(s: Span) -> tuple[int, int] | None:
    if s.actor == "executor" and s.kind == "stall":
        return None
    if s.step >= 0 and s.layer >= 0:
        return (s.step, s.layer)
    return (-1, s.flow) if s.flow else None


def flows(spans: Sequence[Span]) -> list[list[int]]:
    """Chains of span indices (into `spans`), one per (step, layer) with at least two spans, each in
    end order; the last is normally the layer's FFN."""
    chains: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, s in enumerate(spans):
        key = _flow_key(s)
        if key is not None:
            chains[key].append(i)
    return [sorted(members, key=lambda i: (spans[i].end_ns, spans[i].start_ns))
            for members in chains.values() if len(members) > 1]


def span_label(s: Span) -> str:
    """A span's label in legends: its actor and kind ("hbm copy")."""
    return f"{s.actor} {s.kind}"
