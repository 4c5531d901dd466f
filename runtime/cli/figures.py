"""The run's figures for people (``generate --stats``, the demo): each one with what it means.

The numbers are ``engine.stats()``' (``m2cache.figures``, the trace summary's too); this module
only words them.
"""
from __future__ import annotations

from typing import Any, TextIO

from m2cache.figures import PER_TOKEN

MB = 1e6


def mb(n: float) -> str:
    return f"{n / MB:.1f} MB"


def stats_lines(st: dict[str, Any]) -> list[str]:
    """``engine.stats()`` as lines a newcomer can read without the README."""
    bpt, tiers, budgets = st["bytes_per_token"], st["tiers"], st["budgets"]
    lines = [f"policy {st['policy']}: {st['decode_tokens']} decode tokens at {st['decode_tokens_per_s']:.2f} tokens/s, "
             f"time to first token {st['ttft_s'] or 0:.2f}s"]
    ffn = st.get("ffn_bytes")
    if ffn:
        dense = ffn["dense_fp16_per_token"]
        lines.append(f"FFN weights a decode token computes from: {mb(ffn['fetched_per_token'])} at the policy's "
                     f"precisions, {ffn['fetched_per_token'] / dense:.2f} of a dense FP16 model's {mb(dense)}"
                     + (f"; kept resident to choose them: {mb(ffn['policy_resident'])}" if ffn["policy_resident"] else ""))
    how = (f"whole layers preloaded {tiers['prefetch']} ahead" if tiers["preload"] in ("layer", "hybrid")
           and tiers["prefetch"] else "the neurons each token needs, read one by one")
    kept = tiers["kept_for_good"]
    lines.append(f"bytes {PER_TOKEN}: SSD->DRAM {bpt['ssd_to_dram'] / MB:.2f} MB (read off the store: {how}"
                 + (f"; DRAM keeps {', '.join(f'{n} layers at {p}' for p, n in kept.items())} for good" if kept else "")
                 + f"), DRAM->device {bpt['dram_to_hbm'] / MB:.2f} MB")
    if tiers["direct_from_dram"]:
        lines.append(f"device pool: not used on the CPU, where it is DRAM: the CPU computes from DRAM's layers, and "
                     f"the pool's budget ({mb(budgets.get('hbm_given', 0))}) is lent to DRAM; so nothing is copied up "
                     f"and the device hit ratio is 0")
        lines.append(f"DRAM: holds at most {mb(st['peak_bytes']['dram'])} of {mb(budgets['dram'])} (the DRAM budget "
                     f"{mb(budgets.get('dram_given', budgets['dram']))} plus the pool's); it served "
                     f"{st['hit_ratio']['dram']:.1%} of the layers' fetches without a neuron-level read")
    else:
        lines.append(f"device pool: {mb(st['peak_bytes']['hbm'])} of {mb(budgets['hbm'])}; "
                     f"{st['hit_ratio']['hbm']:.1%} of the neurons a step needed were there already (device hit ratio)")
        lines.append(f"DRAM: holds at most {mb(st['peak_bytes']['dram'])} of {mb(budgets['dram'])}; it served "
                     f"{st['hit_ratio']['dram']:.1%} of the fetches without a neuron-level read")
    window = tiers.get("window_slots") or {}
    if window:
        lines.append(f"DRAM's window of neurons read one by one: {', '.join(f'{n} {p}' for p, n in window.items())} "
                     f"slots; it held {st['hit_ratio']['window']:.1%} of the neurons the layers asked it for")
    if st.get("reads_per_token"):
        lines.append(f"the store's reads: {st['reads_per_token']:.0f} {PER_TOKEN}, {st['bytes_per_read'] / 1e3:.0f} KB "
                     f"each on average (a disk bound by its reads a second pays for their count)")
    lines.append(f"resident weights (embeddings, attention, norms, LM head): {mb(st['peak_bytes']['resident'])}")
    lines.append(f"stall: the compute waited for weights {st['stall_fraction']:.1%} of step time")
    if st.get("attention_stream_bytes") is not None and st["tokens"]:
        lines.append(f"attention streamed from the store: {st['attention_stream_bytes'] / st['tokens'] / MB:.1f} MB "
                     f"{PER_TOKEN}")
    if st.get("memory"):
        m, held = st["memory"], st["memory"]["held"]
        lines.append(f"memory limit {m['limit'] / MB:.0f} MB: runtime {m['runtime'] / MB:.0f}, margin {m['margin'] / MB:.0f}, "
                     f"reads in flight {m['reads'] / MB:.0f}, resident ({m['resident_form']}) {m['resident'] / MB:.0f}, "
                     f"KV {m['kv_tokens']} tokens {m['kv'] / MB:.0f}, device pool {m['hbm_budget'] / MB:.0f}, DRAM "
                     f"{m['dram_budget'] / MB:.0f} MB" + ("" if m["dense_prefill"] else "; prefill split by the policy")
                     + f"; held now: KV {held['kv'] / MB:.1f} MB")
    if "carbon_g_per_1k_tokens" in st:
        lines.append(f"carbon estimate: {st['carbon_g_per_1k_tokens']:.2f} gCO2 per 1000 tokens")
    return lines


def print_stats(st: dict[str, Any], stream: TextIO) -> None:
    for line in stats_lines(st):
        print("[m2cache] " + line, file=stream)
