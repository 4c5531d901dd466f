"""Decode speed and bytes of engine variants, alternated in one run: every store × config × policy.

    python tools/ab_decode.py --store S [--store S2] [--config "preload=neuron"] [--config ""] \\
        [--policy gate-40] [--policy dense-fp16] [--tokens 32] [--runs 3] [--dense]

A config is comma-separated ``EngineConfig`` fields (``preload=neuron,direct_io=true,dram_budget=40MB``);
budgets left out are the command line's defaults (20% and 30% of the store's FP16 FFN bytes). Each run
opens one engine per variant, in turn (A B C, A B C, ...), and generates ``--tokens`` greedy tokens from
the demo's first prompt; the table gives the median decode tokens/s, the bytes read off the store and
copied up a token, and the FFN bytes a token computed from. ``--dense`` adds the dense model (every weight
in memory) of the first store, in the same rotation.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from m2cache import Engine, EngineConfig
from m2cache.bench.memlimit import resolve_budget
from m2cache.bench.plan import DEMO_PROMPTS
from m2cache.storage.reader import Store


def parse_config(spec: str, store: Store) -> dict[str, Any]:
    out: dict[str, Any] = {"hbm_budget": resolve_budget("20%", store), "dram_budget": resolve_budget("30%", store)}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, value = item.split("=", 1)
        out[key] = {"true": True, "false": False, "none": None}.get(value.lower(), value)
        if key.endswith("_budget"):
            out[key] = resolve_budget(value, store)
        elif key in ("prefetch", "fixed_layers", "io_threads", "max_batch"):
            out[key] = int(value)
    return out


async def tiered(path: str, kw: dict[str, Any], policy: str, tokens: int) -> dict[str, float]:
    async with Engine.open(path, EngineConfig(policy=policy, **kw)) as engine:
        prompt = engine.tokenizer.encode(DEMO_PROMPTS[0], raw=False)
        async for _ in engine.generate_ids(prompt, tokens):
            pass
    st = engine.stats()
    return {"tok/s": st["decode_tokens_per_s"], "read MB": st["bytes_per_token"]["ssd_to_dram"] / 1e6,
            "copied MB": st["bytes_per_token"]["dram_to_hbm"] / 1e6,
            "fetched MB": st["ffn_bytes"]["fetched_per_token"] / 1e6}


def dense(path: str, tokens: int) -> dict[str, float]:
    import torch

    from m2cache.engine.dense import DenseGenerator

    gen = DenseGenerator(path, torch.float32)
    ids = gen.tokenizer.encode(DEMO_PROMPTS[0], raw=False)
    first, n = 0.0, 0
    for _ in gen.generate_ids(ids, tokens):
        n += 1
        if n == 1:
            first = time.perf_counter()
    return {"tok/s": (n - 1) / (time.perf_counter() - first), "read MB": 0.0, "copied MB": 0.0,
            "fetched MB": gen.model.ffn[0].numel() * 2 * len(gen.model.ffn) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", action="append", required=True)
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--policy", action="append", default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dense", action="store_true")
    args = ap.parse_args()
    variants = [(path, cfg, policy) for path in args.store for cfg in (args.config or [""])
                for policy in (args.policy or [None])]
    results: dict[tuple, list[dict[str, float]]] = {}
    for _ in range(args.runs):
        for path, cfg, policy in variants:
            kw = parse_config(cfg, Store(path))
            results.setdefault((path, cfg, policy), []).append(asyncio.run(tiered(path, kw, policy, args.tokens)))
        if args.dense:
            results.setdefault((args.store[0], "dense model", "-"), []).append(dense(args.store[0], args.tokens))
    keys = ("tok/s", "read MB", "copied MB", "fetched MB")
    print(f"{'store':<40} {'config':<28} {'policy':<12} " + " ".join(f"{k:>10}" for k in keys) + "  (median)")
    for (path, cfg, policy), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        print(f"{path[-40:]:<40} {cfg or 'defaults':<28} {policy or 'default':<12} "
              + " ".join(f"{med[k]:10.2f}" for k in keys)
              + "   runs: " + " ".join(f"{r['tok/s']:.2f}" for r in runs))


if __name__ == "__main__":
    main()
