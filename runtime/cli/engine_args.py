"""What the commands that run an engine share (``generate``, ``demo``, ``serve``): the engine's switches,
the ``EngineConfig`` and the sampling they give, the event loop, and a note on the CPU's budgets."""
from __future__ import annotations

import argparse
import asyncio
import sys

from m2cache.bench.memlimit import ffn_fp16_bytes, parse_memory, resolve_budget
from m2cache.engine.config import DEFAULT_PREFILL_CHUNK, DEFAULT_WINDOW, EngineConfig, format_size


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
    p.add_argument("--window", type=float, default=DEFAULT_WINDOW,
                   help="CPU under --memory: DRAM room for the FP16/INT8 neurons of this many decode tokens, kept at "
                        f"the precision they were read at, so a token reads only what the last ones did not (default "
                        f"{DEFAULT_WINDOW:g}; 0: off)")
    p.add_argument("--lookahead", action="store_true",
                   help="decode ranks layer L+1's neurons from layer L's residual, so its weights move while layer "
                        "L computes (a small quality cost: `m2cache eval --policy NAME@ahead`)")


def engine_config(args, store):
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
        native_decode=getattr(args, "native_decode", True), window=getattr(args, "window", DEFAULT_WINDOW))


def _threads(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _budget(value: str | None, default: str, limited: bool, store):
    """A budget the user gave wins; without one, the default share, or None to size it from --memory."""
    if value is None:
        return None if limited else resolve_budget(default, store)
    return resolve_budget(value, store)


def resolve_memory(value: str | None, store) -> int | None:
    """``--memory``: a size, a share of the model's FP16 weight bytes (resident + every FFN layer), or none."""
    fp16 = int(store.manifest["resident"]["size"]) + ffn_fp16_bytes(store)
    return None if value is None else parse_memory(value, fp16)


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


def run_async(coro):
    """Runs the command's event loop on uvloop when it is installed, plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def note_budgets(args, engine) -> None:
    """Says, where it is so, that the budgets given count together: on the CPU the device pool is the same
    memory as DRAM, so the engine computes from DRAM's layers and lends it the pool's budget."""
    if not engine.plan.direct or (args.hbm_budget is None and args.dram_budget is None):
        return
    hbm, dram = int(engine.config.hbm_budget), int(engine.config.dram_budget)
    print(f"[m2cache] on the CPU the device pool is DRAM: the engine computes from DRAM's layers, and "
          f"--hbm-budget {format_size(hbm)} and --dram-budget {format_size(dram)} count together as one DRAM "
          f"budget of {format_size(hbm + dram)} (--no-compute-from-dram keeps them apart)", file=sys.stderr)
