"""``m2cache bench``: m2cache beside what people run today, on the same model, prompts and tokens.

Systems (``--systems``), every one greedy, with a KV cache, the same prompt ids and new-token count:

- ``m2cache``: the store's default policy under the budgets (a store without trained predictors has
  ``dense-fp16`` as its default; then this row is skipped as a duplicate of the next, and said so);
- ``m2cache-dense-fp16``: tiering alone, every neuron at FP16, same budgets;
- ``hf-bf16`` / ``hf-fp32``: ``transformers``' LlamaForCausalLM, every weight resident;
- ``hf-offload``: ``transformers`` + ``accelerate`` offload (``device_map="auto"``, ``max_memory``,
  ``offload_folder``) holding as many weight bytes as m2cache does (``--offload-memory``);
- ``layer-stream``: naive layer streaming (AirLLM's way), below: every decoder layer's weights read
  from the checkpoint's safetensors when needed, nothing cached, every token.

Each system runs in its own subprocess (``python -m m2cache.bench --child``), so peak RSS
(``ru_maxrss``) and disk reads (``/proc/self/io`` ``read_bytes``) are its own. The parent alternates
them round-robin, rotating the order each repetition, and drops the store's and the checkpoint's pages
from the page cache before every run (``posix_fadvise(DONTNEED)``: best-effort — pages mapped or dirty
elsewhere stay), so each run starts cold. Decode tokens/s counts the tokens after the first.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

SYSTEMS = ("m2cache", "m2cache-dense-fp16", "hf-bf16", "hf-fp32", "hf-offload", "layer-stream")
REFERENCE = ("hf-fp32", "hf-bf16")  # token agreement is measured against the first of these that ran
MB = 1e6


@dataclass
class Job:
    """What one child process runs; crosses the process boundary as JSON."""

    system: str
    store: str
    hf: str
    prompts: list[list[int]]
    tokens: int
    hbm_budget: int
    dram_budget: int
    offload_memory: int
    device: str = "cpu"
    m2cache_dtype: str = "float32"
    policy: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ==== the child: one system, one run ===========================================================
def _io_read_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
    except (OSError, StopIteration, ValueError):
        return None


class _Clock:
    """Times one request: time to first token, then the decode (every token after the first)."""

    def __init__(self) -> None:
        self.t0, self.times, self.tokens = time.perf_counter(), [], []
        self.io_first: int | None = None

    def token(self, tok: int) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(int(tok))
        if len(self.times) == 1:
            self.io_first = _io_read_bytes()

    def result(self) -> dict[str, Any]:
        io_end, n = _io_read_bytes(), len(self.times)
        disk = io_end - self.io_first if io_end is not None and self.io_first is not None else None
        return {"ttft_s": self.times[0] - self.t0 if n else None, "decode_tokens": max(0, n - 1),
                "decode_s": self.times[-1] - self.times[0] if n else 0.0, "disk_read_bytes": disk,
                "tokens": self.tokens}


def _run_m2cache(job: Job) -> dict[str, Any]:
    import asyncio

    from m2cache.config import EngineConfig
    from m2cache.engine import Engine

    cfg = EngineConfig(hbm_budget=job.hbm_budget, dram_budget=job.dram_budget, policy=job.policy,
                       device=job.device, dtype=job.m2cache_dtype)

    async def go() -> dict[str, Any]:
        t0 = time.perf_counter()
        async with Engine.open(job.store, cfg) as engine:
            out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "requests": []}
            decode = {"ssd_to_dram": 0, "dram_to_hbm": 0}  # bytes moved after each request's first token
            for ids in job.prompts:
                clock = _Clock()
                async for tok in engine.generate_ids(ids, job.tokens):
                    clock.token(tok)
                    if len(clock.tokens) == 1:
                        first = engine.stats()["bytes"]
                last = engine.stats()["bytes"]
                for edge in decode:
                    decode[edge] += last[edge] - first[edge]
                out["requests"].append(clock.result())
            st = engine.stats()
        out["stats"] = {k: st[k] for k in ("policy", "bytes_per_token", "hit_ratio", "stall_fraction", "stall_s",
                                           "peak_bytes", "budgets", "tiers", "predictor_recall") if k in st}
        n = sum(r["decode_tokens"] for r in out["requests"])
        out["stats"]["decode_bytes_per_token"] = {e: b / n if n else None for e, b in decode.items()}
        out["moved_bytes_per_token"] = decode["dram_to_hbm"] / n if n else None
        out["ssd_bytes_per_token"] = decode["ssd_to_dram"] / n if n else None
        return out

    return asyncio.run(go())


def _hf_generate(model, job: Job, device) -> list[dict[str, Any]]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Timer(BaseStreamer):  # generate() calls put() with the prompt first, then each new token
        def __init__(self) -> None:
            self.clock, self.prompt_seen = _Clock(), False

        def put(self, value) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.clock.token(int(value.reshape(-1)[0]))

        def end(self) -> None:
            pass

    out = []
    eos = model.config.eos_token_id
    with torch.inference_mode():
        for ids in job.prompts:
            x = torch.tensor([ids], device=device)
            timer = Timer()
            timer.clock.t0 = time.perf_counter()
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=job.tokens,
                           do_sample=False, streamer=timer, pad_token_id=eos if isinstance(eos, int) else 0)
            out.append(timer.clock.result())
    return out


def _run_hf(job: Job) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    dtype = torch.float32 if job.system == "hf-fp32" else torch.bfloat16
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if job.system == "hf-offload":
        gpu = job.device.startswith("cuda")
        max_memory: dict[Any, int] = ({0: job.offload_memory, "cpu": job.extra.get("host_memory", 200 << 30)}
                                      if gpu else {"cpu": job.offload_memory})
        folder = tempfile.mkdtemp(prefix="m2cache-offload-")
        model = LlamaForCausalLM.from_pretrained(job.hf, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                 offload_folder=folder)
        extra["device_map_bytes"] = _device_map_bytes(model)
        extra["max_memory"] = {str(k): v for k, v in max_memory.items()}
        compute = "cuda:0" if gpu else "cpu"
        on_compute = extra["device_map_bytes"].get("0" if gpu else "cpu", 0)
        extra["moved_bytes_per_token"] = sum(extra["device_map_bytes"].values()) - on_compute
    else:
        where = {"device_map": {"": job.device}} if job.device.startswith("cuda") else {}  # straight to the GPU
        model = LlamaForCausalLM.from_pretrained(job.hf, dtype=dtype, **where)
        compute = job.device
        extra["moved_bytes_per_token"] = 0
    model.eval()
    extra["load_s"] = time.perf_counter() - t0
    return extra | {"requests": _hf_generate(model, job, compute)}


def _device_map_bytes(model) -> dict[str, int]:
    """Weight bytes per device of accelerate's map ('disk', 'cpu', 0), tied weights counted once."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    device_map = getattr(model, "hf_device_map", None) or {"": str(model.device)}  # unset when one device holds all
    for name, dev in device_map.items():
        mod = model.get_submodule(name) if name else model
        n = 0
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * p.element_size()
        out[str(dev)] = out.get(str(dev), 0) + n
    return out


