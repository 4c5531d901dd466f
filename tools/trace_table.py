"""Where a decode step's time goes, per layer: one row per (actor, span kind) of a recorded trace.

    python tools/trace_table.py TRACE

Only decode steps count (prefill steps, those with a `prefill` span, are left out); "per layer" is the
span time of those steps divided by (decode steps x layers), so rows compare with one layer's compute.
Spans without a step (version 1 traces recorded reads without one) count from the first decode step on.
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
    return "\n".join(lines)


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
