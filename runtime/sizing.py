"""Sizes the tiers from the budgets, the store and the policy — and refuses budgets that cannot work.

HBM: one slot pool per precision. Prefill is dense (every neuron at FP16), decode keeps the policy's
counts, so one layer's working set is max(F, n_fp16) FP16 slots + n_int8 + n_int4; the rest of the
budget is shared in proportion to the bytes each precision moves per token.
DRAM: whole layers of the precisions decode uses (``layer``/``hybrid``) in a FIFO, plus a staging
reserve for neuron-level reads (``neuron``/``hybrid``); the ring holds the current layer and
``prefetch`` more, and what is left becomes the fixed area of first layers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from m2cache.config import EngineConfig, format_size
from m2cache.errors import BudgetError
from m2cache.model.policy import PRECISION_ORDER, Policy
from m2cache.storage.reader import Store


@dataclass(frozen=True)
class TierPlan:
    hbm_slots: dict[str, int]
    hbm_bytes: int
    dram_budget: int
    staging_reserve: int
    dram_precisions: tuple[str, ...]
    prefetch: int
    fixed_layers: int
    preload: str  # resolved: "auto" becomes layer/neuron/hybrid here
    direct: bool = False  # CPU: decode computes from DRAM's whole layers; the HBM budget is lent to DRAM


def plan_tiers(store: Store, cfg: EngineConfig, policy: Policy, *, cpu_direct: bool = False) -> TierPlan:
    """``cpu_direct``: the CPU kernels can compute from DRAM. With whole layers preloaded the device
    pool then has nothing to do (on the CPU it is the same memory as DRAM), so its budget is lent to
    the DRAM tier: more layers stay whole, fewer are re-read each token. Total bytes are unchanged."""
    if cpu_direct and cfg.preload in ("auto", "layer", "hybrid"):
        hbm = int(cfg.hbm_budget)
        try:
            plan = _plan_dram(store, cfg.replace(hbm_budget=0, dram_budget=int(cfg.dram_budget) + hbm), policy)
        except BudgetError as e:  # say it in the user's terms: what dram_budget works with this hbm_budget
            together = _plan_dram_minimum(store, cfg, policy)
            least = max(together - hbm, 0)
            raise BudgetError(
                f"dram_budget {format_size(int(cfg.dram_budget))} is too small: on the CPU the device pool's "
                f"budget ({format_size(hbm)}) is lent to DRAM, and together they must hold {format_size(together)} "
                f"for preload={cfg.preload!r}; the smallest dram_budget that works is {format_size(least)} "
                f"({least} bytes)") from e
        empty = {p: 0 for p in PRECISION_ORDER}
        return TierPlan(empty, 0, plan.dram_budget, plan.staging_reserve, plan.dram_precisions, plan.prefetch,
                        plan.fixed_layers, plan.preload, direct=True)
    n_layers, F = store.config.num_layers, store.num_neurons
    bb = {p: store.bundle_bytes(p) for p in PRECISION_ORDER}
    counts = policy.max_counts()
    need = {"fp16": max(F, counts["fp16"]), "int8": counts["int8"], "int4": counts["int4"]}
    min_hbm = sum(need[p] * bb[p] for p in PRECISION_ORDER)
    hbm_budget = int(cfg.hbm_budget)
    if hbm_budget < min_hbm:
        raise BudgetError(
            f"hbm_budget {format_size(hbm_budget)} is below one layer's working set under policy "
            f"{policy.name!r} (prefill: {F} neurons at FP16; decode: {counts}); the smallest hbm_budget "
            f"that works is {format_size(min_hbm)} ({min_hbm} bytes)")
    decode_bytes = {p: counts[p] * bb[p] for p in PRECISION_ORDER}
    total_decode = sum(decode_bytes.values()) or 1
    extra = hbm_budget - min_hbm
    slots = {}
    for p in PRECISION_ORDER:
        share = decode_bytes[p] / total_decode
        slots[p] = min(need[p] + int(extra * share) // bb[p], F * n_layers) if need[p] else 0
    hbm_bytes = sum(slots[p] * bb[p] for p in PRECISION_ORDER)
    assert hbm_bytes <= hbm_budget, "HBM slots exceed the budget they were sized from"

    dram = _plan_dram(store, cfg, policy)
    return TierPlan(slots, hbm_bytes, dram.dram_budget, dram.staging_reserve, dram.dram_precisions, dram.prefetch,
                    dram.fixed_layers, dram.preload)


def _plan_dram_minimum(store: Store, cfg: EngineConfig, policy: Policy) -> int:
    """The smallest DRAM budget ``_plan_dram`` accepts (it names it in its BudgetError)."""
    try:
        _plan_dram(store, cfg.replace(dram_budget=0), policy)
    except BudgetError as e:
        m = re.search(r"\((\d+) bytes\)", str(e))
        if m:
            return int(m.group(1))
    raise RuntimeError("_plan_dram accepted a zero DRAM budget or named no minimum")


def _plan_dram(store: Store, cfg: EngineConfig, policy: Policy) -> TierPlan:
    """The DRAM half of the plan (its HBM fields empty)."""
    n_layers = store.config.num_layers
    bb = {p: store.bundle_bytes(p) for p in PRECISION_ORDER}
    counts = policy.max_counts()
    decode_bytes = {p: counts[p] * bb[p] for p in PRECISION_ORDER}
    preload = cfg.preload
    if preload == "auto":
        # measured (demo, tuned-40, 2-core CPU, store in the page cache): hybrid 3.36 tok/s, layer
        # 3.34, neuron 2.62 — whole-layer reads checked in one pass beat many small verified reads even
        # at 3x the bytes. On a slow SSD neuron-level reads move a third of the bytes: choose them there.
        preload = "hybrid"
    used = tuple(p for p in PRECISION_ORDER if counts[p] > 0)
    layer_bytes = {p: store.layer_bytes(p) for p in PRECISION_ORDER}
    per_layer = sum(layer_bytes[p] for p in used)
    staging = 0 if preload == "layer" else max(layer_bytes["fp16"], sum(decode_bytes.values()))
    min_dram = max(layer_bytes["fp16"], per_layer) if preload == "layer" else staging
    dram_budget = int(cfg.dram_budget)
    if dram_budget < min_dram:
        raise BudgetError(
            f"dram_budget {format_size(dram_budget)} is too small for preload={preload!r}: one layer needs "
            f"{format_size(min_dram)}; the smallest dram_budget that works is {format_size(min_dram)} "
            f"({min_dram} bytes)" + ("" if preload != "layer" else ", or use preload='neuron'"))
    ring_layers = (dram_budget - staging) // per_layer
    # neuron mode preloads nothing ahead; its DRAM (beyond staging) keeps the first layers whole
    prefetch = 0 if preload == "neuron" else max(0, min(cfg.prefetch, ring_layers - 1))
    if cfg.fixed_layers is not None:
        fixed = min(cfg.fixed_layers, max(0, ring_layers - (0 if preload == "neuron" else prefetch + 1)), n_layers)
    else:
        spare = ring_layers if preload == "neuron" else ring_layers - prefetch - 2
        fixed = min(max(0, spare), n_layers)
    return TierPlan({}, 0, dram_budget, staging, used, prefetch, fixed, preload)
