"""Quality beside speed: every bench row's perplexity on the same held-out tokens, against dense FP32.

A faster row that writes worse text is not a win until the table shows both. Each row's perplexity is
measured on the same token windows (the held-out tail of CPython's pydoc prose, ``QUALITY_TOKENS`` tokens in
windows of ``WINDOW``), by the code that row runs:

- m2cache rows: the layer-by-layer pass (:mod:`m2cache.offline.layerwise`) of the row's policy, in the
  engine's compute dtype, with the resident form the engine chose at that limit (``stream`` computes the
  ``int8`` form's values); a split store's gate policy is measured as ``gate-split:A,B,C`` on the whole store
  it came from (what the split store computes);
- llama.cpp rows: llama.cpp's own logits on the windows (llama-cpp-python, every position's logits);
- ``hf-bf16`` / ``hf-fp32``: transformers on the HF folder; ``hf-offload`` computes what ``hf-bf16`` does
  (accelerate moves the same weights) and ``layer-stream`` what m2cache's dense code does in its dtype;
- the reference, ``dense_ppl``: m2cache's dense model in FP32 on the whole store.

Numbers are computed once per model and kept in ``quality.json`` beside it, keyed by what decides them;
each measurement runs in a child process (a model's weights do not stay in the bench's own memory). A model
with random weights gets none: its perplexity means nothing.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# imports inside functions: they load torch; the bench's children import this module (through
# m2cache.bench.harness), and a child holds torch only when its system runs on it

QUALITY_TOKENS, WINDOW = 1024, 512
QUALITY_FILE = "quality.json"
LEVELS = (0.005, 0.01, 0.03, 0.1)  # the "fastest at this quality" lines: Δppl at most +0.5%, +1%, +3%, +10%


def windows_of(store_dir: Path, tokens: int = QUALITY_TOKENS) -> list[list[int]]:
    from m2cache.offline.train import split_text, token_windows
    from m2cache.storage.reader import Store

    return token_windows(Store(store_dir), split_text(None)[1], tokens, window=WINDOW)


def row_key(system: str, row: dict[str, Any], policy: str | None, split: bool, dtype: str,
            shares: tuple[float, float, float] | None = None, stream_group: int = 0) -> str | None:
    """What decides a row's perplexity, as a key of the cache (None: nothing to measure). ``shares``: a m2cache
    row's FP16/INT8/INT4 shares (one for every layer), which a split store's gate policy is measured by.
    ``stream_group``: the row's store's INT8 attention file's group; streamed from a file in groups, the
    attention and head compute what the int8 form's do (its key)."""
    if system.startswith("llama-"):
        return f"llama|{system.removeprefix('llama-')}"
    if system in ("hf-bf16", "hf-offload"):
        return "hf|bfloat16"
    if system == "hf-fp32":
        return "hf|float32"
    if system == "layer-stream":
        return f"m2cache|dense-fp16|full|{dtype}"
    if system.startswith("m2cache"):
        form = (row.get("m2cache_stats") or {}).get("resident_form") or "full"
        name = "dense-fp16" if system == "m2cache-dense-fp16" else policy
        if name is None or (split and name != "dense-fp16" and shares is None):
            return None
        # int8g: the int8 form in groups of 32 (older caches' "int8" rows had a scale a row: not reused)
        grouped = form == "int8" or form == "stream" and stream_group
        return f"m2cache|{as_whole_store_policy(name, split, shares)}|{'int8g' if grouped else form}|{dtype}"
    return None


def as_whole_store_policy(name: str, split: bool, shares: tuple[float, float, float] | None = None) -> str:
    """A split store's gate policy as the whole store measures it: ``gate-split:A,B,C``."""
    if not split or name == "dense-fp16":
        return name
    if shares is None:
        raise ValueError(f"{name}: a split store's policy needs its shares to be measured")
    return "gate-split:" + ",".join(f"{v:g}" for v in shares)


class QualityCache:
    """``quality.json`` beside a model: {"windows": ..., "rows": {key: {...}}}; rewritten after each measurement."""

    def __init__(self, path: Path, windows: list[list[int]]) -> None:
        self.path, self.windows = path, windows
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.rows: dict[str, dict[str, Any]] = data.get("rows", {}) if data.get("windows") == windows else {}

    def save(self) -> None:
        self.path.write_text(json.dumps({"windows": self.windows, "rows": self.rows}, indent=1))


