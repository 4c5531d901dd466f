"""``m2cache bench``'s figures: runs summarised per system, the floor, ratios, the table and the plot.

The floor of a system is its disk bytes per decode token over the disk's measured ``O_DIRECT``
bandwidth: the tokens/s its own reads allow. A row at 100% of its floor is bound by the disk alone.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from m2cache.errors import require_extra

MB, GB = 1e6, 1e9
REFERENCE = ("hf-fp32", "hf-bf16", "llama-f16")  # token agreement is against the first of these that ran
BASES = ("llama-f16", "llama-q8_0", "hf-offload", "hf-bf16")  # ratios are given against each of these that ran
W = 27  # the system column: "m2cache:gate:0.05,0.1,0.85" and "llama-q5_k_m (repack)"


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
            "status": "ok" if ok else "failed", "runs_ok": len(ok), "runs": len(runs),
            "decode_tokens_per_s": _median(rates), "decode_tokens_per_s_all": rates,
            "ttft_s": _median([p["ttft_s"] for p in per]),
            "peak_rss_bytes": _median([r.get("peak_rss_bytes") for r in ok]),
            "peak_device_bytes": _median([r.get("peak_device_bytes") for r in ok]),
            "cgroup_peak_bytes": _median([r.get("cgroup_peak_bytes") for r in ok]),
            "disk_read_bytes_per_token": _median([p["disk_read_bytes_per_token"] for p in per]),
            "moved_bytes_per_token": _median([r.get("moved_bytes_per_token") for r in ok]),
            "load_s": _median([r.get("load_s") for r in ok]),
            "available_seen_bytes": _median([(r.get("seen") or {}).get("available") for r in ok]),
            "mem_available_seen_bytes": _median([(r.get("seen") or {}).get("mem_available") for r in ok]),
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


def add_floor(rows: dict[str, dict[str, Any]], disk_bps: float | None) -> None:
    """Each row's floor (tokens/s its disk bytes per token allow) and how close it came."""
    for row in rows.values():
        bpt, rate = row.get("disk_read_bytes_per_token"), row.get("decode_tokens_per_s")
        floor = disk_bps / bpt if disk_bps and bpt and bpt > 1 << 20 else None  # under 1 MB: no disk bound
        row["floor_tokens_per_s"] = floor
        row["share_of_floor"] = rate / floor if floor and rate else None


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for base in BASES:
        b = rows.get(base, {}).get("decode_tokens_per_s")
        if b:
            out[f"vs_{base}"] = {s: (r["decode_tokens_per_s"] / b if r.get("decode_tokens_per_s") else None)
                                 for s, r in rows.items()}
    return out


def _fmt(v: float | None, spec: str) -> str:
    if v is None:  # keep the column's width: the digits before the point or the '%'
        width = spec.split(".")[0].lstrip("+").rstrip("%")
        return "-".rjust(int(width)) if width.isdigit() else "-"
    return format(v, spec)


