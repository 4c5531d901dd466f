"""engine.stats(): what a run did — speed, bytes per edge, hit ratios, stalls, memory, carbon."""
from __future__ import annotations

import statistics
import time
from typing import Any

from m2cache.engine.carbon import CarbonModel


def engine_stats(engine) -> dict[str, Any]:
    rs = engine.run_stats
    reader, dram, hbm = engine.reader.stats(), engine.dram.stats(), engine.hbm.stats()
    tokens = rs.decode_tokens + len(rs.ttft)  # every generated token (the first comes from the prefill)
    busy = rs.decode_s + rs.prefill_s
    ssd_bytes, copy_bytes = reader["bytes_read"], hbm["bytes_copied"]
    served = dram["served"]
    dram_total = served + dram["neuron_reads"]
    out: dict[str, Any] = {
        "policy": engine.policy.name,
        "tokens": tokens,
        "decode_tokens": rs.decode_tokens,
        "decode_tokens_per_s": rs.decode_tokens / rs.decode_s if rs.decode_s else 0.0,
        "ttft_s": statistics.mean(rs.ttft) if rs.ttft else None,
        "requests": {"completed": rs.completed, "failed": rs.failed, "cancelled": rs.cancelled},
        "bytes": {"ssd_to_dram": ssd_bytes, "dram_to_hbm": copy_bytes},
        "bytes_per_token": {"ssd_to_dram": ssd_bytes / tokens if tokens else 0.0,
                            "dram_to_hbm": copy_bytes / tokens if tokens else 0.0},
        "hit_ratio": {"hbm": hbm["hit_ratio"], "dram": served / dram_total if dram_total else 0.0},
        "stall_fraction": rs.stall_s / busy if busy else 0.0,
        "stall_s": rs.stall_s,
        "held_bytes": {"hbm": hbm["pool_bytes"], "dram": dram["bytes_held"]},
        "peak_bytes": {"hbm": hbm["pool_bytes"], "dram": dram["peak_bytes"],
                       "resident": sum(t.numel() * t.element_size() for t in _resident_tensors(engine))},
        # per tier as planned: on the CPU computing from DRAM the device pool's budget is lent to DRAM
        "budgets": {"hbm": 0 if engine.plan.direct else int(engine.config.hbm_budget),
                    "dram": engine.plan.dram_budget},
        "tiers": {"hbm_slots": engine.plan.hbm_slots, "prefetch": engine.plan.prefetch,
                  "fixed_layers": engine.plan.fixed_layers, "preload": engine.plan.preload,
                  "direct_from_dram": engine.plan.direct},
        "predictor_recall": getattr(engine.policy, "recall", None),
        "actors": {"ssd": reader, "dram": dram, "hbm": {k: v for k, v in hbm.items() if k != "cache"}},
    }
    if tokens:
        seconds = time.perf_counter() - engine.t_open if not busy else busy
        est = CarbonModel().estimate(seconds, tokens, {"ssd_to_dram": ssd_bytes, "dram_to_hbm": copy_bytes},
                                     engine.device.type)
        out["carbon_g_per_1k_tokens"] = est.grams_per_1k_tokens
    return out


def _resident_tensors(engine):
    res = engine.res
    seen = set()
    for t in [res.embed, res.final_norm, res.lm_head] + [
        x for w in res.layers for x in (w.attn_norm, w.wqkv, w.wo, w.ffn_norm)
    ]:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            yield t
