"""``m2cache bench``: m2cache beside what people run today, on the same weights, prompts and tokens,
under a real memory limit, reading from the real disk.

The default model is 8 layers of LLaMA-2-7B (``m2cache synth``, ~3.7 GB of FP16, cached under
``~/.cache/m2cache`` with its GGUF exports); ``--model demo`` is the in-RAM demo (SmolLM2-135M), which
measures m2cache's own overhead. Systems (``--systems``), every one greedy, with a KV cache:

- ``m2cache``: the store's default policy (skipped as a duplicate when that is ``dense-fp16``);
  ``m2cache-dense-fp16``: tiering alone. Both read with ``O_DIRECT`` by default (``--no-direct-io``),
  with the engine sized from the memory limit (``EngineConfig.memory``: resident form, KV reserve and tiers;
  or ``--hbm-budget``/``--dram-budget``);
- ``llama-f16`` / ``llama-q8_0`` / ``llama-q4_0``: llama.cpp through llama-cpp-python (mmap, 2 threads)
  on GGUF files written by ``m2cache export-gguf`` — an optional extra (``make peers``);
- ``hf-bf16`` / ``hf-fp32``: transformers, every weight resident;
- ``hf-offload``: transformers + accelerate, ``max_memory`` what the limit leaves, the rest on disk;
- ``layer-stream``: every decoder layer read from the safetensors when needed (AirLLM's way).

``--memory`` (a size, a share of the FP16 weight bytes such as ``40%``, or ``none``; several,
comma-separated, for the plot) limits RSS and page cache together (:mod:`m2cache.bench.memlimit`). A system
whose own weights cannot fit the limit is listed as "does not fit" with what it would need. Each run
is its own subprocess, cold (the model's files dropped from the page cache first), alternated
round-robin; the median of ``--runs`` is reported, with the disk's ``O_DIRECT`` bandwidth and each
system's floor (:mod:`m2cache.bench.report`). Progress goes to stderr.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from m2cache.bench.model import code_state, evict
from m2cache.bench.report import GB, add_floor, aggregate, plot, print_report, ratios, summarise
from m2cache.bench.systems import Job, _plain, child_main  # the child side: one system, one run

SYSTEMS = ("m2cache", "m2cache-dense-fp16", "llama-f16", "llama-q8_0", "llama-q4_0", "hf-bf16", "hf-fp32",
           "hf-offload", "layer-stream")
QUICK_SYSTEMS = ("m2cache", "llama-f16", "llama-q4_0", "hf-offload", "layer-stream")
BYTES_PER_WEIGHT = {"llama-f16": 2.0, "llama-q8_0": 34 / 32, "llama-q4_0": 18 / 32, "hf-bf16": 2.0, "hf-fp32": 4.0,
                    "hf-offload": 2.0, "layer-stream": 2.0, "m2cache-dense-fp16": 2.0}
# measured RSS before any weight: python + torch + m2cache 0.23 GB, + transformers/accelerate 0.35 GB;
# the margins cover activations, the KV cache, code pages and one layer's transients. m2cache's rows size
# themselves from the limit (EngineConfig.memory: the engine measures its own process at open)
PY_OVERHEAD, HF_OVERHEAD, LLAMA_OVERHEAD = 350 << 20, 500 << 20, 200 << 20
M2CACHE_RUNTIME = 300 << 20  # the m2cache child's own RSS when its engine opens: measured 274-279 MB (7B shape)
PEERS_HINT = ("llama-cpp-python is not installed: `make peers` (or pip install 'm2cache[peers]') builds it from "
              "source, about 16 minutes on 2 cores")


@dataclass
class Model:
    store: Path
    hf: Path
    gguf: dict[str, Path] = field(default_factory=dict)
    label: str = ""


def resolve_model(args) -> Model:
    from m2cache.bench.model import bench_model, ensure_ggufs, gguf_paths

    want_gguf = any(s.startswith("llama") for s in _systems(args)) and _have_llama()
    if args.store:
        store = Path(args.store)
        hf = Path(args.hf) if args.hf else store.parent / "hf"
        gg = ensure_ggufs(store, store.parent) if want_gguf else gguf_paths(store.parent)
        return Model(store, hf, gg, store.parent.name)
    if args.model == "demo":
        from m2cache.offline.convert import fetch_demo

        store = fetch_demo()
        gg = ensure_ggufs(store, store.parent) if want_gguf else gguf_paths(store.parent)
        return Model(store, store.parent / "hf", gg, "SmolLM2-135M (demo)")
    m = bench_model(gguf=want_gguf)
    return Model(m["store"], m["hf"], m["gguf"] or gguf_paths(m["store"].parent), "LLaMA-2-7B shape, 8 layers, synth")


def _have_llama() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _missing_bench_packages(system: str) -> list[str]:
    """The 'bench' extra's packages a system's child process imports and this environment lacks."""
    needs = {"hf-offload": ("transformers", "accelerate")}.get(system, ("transformers",) if system.startswith("hf") else ())
    return [m for m in needs if importlib.util.find_spec(m) is None]


def _systems(args) -> list[str]:
    spec = args.systems or ",".join(QUICK_SYSTEMS if args.quick else SYSTEMS)
    systems = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"m2cache bench: unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    return systems


class Plan:
    """What every limit shares: the model, its sizes, the prompts, the systems."""

    def __init__(self, args, model: Model) -> None:
        from m2cache.cli.main import DEMO_PROMPTS
        from m2cache.engine.loading import load_tokenizer
        from m2cache.engine.policies import default_policy_name
        from m2cache.storage.reader import Store

        self.args, self.model = args, model
        self.store = Store(model.store)
        cfg = self.store.config
        self.resident_fp16 = int(self.store.manifest["resident"]["size"])
        self.ffn_fp16 = self.store.layer_bytes("fp16") * cfg.num_layers
        self.fp16_bytes = self.resident_fp16 + self.ffn_fp16
        self.params = self.fp16_bytes // 2
        self.cuda = args.device.startswith("cuda")
        self.notes: list[str] = []
        self.systems = _systems(args)
        if not (model.hf / "config.json").is_file():
            self.notes.append(f"no HF folder at {model.hf} (give --hf): transformers baselines and layer-stream skipped")
            self.systems = [s for s in self.systems if not s.startswith(("hf", "layer"))]
        default = default_policy_name(self.store)
        if "m2cache" in self.systems and default == "dense-fp16" and "m2cache-dense-fp16" in self.systems:
            self.systems.remove("m2cache")
            self.notes.append("the store has no trained predictors (default policy dense-fp16): the 'm2cache' row is "
                              "skipped as the same as m2cache-dense-fp16; train with `m2cache train-predictor`")
        self.policy = args.policy or default
        tok = load_tokenizer(self.store)
        self.prompts = [tok.encode(p, raw=False) for p in (args.prompts or DEMO_PROMPTS[:1])]
        self.dtype = args.m2cache_dtype or ("float16" if self.cuda else "bfloat16" if args.model != "demo" or
                                            args.store else "float32")
        self.dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]

    def bytes_per_weight(self, system: str) -> float | None:
        if system == "m2cache":
            shares = self.stored_policy(self.policy).shares  # one per layer
            bb = {p: self.store.bundle_bytes(p) for p in ("fp16", "int8", "int4")}
            ffn = sum(s.bytes_ratio(bb) for s in shares) / len(shares) * 2
            return (ffn * self.ffn_fp16 + 2 * self.resident_fp16) / self.fp16_bytes
        return BYTES_PER_WEIGHT.get(system)

    def stored_policy(self, name: str):
        """The shares of a policy the store names, or of a built-in ``KIND:A,B,C`` (every neuron at FP16 for
        any other name), as a Policy: what sizing needs of it, without loading its predictors."""
        from m2cache.engine.policies import parse_shares
        from m2cache.model.policy import Policy, Shares
        from m2cache.model.predictor import shares_from_spec

        spec = (self.store.manifest.get("policies") or {}).get(name, {})
        cfg = self.store.config
        shares = (shares_from_spec(spec, cfg.num_layers) if spec.get("shares")
                  else parse_shares(name) if ":" in name else Shares())
        return Policy(cfg.num_layers, self.store.num_neurons, shares)

    def gate_copy_bytes(self, name: str) -> int:
        """What a gate policy holds beside the tiers (its packed INT4 gate rows, in the child's RSS when its
        engine plans); 0 for other policies."""
        from m2cache.engine.policies import gate_copy_bytes, is_gate_policy

        return gate_copy_bytes(self.store) if is_gate_policy(self.store, name) else 0

    def needs(self, system: str) -> tuple[int, str]:
        """(bytes of memory the system must hold, what they are) for a run to work at all."""
        cfg, p = self.store.config, self.params
        emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        layer = p and (p - emb) // cfg.num_layers
        if system in ("hf-bf16", "hf-fp32"):
            w = p * (2 if system == "hf-bf16" else 4)
            return w + HF_OVERHEAD, f"every weight resident {w / GB:.2f} GB + runtime {HF_OVERHEAD / GB:.2f} GB"
        if system == "hf-offload":
            return HF_OVERHEAD + 2 * layer, f"runtime {HF_OVERHEAD / GB:.2f} GB + one layer in bf16"
        if system == "layer-stream":  # a layer is read (FP16) and converted: two copies at once
            w = emb * self.dtype_bytes + layer * (2 + self.dtype_bytes)
            return w + PY_OVERHEAD, (f"embeddings and head in {self.dtype} and one layer read and converted "
                                     f"{w / GB:.2f} GB + runtime {PY_OVERHEAD / GB:.2f} GB")
        if system.startswith("llama"):
            return LLAMA_OVERHEAD, "runtime, KV cache and buffers; weights are mapped from the file"
        return self._m2cache_needs(system)

    def _m2cache_needs(self, system: str) -> tuple[int, str]:
        """The engine's own smallest ``memory`` (:func:`m2cache.engine.memory.smallest_memory`), for a child
        holding M2CACHE_RUNTIME when the engine opens (the child measures its own and decides for real)."""
        from m2cache.engine.config import EngineConfig
        from m2cache.engine.memory import smallest_memory

        name = "dense-fp16" if system == "m2cache-dense-fp16" else self.policy
        policy = self.stored_policy(name)
        cfg = EngineConfig(memory=1, dtype=self.dtype, policy=name, preload=self.args.preload,
                           resident="full" if system == "m2cache-dense-fp16" else self.args.resident)
        direct = not self.cuda and self.args.compute_from_dram and name != "dense-fp16"
        need, why = smallest_memory(self.store, cfg, policy, cpu_direct=direct,
                                    runtime=M2CACHE_RUNTIME + self.gate_copy_bytes(name))
        return need, why.replace("the process already holds", "the process holds about")

    def budgets(self, system: str, limit: int | None) -> tuple[int | None, int | None]:
        """m2cache's budgets: the ones given, else the defaults without a limit, else None (the engine sizes
        them from ``memory``, the limit)."""
        from m2cache.cli.main import resolve_budget
        from m2cache.engine.config import parse_size

        if limit is None or not self.sizes_itself():
            return (parse_size(resolve_budget(self.args.hbm_budget, self.store), "--hbm-budget"),
                    parse_size(resolve_budget(self.args.dram_budget, self.store), "--dram-budget"))
        return None, None

    def sizes_itself(self) -> bool:
        """m2cache rows size their engine from the limit (memory=), unless budgets are given or on CUDA,
        where the tiers are device and host memory, given by their budgets."""
        return not self.args.hbm_budget_set and not self.cuda

    def jobs(self, limit: int | None) -> tuple[list[Job], dict[str, dict[str, Any]]]:
        """The runnable jobs at ``limit``, and the rows of systems that do not run (with why)."""
        jobs, rows = [], {}
        for s in self.systems:
            need, what = self.needs(s)
            bpw = self.bytes_per_weight(s)
            missing = _missing_bench_packages(s)
            if missing:
                rows[s] = {"status": "skipped", "bytes_per_weight": bpw,
                           "reason": f"needs {', '.join(missing)}: pip install 'm2cache[bench]'"}
                continue
            if s.startswith("llama") and not _have_llama():
                rows[s] = {"status": "skipped", "reason": PEERS_HINT, "bytes_per_weight": bpw}
                continue
            if s.startswith("llama") and not self.model.gguf.get(s.removeprefix("llama-"), Path()).is_file():
                rows[s] = {"status": "skipped", "reason": "no GGUF file (m2cache export-gguf)", "bytes_per_weight": bpw}
                continue
            if limit is not None and need > limit:
                rows[s] = {"status": "does not fit", "needs_bytes": need, "needs": what, "bytes_per_weight": bpw}
                continue
            hbm, dram = self.budgets(s, limit) if s.startswith("m2cache") else (0, 0)
            if limit:  # what the limit leaves after the runtime and one layer in flight
                offload = max(limit - HF_OVERHEAD - 2 * (self.params // self.store.config.num_layers), 0)
            else:  # the weight bytes m2cache holds on the compute device (on the CPU, the DRAM tier too)
                m_hbm, m_dram = self.budgets("m2cache", None)
                offload = self.resident_fp16 + (m_hbm or 0) + (0 if self.cuda else m_dram or 0)
            jobs.append(Job(system=s, store=str(self.model.store), hf=str(self.model.hf), prompts=self.prompts,
                            tokens=self.args.tokens, hbm_budget=hbm, dram_budget=dram, offload_memory=offload,
                            memory=limit if s.startswith("m2cache") and self.sizes_itself() else None,
                            resident="full" if s == "m2cache-dense-fp16" else self.args.resident,
                            device=self.args.device, m2cache_dtype=self.dtype,
                            policy="dense-fp16" if s == "m2cache-dense-fp16" else self.args.policy,
                            direct_io=self.args.direct_io, preload=self.args.preload, io_threads=self.args.io_threads,
                            compute_from_dram=self.args.compute_from_dram, lookahead=self.args.lookahead,
                            gguf=str(self.model.gguf.get(s.removeprefix("llama-"), "")), threads=self.args.threads,
                            llama_repack=self.args.llama_repack,
                            trace=f"{self.args.m2cache_trace}.{s}" if self.args.m2cache_trace and s.startswith("m2cache")
                            else None))
        return jobs, rows

    def paths(self) -> list[Path]:
        return [self.model.store, self.model.hf, *[p for p in self.model.gguf.values() if p.is_file()]]


def run_child(job: Job, limiter, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="m2cache-bench-") as d:
        jf, of = Path(d) / "job.json", Path(d) / "out.json"
        jf.write_text(json.dumps(asdict(job)))
        cmd = [sys.executable, "-m", "m2cache.bench.harness", "--child", str(jf), str(of)]
        try:
            proc = limiter.run(cmd, timeout)
        except Exception as e:  # subprocess.TimeoutExpired, or a cgroup that could not be made
            return {"system": job.system, "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        figures = dict(limiter.last_run)
        if not of.is_file():
            why = ("killed (SIGKILL) under the memory limit: it does not fit" if figures.get("killed")
                   else f"child exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
            return {"system": job.system, "ok": False, "error": why} | figures
        return json.loads(of.read_text()) | figures


def run_limit(plan: Plan, value: str, limit: int | None, t_start: float) -> dict[str, Any]:
    """Every system at one memory limit: the part of the report for it."""
    from m2cache.bench.model import disk_bandwidth
    from m2cache.bench.memlimit import MemoryLimit

    args = plan.args
    jobs, not_run = plan.jobs(limit)
    disk_files = sorted(plan.model.hf.glob("*.safetensors")) or sorted((plan.model.store / "ffn").glob("*"))
    results: dict[str, list[dict[str, Any]]] = {j.system: [] for j in jobs}
    with MemoryLimit(limit, args.limit_mechanism) as ml:
        disk = disk_bandwidth(disk_files)
        bw = disk.get("bytes_per_s")
        print(f"[bench] limit {value}: {ml.mechanism}"
              + (f", {limit / GB:.2f} GB" if limit else "") + "; disk O_DIRECT "
              + (f"{bw / GB:.2f} GB/s" if bw else "unmeasured") + f"; running {[j.system for j in jobs]}",
              file=sys.stderr, flush=True)
        for rep in range(args.runs):
            k = rep % max(len(jobs), 1)
            for job in jobs[k:] + jobs[:k]:  # rotated, so no system always runs first
                evict(plan.paths())
                t0 = time.monotonic()
                res = run_child(job, ml, args.child_timeout)
                results[job.system].append(res)
                s = summarise(res) if res.get("ok") else {}
                dpt = s.get("disk_read_bytes_per_token")
                msg = (f"{s.get('decode_tokens_per_s') or 0:.3f} tok/s, TTFT {s.get('ttft_s') or 0:.1f}s, "
                       f"disk {(dpt or 0) / 1e6:.0f} MB/tok" if res.get("ok") else f"FAILED: {res.get('error')}")
                print(f"[bench {value} {rep + 1}/{args.runs}] {job.system:<19} {msg} ({time.monotonic() - t0:.0f}s; "
                      f"{time.monotonic() - t_start:.0f}s in all)", file=sys.stderr, flush=True)
        limit_info = ml.describe()
    rows = aggregate(results)
    for s, r in rows.items():
        r["bytes_per_weight"] = plan.bytes_per_weight(s)
        if r["runs_ok"] == 0 and any("does not fit" in e for e in r["errors"]):
            r["status"] = "killed at the limit"
    add_floor(rows, bw)
    ordered = {s: rows.get(s) or not_run[s] for s in plan.systems if s in rows or s in not_run}
    return {"limit": limit_info | {"label": value}, "fp16_bytes": plan.fp16_bytes, "disk": disk,
            "systems": ordered, "ratios": ratios(ordered),
            "budgets": {j.system: {"hbm": j.hbm_budget, "dram": j.dram_budget, "offload_memory": j.offload_memory}
                        for j in jobs}}


def _normalise(args) -> None:
    """Defaults that depend on other switches (once per args)."""
    if getattr(args, "normalised", False):
        return
    if args.quick:
        args.tokens, args.runs = min(args.tokens, 4), 1
    if args.memory is None:
        args.memory = "none" if args.model == "demo" and not args.store else "40%"
    args.hbm_budget_set = args.hbm_budget is not None
    args.hbm_budget, args.dram_budget = args.hbm_budget or "20%", args.dram_budget or "30%"
    args.normalised = True


def build_args(argv: list[str]):
    """``m2cache bench`` switches as parsed and completed (for embedding and tests)."""
    from m2cache.cli.main import build_parser

    args = build_parser().parse_args(["bench", *argv])
    _normalise(args)
    return args


def cmd_bench(args) -> int:
    from m2cache.bench.memlimit import parse_memory

    t_start = time.monotonic()
    _normalise(args)
    model = resolve_model(args)
    plan = Plan(args, model)
    values = [v.strip() for v in args.memory.split(",") if v.strip()]
    limits = [(v, parse_memory(v, plan.fp16_bytes)) for v in values]
    parts = [run_limit(plan, v, lim, t_start) for v, lim in limits]
    notes = plan.notes + [
        "decode tok/s = tokens after the first / their time, median over runs; TTFT excludes model loading",
        "disk MB/tok = /proc/<pid>/io read_bytes during the decode / decode tokens; floor = disk O_DIRECT "
        "bandwidth / disk MB per token (the tokens/s its own reads allow)",
        "page cache dropped before every run (posix_fadvise DONTNEED); this virtual disk may be cached by its "
        "host, so reads through the page cache can exceed the O_DIRECT bandwidth",
        "'cg peak' = the run's cgroup peak (RSS + page cache); 'seen MB' = memory available to the run at its "
        "start (cgroup limit - usage, or MemAvailable under a balloon)"]
    report: dict[str, Any] = {
        "config": {"model": model.label, "store": str(model.store), "hf": str(model.hf), "device": args.device,
                   "tokens": args.tokens, "runs": args.runs, "prompt_tokens": [len(p) for p in plan.prompts],
                   "m2cache_dtype": plan.dtype, "policy": plan.policy, "direct_io": args.direct_io,
                   "preload": args.preload, "compute_from_dram": args.compute_from_dram, "lookahead": args.lookahead,
                   "io_threads": args.io_threads, "llama_threads": args.threads, "systems": plan.systems,
                   "memory": values, "fp16_bytes": plan.fp16_bytes, "code": code_state(),
                   "title": f"{model.label}: FP16 weights {plan.fp16_bytes / GB:.2f} GB, {args.tokens} tokens, "
                            f"2-core CPU"},
        "limits": parts, "notes": notes}
    report["seconds"] = round(time.monotonic() - t_start, 1)
    print_report(report)
    if args.plot and len([p for p in parts if p["limit"].get("limit_bytes")]) > 1:
        print(f"plot: {plot(report, args.plot)}", file=sys.stderr)
    print(f"bench took {report['seconds']:.0f}s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=_plain))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2])
    from m2cache.cli.main import main as cli_main

    return cli_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
