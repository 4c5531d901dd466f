"""What tracing costs: decode tokens/s with the trace recorder on and off, alternated, same engine config.

    python tools/trace_overhead.py [--store DIR] [--policy P] [--tokens N] [--runs R] [--png OUT.png --html OUT.html]

With --png/--html it also draws the last traced run (the lanes show SSD reads and DRAM preloads
overlapping the executor's compute).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from m2cache.bench.memlimit import resolve_budget
from m2cache.engine.config import EngineConfig
from m2cache.offline.convert import demo_paths
from m2cache.engine.engine import Engine
from m2cache.storage.reader import Store
from m2cache.trace.recorder import TraceRecorder
from m2cache.trace.export import summary_line, to_html, to_png

PROMPT = "Explain how a cache works in a computer."


async def one_run(store: str, cfg: EngineConfig, tokens: int) -> float:
    async with Engine.open(store, cfg) as engine:
        ids = engine.tokenizer.encode(PROMPT, raw=False)
        async for _ in engine.generate_ids(ids, tokens):
            pass
        return engine.stats()["decode_tokens_per_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(demo_paths()["store"]))
    ap.add_argument("--policy", default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hbm-budget", default="20%")
    ap.add_argument("--dram-budget", default="30%")
    ap.add_argument("--png")
    ap.add_argument("--html")
    args = ap.parse_args(argv)
    store = Store(args.store)
    base = EngineConfig(hbm_budget=resolve_budget(args.hbm_budget, store),
                        dram_budget=resolve_budget(args.dram_budget, store), policy=args.policy)
    tmp = Path(tempfile.mkdtemp(prefix="m2cache-trace-"))
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(args.runs):
        for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):  # alternate which goes first
            cfg = base.replace(trace=str(tmp / f"run{i}.trace") if mode == "on" else None)
            rates[mode].append(asyncio.run(one_run(args.store, cfg, args.tokens)))
            print(f"run {i + 1} trace {mode:>3}: {rates[mode][-1]:.2f} decode tokens/s", file=sys.stderr)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(f"decode tokens/s, median of {args.runs}: tracing off {off:.2f}, on {on:.2f}: "
          f"tracing costs {(1 - on / off) * 100:+.1f}% of decode speed")
    last = TraceRecorder.load(tmp / f"run{args.runs - 1}.trace")
    spans = last.spans()
    print(summary_line(spans, last.metadata))
    if args.png:
        to_png(spans, last.metadata, args.png)
    if args.html:
        to_html(spans, last.metadata, args.html)
    return 0


if __name__ == "__main__":
    sys.exit(main())
