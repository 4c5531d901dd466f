"""``m2cache bench``: m2cache beside what people run today, on the same weights, prompts and tokens,
under a real memory limit, reading from the real disk, with every row's quality beside its speed.

The default model is the grown real model (``--model grown``: SmolLM2-135M grown 16-fold, 5.2 GB of FP16,
the demo model's function and activation statistics); ``--model 7b-random`` is 8 layers of LLaMA-2-7B with
random weights (the worst case: no locality, no meaningful perplexity); ``--model demo`` the demo model in
RAM (m2cache's own overhead). All are cached under ``~/.cache/m2cache`` with their GGUF files.
Systems (``--systems``, :mod:`m2cache.bench.plan`), every one greedy, with a KV cache:

- ``m2cache``: the default policy of the model's split store (skipped as a duplicate when it is
  ``dense-fp16``); ``m2cache-frontier``: one ``m2cache:POLICY`` row per policy of ``--policies`` (default
  :data:`~m2cache.bench.plan.FRONTIER`); ``m2cache-dense-fp16``: tiering alone. They read with ``O_DIRECT`` by
  default (``--no-direct-io``), the engine sized from the memory limit (``EngineConfig.memory``: resident form,
  KV reserve and tiers; or ``--hbm-budget``/``--dram-budget``);
- ``llama-f16``, ``-q8_0``, ``-q6_k``, ``-q5_k_m``, ``-q4_k_m``, ``-q4_0``: llama.cpp through llama-cpp-python
  (2 threads) on the F16 export and llama.cpp's own quantizations of it, with its repacking where the file
  fits the limit and ``mmap`` where it does not (``--llama-repack`` / ``--no-llama-repack`` force one) — an
  optional extra (``make peers``);
- ``hf-bf16`` / ``hf-fp32``: transformers, every weight resident;
- ``hf-offload``: transformers + accelerate, ``max_memory`` what the limit leaves, the rest on disk;
- ``layer-stream``: every decoder layer read from the safetensors when needed (AirLLM's way).

Every row carries ``ppl`` (held-out text, the same tokens for every system), ``dense_ppl`` (dense FP32),
``bytes_per_weight`` and ``fits`` (its weights fit the limit without reading the disk per token):
:mod:`m2cache.bench.quality`.

``--memory`` (a size, a share of the FP16 weight bytes such as ``40%``, or ``none``; several,
comma-separated, for the plot) limits RSS and page cache together (:mod:`m2cache.bench.memlimit`). A system
whose own weights cannot fit the limit is listed as "does not fit" with what it would need. Each run
is its own subprocess, cold (the model's files dropped from the page cache first), alternated
round-robin; the median of ``--runs`` is reported, with the disk's ``O_DIRECT`` bandwidth and each
system's floor (:mod:`m2cache.bench.report`). Progress goes to stderr.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from m2cache.bench import quality
from m2cache.bench.args import parser
from m2cache.bench.memlimit import MemoryLimit, parse_memory
from m2cache.bench.model import code_state, disk_bandwidth, evict
from m2cache.bench.plan import Plan, resolve_model
from m2cache.bench.report import GB, add_floor, aggregate, plot, plot_frontier, print_report, ratios, summarise
from m2cache.bench.systems import Job, _plain, child_main  # the child side: one system, one run
from m2cache.errors import command_exit

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
        r["bytes_per_weight"] = plan.bytes_per_weight(s, (r.get("m2cache_stats") or {}).get("resident_form"))
        if r["runs_ok"] == 0 and any("does not fit" in e for e in r["errors"]):
            r["status"] = "killed at the limit"
        r["fits"] = plan.fits(s, r, limit) if r["runs_ok"] else None
        if s.startswith("llama-"):
            r["llama_mode"] = "repack" if plan.llama_repack(s, limit) else "mmap"
    for r in not_run.values():
        r["fits"] = False if r["status"] == "does not fit" else None
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
    args.hbm_budget_set, args.dram_budget_set = args.hbm_budget is not None, args.dram_budget is not None
    args.hbm_budget, args.dram_budget = args.hbm_budget or "20%", args.dram_budget or "30%"
    if args.model == "7b":  # the name before the grown model became the default
        args.model = "7b-random"
    args.normalised = True


def build_args(argv: list[str]):
    """``m2cache bench`` switches as parsed and completed (for embedding and tests)."""
    args = parser().parse_args(argv)
    _normalise(args)
    return args


def cmd_bench(args) -> int:
    t_start = time.monotonic()
    _normalise(args)
    model = resolve_model(args)
    plan = Plan(args, model)
    if args.from_json:  # earlier reports' runs (limits in the order given): quality, table, pictures; nothing rerun
        reports = [json.loads(Path(f).read_text()) for f in args.from_json]
        report = reports[0] | {"limits": [p for r in reports for p in r["limits"]],
                               "notes": list(dict.fromkeys(n for r in reports for n in r["notes"]))}
        report["config"]["memory"] = [p["limit"]["label"] for p in report["limits"]]
        parts, notes = report["limits"], report["notes"]
    else:
        values = [v.strip() for v in args.memory.split(",") if v.strip()]
        parts, notes = [], plan.notes + NOTES
        report = {"config": _config(args, plan, model, values), "limits": parts, "notes": notes}
        for v, lim in [(v, parse_memory(v, plan.fp16_bytes)) for v in values]:
            parts.append(run_limit(plan, v, lim, t_start))
            _save(args, report)  # each limit's runs kept as they finish: quality comes last
    if args.quality and not model.random:
        add_quality(plan, parts, notes)
    elif model.random and not any("random weights" in n for n in notes):
        notes.append("random weights: no perplexity (it would mean nothing); speed only")
    report["seconds"] = report.get("seconds", 0) + round(time.monotonic() - t_start, 1)
    print_report(report)
    if args.plot and len([p for p in parts if p["limit"].get("limit_bytes")]) > 1:
        print(f"plot: {plot(report, args.plot)}", file=sys.stderr)
    if args.frontier_plot and any(r.get("ppl_delta") is not None for p in parts for r in p["systems"].values()):
        print(f"frontier plot: {plot_frontier(report, args.frontier_plot)}", file=sys.stderr)
    print(f"bench took {time.monotonic() - t_start:.0f}s", file=sys.stderr)
    _save(args, report)
    return 0


NOTES = [
    "decode tok/s = tokens after the first / their time, median over runs; TTFT excludes model loading",
    "disk MB/tok = /proc/<pid>/io read_bytes during the decode / decode tokens; floor = disk O_DIRECT "
    "bandwidth / disk MB per token (the tokens/s its own reads allow)",
    "page cache dropped before every run (posix_fadvise DONTNEED); this virtual disk may be cached by its "
    "host, so reads through the page cache can exceed the O_DIRECT bandwidth",
    "'cg peak' = the run's cgroup peak (RSS + page cache); 'seen MB' = memory available to the run at its "
    "start (cgroup limit - usage, or MemAvailable under a balloon)",
    "B/wt = bytes per weight of what a row computes with (a GGUF file's size over the parameters; m2cache: its "
    "resident part in the form it held and each precision's share of its FFN bundles); fits = its weights fit the "
    "limit without reading the disk per token; llama.cpp runs with its repacking where its file fits, mmap where not"]


def _config(args, plan: Plan, model, values: list[str]) -> dict[str, Any]:
    return {"model": model.label, "store": str(model.store), "split": str(model.split or ""), "hf": str(model.hf),
            "device": args.device, "tokens": args.tokens, "runs": args.runs,
            "prompt_tokens": [len(p) for p in plan.prompts], "m2cache_dtype": plan.dtype, "policy": plan.policy,
            "direct_io": args.direct_io, "preload": args.preload, "compute_from_dram": args.compute_from_dram,
            "lookahead": args.lookahead, "io_threads": args.io_threads, "llama_threads": args.threads,
            "systems": plan.systems, "memory": values, "fp16_bytes": plan.fp16_bytes, "code": code_state(),
            "title": f"{model.label}: FP16 weights {plan.fp16_bytes / GB:.2f} GB, {args.tokens} tokens, 2-core CPU"}


def _save(args, report: dict[str, Any]) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=_plain))


def _stream_group(plan: Plan, system: str) -> int:
    """The group of the INT8 attention file a m2cache row streams from (0: one scale a row, or none)."""
    if not system.startswith("m2cache"):
        return 0
    return int((plan.row_store(system).manifest.get("attention_int8") or {}).get("group", 0))


def add_quality(plan: Plan, parts: list[dict[str, Any]], notes: list[str]) -> None:
    """Every row's perplexity (measured once per model, kept in its quality.json) and the fastest row at each
    quality level under each limit."""
    cache = quality.QualityCache((plan.model.root or plan.model.store.parent) / quality.QUALITY_FILE,
                                 quality.windows_of(plan.model.store))
    keys_by_part = []
    for part in parts:
        keys = {s: quality.row_key(s, r, plan.row_policy(s), plan.row_store(s).split if s.startswith("m2cache") else False,
                                   plan.dtype, shares=_mean_shares(plan, s), stream_group=_stream_group(plan, s))
                for s, r in part["systems"].items()}
        keys_by_part.append(keys)
    wanted = {k for keys in keys_by_part for k in keys.values() if k}
    quality.measure(cache, wanted, whole_store=plan.model.store, hf=plan.model.hf, gguf=plan.model.gguf)
    for part, keys in zip(parts, keys_by_part):
        quality.attach(part["systems"], keys, cache)
        part["fastest_at"] = quality.fastest_at(part["systems"])
    notes.append(f"ppl: perplexity on {sum(len(w) - 1 for w in cache.windows)} held-out tokens (pydoc prose), the same "
                 "tokens for every row; Δppl against m2cache's dense FP32 model; m2cache rows in their compute dtype "
                 "with the resident form they held (m2cache.bench.quality)")


def _mean_shares(plan: Plan, system: str) -> tuple[float, float, float] | None:
    if not system.startswith("m2cache"):
        return None
    shares = plan.shares(system)
    if any(s != shares[0] for s in shares):
        return None  # a per-layer policy: measured by its name
    return shares[0].astuple()


def main(argv: list[str] | None = None) -> int:
    """``python -m m2cache.bench ...`` is ``m2cache bench ...``: the same switches, messages and exit codes
    (``m2cache.cli.main.main``'s)."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2])
    args = build_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    return command_exit(lambda: cmd_bench(args))


if __name__ == "__main__":
    sys.exit(main())
