"""engine.stats(): what a run did — speed, bytes per edge, hit ratios, stalls, memory, carbon.

The figures come from ``m2cache.figures`` over ``engine_counters(engine)``; the counters ride
along under ``"counters"``, so a saved trace (whose metadata holds ``stats()``) gives the same figures.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from m2cache.engine.policies import fetched_bytes, resident_policy_bytes
from m2cache.figures import Counters, figures
from m2cache.engine.loading import resident_bytes
from m2cache.formats import quant


def engine_counters(engine) -> Counters:
    """A snapshot of the counters the actors keep (subtract two for what happened in between)."""
    rs = engine.run_stats
    reader, dram, hbm = engine.reader, engine.dram, engine.hbm
    window_hits, window_misses = dram.window_counts()
    return Counters(
        tokens=rs.decode_tokens + len(rs.ttft), decode_tokens=rs.decode_tokens, first_tokens=len(rs.ttft),
        prefill_s=rs.prefill_s, decode_s=rs.decode_s, stall_s=rs.stall_s, ttft_s_sum=sum(rs.ttft),
        ssd_to_dram_bytes=reader.bytes_read, dram_to_hbm_bytes=hbm.bytes_copied, hbm_hits=hbm.hits,
        hbm_misses=hbm.misses, dram_served=_dram_served(engine), dram_neuron_reads=dram.counts["neuron_reads"],
        disk_reads=engine.backend.reads, disk_bytes=engine.backend.bytes_read, window_hits=window_hits,
        window_misses=window_misses)


def engine_stats(engine) -> dict[str, Any]:
    rs = engine.run_stats
    reader, hbm = engine.reader.stats(), engine.hbm.stats()
    dram = {**engine.dram.stats(), "served": _dram_served(engine)}
    counters = engine_counters(engine)
    out: dict[str, Any] = {
        "policy": engine.policy.name,
        "resident_form": engine.resident_form,  # full, int8 or stream (what --resident / the memory plan chose)
        **figures(counters, device=engine.device.type),
        "requests": {"completed": rs.completed, "failed": rs.failed, "cancelled": rs.cancelled},
        "held_bytes": {"hbm": hbm["pool_bytes"], "dram": dram["bytes_held"]},
        "peak_bytes": {"hbm": hbm["pool_bytes"], "dram": dram["peak_bytes"],
                       "resident": _resident_held(engine)},
        # per tier as planned: on the CPU computing from DRAM the device pool's budget is lent to DRAM
        "budgets": {"hbm": 0 if engine.plan.direct else int(engine.config.hbm_budget),
                    "dram": engine.plan.dram_budget, "hbm_given": int(engine.config.hbm_budget),
                    "dram_given": int(engine.config.dram_budget)},
        "ffn_bytes": _ffn_bytes(engine),
        "tiers": {"hbm_slots": engine.plan.hbm_slots, "prefetch": engine.plan.prefetch,
                  "fixed_layers": engine.plan.fixed_layers, "preload": engine.plan.preload,
                  "kept_for_good": _kept_for_good(engine.plan.fixed_keys),
                  "decode_read_bytes": engine.plan.decode_read_bytes,
                  "direct_from_dram": engine.plan.direct, "window_slots": engine.plan.window_slots},
        "memory": _memory(engine, dram["peak_bytes"], hbm["pool_bytes"]),
        "actors": {"ssd": reader, "dram": dram, "hbm": {k: v for k, v in hbm.items() if k != "cache"}},
        # resident="stream": the attention projections read per layer (beside the FFN's SSD->DRAM bytes)
        "attention_stream_bytes": None if engine.attention is None else engine.attention.bytes_read,
        "device": engine.device.type,
        "messages": _messages(engine),
        "counters": counters.to_dict(),
    }
    return out



def _messages(engine) -> dict[str, int]:
    """Messages sent so far on each channel between the actors, ``sender->receiver`` (Stop aside: it is the
    engine's), and all of them: the hops (``tools/hops.py`` turns them into hops per layer of a decode token)."""
    sent = {ch.edge: ch.sent for a in engine.actors for ch in a.channels}
    return {**sent, "total": sum(sent.values())}


def _dram_served(engine) -> int:
    """Layers served from DRAM: the DRAM manager's serves, and the entries the native step read from it."""
    native = engine.executor.native
    return engine.dram.counts["served"] + (native.served if native is not None else 0)


def _ffn_bytes(engine) -> dict[str, int]:
    """What the policy's FFN takes a decode token (``m2cache policies``' figures): the bytes it computes
    from at its precisions, a dense FP16 FFN's, and what it keeps resident to choose its neurons."""
    store = engine.store
    dense = quant.bundle_bytes("fp16", 3, store.hidden) * store.num_neurons * store.config.num_layers
    return {"fetched_per_token": fetched_bytes(store, engine.policy), "dense_fp16_per_token": dense,
            "policy_resident": resident_policy_bytes(store, engine.policy.name)}


def _memory(engine, dram_peak: int, hbm_pool: int) -> dict[str, Any] | None:
    """The memory limit's split (``EngineConfig.memory``) and what the engine holds of it now."""
    if engine.memory is None:
        return None
    kv = sum(s.kv.nbytes for s in list(engine.executor.active) if s.kv is not None)
    held = {"resident": _resident_held(engine), "hbm": hbm_pool, "dram_peak": dram_peak, "kv": kv}
    return engine.memory.to_dict() | {"held": held}


def _kept_for_good(keys) -> dict[str, int]:
    """Layers per precision whose whole entry DRAM keeps for good."""
    return dict(Counter(p for _, p in keys))


def _resident_held(engine) -> int:
    """The resident weights, and with ``resident="stream"`` the layers of attention it holds."""
    streamed = 0 if engine.attention is None else engine.attention.held_layers() * engine.attention.layer_bytes
    return resident_bytes(engine.res) + streamed
