"""``m2cache bench``'s switches, declared below the CLI: the bench parses its own command line with them
(``build_args``, ``python -m m2cache.bench``, ``tools/bench.py``) and ``m2cache bench`` registers the
same (``m2cache.cli.bench``)."""
from __future__ import annotations

import argparse

from m2cache.bench.plan import FRONTIER, QUICK_SYSTEMS, SYSTEMS

HELP = ("m2cache vs llama.cpp, transformers, accelerate offload and layer streaming, "
        "under a memory limit, cold, side by side")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="grown", choices=("grown", "7b-random", "7b", "demo"),
                   help="grown: SmolLM2-135M grown 16-fold, real weights (5.2 GB of FP16; `m2cache grow`, cached); "
                        "7b-random: 8 layers of LLaMA-2-7B with random weights (the no-locality worst case; 7b is "
                        "its old name); demo: SmolLM2-135M in RAM")
    p.add_argument("--store", help="another store (its HF folder is its sibling 'hf', GGUFs in 'gguf')")
    p.add_argument("--split", help="with --store of an older version: the split store written beside it (a format-3 store runs its "
                        "gate policies itself)")
    p.add_argument("--random", action="store_true", help="with --store: random weights (no perplexity)")
    p.add_argument("--hf", help="the same model as a HF folder")
    p.add_argument("--memory", help="memory limit (RSS + page cache): a size, a share of the FP16 weights, or none; "
                                    "several comma-separated (e.g. 25%%,40%%,60%%,100%%) for the plot (default 40%%; "
                                    "none for --model demo, whose point is m2cache's overhead in RAM)")
    p.add_argument("--limit-mechanism", default="auto", choices=("auto", "cgroup", "balloon"))
    p.add_argument("--quick", action="store_true", help=f"4 tokens, 1 run, systems {','.join(QUICK_SYSTEMS)}")
    p.add_argument("--tokens", type=int, default=8, help="new tokens per prompt (greedy)")
    p.add_argument("--runs", type=int, default=3, help="repetitions of every system (median reported)")
    p.add_argument("--prompts", nargs="+", help="prompts (default: the demo's first)")
    p.add_argument("--hbm-budget", help="m2cache's device pool (default: sized from --memory; 20%% without one)")
    p.add_argument("--dram-budget", help="m2cache's DRAM FIFO (default: sized from --memory; 30%% without one)")
    p.add_argument("--direct-io", action=argparse.BooleanOptionalAction, default=True,
                   help="m2cache rows read with O_DIRECT (default on)")
    p.add_argument("--preload", default="auto", choices=("auto", "layer", "neuron", "hybrid"), help="m2cache rows")
    p.add_argument("--compute-from-dram", action=argparse.BooleanOptionalAction, default=True,
                   help="m2cache rows, CPU: compute from DRAM's whole layers (default); --no-compute-from-dram "
                        "keeps the device pool and its copies up, the path CUDA takes")
    p.add_argument("--io-threads", type=int, default=2, help="m2cache rows: I/O threads")
    p.add_argument("--lookahead", action="store_true",
                   help="m2cache rows that score neurons: rank layer L+1 from layer L's residual (EngineConfig.lookahead)")
    p.add_argument("--resident", default="auto", choices=("auto", "full", "int8", "stream"),
                   help="m2cache rows (not m2cache-dense-fp16, which stays exact): attention, embeddings and LM "
                        "head full, INT8 or streamed per layer; auto = full, or under a limit the form that fits and reads least")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--llama-repack", action=argparse.BooleanOptionalAction, default=None,
                   help="force llama.cpp's repacking (weights copied into its own buffers) on or off; default: on "
                        "where the GGUF file fits the limit, mmap where it does not (as its users run it)")
    p.add_argument("--policies", nargs="+", metavar="POLICY",
                   help=f"the m2cache-frontier rows' policies (default where the store runs gate policies from its split view: {' '.join(FRONTIER)})")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True,
                   help="every row's perplexity beside its speed (measured once per model, kept beside it)")
    p.add_argument("--from-json", nargs="+", metavar="REPORT",
                   help="earlier reports (--json): their runs, one limit after another, with quality, table and "
                        "pictures; nothing rerun")
    p.add_argument("--frontier-plot", help="write the quality-vs-speed picture here (PNG; one panel per limit)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--policy", help="policy of the 'm2cache' row (default: the store's)")
    p.add_argument("--m2cache-dtype", choices=("float32", "bfloat16", "float16"),
                   help="m2cache's and layer-stream's compute dtype (default bfloat16 on the CPU for the 7B model)")
    p.add_argument("--systems", help=f"comma-separated, of: {', '.join(SYSTEMS)}")
    p.add_argument("--m2cache-trace", metavar="PREFIX",
                   help="m2cache rows write their trace to PREFIX.SYSTEM (the last run's; see tools/trace.py)")
    p.add_argument("--child-timeout", type=float, default=600, help="seconds before one run is abandoned")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--plot", help="write the tokens/s-vs-limit plot here (PNG; needs 2+ limits)")


def parser() -> argparse.ArgumentParser:
    """The bench's own command line (``python -m m2cache.bench``): ``m2cache bench``'s switches."""
    p = argparse.ArgumentParser(prog="m2cache bench")
    add_arguments(p)
    return p
