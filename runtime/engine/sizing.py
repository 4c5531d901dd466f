"""Sizes the tiers from the budgets, the store and the policy — and refuses budgets that cannot work.

HBM: one slot pool per precision. Prefill is dense (every neuron at FP16; ``dense_prefill=False`` takes
the policy's split instead), decode keeps the policy's counts, so one layer's working set is
max(F, n_fp16) FP16 slots + n_int8 + n_int4 (with ``lookahead`` decode holds two layers' counts: layer L
computes while layer L+1's rows are copied in); the rest of the budget is shared in proportion to the
bytes each precision moves per token.
DRAM: whole layers of the precisions decode uses (``layer``/``hybrid``) in a FIFO, plus a staging
reserve for neuron-level reads (``neuron``/``hybrid``); the ring holds the current layer and
``prefetch`` more, and what is left becomes the fixed area of first layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from m2cache.engine.config import EngineConfig, format_size
from m2cache.errors import BudgetError
from m2cache.formats.shares import PRECISION_ORDER
from m2cache.model.policy import Policy
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
    fixed_keys: tuple[tuple[int, str], ...] = ()  # (layer, precision) entries DRAM keeps for good
    decode_read_bytes: int = -1  # what a decode token reads off the store once warm (-1: not estimated)
    window_slots: dict[str, int] = field(default_factory=dict)  # DRAM's window of neurons read one by one


def plan_tiers(store: Store, cfg: EngineConfig, policy: Policy, *, cpu_direct: bool = False) -> TierPlan:
    """``cpu_direct``: the CPU kernels can compute from DRAM. With whole layers preloaded the device
    pool then has nothing to do (on the CPU it is the same memory as DRAM), so its budget is lent to
    the DRAM tier: more layers stay whole, fewer are re-read each token. Total bytes are unchanged."""
    if cpu_direct and cfg.preload in ("auto", "layer", "hybrid"):
        hbm, dram = int(cfg.hbm_budget), int(cfg.dram_budget)
        together = _dram_needs(store, cfg, policy).min_dram
        if hbm + dram < together:  # said in the user's terms: what dram_budget works with this hbm_budget
            least = together - hbm
            raise BudgetError(
                f"dram_budget {format_size(dram)} is too small: on the CPU the device pool's budget "
                f"({format_size(hbm)}) is lent to DRAM, and together they must hold {format_size(together)} "
                f"for preload={cfg.preload!r}; the smallest dram_budget that works is {format_size(least)} "
                f"({least} bytes)")
        lent = _plan_dram(store, cfg.replace(hbm_budget=0, dram_budget=hbm + dram), policy, upgrade=True)
        return replace(lent, hbm_slots={p: 0 for p in PRECISION_ORDER}, direct=True)
    n_layers, F = store.config.num_layers, store.num_neurons
    bb = {p: store.bundle_bytes(p) for p in PRECISION_ORDER}
    counts = policy.max_counts()
    need = _working_set(store, cfg, policy)
    min_hbm = _min_hbm(store, cfg, policy)
    hbm_budget = int(cfg.hbm_budget)
    if hbm_budget < min_hbm:
        raise BudgetError(
            f"hbm_budget {format_size(hbm_budget)} is below the working set under policy "
            f"{policy.name!r} (prefill: {_prefill_counts(store, cfg, policy)}; decode: {counts}"
            f"{' for each of 2 layers: lookahead' if _decode_layers(cfg, policy) == 2 else ''}); the smallest hbm_budget "
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

    return replace(_plan_dram(store, cfg, policy), hbm_slots=slots, hbm_bytes=hbm_bytes)


def min_tier_budgets(store: Store, cfg: EngineConfig, policy: Policy, *, cpu_direct: bool = False) -> tuple[int, int]:
    """(smallest hbm_budget, smallest dram_budget) that :func:`plan_tiers` accepts for this policy; on the
    CPU computing from DRAM the pool's budget is lent to DRAM, so all of it is DRAM's."""
    min_dram = _dram_needs(store, cfg, policy).min_dram
    if cpu_direct and cfg.preload in ("auto", "layer", "hybrid"):
        return 0, min_dram
    return _min_hbm(store, cfg, policy), min_dram


def dram_to_keep_all(store: Store, cfg: EngineConfig, policy: Policy, *, cpu_direct: bool = False) -> int:
    """The smallest DRAM budget (with ``cfg.hbm_budget`` beside it) at which the plan keeps every layer of every
    precision decode uses for good: nothing is read per token once they are in, and on the CPU computing from DRAM
    decode tokens run natively (``EngineConfig.native_decode``). Every system holding all its weights, m2cache's DRAM
    tier included: what the bench's in-RAM setting gives it."""
    needs = _dram_needs(store, cfg, policy)
    want = {(layer, p) for layer in range(store.config.num_layers) for p in needs.used}
    budget = needs.staging + needs.per_layer * store.config.num_layers
    lent = int(cfg.hbm_budget or 0) if cpu_direct and cfg.preload in ("auto", "layer", "hybrid") else 0
    for _ in range(cfg.prefetch + 3):  # without O_DIRECT the preload ring keeps its layers too
        dram = max(budget - lent, needs.min_dram)
        plan = plan_tiers(store, cfg.replace(dram_budget=dram), policy, cpu_direct=cpu_direct)
        if want <= set(plan.fixed_keys):
            return dram
        budget += needs.per_layer
    raise AssertionError(f"no DRAM budget up to {format_size(budget)} keeps every layer for good")


