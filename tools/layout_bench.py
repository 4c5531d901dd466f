"""What the store's layout costs each policy: format 2 ([gate|up|down] bundles, one file per layer and
precision) against format 3 (the gate rows in files of their own), the same model, alternated in one run.

    python tools/layout_bench.py V2_STORE V3_STORE [--policies dense-fp16,mixed-40,gate-40] [--tokens 32]
                                 [--runs 3] [--preload auto] [--direct-io]

Make V3_STORE with ``m2cache upgrade V2_STORE --to V3_STORE``: the same bundles, bytes moved. Two parts:

- reads: one layer read whole (what whole-layer preloading and dense-fp16 do), and the bundles of a
  random share of its neurons (what a neuron-level read of a predictor policy does), per precision, from
  the page cache: the median time of each layout's read, format 3 reading the gate file and the
  [up|down] file where format 2 read one;
- decode: each policy generating ``--tokens`` greedy tokens on each store (default budgets, one engine a
  run), runs alternated: decode tokens/s and the bytes read off the store a token (median of the runs).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from m2cache import Engine, EngineConfig
from m2cache.bench.memlimit import resolve_budget
from m2cache.engine.policies import store_for_policy
from m2cache.storage.reader import PlainBackend, Store

SHARES = {"fp16": 0.1, "int8": 0.2, "int4": 0.7}  # the neurons a policy like mixed-40 takes at each precision


def time_reads(store: Store, repeats: int = 21) -> dict[str, float]:
    """Median seconds: a whole layer per precision, and the ``SHARES`` of its neurons at each."""
    backend, rng, layers, out = PlainBackend(), np.random.default_rng(0), store.config.num_layers, {}
    for p, share in SHARES.items():
        ids = np.sort(rng.choice(store.num_neurons, int(share * store.num_neurons), replace=False))
        for kind, read in (("layer", lambda L: store.read_layer(L, p, backend)),
                           ("neurons", lambda L: store.read_neurons(L, p, ids, backend))):
            times = []
            for r in range(repeats):
                t0 = time.perf_counter()
                read(r % layers)
                times.append(time.perf_counter() - t0)
            out[f"{kind} {p}"] = statistics.median(times)
    return out


async def decode(path: str, policy: str, tokens: int, preload: str, direct_io: bool) -> tuple[float, float]:
    store = Store(path)
    cfg = EngineConfig(hbm_budget=resolve_budget("20%", store), dram_budget=resolve_budget("30%", store),
                       policy=policy, preload=preload, direct_io=direct_io or None)
    async with Engine.open(path, cfg) as engine:
        prompt = engine.tokenizer.encode("Why is the sky blue?", raw=False)
        async for _ in engine.generate_ids(prompt, tokens):
            pass
    st = engine.stats()
    return st["decode_tokens_per_s"], st["bytes_per_token"]["ssd_to_dram"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("v2")
    ap.add_argument("v3")
    ap.add_argument("--policies", default="dense-fp16,mixed-40,gate-40")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--preload", default="auto")
    ap.add_argument("--direct-io", action="store_true")
    args = ap.parse_args()
    stores = {"format 2": args.v2, "format 3": args.v3}
    reads = {name: time_reads(Store(path)) for name, path in stores.items()}
    print(f"{'read (page cache)':<22} {'format 2':>10} {'format 3':>10} {'3 / 2':>7}")
    for key in reads["format 2"]:
        a, b = reads["format 2"][key], reads["format 3"][key]
        print(f"{key:<22} {a * 1e3:8.3f}ms {b * 1e3:8.3f}ms {b / a:7.2f}")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.runs):
        for policy in args.policies.split(","):
            for name, path in stores.items():
                results.setdefault((policy, name), []).append(
                    asyncio.run(decode(path, policy, args.tokens, args.preload, args.direct_io)))
    print(f"\n{'policy':<12} {'store':<9} {'tokens/s':>9} {'read MB/token':>14}  fetched as")
    for policy in args.policies.split(","):
        base = None
        for name, path in stores.items():
            runs = results[(policy, name)]
            tps, read = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            view = store_for_policy(Store(path), policy)
            ratio = "" if base is None else f"  ({tps / base:.2f}x format 2)"
            base = base or tps
            print(f"{policy:<12} {name:<9} {tps:9.2f} {read / 1e6:14.1f}  {view.parts} parts{ratio}")


if __name__ == "__main__":
    main()