def _run_layer_stream(job: Job) -> dict[str, Any]:
    """AirLLM's way in a few lines: embeddings, final norm and LM head stay resident; every decoder
    layer is read from the checkpoint (safetensors) when the forward reaches it, then dropped."""
    import torch
    import torch.nn.functional as F
    from safetensors import safe_open

    from m2cache.model.llama import (KVCache, LayerWeights, ModelConfig, Rotary, activation, attention_block,
                                     rms_norm)

    hf = Path(job.hf)
    cfg = ModelConfig.from_hf(json.loads((hf / "config.json").read_text()))
    index = hf / "model.safetensors.index.json"
    where = ({n: hf / f for n, f in json.loads(index.read_text())["weight_map"].items()} if index.is_file()
             else _names_in(hf / "model.safetensors"))
    dev, dtype = torch.device(job.device), getattr(torch, job.m2cache_dtype)
    moved = [0]

    def load(names: list[str]) -> list[torch.Tensor]:
        """The named tensors, read from their files now (one open per file), in ``names``' order."""
        got: dict[str, torch.Tensor] = {}
        for path in {where[n] for n in names}:
            with safe_open(str(path), framework="pt") as f:
                for n in (n for n in names if where[n] == path):
                    t = f.get_tensor(n)
                    moved[0] += t.numel() * t.element_size()
                    got[n] = t.to(dev, dtype)
        return [got[n] for n in names]

    t0 = time.perf_counter()
    top = load(["model.embed_tokens.weight", "model.norm.weight"]
               + ([] if cfg.tie_word_embeddings else ["lm_head.weight"]))
    embed, norm, head = top[0], top[1], top[-1] if not cfg.tie_word_embeddings else top[0]
    rope, act = Rotary(cfg, dev), activation(cfg.hidden_act)
    parts = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    @torch.inference_mode()
    def forward(ids: list[int], kv: KVCache) -> int:
        x = embed[torch.tensor(ids, device=dev)]  # [T, D]
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            w = load([p + n + ".weight" for n in parts])
            x = attention_block(cfg, LayerWeights(*w[:6]), x, i, kv, kv.length, rope)
            h = rms_norm(x, w[5], cfg.rms_norm_eps)
            x = x + F.linear(act(F.linear(h, w[6])) * F.linear(h, w[7]), w[8])
        kv.length += len(ids)
        return int(F.linear(rms_norm(x[-1:], norm, cfg.rms_norm_eps), head)[0].argmax())

    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "requests": []}
    eos = set(cfg.eos_token_ids)
    for ids in job.prompts:
        kv = KVCache(cfg, dtype, dev, capacity=len(ids) + job.tokens)
        clock = _Clock()
        tok = forward(ids, kv)
        moved[0] = 0  # count the decode's reads only
        for _ in range(job.tokens):
            clock.token(tok)
            if tok in eos or len(clock.tokens) == job.tokens:
                break
            tok = forward([tok], kv)
        out["requests"].append(clock.result() | {"moved_bytes": moved[0]})
    n = sum(r["decode_tokens"] for r in out["requests"])
    out["moved_bytes_per_token"] = sum(r["moved_bytes"] for r in out["requests"]) / n if n else None
    return out