def staging_bytes(store: Store, cfg: EngineConfig, policy: Policy) -> int:
    """The DRAM reserve for neuron-level reads (0 when whole layers are always read)."""
    return _dram_needs(store, cfg, policy).staging


def _prefill_counts(store: Store, cfg: EngineConfig, policy: Policy) -> dict[str, int]:
    """Neurons a prefill step takes per precision: every one at FP16 (``dense_prefill``), else the policy's."""
    if cfg.dense_prefill is False:
        return policy.max_counts()
    return {"fp16": store.num_neurons, "int8": 0, "int4": 0}


def _decode_layers(cfg: EngineConfig, policy: Policy) -> int:
    """Layers a decode step holds in the pool (and in staging) at once: two when it looks ahead."""
    return 2 if cfg.lookahead and policy.needs_scores else 1


def _working_set(store: Store, cfg: EngineConfig, policy: Policy) -> dict[str, int]:
    """The neurons per precision that prefill or decode may hold at once."""
    decode, prefill = policy.max_counts(), _prefill_counts(store, cfg, policy)
    return {p: max(decode[p] * _decode_layers(cfg, policy), prefill[p]) for p in PRECISION_ORDER}


def _min_hbm(store: Store, cfg: EngineConfig, policy: Policy) -> int:
    """The working set in the pool (one layer's; two layers' of decode with lookahead)."""
    need = _working_set(store, cfg, policy)
    return sum(need[p] * store.bundle_bytes(p) for p in PRECISION_ORDER)


@dataclass(frozen=True)
class _DramNeeds:
    preload: str  # resolved
    used: tuple[str, ...]  # precisions decode uses: whole layers of these in DRAM
    per_layer: int  # bytes of one layer at those precisions
    staging: int  # reserve for neuron-level reads
    min_dram: int  # the smallest DRAM budget that works


def _dram_needs(store: Store, cfg: EngineConfig, policy: Policy) -> _DramNeeds:
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
    prefill = _prefill_counts(store, cfg, policy)
    prefill_bytes = sum(prefill[p] * bb[p] for p in PRECISION_ORDER)
    staging = 0 if preload == "layer" else max(prefill_bytes, sum(decode_bytes.values()) * _decode_layers(cfg, policy))
    prefill_layers = sum(layer_bytes[p] for p in PRECISION_ORDER if prefill[p])
    # whole layers: the one computing stays pinned while lookahead fetches the next
    min_dram = max(prefill_layers, per_layer * _decode_layers(cfg, policy)) if preload == "layer" else staging
    return _DramNeeds(preload, used, per_layer, staging, min_dram)