def measure(cache: QualityCache, keys: set[str], *, whole_store: Path, hf: Path, gguf: dict[str, Path],
            timeout: float = 3600) -> None:
    """Fills ``cache`` with every key it lacks (the m2cache variants in one layer-by-layer pass)."""
    from m2cache.offline.grow import grown_from
    from m2cache.storage.reader import Store

    todo = sorted(k for k in keys if k not in cache.rows)
    m2 = [k for k in todo if k.startswith("m2cache|")]
    if m2 or "dense" not in cache.rows:
        variants = [[p, "int8" if form == "int8g" else form, d] for p, form, d in (k.split("|")[1:] for k in m2)]
        t0 = time.monotonic()
        # a grown model computes its source's function exactly (rows tiled: the same codes at every precision,
        # the same perplexity; tools/grown_check.py), so its policies are measured on the source, 16x cheaper
        source = grown_from(Store(whole_store))
        on = source or whole_store
        print(f"[bench] quality: {len(variants)} m2cache variant(s) layer by layer on {on}"
              f"{' (the source this model was grown from: the same function)' if source else ''} ...",
              file=sys.stderr, flush=True)
        out = _child({"kind": "m2cache", "store": str(on), "variants": variants}, cache.windows, timeout)
        for k, r in zip(m2, out["rows"]):
            cache.rows[k] = r
        cache.rows["dense"] = {"ppl": out["rows"][0]["dense_ppl"] if out["rows"] else out["dense_ppl"],
                               "argmax": out["dense_argmax"], "measured_on": str(on)}
        print(f"[bench] quality: m2cache done in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
        cache.save()
    for k in todo:
        if k in cache.rows:
            continue
        kind, what = k.split("|", 1)
        t0 = time.monotonic()
        if kind == "llama":
            if not gguf.get(what, Path()).is_file():
                continue
            job = {"kind": "llama", "gguf": str(gguf[what])}
        else:
            job = {"kind": "hf", "hf": str(hf), "dtype": what}
        print(f"[bench] quality: {k} ...", file=sys.stderr, flush=True)
        out = _child(job, cache.windows, timeout)
        dense = cache.rows["dense"]
        cache.rows[k] = {"ppl": out["ppl"], "dense_ppl": dense["ppl"], "ppl_delta": out["ppl"] / dense["ppl"] - 1,
                         "top1": _agreement(out["argmax"], dense["argmax"]), "seconds": round(time.monotonic() - t0, 1)}
        cache.save()


def attach(rows: dict[str, dict[str, Any]], keys: dict[str, str | None], cache: QualityCache) -> None:
    """Puts ``ppl``, ``dense_ppl``, ``ppl_delta`` and ``top1`` on every row whose key the cache holds."""
    for system, row in rows.items():
        q = cache.rows.get(keys.get(system) or "")
        if q:
            row.update({k: q.get(k) for k in ("ppl", "dense_ppl", "ppl_delta", "top1")})
            row["quality_key"] = keys[system]


def fastest_at(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Per quality level, the fastest row within it: what a user with this much memory should run."""
    lines = []
    for level in LEVELS:
        ok = [(r["decode_tokens_per_s"], s) for s, r in rows.items()
              if r.get("decode_tokens_per_s") and r.get("ppl_delta") is not None and r["ppl_delta"] <= level]
        if ok:
            rate, system = max(ok)
            lines.append(f"Δppl ≤ +{level:.1%}: {system} {rate:.3f} tok/s ({rows[system]['ppl_delta']:+.2%})")
        else:
            lines.append(f"Δppl ≤ +{level:.1%}: no row")
    return lines


def _agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(b), 1)


def _child(job: dict[str, Any], windows: list[list[int]], timeout: float) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="m2cache-quality-") as d:
        jf, of = Path(d) / "job.json", Path(d) / "out.json"
        jf.write_text(json.dumps(job | {"windows": windows}))
        proc = subprocess.run([sys.executable, "-m", "m2cache.bench.quality", str(jf), str(of)],
                              capture_output=True, text=True, timeout=timeout)
        if not of.is_file():
            raise RuntimeError(f"quality measurement {job['kind']} failed: {proc.stderr.strip()[-800:]}")
        return json.loads(of.read_text())


# ==== the child: one measurement =================================================================
def _nll(logits, targets) -> tuple[float, list[int]]:
    import torch
    import torch.nn.functional as F

    lg = torch.as_tensor(logits, dtype=torch.float32)
    tg = torch.as_tensor(targets)
    return float(F.cross_entropy(lg, tg, reduction="sum")), lg.argmax(1).tolist()


def _child_m2cache(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from m2cache.offline.layerwise import LayerwiseEval, Variant, variant
    from m2cache.storage.reader import Store

    ev = LayerwiseEval(Store(job["store"]), job["windows"])
    ref = Variant("dense-fp16", "full", torch.float32)
    runs = [ref] + [variant(p, form, getattr(torch, dtype)) for p, form, dtype in job["variants"]]
    ev.run(runs)
    dense_ppl = math.exp(ref.nll / ref.count)
    rows = [{"ppl": math.exp(v.nll / v.count), "dense_ppl": dense_ppl, "ppl_delta": math.exp(v.nll / v.count) / dense_ppl - 1,
             "top1": v.same / v.count} for v in runs[1:]]
    return {"rows": rows, "dense_ppl": dense_ppl, "dense_argmax": ev.reference_argmax}


def _child_llama(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    T = max(len(w) for w in job["windows"])
    llm = Llama(model_path=job["gguf"], n_ctx=T, n_batch=T, n_ubatch=T, logits_all=True, n_threads=2,
                n_threads_batch=2, verbose=False)
    nll, count = 0.0, 0
    argmax: list[int] = []
    for w in job["windows"]:
        llm.reset()
        llm.eval(w)
        scores = np.asarray(llm.scores[: len(w) - 1])
        n, top = _nll(scores, w[1:])
        nll, count, argmax = nll + n, count + len(w) - 1, argmax + top
    return {"ppl": math.exp(nll / count), "argmax": argmax}


def _child_hf(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(job["hf"], dtype=getattr(torch, job["dtype"]))
    model.eval()
    nll, count = 0.0, 0
    argmax: list[int] = []
    with torch.inference_mode():
        for w in job["windows"]:
            logits = model(torch.tensor([w])).logits[0, :-1]
            n, top = _nll(logits, w[1:])
            nll, count, argmax = nll + n, count + len(w) - 1, argmax + top
    return {"ppl": math.exp(nll / count), "argmax": argmax}


def child_main(job_file: str, out_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    run = {"m2cache": _child_m2cache, "llama": _child_llama, "hf": _child_hf}[job["kind"]]
    Path(out_file).write_text(json.dumps(run(job)))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1], sys.argv[2]))
