"""m2cache's dense model against transformers' on the same weights: greedy tokens and logits.

    python tools/parity.py STORE HF_FOLDER [--gguf FILE] [--tokens 32] [--engine]

Loads transformers' model (AutoModelForCausalLM, FP32) from the Hugging Face folder the store was converted
from, and m2cache's dense FP32 model from the store; for each prompt prints whether the tokenizers give the
same ids, the largest absolute difference of the logits over every prompt position (and relative to the
logits' norm), and whether ``--tokens`` greedy tokens are equal. ``--gguf``: also transformers on the
GGUF file itself, dequantised to FP32 (the store holds its values rounded to FP16). ``--engine``: also the
tiered engine under ``dense-fp16`` against the dense model's tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Water boils at a temperature of",
]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    eos = model.generation_config.eos_token_id
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         pad_token_id=(eos[0] if isinstance(eos, list) else eos) or 0)
    return out[0, len(ids):].tolist()


async def engine_tokens(store: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    from m2cache.bench.memlimit import ffn_fp16_bytes
    from m2cache.engine.engine import Engine, EngineConfig
    from m2cache.storage.reader import Store

    ffn = ffn_fp16_bytes(Store(store))
    cfg = EngineConfig(policy="dense-fp16", hbm_budget=int(0.2 * ffn), dram_budget=int(0.3 * ffn))
    async with Engine.open(store, cfg) as engine:
        return [[t async for t in engine.generate_ids(ids, n)] for ids in prompts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("hf")
    ap.add_argument("--gguf", help="the GGUF the folder was dequantised from: transformers on it too")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--engine", action="store_true", help="the tiered engine's dense-fp16 tokens too")
    args = ap.parse_args(argv)
    import transformers

    from m2cache.engine.dense import DenseGenerator

    torch.set_grad_enabled(False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(args.hf)
    m2 = DenseGenerator(args.store, torch.float32)
    raw = None
    if args.gguf:
        g = Path(args.gguf)
        raw = transformers.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    all_ids, dense_tokens = [], []
    worst, worst_rel, worst_raw, equal = 0.0, 0.0, 0.0, 0
    for prompt in PROMPTS:
        ids = [int(i) for i in tok(prompt)["input_ids"]]
        same_ids = m2.tokenizer.encode(prompt, raw=True) == ids
        want = ref(torch.tensor([ids])).logits[0].float()
        mine = m2.model.forward(ids, m2.model.new_cache(), all_logits=True)
        diff = float((mine - want).abs().max())
        rel = float((mine - want).norm() / want.norm())
        got_tokens = list(m2.generate_ids(ids, args.tokens))
        ref_tokens = hf_greedy(ref, ids, args.tokens)
        line = (f"{prompt!r:44} ids equal {same_ids}  max |dlogit| {diff:.2e} (rel {rel:.1e}, logits up to "
                f"{float(want.abs().max()):.1f})  greedy {len(got_tokens)} tokens equal {got_tokens == ref_tokens}")
        if raw is not None:
            d_raw = float((mine - raw(torch.tensor([ids])).logits[0].float()).abs().max())
            worst_raw = max(worst_raw, d_raw)
            line += f"  vs GGUF FP32 {d_raw:.2e}"
        print(line, flush=True)
        worst, worst_rel = max(worst, diff), max(worst_rel, rel)
        equal += got_tokens == ref_tokens
        all_ids.append(ids)
        dense_tokens.append(got_tokens)
    print(f"all: greedy equal {equal}/{len(PROMPTS)}, max |dlogit| {worst:.2e}, max rel {worst_rel:.1e}"
          + (f", vs the GGUF dequantised to FP32 {worst_raw:.2e}" if raw is not None else ""))
    if args.engine:
        tiered = asyncio.run(engine_tokens(args.store, all_ids, args.tokens))
        same = sum(a == b for a, b in zip(tiered, dense_tokens))
        print(f"tiered dense-fp16 (device 20%, DRAM 30%): tokens equal to dense on {same}/{len(PROMPTS)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
