"""Batched decode through the tiers, in process: aggregate decode tokens/s for 1, 2, 4, 8... concurrent
requests on one engine (no HTTP; ``tools/serve_load.py`` measures the server).

    python tools/batch_bench.py STORE --clients 1,2,4,8 --tokens 16 [--device cuda] [--hbm 25%] [--dram 30%]

Per concurrency: decode tokens/s (decode tokens over the time the engine spent in decode steps: what
batching changes), wall tokens/s (every token over the phase's wall time, prefills included), the
decode steps' batch sizes, and the bytes each decode token moved up the tiers. One engine per phase,
opened before its clock starts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


async def phase(store: str, cfg, clients: int, tokens: int) -> dict:
    from m2cache.engine.engine import Engine

    async with Engine.open(store, cfg) as engine:
        tok = engine.tokenizer
        prompts = [tok.encode(f"Question {i}: why is the sky blue on day {i}?", raw=False) for i in range(clients)]

        async def one(p: list[int]) -> int:
            return len([t async for t in engine.generate_ids(p, tokens)])

        t0 = time.perf_counter()
        made = sum(await asyncio.gather(*(one(p) for p in prompts)))
        wall = time.perf_counter() - t0
        st = engine.stats()
        sizes = dict(sorted(engine.executor.batch_sizes.items()))
    return {"clients": clients, "tokens": made, "wall_s": wall, "wall_tokens_per_s": made / wall,
            "decode_tokens_per_s": st["decode_tokens_per_s"], "batch_sizes": sizes,
            "dram_to_hbm_per_decode_token": st["bytes_per_token"]["dram_to_hbm"], "stall": st["stall_fraction"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on cuda, bfloat16 on the CPU")
    ap.add_argument("--hbm", default="20%")
    ap.add_argument("--dram", default="30%")
    ap.add_argument("--policy")
    ap.add_argument("--direct-io", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    from m2cache.cli.main import resolve_budget
    from m2cache.engine.config import EngineConfig
    from m2cache.storage.reader import Store

    store = Store(args.store)
    cfg = EngineConfig(hbm_budget=resolve_budget(args.hbm, store), dram_budget=resolve_budget(args.dram, store),
                       device=args.device, dtype=args.dtype or ("float16" if args.device == "cuda" else "bfloat16"),
                       policy=args.policy, direct_io=args.direct_io)
    out = []
    print(f"{'clients':>7} {'decode tok/s':>12} {'x 1':>5} {'wall tok/s':>10} {'x 1':>5} {'stall':>6} batch sizes",
          flush=True)
    for c in (int(x) for x in args.clients.split(",")):
        r = asyncio.run(phase(args.store, cfg, c, args.tokens))
        out.append(r)
        d0, w0 = out[0]["decode_tokens_per_s"], out[0]["wall_tokens_per_s"]
        print(f"{c:>7} {r['decode_tokens_per_s']:>12.2f} {r['decode_tokens_per_s'] / d0:>5.2f} "
              f"{r['wall_tokens_per_s']:>10.2f} {r['wall_tokens_per_s'] / w0:>5.2f} {r['stall']:>6.1%} "
              f"{r['batch_sizes']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