def print_limit(part: dict[str, Any], stream=sys.stdout) -> None:
    """The table of one memory limit."""
    lim, rows, rat = part["limit"], part["systems"], part["ratios"]
    bw = part.get("disk", {}).get("bytes_per_s")
    if lim.get("limit_bytes"):
        print(f"\n== memory limit {lim['limit_bytes'] / GB:.2f} GB ({lim['label']}; FP16 weights "
              f"{part['fp16_bytes'] / GB:.2f} GB = {part['fp16_bytes'] / lim['limit_bytes']:.1f}x the limit) via "
              f"{lim['mechanism']}; MemAvailable before {lim['mem_available_before'] / GB:.1f} GB; disk O_DIRECT "
              f"{_fmt(bw and bw / GB, '.2f')} GB/s", file=stream)
    else:
        print(f"\n== no memory limit; disk O_DIRECT {_fmt(bw and bw / GB, '.2f')} GB/s", file=stream)
    bases = [k.removeprefix("vs_") for k in rat]
    head = (f"{'system':<{W}} {'B/wt':>5} {'Δppl':>7} {'fits':>4} {'tok/s':>7} {'(min-max)':>11} {'TTFT s':>7} "
            f"{'RSS MB':>7} {'cg peak':>7} {'seen MB':>7} {'disk MB/tok':>11} {'floor':>6} {'%floor':>6} "
            + " ".join(f"{'x ' + b:>13}" for b in bases) + f" {'same tok':>8}")
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for s, r in rows.items():
        bpw = _fmt(r.get("bytes_per_weight"), "5.2f")
        dppl = _fmt(r.get("ppl_delta"), "+7.2%")
        fits = {True: "yes", False: "no"}.get(r.get("fits"), "-")  # type: ignore[arg-type]
        name = f"{s} ({r['llama_mode']})" if r.get("llama_mode") else s
        if r["status"] == "does not fit":
            print(f"{name:<{W}} {bpw} {dppl} {fits:>4} does not fit: needs about {r['needs_bytes'] / GB:.2f} GB "
                  f"({r['needs']})", file=stream)
            continue
        if r["status"] == "skipped":
            print(f"{name:<{W}} {bpw} {dppl} {fits:>4} skipped: {r['reason']}", file=stream)
            continue
        rates = r["decode_tokens_per_s_all"]
        span = f"{min(rates):.2f}-{max(rates):.2f}" if rates else "-"
        agree = r.get("agreement", {}).get("prefix_match")
        mb = lambda v: _fmt(v and v / MB, "7.0f")  # noqa: E731
        print(f"{name:<{W}} {bpw} {dppl} {fits:>4} {_fmt(r['decode_tokens_per_s'], '7.3f')} {span:>11} "
              f"{_fmt(r['ttft_s'], '7.1f')} "
              f"{mb(r['peak_rss_bytes'])} {mb(r.get('cgroup_peak_bytes'))} {mb(r.get('available_seen_bytes'))} "
              f"{_fmt(r['disk_read_bytes_per_token'] and r['disk_read_bytes_per_token'] / MB, '11.1f')} "
              f"{_fmt(r.get('floor_tokens_per_s'), '6.2f')} {_fmt(r.get('share_of_floor'), '6.0%')} "
              + " ".join(f"{_fmt(rat['vs_' + b].get(s), '13.2f')}" for b in bases) + f" {_fmt(agree, '8.0%')}",
              file=stream)
        for err in r["errors"]:
            print(f"{'':<{W}} failed: {err}", file=stream)
    for line in part.get("fastest_at", []):
        print(f"fastest at {line}", file=stream)
    _print_details(rows, stream)


def _print_details(rows: dict[str, dict[str, Any]], stream) -> None:
    for s, r in rows.items():
        st = r.get("m2cache_stats")
        if not st:
            continue
        # the engine's figures (m2cache.figures) over the decode part of the requests; a report
        # written before they were kept there has the whole run's stall and hit ratios
        decode = st.get("decode") or {"bytes_per_token": st["decode_bytes_per_token"],
                                      "stall_fraction": st["stall_fraction"], "hit_ratio": st["hit_ratio"]}
        dec, hit = decode["bytes_per_token"], decode["hit_ratio"]
        print(f"{s} ({st['policy']}; hbm {st['budgets']['hbm'] / MB:.0f} MB, dram {st['budgets']['dram'] / MB:.0f} MB):"
              f" stall {decode['stall_fraction']:.1%} of decode step time; per decode token SSD->DRAM "
              f"{_fmt(dec['ssd_to_dram'] and dec['ssd_to_dram'] / MB, '.1f')} MB, DRAM->device "
              f"{_fmt(dec['dram_to_hbm'] and dec['dram_to_hbm'] / MB, '.1f')} MB; hit ratio device "
              f"{hit['hbm']:.1%}, DRAM {hit['dram']:.1%}"
              + (f", window {hit['window']:.1%}" if "window" in hit else "")
              + (f"; the store's reads per decode token {decode['reads_per_token']:.0f}, "
                 f"{decode['bytes_per_read'] / 1e3:.0f} KB each" if decode.get("reads_per_token") else "")
              + f"; tiers {st['tiers']}", file=stream)
    for r in rows.values():
        if "device_map_bytes" in r:
            dm = r["device_map_bytes"]
            total = sum(dm.values()) or 1
            shares = ", ".join(f"{k} {v / MB:.0f} MB ({v / total:.0%})" for k, v in sorted(dm.items()))
            print(f"hf-offload device map (max_memory {r['max_memory']}): {shares}", file=stream)


