"""Checks that a grown model (``m2cache grow``) computes its source's function, three ways:

1. dense FP32 perplexity on held-out text (layer by layer) within 0.1% of the source's;
2. greedy tokens of the demo prompts (dense FP32, m2cache's model code) equal to the source's, or the first
   difference shown with the two candidates' logit gap (a near-tie);
3. llama.cpp's greedy tokens on the grown model's F16 GGUF equal to m2cache's on the grown store.

    python tools/grown_check.py SOURCE_STORE GROWN_ROOT [--tokens 32] [--ppl-tokens 1024]

GROWN_ROOT holds ``store`` and ``gguf/model-f16.gguf`` (as ``m2cache bench`` writes them). The dense grown
model is held in FP32 for step 2 (twice its FP16 bytes: 10.4 GB for the 16-fold demo model; give it
``--dtype bfloat16`` on a smaller machine, where near-ties may flip).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens and, at each, the gap between the best and second-best logit."""
    kv = model.new_cache()
    logits = model.forward(prompt, kv)
    out, gaps = [], []
    for _ in range(n):
        top = logits.float().topk(2)
        out.append(int(top.indices[0]))
        gaps.append(float(top.values[0] - top.values[1]))
        logits = model.forward([out[-1]], kv)
    return out, gaps


def llama_greedy(gguf: Path, prompt: list[int], n: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=2, n_ctx=len(prompt) + n + 8, verbose=False)
    out = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) >= n:
            break
    return out


def main() -> int:
    from m2cache.bench.plan import DEMO_PROMPTS
    from m2cache.engine.loading import load_dense, load_tokenizer
    from m2cache.offline.evaluate import PROMPTS
    from m2cache.offline.layerwise import LayerwiseEval, Variant
    from m2cache.offline.train import split_text, token_windows
    from m2cache.storage.reader import Store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("grown_root")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    src, root = Store(args.source), Path(args.grown_root)
    grown = Store(root / "store")
    print(f"source {src.path}: hidden {src.config.hidden_size}; grown {grown.path}: hidden {grown.config.hidden_size}")

    t0 = time.monotonic()
    windows = token_windows(src, split_text(None)[1], args.ppl_tokens, window=512)
    ra, rb = Variant("dense-fp16", "full", torch.float32), Variant("dense-fp16", "full", torch.float32)
    LayerwiseEval(src, windows).run([ra])
    LayerwiseEval(grown, windows).run([rb])
    pa, pb = math.exp(ra.nll / ra.count), math.exp(rb.nll / rb.count)
    print(f"1. dense FP32 perplexity on {sum(len(w) - 1 for w in windows)} held-out tokens: source {pa:.4f}, grown "
          f"{pb:.4f} ({pb / pa - 1:+.4%}) ({time.monotonic() - t0:.0f}s)")

    tok = load_tokenizer(src)
    prompts = [tok.encode(p, raw=False) for p in (*DEMO_PROMPTS, *PROMPTS[:4])]
    dtype = getattr(torch, args.dtype)
    t0 = time.monotonic()
    ref = load_dense(src, dtype)
    want = [greedy(ref, p, args.tokens) for p in prompts]
    del ref
    big = load_dense(grown, dtype)
    got = [greedy(big, p, args.tokens) for p in prompts]
    del big
    same = 0
    for p, (w, wg), (g, _) in zip(prompts, want, got):
        k = next((i for i, (x, y) in enumerate(zip(w, g)) if x != y), len(w))
        same += k == len(w)
        note = "equal" if k == len(w) else f"differ at token {k} (source's logit gap there {wg[k]:.4f})"
        print(f"2. {tok.decode(p)[-40:]!r}: {note}")
    print(f"2. greedy tokens ({args.dtype}) equal on {same} of {len(prompts)} prompts ({time.monotonic() - t0:.0f}s)")

    gguf = root / "gguf" / "model-f16.gguf"
    if gguf.is_file():
        t0 = time.monotonic()
        agree = 0
        for p, (g, _) in zip(prompts, got):
            lg = llama_greedy(gguf, p, args.tokens)
            k = next((i for i, (x, y) in enumerate(zip(lg, g)) if x != y), min(len(lg), len(g)))
            agree += k == len(g)
            print(f"3. llama.cpp F16 vs m2cache: {'equal' if k == len(g) else f'differ at token {k}'}")
        print(f"3. llama.cpp F16 greedy tokens equal m2cache's on {agree} of {len(prompts)} prompts "
              f"({time.monotonic() - t0:.0f}s)")
    else:
        print(f"3. skipped: no {gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
