"""Is the I/O really overlapped with compute? Decode tokens/s for prefetch k = 0..3 over a simulated SSD.

    python tools/overlap.py [--store DIR] [--ssd-sim SPEC] [--tokens N] [--runs R]

The default SSD is sized so that reading one FP16 layer of the demo model (5.3 MB) takes about as
long as the tiered engine computes one layer on the 2-core CPU machine (~7-8 ms): with perfect
overlap, k >= 2 approaches twice the speed of k = 0, where every layer's read waits for its turn.
Systems run in alternation, the order rotating each round; the median of the runs is reported.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

from m2cache.bench.memlimit import resolve_budget
from m2cache.engine.config import EngineConfig
from m2cache.offline.convert import demo_paths
from m2cache.engine.engine import Engine
from m2cache.storage.reader import Store

PROMPT = "Explain how a cache works in a computer."


async def one_run(store: str, cfg: EngineConfig, tokens: int) -> tuple[float, float]:
    async with Engine.open(store, cfg) as engine:
        ids = engine.tokenizer.encode(PROMPT, raw=False)
        async for _ in engine.generate_ids(ids, tokens):
            pass
        st = engine.stats()
        return st["decode_tokens_per_s"], st["stall_fraction"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(demo_paths()["store"]))
    ap.add_argument("--ssd-sim", default="latency=1ms,bandwidth=700MB/s,jitter=0.2,seed=1")
    ap.add_argument("--policy", default="dense-fp16")
    ap.add_argument("--preload", default="layer")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hbm-budget", default="20%")
    ap.add_argument("--dram-budget", default="30%")
    args = ap.parse_args(argv)
    store = Store(args.store)
    base = EngineConfig(hbm_budget=resolve_budget(args.hbm_budget, store),
                        dram_budget=resolve_budget(args.dram_budget, store), policy=args.policy,
                        preload=args.preload, ssd_sim=args.ssd_sim)
    ks = [0, 1, 2, 3]
    rates: dict[int, list[float]] = {k: [] for k in ks}
    stalls: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(args.runs):
        for k in ks[r % len(ks):] + ks[: r % len(ks)]:
            rate, stall = asyncio.run(one_run(args.store, base.replace(prefetch=k), args.tokens))
            rates[k].append(rate)
            stalls[k].append(stall)
            print(f"run {r + 1} prefetch {k}: {rate:.2f} decode tokens/s, stall {stall:.0%}", file=sys.stderr)
    base_rate = statistics.median(rates[0])
    print(f"policy {args.policy}, preload {args.preload}, ssd {args.ssd_sim}, {args.tokens} tokens, "
          f"median of {args.runs}")
    for k in ks:
        med = statistics.median(rates[k])
        print(f"prefetch {k}: {med:.2f} decode tokens/s ({med / base_rate:.2f}x k=0), "
              f"stall fraction {statistics.median(stalls[k]):.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