def _plan_dram(store: Store, cfg: EngineConfig, policy: Policy, upgrade: bool = False) -> TierPlan:
    """The DRAM half of the plan (its HBM fields empty). ``upgrade``: the CPU computes from DRAM, where a
    layer's INT8 neurons are served from its FP16 entry when DRAM keeps that and not the INT8 one
    (``DRAMManager._upgraded``)."""
    n_layers = store.config.num_layers
    needs = _dram_needs(store, cfg, policy)
    preload, used, per_layer, staging, min_dram = (needs.preload, needs.used, needs.per_layer, needs.staging,
                                                   needs.min_dram)
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
    keys = tuple((layer, p) for layer in range(fixed) for p in used)
    # off the disk (O_DIRECT), and on the CPU computing from DRAM, bytes decide: keep what saves most reads
    # when that reads less per token than whole layers ahead. Measured on the demo (format 3, gate-40, default
    # budgets, store in the page cache, 2-core CPU, docs/results/read_plan_demo_ab.txt): 101 MB read a token for
    # 1.05x the tokens/s of whole layers ahead's 154 MB. Elsewhere from the page cache (the device pool copying
    # up, dense-fp16) whole-layer reads checked in one pass measured faster
    window: dict[str, int] = {}
    if (cfg.direct_io or upgrade) and cfg.fixed_layers is None and preload != "layer":
        room = dram_budget - staging

        def kept_by_share(room: int) -> tuple[tuple[int, str], ...]:
            by_share = _fixed_by_share(store, policy, used, room)
            if upgrade:  # every layer's FP16 entry serving its INT8 neurons too, when that reads less
                by_share = min(by_share, _fixed_by_share(store, policy, used, room, upgrade=True),
                               key=lambda k: _read_bytes(store, policy, used, k, 0, upgrade))
            return by_share

        by_share = kept_by_share(room)
        # the window where whole entries leave reads a token: its room comes from the entries kept after the
        # layers of the precision most neurons take
        window_bytes = (_window_bytes(store, cfg, policy, used, room)
                        if upgrade and _read_bytes(store, policy, used, by_share, 0, upgrade) else 0)
        if window_bytes:
            by_share = kept_by_share(room - window_bytes)
        if _read_bytes(store, policy, used, by_share, 0, upgrade) < _read_bytes(store, policy, used, keys, prefetch,
                                                                                  upgrade):
            keys, prefetch, fixed = by_share, 0, 0
            window = _window_slots(store, policy, used, keys, window_bytes)
    whole = {"layer": 1, "hybrid": prefetch}.get(preload, 0)  # entries not kept: read whole, or their neurons
    return TierPlan({}, 0, dram_budget, staging, used, prefetch, fixed, preload, fixed_keys=keys,
                    decode_read_bytes=_read_bytes(store, policy, used, keys, whole, upgrade), window_slots=window)


def _window_bytes(store: Store, cfg: EngineConfig, policy: Policy, used: tuple[str, ...], room: int) -> int:
    """DRAM's window (``EngineConfig.window``): room for ``cfg.window`` decode tokens' neurons of the precisions
    other than the one most neurons take, whose layers are kept for good first. Per byte held it saves more
    bytes than whole layers of those precisions kept for good: a whole INT8 layer saves the 20% of its neurons a
    token reads, a window of one token's neurons the share of them the next token takes again (on the grown
    SmolLM2 45% of the top 10% and more of the rest; ``m2cache locality``). Measured there at 40%: 16% fewer
    bytes read, the same reads a token and the same speed (``docs/results/bench_grown_40pct_levers.txt``)."""
    counts, n_layers, F = policy.max_counts(), store.config.num_layers, store.num_neurons
    if cfg.window <= 0 or len(used) < 2:
        return 0
    first = max(used, key=lambda p: counts[p] / F)
    per_token = sum(counts[p] * store.bundle_bytes(p) for p in used if p != first) * n_layers
    return max(0, min(int(cfg.window * per_token), room - store.layer_bytes(first) * n_layers))


