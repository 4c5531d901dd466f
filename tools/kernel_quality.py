"""What the CPU kernels' numerics cost in quality: perplexity on held-out text, every position computed as the
engine's native decode step computes a token (``m2cache.model.native_decode``: the gate policy's choice of
neurons and precisions, the C kernels over the store's rows), against the same model run dense in FP32.

    python tools/kernel_quality.py SPLIT_STORE --source STORE [--tokens 1024] [--text FILE ...] [--dtype float32]

Both of the kernels' settings run over the same windows (``cpu_kernels.set_int8_activations``): ``float32``
(every product in float32: the numerics of the kernels before INT8 activations) and ``int8`` (INT8 and INT4
rows meet activations quantised to INT8 in blocks of 32: the default), the second beside the first token by
token (the mean change of every token's log-likelihood, as a perplexity ratio, with its standard error). Teacher-forced: each window's tokens are fed one at a time, each
position a decode step over the KV cache of those before it. ``--text`` files are read as held-out text as they
are (default: the held-out tail of the pydoc prose ``m2cache eval`` uses, and /usr/share/common-licenses/GPL-3
where it exists). The reference is the source store's dense FP32 model (``m2cache eval``'s).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from m2cache.engine.loading import load_dense, load_resident
from m2cache.engine.policies import load_policy
from m2cache.model import cpu_kernels
from m2cache.model.llama import KVCache, Rotary, rope_slice
from m2cache.model.native_decode import NativeDecoder, applies
from m2cache.offline.train import split_text, token_windows
from m2cache.storage.reader import PlainBackend, Store

GPL = Path("/usr/share/common-licenses/GPL-3")


def texts(files: list[str]) -> dict[str, str]:
    if files:
        return {Path(f).name: Path(f).read_text(errors="replace") for f in files}
    out = {"pydoc": split_text(None)[1]}
    if GPL.is_file():
        out["GPL-3"] = GPL.read_text()
    return out


def native(store: Store, dtype: torch.dtype) -> tuple[NativeDecoder, Rotary]:
    res = load_resident(store, dtype, "cpu", "full")
    policy = load_policy(store, None, dtype)
    cfg = store.config
    if not applies(cfg, res, policy, device=torch.device("cpu"), dtype=dtype, parts=store.parts):
        raise SystemExit(f"the native decode step does not take {store.path} with policy {policy.name}")
    dec = NativeDecoder(cfg, res, policy, parts=store.parts, groups=store.groups,
                        bundle_bytes={p: store.bundle_bytes(p) for p in store.geometry}, dtype=dtype)
    backend = PlainBackend()
    dec.bind([{p: store.read_layer(L, p, backend) for p in dec.used} for L in range(cfg.num_layers)])
    return dec, Rotary(cfg)


def nll_native(dec: NativeDecoder, rope: Rotary, windows: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
    """Every predicted token's negative log-likelihood (float64), the windows' positions in order."""
    out: list[float] = []
    for w in windows:
        kv = KVCache(dec.cfg, dtype, "cpu", capacity=len(w))
        for i, tok in enumerate(w[:-1]):
            cos, sin = rope_slice(rope, kv.length, 1, dtype)
            logits = dec.step(dec.res.embed[torch.tensor([tok])], kv, cos, sin)
            kv.length += 1
            out.append(-float(F.log_softmax(logits.double(), -1)[w[i + 1]]))
    return torch.tensor(out, dtype=torch.float64)


def nll_dense(model, windows: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    for w in windows:
        logits = model.forward(w, model.new_cache(), all_logits=True)
        lp = F.log_softmax(logits.double(), -1)[:-1]
        total -= float(lp.gather(1, torch.tensor(w[1:])[:, None]).sum())
        count += len(w) - 1
    return total, count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="a store whose default policy the native step takes (a split store's gate-40)")
    ap.add_argument("--source", required=True, help="the store it came from (the dense FP32 reference)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--text", action="append", default=[])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=1, help="the kernels' threads")
    args = ap.parse_args()
    store, source = Store(args.store), Store(args.source)
    dtype = getattr(torch, args.dtype)
    cpu_kernels.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    dec, rope = native(store, dtype)
    dense = load_dense(source, torch.float32)
    print(f"{store.path} (policy {dec.policy.name}, {args.dtype}, kernels' threads {args.threads}); reference: "
          f"{source.path} dense FP32; {args.tokens} held-out tokens a text")
    print(f"{'text':<8}{'kernels':<11}{'ppl':>9}{'dense':>9}{'Δppl':>8}  {'vs float32 (paired, ± std err)':<30}{'s':>5}")
    for name, text in texts(args.text).items():
        windows = token_windows(source, text, args.tokens)
        ref = nll_dense(dense, windows)
        dense_ppl = math.exp(ref[0] / ref[1])
        base: torch.Tensor | None = None
        for mode in ("float32", "int8"):  # float32 first: int8 is compared with it token by token
            before = cpu_kernels.set_int8_activations(mode == "int8")
            t0 = time.perf_counter()
            try:
                nll = nll_native(dec, rope, windows, dtype)
            finally:
                cpu_kernels.set_int8_activations(before)
            base = nll if base is None else base
            d = nll - base
            paired = "" if mode == "float32" else \
                f"{(math.exp(d.mean()) - 1) * 100:+.2f}% ± {float(d.std()) / math.sqrt(len(d)) * 100:.2f}%"
            ppl = math.exp(nll.mean())
            print(f"{name:<8}{mode:<11}{ppl:>9.3f}{dense_ppl:>9.3f}{(ppl / dense_ppl - 1) * 100:>+7.2f}%  {paired:<30}"
                  f"{time.perf_counter() - t0:>5.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
