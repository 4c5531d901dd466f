"""Where a decode step's time goes, per layer: one row per (actor, span kind) of a recorded trace.

    python tools/trace_table.py TRACE

Only decode steps count (prefill steps, those with a `prefill` span, are left out); "per layer" is the
span time of those steps divided by (decode steps x layers), so rows compare with one layer's compute.
Spans without a step (version 1 traces recorded reads without one) count from the first decode step on.
Below the table: a decode token's wall time beside what the executor's compute spans cover of it.
"""
from __future__ import annotations

import argparse
import collections
import sys

from m2cache.errors import M2CacheError
from m2cache.trace.layout import steps as executor_steps
from m2cache.trace.recorder import TraceRecorder


def table(recorder: TraceRecorder) -> str:
    spans = recorder.spans()
    decode = {st.number for st in executor_steps(spans) if not st.prefill}
    layers = 1 + max((s.layer for s in spans if s.layer >= 0), default=0)
    total: dict[tuple[str, str], int] = collections.Counter()
    count: dict[tuple[str, str], int] = collections.Counter()
    first_decode_ns = min((x.start_ns for x in spans if x.step in decode), default=None)
    for s in spans:
        if s.step in decode or (s.step < 0 and first_decode_ns is not None and s.start_ns >= first_decode_ns):
            total[(s.actor, s.kind)] += s.duration_ns
            count[(s.actor, s.kind)] += 1
    per = max(1, len(decode) * layers)
    lines = [f"{len(decode)} decode steps x {layers} layers", f"{'actor':10} {'span':12} {'count':>7} {'ms/layer':>9}"]
    for key, ns in sorted(total.items(), key=lambda kv: -kv[1]):
        lines.append(f"{key[0]:10} {key[1]:12} {count[key]:7d} {ns / per / 1e6:9.3f}")
    lines += _wall(spans, decode, layers, total)
    return "\n".join(lines)


COMPUTE = {"attention", "select", "ffn", "lm_head"}  # the executor's compute spans (kernels and their glue)


def _wall(spans, decode: set[int], layers: int, total) -> list[str]:
    """A decode token's wall time (from a decode step's start to the next step's, the steps that follow another
    decode step) beside what the executor's compute spans cover of it; the rest is Python between them, the
    hand-offs between actors and threads, sampling and the event loop."""
    steps = executor_steps(spans)
    gaps = [b.start_ns - a.start_ns for a, b in zip(steps, steps[1:]) if a.number in decode and b.number in decode]
    if not gaps:
        return []
    wall = sum(gaps) / len(gaps)
    compute = sum(ns for (actor, kind), ns in total.items() if actor == "executor" and kind in COMPUTE) / len(decode)
    return ["", f"a decode token: {wall / 1e6:.2f} ms wall ({wall / layers / 1e6:.3f} ms a layer); the executor's "
            f"compute spans {compute / 1e6:.2f} ms ({compute / wall:.0%}); the rest {(wall - compute) / 1e6:.2f} ms "
            f"({1 - compute / wall:.0%}): Python between spans, hand-offs, sampling, the event loop"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    args = parser.parse_args(argv)
    try:
        print(table(TraceRecorder.load(args.trace)))
    except (M2CacheError, OSError) as error:
        print(f"trace_table.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