def _window_slots(store: Store, policy: Policy, used: tuple[str, ...], kept: tuple[tuple[int, str], ...],
                  window_bytes: int) -> dict[str, int]:
    """``window_bytes`` in slots per precision, in proportion to the bytes a token reads of each one one by one
    (the layers not kept whole); a precision whose share would not hold three layers' neurons gets none (a
    request the window cannot take is read as without it)."""
    counts, n_layers = policy.max_counts(), store.config.num_layers
    held = set(kept)
    reads = {p: counts[p] * store.bundle_bytes(p) * sum((layer, p) not in held for layer in range(n_layers))
             for p in used}
    total = sum(reads.values())
    slots = {p: int(window_bytes * reads[p] / total) // store.bundle_bytes(p) if total else 0 for p in used}
    return {p: n for p, n in slots.items() if n >= 3 * counts[p] and reads[p]}


def _fixed_by_share(store: Store, policy: Policy, used: tuple[str, ...], room: int,
                    upgrade: bool = False) -> tuple[tuple[int, str], ...]:
    """Whole (layer, precision) entries to keep for good in ``room`` bytes, the precision that most neurons
    take first (holding it saves the most neuron reads per byte held), every layer of it before the next.
    ``upgrade``: INT8 is never kept, its neurons served from the FP16 entries instead (measured at 3.6 GiB
    on the 7B shape's split store: every FP16 and INT4 entry fits where the three precisions did not)."""
    counts, F = policy.max_counts(), store.num_neurons
    keys: list[tuple[int, str]] = []
    kept = [p for p in used if not (upgrade and p == "int8" and "fp16" in used)]
    for p in sorted(kept, key=lambda p: -counts[p] / F):
        for layer in range(store.config.num_layers):
            if store.layer_bytes(p) <= room:
                keys.append((layer, p))
                room -= store.layer_bytes(p)
    return tuple(keys)


def _read_bytes(store: Store, policy: Policy, used: tuple[str, ...], fixed: tuple[tuple[int, str], ...],
                prefetch: int, upgrade: bool = False) -> int:
    """Bytes a decode token reads off the store: entries not held are read whole when preloaded ahead,
    else just the neurons the policy takes at that precision (``upgrade``: a layer's INT8 neurons cost
    nothing when its FP16 entry is kept and its INT8 one is not)."""
    counts, held = policy.max_counts(), set(fixed)
    if upgrade:
        held |= {(layer, "int8") for layer, p in fixed if p == "fp16"}
    per_key = {p: store.layer_bytes(p) if prefetch else _neuron_read_bytes(store, p, counts[p]) for p in used}
    return sum(per_key[p] for layer in range(store.config.num_layers) for p in used if (layer, p) not in held)


def _neuron_read_bytes(store: Store, precision: str, count: int) -> int:
    """What a neuron-level read of ``count`` neurons at ``precision`` brings off the store: their blocks with
    the padding, the gaps merged into runs, or the whole file where they fill half its blocks
    (:meth:`Store.run_bytes`), for ids spread at random as a policy without locality takes them. Counting
    only their bundles' bytes under-estimated the 7B shape's gate-40 reads 2.3x (501 MB a token planned,
    1169 MB read: 12 KiB blocks for 8.2 KB INT8 bundles, runs of 20% of the neurons, INT4's whole file)."""
    if count <= 0:
        return 0
    count = min(count, store.num_neurons)
    ids = np.random.default_rng(0).choice(store.num_neurons, size=count, replace=False)
    return store.run_bytes(precision, ids)
