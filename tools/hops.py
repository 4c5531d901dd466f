"""Messages between the actors per layer of a decode token (``engine.stats()["messages"]``), on the demo model.

    python tools/hops.py [STORE] [--tokens 8,40] [--settings ram,ram-layers,small-dram]

Settings: ``ram``: DRAM keeps every layer the default policy uses (the bench's in-RAM setting; decode tokens of
one sequence run natively); ``ram-layers``: the same tiers, decode layer by layer (``native_decode=False``);
``small-dram``: the default budgets (HBM 20%, DRAM 30% of the FP16 FFN bytes), layer by layer, so the SSD
reader works every token. Each setting runs one prompt greedily on two fresh engines, for the two token counts:
the difference of their counts over the difference of their decode tokens is a decode token's (the prefill,
the same in both, cancels), divided by the layers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

PROMPT = "Write a long story about a cache that remembers everything it was ever asked."


def config(setting: str, store):
    from m2cache.bench.memlimit import resolve_budget
    from m2cache.engine.config import EngineConfig
    from m2cache.engine.policies import load_policy, store_for_policy
    from m2cache.engine.sizing import dram_to_keep_all

    hbm, dram = resolve_budget("20%", store), resolve_budget("30%", store)
    cfg = EngineConfig(hbm_budget=hbm, dram_budget=dram, native_decode=setting == "ram")
    if setting.startswith("ram"):
        policy = load_policy(store_for_policy(store, cfg.policy), cfg.policy, cfg.torch_dtype, "cpu")
        cfg = cfg.replace(dram_budget=dram_to_keep_all(store_for_policy(store, cfg.policy), cfg, policy,
                                                       cpu_direct=True))
    return cfg


async def run(store_dir: str, cfg, tokens: int) -> tuple[int, dict[str, int], bool]:
    from m2cache.engine.engine import Engine

    async with Engine.open(store_dir, cfg) as engine:
        ids = engine.tokenizer.encode(PROMPT, raw=False)
        async for _ in engine.generate_ids(ids, tokens):
            pass
        native = engine.executor.native is not None and engine.executor.native.tokens > 0
    st = engine.stats()  # once closed: nothing in flight
    return st["decode_tokens"], st["messages"], native


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", nargs="?")
    ap.add_argument("--tokens", default="8,40", help="the two token counts whose difference is measured")
    ap.add_argument("--settings", default="ram,ram-layers,small-dram")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    from m2cache.offline.convert import fetch_demo
    from m2cache.storage.reader import Store

    store_dir = args.store or str(fetch_demo(progress=False))
    store = Store(store_dir)
    layers = store.config.num_layers
    short, long = (int(t) for t in args.tokens.split(","))
    out = {}
    for setting in args.settings.split(","):
        cfg = config(setting, store)
        (d0, m0, _), (d1, m1, native) = (asyncio.run(run(store_dir, cfg, n)) for n in (short, long))
        tokens = d1 - d0
        assert tokens > 0, f"{setting}: {d0} and {d1} decode tokens (the model stopped early)"
        per_layer = {k: (m1[k] - m0.get(k, 0)) / tokens / layers for k in m1}
        out[setting] = {"decode_tokens": tokens, "layers": layers, "native": native, "per_layer": per_layer}
        edges = ", ".join(f"{k} {v:.2f}" for k, v in per_layer.items() if k != "total")
        print(f"{setting:11s} messages per layer of a decode token: {per_layer['total']:.2f}  ({edges}; "
              f"{tokens} decode tokens, {layers} layers, native step {'used' if native else 'not used'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
