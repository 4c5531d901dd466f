"""Batched decode through the tiers, in process: aggregate decode tokens/s for 1, 2, 4, 8... concurrent
requests on one engine (no HTTP; ``tools/serve_load.py`` measures the server).

    python tools/batch_bench.py STORE --clients 1,4,8,16 --tokens 16 [--device cuda] [--hbm 25%] [--dram 30%]
        [--policy gate:0.1,0.2,0.7] [--modes invariant,shared]

Per concurrency and mode: decode tokens/s (decode tokens over the time the engine spent in decode steps:
what batching changes), wall tokens/s (every token over the phase's wall time, prefills included), the
decode steps' batch sizes, the FFN bytes a decode step asked the tiers for (the batch's union of its
requests' cuts, or its shared cut) and the bytes each decode token moved up the tiers, and how many
requests got the very tokens their prompt gets alone (each prompt's greedy tokens are first taken alone,
one request at a time, per mode). ``invariant`` is the default engine (``batch_invariant``: each request
its own neurons, the batch fetches the union); ``shared`` is ``--shared-cut``. Modes alternate within each
concurrency, one engine per phase, opened before its clock starts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


def prompts_of(tok, n: int) -> list[list[int]]:
    topics = ("the sky is blue", "bicycles were invented", "caches make disks fast", "the moon has phases",
              "rivers reach the sea", "bread rises", "trains run on time", "the tide comes in")
    return [tok.encode(f"Question {i}: explain why {topics[i % len(topics)]}.", raw=False) for i in range(n)]


async def phase(store: str, cfg, clients: int, tokens: int, alone: list[list[int]] | None) -> dict:
    from m2cache.engine.engine import Engine

    async with Engine.open(store, cfg) as engine:
        prompts = prompts_of(engine.tokenizer, clients)

        async def one(p: list[int]) -> list[int]:
            return [t async for t in engine.generate_ids(p, tokens)]

        before = engine.predictor.decode_bytes
        t0 = time.perf_counter()
        if alone is None:  # the reference: one request at a time
            got = [await one(p) for p in prompts]
        else:
            got = list(await asyncio.gather(*(one(p) for p in prompts)))
        wall = time.perf_counter() - t0
        st = engine.stats()
        sizes = dict(sorted(engine.executor.batch_sizes.items()))
        decode_steps = sum(sizes.values())
        asked = engine.predictor.decode_bytes - before
    made = sum(len(g) for g in got)
    return {"clients": clients, "tokens": made, "wall_s": wall, "wall_tokens_per_s": made / wall,
            "decode_tokens_per_s": st["decode_tokens_per_s"], "batch_sizes": sizes,
            "asked_bytes_per_decode_step": asked / max(decode_steps, 1),
            "dram_to_hbm_per_token": st["bytes_per_token"]["dram_to_hbm"],
            "ssd_to_dram_per_token": st["bytes_per_token"]["ssd_to_dram"], "stall": st["stall_fraction"],
            "same_as_alone": None if alone is None else sum(g == a for g, a in zip(got, alone)),
            "texts": got}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on cuda, bfloat16 on the CPU")
    ap.add_argument("--hbm", default="20%")
    ap.add_argument("--dram", default="30%")
    ap.add_argument("--policy")
    ap.add_argument("--modes", default="invariant,shared", help="invariant (the default engine), shared (--shared-cut)")
    ap.add_argument("--direct-io", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    from m2cache.bench.memlimit import resolve_budget
    from m2cache.engine.config import EngineConfig
    from m2cache.storage.reader import Store

    store = Store(args.store)
    base = EngineConfig(hbm_budget=resolve_budget(args.hbm, store), dram_budget=resolve_budget(args.dram, store),
                        device=args.device, dtype=args.dtype or ("float16" if args.device == "cuda" else "bfloat16"),
                        policy=args.policy, direct_io=args.direct_io)
    modes = {m: base.replace(batch_invariant=(m == "invariant")) for m in args.modes.split(",")}
    counts = [int(x) for x in args.clients.split(",")]
    alone = {m: asyncio.run(phase(args.store, cfg, max(counts), args.tokens, None))["texts"] for m, cfg in modes.items()}
    out: dict[str, list[dict]] = {m: [] for m in modes}
    print(f"{'clients':>7} {'mode':>9} {'decode tok/s':>12} {'x 1':>5} {'wall tok/s':>10} {'asked MB/step':>13} "
          f"{'same as alone':>13} batch sizes", flush=True)
    for c in counts:
        for m, cfg in modes.items():  # alternated, so both modes meet the same machine
            r = asyncio.run(phase(args.store, cfg, c, args.tokens, alone[m][:c]))
            out[m].append(r)
            d0 = out[m][0]["decode_tokens_per_s"]
            print(f"{c:>7} {m:>9} {r['decode_tokens_per_s']:>12.2f} {r['decode_tokens_per_s'] / d0:>5.2f} "
                  f"{r['wall_tokens_per_s']:>10.2f} {r['asked_bytes_per_decode_step'] / 1e6:>13.1f} "
                  f"{r['same_as_alone']:>8}/{c:<4} {r['batch_sizes']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: str(v) for k, v in vars(args).items()}, "alone": alone, "phases": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
