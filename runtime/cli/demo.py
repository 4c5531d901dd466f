"""``m2cache demo``: the demo model fetched (once), run with tiering at the store's default policy and then
as the dense model on the same prompts with the same sampling, and the two compared in figures a newcomer
reads: decode speed, FFN bytes a token against dense FP16's, memory held, and the perplexity the policy
costs (measured when the store was built)."""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from m2cache.bench.memlimit import UNDER_LIMIT_ENV, ffn_fp16_bytes, rerun_under_limit
from m2cache.bench.plan import DEMO_PROMPTS
from m2cache.cli.engine_args import engine_config, note_budgets, run_async, sampling, torch_dtype
from m2cache.cli.figures import mb, print_stats

# imports inside functions: a command imports the store, the engine and the offline tools (torch) when it
# runs; importing this module loads none of them

DEMO_SEED = 0  # sampled, but the same text every run (and for both models)


def cmd_demo(args) -> int:
    from m2cache.offline.convert import fetch_demo
    from m2cache.storage.reader import Store

    store_dir = fetch_demo()
    store = Store(store_dir)
    if getattr(args, "memory", None) and not os.environ.get(UNDER_LIMIT_ENV):  # the whole demo, once, inside it
        rc = rerun_under_limit(args.argv, args.memory, int(store.manifest["resident"]["size"]) + ffn_fp16_bytes(store))
        if rc >= 0:
            return rc
    args.store, args.seed = str(store_dir), DEMO_SEED if args.seed is None else args.seed
    print(f"[m2cache] the demo model's store: {store_dir}")
    tiered = run_async(_tiered(args, store))
    print("\n[m2cache] the same prompts, as the dense model (every weight in memory, no tiering) ...",
          file=sys.stderr)
    dense = _dense(args, store)
    for line in summary(store, tiered, dense):
        print(line)
    exe = _command()
    print(f"\nnext: {exe} generate {shlex.quote(str(store_dir))} \"your prompt\" --stats"
          f"\n      {exe} policies {shlex.quote(str(store_dir))}   (what else this store runs)")
    return 0


async def _tiered(args, store) -> dict[str, Any]:
    from m2cache.engine.engine import Engine

    async with Engine.open(args.store, engine_config(args, store)) as engine:
        note_budgets(args, engine)
        for prompt in DEMO_PROMPTS:
            print(f"\n>>> {prompt}")
            async for text in engine.generate(prompt, args.max_new_tokens, seed=args.seed, raw=args.raw,
                                              **sampling(args, store)):
                sys.stdout.write(text)
                sys.stdout.flush()
            sys.stdout.write("\n")
    st = engine.stats()  # once closed: reads still in flight counted
    print(file=sys.stderr)
    print_stats(st, sys.stderr)
    return st


def _dense(args, store) -> dict[str, Any]:
    """The dense model on the demo's prompts: decode tokens/s (the prefill left out, as the engine's figure
    does) and the weight bytes it holds."""
    import torch

    from m2cache.engine.dense import DenseGenerator
    from m2cache.engine.loading import resident_bytes

    gen = DenseGenerator(args.store, dtype=torch_dtype(args.dtype))
    decode_tokens, decode_s = 0, 0.0
    for prompt in DEMO_PROMPTS:
        ids = gen.tokenizer.encode(prompt, raw=args.raw)
        first: float | None = None
        n = 0
        for _ in gen.generate_ids(ids, args.max_new_tokens, seed=args.seed, **sampling(args, store)):
            n += 1
            if first is None:
                first = time.perf_counter()
        if first is not None and n > 1:
            decode_tokens, decode_s = decode_tokens + n - 1, decode_s + time.perf_counter() - first
    held = resident_bytes(gen.model.res) + sum(w.numel() * w.element_size() for w in gen.model.ffn)
    del gen
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"decode_tokens_per_s": decode_tokens / decode_s if decode_s else 0.0, "held": held}


def summary(store, st: dict[str, Any], dense: dict[str, Any]) -> list[str]:
    """The comparison, in words."""
    ffn, policy = st["ffn_bytes"], st["policy"]
    fast, slow = st["decode_tokens_per_s"], dense["decode_tokens_per_s"]
    held = st["peak_bytes"]["dram"] + st["peak_bytes"]["hbm"] + st["peak_bytes"]["resident"] + ffn["policy_resident"]
    lines = ["", f"[m2cache] the same prompts, the same sampling, on this machine ({st['device']}):",
             f"  speed    m2cache ({policy}) {fast:.1f} decode tokens/s; the dense model {slow:.1f}"
             + (f" ({fast / slow:.2f}x)" if slow else ""),
             f"  bytes    a decode token computes from {mb(ffn['fetched_per_token'])} of FFN weights, "
             f"{ffn['fetched_per_token'] / ffn['dense_fp16_per_token']:.2f} of the {mb(ffn['dense_fp16_per_token'])} "
             f"a dense FP16 model reads; m2cache read {mb(st['bytes_per_token']['ssd_to_dram'])} a token off the "
             "store for them",
             f"  memory   m2cache held at most {mb(held)} of weights (tiers, resident part, gate rows); the dense "
             f"model {mb(dense['held'])}"]
    q = (store.manifest.get("quality") or {}).get(policy)
    if q:
        lines.append(f"  quality  {policy} costs {q['ppl_delta']:+.1%} perplexity against the dense model (measured "
                     f"when the store was built: {q['tokens']} tokens of held-out text, "
                     f"{q['top1']:.0%} of the next-token choices the same)")
    return lines


def _command() -> str:
    """How this user runs m2cache: ``m2cache`` where that is on the PATH, else the launcher's own path."""
    import shutil

    exe, found = Path(sys.argv[0]), shutil.which("m2cache")
    if exe.name != "m2cache" or not exe.exists() or (found and Path(found).resolve() == exe.resolve()):
        return "m2cache"
    try:
        return str(exe.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(exe.resolve())