def _names_in(path: Path) -> dict[str, Path]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {n: path for n in f.keys()}


RUNNERS: dict[str, Callable[[Job], dict[str, Any]]] = {
    "m2cache": _run_m2cache, "m2cache-dense-fp16": _run_m2cache, "hf-bf16": _run_hf, "hf-fp32": _run_hf,
    "hf-offload": _run_hf, "layer-stream": _run_layer_stream,
}


def child_main(job_file: str, out_file: str) -> int:
    job = Job(**json.loads(Path(job_file).read_text()))
    res: dict[str, Any] = {"system": job.system}
    try:
        res |= RUNNERS[job.system](job)
        res["ok"] = True
    except Exception as e:  # reported in the table; the other systems go on
        import traceback

        res |= {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if job.device.startswith("cuda"):
        import torch

        res["peak_device_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    Path(out_file).write_text(json.dumps(res, default=_plain))
    return 0


def _plain(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ==== the parent: alternation, summary, table ====================================================
def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """One child's result -> the figures of that run (decode over all its requests together)."""
    reqs = run.get("requests") or []
    n = sum(r["decode_tokens"] for r in reqs)
    s = sum(r["decode_s"] for r in reqs)
    disk = [r["disk_read_bytes"] for r in reqs if r["disk_read_bytes"] is not None]
    return {"decode_tokens": n, "decode_tokens_per_s": n / s if s > 0 else None,
            "ttft_s": statistics.mean(r["ttft_s"] for r in reqs) if reqs else None,
            "disk_read_bytes_per_token": sum(disk) / n if disk and n else None}


def _median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for system, runs in results.items():
        ok = [r for r in runs if r.get("ok")]
        per = [summarise(r) for r in ok]
        rates = [p["decode_tokens_per_s"] for p in per if p["decode_tokens_per_s"]]
        row: dict[str, Any] = {
            "runs_ok": len(ok), "runs": len(runs),
            "decode_tokens_per_s": _median(rates), "decode_tokens_per_s_all": rates,
            "ttft_s": _median([p["ttft_s"] for p in per]),
            "peak_rss_bytes": _median([r.get("peak_rss_bytes") for r in ok]),
            "peak_device_bytes": _median([r.get("peak_device_bytes") for r in ok]),
            "disk_read_bytes_per_token": _median([p["disk_read_bytes_per_token"] for p in per]),
            "moved_bytes_per_token": _median([r.get("moved_bytes_per_token") for r in ok]),
            "load_s": _median([r.get("load_s") for r in ok]),
            "decode_tokens": per[0]["decode_tokens"] if per else 0,
            "errors": sorted({r["error"] for r in runs if not r.get("ok")}),
        }
        if ok and "stats" in ok[0]:
            mid = sorted(ok, key=lambda r: summarise(r)["decode_tokens_per_s"] or 0)[len(ok) // 2]
            row["m2cache_stats"] = mid["stats"]
            row["ssd_bytes_per_token"] = mid.get("ssd_bytes_per_token")
        if ok and "device_map_bytes" in ok[0]:
            row["device_map_bytes"], row["max_memory"] = ok[0]["device_map_bytes"], ok[0]["max_memory"]
        if ok:
            row["tokens"] = [r["tokens"] for r in ok[0]["requests"]]
        out[system] = row
    _agreement(out)
    return out


def _agreement(rows: dict[str, dict[str, Any]]) -> None:
    """Greedy-token agreement with the reference: matching prefix length / tokens, over all prompts."""
    ref = next((s for s in REFERENCE if rows.get(s, {}).get("tokens")), None)
    if ref is None:
        return
    want = rows[ref]["tokens"]
    for row in rows.values():
        got = row.get("tokens")
        if not got:
            continue
        same = total = 0
        for a, b in zip(got, want):
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            same, total = same + k, total + len(b)
        row["agreement"] = {"reference": ref, "prefix_match": same / total if total else None}


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for base in ("hf-bf16", "hf-offload"):
        b = rows.get(base, {}).get("decode_tokens_per_s")
        out[f"vs_{base}"] = {s: (r["decode_tokens_per_s"] / b if b and r["decode_tokens_per_s"] else None)
                             for s, r in rows.items()}
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_report(report: dict[str, Any], stream=sys.stdout) -> None:
    rows, rat = report["systems"], report["ratios"]
    head = (f"{'system':<20} {'decode tok/s':>12} {'(min-max)':>13} {'TTFT s':>7} {'peak RSS MB':>11} "
            f"{'disk MB/tok':>11} {'moved MB/tok':>12} {'x hf-bf16':>9} {'x offload':>9} {'same tok':>8}")
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for s, r in rows.items():
        rates = r["decode_tokens_per_s_all"]
        span = f"{min(rates):.2f}-{max(rates):.2f}" if rates else "-"
        agree = r.get("agreement", {}).get("prefix_match")
        print(f"{s:<20} {_fmt(r['decode_tokens_per_s'], '12.2f')} {span:>13} {_fmt(r['ttft_s'], '7.2f')} "
              f"{_fmt(r['peak_rss_bytes'] and r['peak_rss_bytes'] / MB, '11.0f')} "
              f"{_fmt(r['disk_read_bytes_per_token'] and r['disk_read_bytes_per_token'] / MB, '11.2f')} "
              f"{_fmt(r['moved_bytes_per_token'] and r['moved_bytes_per_token'] / MB, '12.2f')} "
              f"{_fmt(rat['vs_hf-bf16'].get(s), '9.2f')} {_fmt(rat['vs_hf-offload'].get(s), '9.2f')} "
              f"{_fmt(agree, '8.0%')}", file=stream)
        for err in r["errors"]:
            print(f"{'':<20} failed: {err}", file=stream)
    for s, r in rows.items():
        st = r.get("m2cache_stats")
        if not st:
            continue
        bpt, dec, hit = st["bytes_per_token"], st["decode_bytes_per_token"], st["hit_ratio"]
        print(f"\n{s} ({st['policy']}), where time goes (median run): stall fraction {st['stall_fraction']:.1%}; "
              f"bytes per decode token: SSD->DRAM {_fmt(dec['ssd_to_dram'] and dec['ssd_to_dram'] / MB, '.2f')} MB, "
              f"DRAM->device {_fmt(dec['dram_to_hbm'] and dec['dram_to_hbm'] / MB, '.2f')} MB (per generated token, "
              f"prefill included: {bpt['ssd_to_dram'] / MB:.2f} / {bpt['dram_to_hbm'] / MB:.2f} MB); hit ratio "
              f"device {hit['hbm']:.1%}, DRAM {hit['dram']:.1%}; tiers {st['tiers']}", file=stream)
    for r in rows.values():
        if "device_map_bytes" in r:
            dm = r["device_map_bytes"]
            total = sum(dm.values()) or 1
            shares = ", ".join(f"{k} {v / MB:.0f} MB ({v / total:.0%})" for k, v in sorted(dm.items()))
            print(f"\nhf-offload device map (max_memory {r['max_memory']}): {shares}", file=stream)
    for note in report["notes"]:
        print(f"note: {note}", file=stream)


def run_child(job: Job, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="m2cache-bench-") as d:
        jf, of = Path(d) / "job.json", Path(d) / "out.json"
        jf.write_text(json.dumps(asdict(job)))
        cmd = [sys.executable, "-m", "m2cache.bench", "--child", str(jf), str(of)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"system": job.system, "ok": False, "error": f"timed out after {timeout:.0f}s"}
        if not of.is_file():
            return {"system": job.system, "ok": False,
                    "error": f"child exited {proc.returncode}: {proc.stderr.strip()[-600:]}"}
        return json.loads(of.read_text())


def evict(paths: list[Path]) -> None:
    from m2cache.storage.ssd import FileBackend

    files = [f for p in paths if p.exists() for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file()]
    for d in [p for p in paths if p.is_dir()]:  # a store may link to its files (follow one level)
        files += [f for link in d.iterdir() if link.is_symlink() and link.is_dir() for f in link.rglob("*")]
    FileBackend().evict_page_cache(files)


def plan(args) -> tuple[list[Job], list[str], list[Path]]:
    """The jobs of one repetition (one per system), notes for the report, and the paths to evict."""
    from m2cache.cli import DEMO_PROMPTS, resolve_budget
    from m2cache.loading import load_tokenizer
    from m2cache.policies import default_policy_name
    from m2cache.storage.reader import Store

    if args.store:
        store_dir = Path(args.store)
    else:
        from m2cache.convert import fetch_demo

        store_dir = fetch_demo()
    store = Store(store_dir)
    hf = Path(args.hf) if args.hf else store_dir.parent / "hf"
    notes = ["page cache dropped before every run with posix_fadvise(DONTNEED): best-effort (pages mapped or "
             "dirty elsewhere stay cached)",
             "decode tok/s = tokens after the first / their time, median over runs; TTFT excludes model loading"]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"m2cache bench: unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    if not (hf / "config.json").is_file() and any(s.startswith(("hf", "layer")) for s in systems):
        notes.append(f"no HF folder at {hf} (give --hf): transformers baselines and layer-stream skipped")
        systems = [s for s in systems if s.startswith("m2cache")]
    default = default_policy_name(store)
    if "m2cache" in systems and default == "dense-fp16":
        if "m2cache-dense-fp16" in systems:
            systems.remove("m2cache")
            notes.append("the store has no trained predictors (default policy dense-fp16): the 'm2cache' row is "
                         "skipped as the same as m2cache-dense-fp16; train with `m2cache train-predictor`")
        else:
            notes.append("the store has no trained predictors: 'm2cache' runs its default, dense-fp16")
    hbm, dram = int(resolve_budget(args.hbm_budget, store)), int(resolve_budget(args.dram_budget, store))
    cuda = args.device.startswith("cuda")
    resident = int(store.manifest["resident"]["size"])
    if args.offload_memory:
        offload = int(resolve_budget(args.offload_memory, store))
    else:  # the weight bytes m2cache keeps in the compute device's memory (on the CPU, the DRAM tier too)
        offload = resident + hbm + (0 if cuda else dram)
        notes.append(f"hf-offload max_memory = resident weights {resident / MB:.0f} MB + hbm budget "
                     f"{hbm / MB:.0f} MB" + ("" if cuda else f" + dram budget {dram / MB:.0f} MB (both RAM on CPU)"))
    tok = load_tokenizer(store)
    prompts = [tok.encode(p, raw=False) for p in (args.prompts or DEMO_PROMPTS[:1])]
    dtype = args.m2cache_dtype or ("float16" if cuda else "float32")
    jobs = [Job(system=s, store=str(store_dir), hf=str(hf), prompts=prompts, tokens=args.tokens, hbm_budget=hbm,
                dram_budget=dram, offload_memory=offload, device=args.device, m2cache_dtype=dtype,
                policy="dense-fp16" if s == "m2cache-dense-fp16" else args.policy) for s in systems]
    return jobs, notes, [store_dir, hf]


def cmd_bench(args) -> int:
    t_start = time.monotonic()
    jobs, notes, paths = plan(args)
    results: dict[str, list[dict[str, Any]]] = {j.system: [] for j in jobs}
    for rep in range(args.runs):
        k = rep % len(jobs)
        for job in jobs[k:] + jobs[:k]:  # rotated, so no system always runs first on a busy machine
            evict(paths)
            t0 = time.monotonic()
            res = run_child(job, args.child_timeout)
            results[job.system].append(res)
            s = summarise(res) if res.get("ok") else {}
            msg = (f"{_fmt(s.get('decode_tokens_per_s'), '.2f')} tok/s decode, TTFT {_fmt(s.get('ttft_s'), '.2f')}s"
                   if res.get("ok") else f"FAILED: {res.get('error')}")
            print(f"[bench {rep + 1}/{args.runs}] {job.system:<20} {msg} ({time.monotonic() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    rows = aggregate(results)
    j0 = jobs[0]
    report = {"config": {"store": j0.store, "hf": j0.hf, "device": j0.device, "tokens": j0.tokens,
                         "runs": args.runs, "prompts": args.prompts or "demo", "prompt_tokens": [len(p) for p in j0.prompts],
                         "hbm_budget": j0.hbm_budget, "dram_budget": j0.dram_budget,
                         "offload_memory": j0.offload_memory, "m2cache_dtype": j0.m2cache_dtype,
                         "systems": [j.system for j in jobs]},
              "systems": rows, "ratios": ratios(rows), "notes": notes,
              "raw": results if args.raw else None, "seconds": None}
    report["seconds"] = time.monotonic() - t_start
    print_report(report)
    print(f"bench took {report['seconds']:.0f}s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=_plain))
    return 0


def add_commands(sub) -> None:
    from m2cache.synth import add_synth_command

    p = sub.add_parser("bench", help="m2cache vs transformers, accelerate offload and layer streaming, cold, "
                                     "side by side")
    p.add_argument("--store", help="the store (default: the demo model's)")
    p.add_argument("--hf", help="the same model as a HF folder (default: the store's sibling 'hf')")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per prompt (greedy)")
    p.add_argument("--runs", type=int, default=3, help="repetitions of every system (median reported)")
    p.add_argument("--prompts", nargs="+", help="prompts (default: the demo's first; the defaults keep a cold "
                                                "run of all six systems under 10 minutes on 2 cores)")
    p.add_argument("--hbm-budget", default="20%", help="device pool: a size or a share of FP16 FFN bytes")
    p.add_argument("--dram-budget", default="30%", help="DRAM FIFO: a size or a share of FP16 FFN bytes")
    p.add_argument("--offload-memory", help="accelerate's max_memory on the compute device (default: the "
                                            "weight bytes m2cache holds there)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--policy", help="policy of the 'm2cache' row (default: the store's)")
    p.add_argument("--m2cache-dtype", choices=("float32", "bfloat16", "float16"),
                   help="m2cache's and layer-stream's compute dtype (default float32 on CPU, float16 on CUDA)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of: {', '.join(SYSTEMS)}")
    p.add_argument("--child-timeout", type=float, default=600, help="seconds before one run is abandoned")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--raw", action="store_true", help="include every run's raw figures in the JSON")
    p.set_defaults(func=cmd_bench)
    add_synth_command(sub)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2])
    from m2cache.cli import main as cli_main

    return cli_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