def print_report(report: dict[str, Any], stream=sys.stdout) -> None:
    for part in report["limits"]:
        print_limit(part, stream)
    print("", file=stream)
    for note in report["notes"]:
        print(f"note: {note}", file=stream)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Decode tokens/s of every system against the memory limit (log scale), one line per system."""
    require_extra("bench", "matplotlib", what="the bench plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in report["limits"] if p["limit"].get("limit_bytes")]
    fig, ax = plt.subplots(figsize=(10, 5))
    systems = list(dict.fromkeys(s for p in parts for s in p["systems"]))
    rates = [r["decode_tokens_per_s"] for p in parts for r in p["systems"].values() if r.get("decode_tokens_per_s")]
    floor_y = min(rates) / 2 if rates else 0.01  # where "does not fit" is marked
    for k, s in enumerate(systems):
        pts = [(p["limit"]["limit_bytes"] / GB, p["systems"][s]["decode_tokens_per_s"]) for p in parts
               if p["systems"].get(s, {}).get("decode_tokens_per_s")]
        unfit = [p["limit"]["limit_bytes"] / GB for p in parts
                 if p["systems"].get(s, {}).get("status") in ("does not fit", "killed at the limit")]
        if not pts and not unfit:
            continue
        (line,) = ax.plot(*zip(*sorted(pts)), marker="o", label=s) if pts else ax.plot([], [], marker="o", label=s)
        if unfit:
            y = floor_y * 0.8 ** k  # one row of crosses per system, so none hides another
            ax.plot(unfit, [y] * len(unfit), linestyle="none", marker="x", color=line.get_color())
    ax.plot([], [], linestyle="none", marker="x", color="black", label="x: does not fit at that limit")
    fp16 = report["limits"][0]["fp16_bytes"] / GB if report["limits"] else None
    if fp16:
        ax.axvline(fp16, color="grey", linestyle=":", label=f"FP16 weights {fp16:.2f} GB")
    ax.set_xlabel("memory limit, GB (RSS + page cache)")
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_yscale("log")
    ax.set_title(report["config"].get("title", "m2cache bench"), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_frontier(report: dict[str, Any], path: str | Path) -> Path:
    """Quality against speed, one panel per limit: Δ perplexity against decode tokens/s, a point per row
    (filled where its weights fit the limit, hollow where it reads the disk per token), m2cache's policies
    joined as one line and llama.cpp's types as another. Down and to the right is better."""
    require_extra("bench", "matplotlib", what="the frontier plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = report["limits"]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        rows = {s: r for s, r in part["systems"].items()
                if r.get("decode_tokens_per_s") and r.get("ppl_delta") is not None}
        families = {"m2cache": [s for s in rows if s.startswith("m2cache") and s != "m2cache-dense-fp16"],
                    "llama.cpp": [s for s in rows if s.startswith("llama-")]}
        for label, members in families.items():
            pts = sorted((rows[s]["decode_tokens_per_s"], 100 * rows[s]["ppl_delta"]) for s in members)
            if pts:
                ax.plot(*zip(*pts), linestyle="-", alpha=0.5, label=label)
        for s, r in rows.items():
            x, y = r["decode_tokens_per_s"], 100 * r["ppl_delta"]
            filled = bool(r.get("fits"))
            ax.plot([x], [y], marker="o", linestyle="none", color="black" if filled else "none",
                    markeredgecolor="black")
            ax.annotate(s.removeprefix("m2cache:").removeprefix("llama-"), (x, y), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        lim = part["limit"]
        ax.set_title(f"limit {lim['label']}" + (f" ({lim['limit_bytes'] / GB:.2f} GB)" if lim.get("limit_bytes") else ""),
                     fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("decode tokens/s (log)")
        ax.set_ylabel("Δ perplexity vs dense FP32, %")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(report["config"].get("title", "m2cache bench") + ": filled = fits the limit, hollow = reads the "
                 "disk per token", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
