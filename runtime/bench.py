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

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from m2cache.bench_systems import Job, _plain, child_main  # the child side: one system, one run

SYSTEMS = ("m2cache", "m2cache-dense-fp16", "hf-bf16", "hf-fp32", "hf-offload", "layer-stream")
REFERENCE = ("hf-fp32", "hf-bf16")  # token agreement is measured against the first of these that ran
MB = 1e6




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
              "raw": results if args.raw else None}
    seconds = time.monotonic() - t_start
    report["seconds"] = round(seconds, 1)  # type: ignore[assignment]
    print_report(report)
    print(f"bench took {seconds:.0f}s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=_plain))
    return 0


def add_commands(sub) -> None:
    from m2cache.export_gguf import add_export_command
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
    add_export_command(sub)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2])
    from m2cache.cli import main as cli_main

    return cli_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
