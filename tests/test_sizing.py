"""plan_tiers: slots fit the HBM budget, too-small budgets are refused naming the smallest that works,
and the preload window is clipped to what the DRAM budget holds."""
from __future__ import annotations

import re

import pytest

from m2cache.engine.config import EngineConfig
from m2cache.errors import BudgetError
from m2cache.formats.shares import PRECISION_ORDER, Shares
from m2cache.model.policy import Policy
from m2cache.engine.sizing import plan_tiers
from m2cache.storage.reader import Store

MIXED = Shares(0.1, 0.2, 0.2)


@pytest.fixture(scope="module")
def store(tiny_store) -> Store:
    return Store(tiny_store.store)


def dense(store: Store) -> Policy:
    return Policy(store.config.num_layers, store.num_neurons)


def mixed(store: Store) -> Policy:
    return Policy(store.config.num_layers, store.num_neurons, MIXED)


def layer(store: Store, p: str = "fp16") -> int:
    return store.layer_bytes(p)


def smallest(error: BaseException) -> int:
    m = re.search(r"the smallest (\w+) that works is \S+ \((\d+) bytes\)", str(error))
    assert m, f"no smallest budget in: {error}"
    return int(m.group(2))


@pytest.mark.parametrize("policy", [dense, mixed])
@pytest.mark.parametrize("hbm_layers", [1.0, 1.3, 2.0, 2.99, 3.0, 10.0])
def test_hbm_slots_never_exceed_the_budget_and_hold_one_layers_working_set(store: Store, policy, hbm_layers: float
                                                                           ) -> None:
    pol = policy(store)
    budget = int(hbm_layers * layer(store)) + 2 * layer(store, "int8")
    plan = plan_tiers(store, EngineConfig(hbm_budget=budget, dram_budget=10 * layer(store)), pol)
    assert plan.hbm_bytes == sum(plan.hbm_slots[p] * store.bundle_bytes(p) for p in PRECISION_ORDER)
    assert plan.hbm_bytes <= budget
    counts = pol.max_counts()
    assert plan.hbm_slots["fp16"] >= max(store.num_neurons, counts["fp16"])  # prefill is dense FP16
    for p in ("int8", "int4"):
        assert plan.hbm_slots[p] >= counts[p]
        assert plan.hbm_slots[p] <= store.num_neurons * store.config.num_layers
    assert plan.hbm_slots["fp16"] <= store.num_neurons * store.config.num_layers


@pytest.mark.parametrize("policy", [dense, mixed])
def test_an_hbm_budget_below_one_layer_is_refused_with_the_smallest_that_works(store: Store, policy) -> None:
    pol = policy(store)
    with pytest.raises(BudgetError, match="hbm_budget") as info:
        plan_tiers(store, EngineConfig(hbm_budget=1000, dram_budget=10 * layer(store)), pol)
    least = smallest(info.value)
    counts = pol.max_counts()
    assert least == (store.num_neurons * store.bundle_bytes("fp16") + counts["int8"] * store.bundle_bytes("int8")
                     + counts["int4"] * store.bundle_bytes("int4"))
    with pytest.raises(BudgetError):
        plan_tiers(store, EngineConfig(hbm_budget=least - 1, dram_budget=10 * layer(store)), pol)
    assert plan_tiers(store, EngineConfig(hbm_budget=least, dram_budget=10 * layer(store)), pol).hbm_bytes <= least


@pytest.mark.parametrize("preload", ["layer", "neuron", "hybrid"])
@pytest.mark.parametrize("policy", [dense, mixed])
def test_a_dram_budget_below_one_layer_is_refused_with_the_smallest_that_works(store: Store, preload: str,
                                                                              policy) -> None:
    pol = policy(store)
    cfg = EngineConfig(hbm_budget=10 * layer(store), dram_budget=1000, preload=preload)
    with pytest.raises(BudgetError, match="dram_budget") as info:
        plan_tiers(store, cfg, pol)
    assert preload in str(info.value)
    least = smallest(info.value)
    assert least >= layer(store)  # at least one FP16 layer: prefill reads whole layers
    with pytest.raises(BudgetError):
        plan_tiers(store, cfg.replace(dram_budget=least - 1), pol)
    plan = plan_tiers(store, cfg.replace(dram_budget=least), pol)
    assert plan.dram_budget == least
    assert plan.staging_reserve <= least


@pytest.mark.parametrize("prefetch", [0, 1, 2, 3, 8])
@pytest.mark.parametrize("ring_layers", [1, 2, 3, 5])
def test_prefetch_is_clipped_to_the_layers_the_dram_ring_holds(store: Store, prefetch: int, ring_layers: int) -> None:
    cfg = EngineConfig(hbm_budget=10 * layer(store), dram_budget=ring_layers * layer(store), preload="layer",
                       prefetch=prefetch)
    plan = plan_tiers(store, cfg, dense(store))
    assert plan.prefetch == min(prefetch, ring_layers - 1)  # the ring holds the current layer too
    assert plan.prefetch + 1 + plan.fixed_layers <= ring_layers
    hybrid = plan_tiers(store, cfg.replace(preload="hybrid", dram_budget=(ring_layers + 1) * layer(store)),
                        dense(store))
    assert hybrid.staging_reserve == layer(store)  # one layer of staging comes off the top
    assert hybrid.prefetch == min(prefetch, ring_layers - 1)


def test_neuron_preload_never_prefetches_and_keeps_only_the_fixed_area_whole(store: Store) -> None:
    n = store.config.num_layers
    for dram_layers in (1, 2, 3, 10):
        cfg = EngineConfig(hbm_budget=10 * layer(store), dram_budget=dram_layers * layer(store), preload="neuron",
                           prefetch=3)
        plan = plan_tiers(store, cfg, dense(store))
        assert plan.prefetch == 0
        assert plan.staging_reserve >= layer(store)
        assert plan.staging_reserve + plan.fixed_layers * layer(store) <= plan.dram_budget
        assert plan.fixed_layers <= n


def test_the_fixed_area_takes_what_the_ring_leaves_and_respects_an_explicit_count(store: Store) -> None:
    n = store.config.num_layers
    cfg = EngineConfig(hbm_budget=10 * layer(store), dram_budget=100 * layer(store), preload="layer", prefetch=1)
    assert plan_tiers(store, cfg, dense(store)).fixed_layers == n  # room for all: never more than the model has
    assert plan_tiers(store, cfg.replace(fixed_layers=1), dense(store)).fixed_layers == 1
    tight = cfg.replace(dram_budget=3 * layer(store), fixed_layers=5)
    plan = plan_tiers(store, tight, dense(store))
    assert plan.fixed_layers + plan.prefetch + 1 <= 3


def test_decode_precisions_are_the_ones_the_policy_uses(store: Store) -> None:
    cfg = EngineConfig(hbm_budget=10 * layer(store), dram_budget=10 * layer(store))
    assert plan_tiers(store, cfg, dense(store)).dram_precisions == ("fp16",)
    assert plan_tiers(store, cfg, mixed(store)).dram_precisions == ("fp16", "int8", "int4")
    only8 = Policy(store.config.num_layers, store.num_neurons, Shares(0.0, 0.5, 0.0))
    plan = plan_tiers(store, cfg, only8)
    assert plan.dram_precisions == ("int8",)
    assert plan.hbm_slots["fp16"] >= store.num_neurons  # prefill still needs a whole FP16 layer


def test_on_the_cpu_computing_from_dram_the_device_budget_is_lent_to_dram(store: Store) -> None:
    cfg = EngineConfig(hbm_budget=2 * layer(store), dram_budget=10 * layer(store))
    plan = plan_tiers(store, cfg, mixed(store), cpu_direct=True)
    assert plan.direct and plan.hbm_bytes == 0 and all(n == 0 for n in plan.hbm_slots.values())
    assert plan.dram_budget == 12 * layer(store)  # the two budgets together, no more


def test_on_the_cpu_a_too_small_dram_budget_names_what_works_with_the_lent_device_budget(store: Store) -> None:
    hbm = layer(store) // 2
    with pytest.raises(BudgetError, match="lent to DRAM") as info:
        plan_tiers(store, EngineConfig(hbm_budget=hbm, dram_budget=1000), mixed(store), cpu_direct=True)
    least = smallest(info.value)
    with pytest.raises(BudgetError):
        plan_tiers(store, EngineConfig(hbm_budget=hbm, dram_budget=least - 1), mixed(store), cpu_direct=True)
    assert plan_tiers(store, EngineConfig(hbm_budget=hbm, dram_budget=least), mixed(store), cpu_direct=True).direct


def test_off_the_disk_a_small_dram_keeps_the_precision_most_neurons_take_in_every_layer(store: Store) -> None:
    policy = Policy(store.config.num_layers, store.num_neurons, Shares(0.1, 0.2, 0.7))
    staging = layer(store)  # prefill's dense FP16 layer
    room = store.config.num_layers * layer(store, "int4") + layer(store, "int8")  # every int4 and one int8
    cfg = EngineConfig(hbm_budget="1MB", dram_budget=staging + room, preload="hybrid", direct_io=True)
    plan = plan_tiers(store, cfg, policy)
    int4 = {(i, "int4") for i in range(store.config.num_layers)}
    assert int4 <= set(plan.fixed_keys) and (0, "int8") in plan.fixed_keys and plan.prefetch == 0
    assert sum(store.layer_bytes(p) for _, p in plan.fixed_keys) <= plan.dram_budget - plan.staging_reserve
    # from the page cache (no O_DIRECT) whole layers are still preloaded ahead, as measured there
    cached = plan_tiers(store, cfg.replace(direct_io=False), policy)
    assert all(p != "int4" or layer_ < cached.fixed_layers for layer_, p in cached.fixed_keys)


def scored(store: Store) -> Policy:
    """The mixed shares under a policy that ranks neurons (only those look ahead)."""
    policy = mixed(store)
    policy.needs_scores = True
    return policy


def test_lookahead_holds_two_layers_of_decode_in_the_pool_and_in_staging(store: Store) -> None:
    # layer L+1's rows are copied in while layer L computes from its own: both must fit at once
    cfg = EngineConfig(hbm_budget=1, dram_budget="1GB", dense_prefill=False, preload="hybrid")
    with pytest.raises(BudgetError) as one:
        plan_tiers(store, cfg, scored(store))
    with pytest.raises(BudgetError, match="for each of 2 layers: lookahead") as two:
        plan_tiers(store, cfg.replace(lookahead=True), scored(store))
    assert smallest(two.value) == 2 * smallest(one.value)
    ok = plan_tiers(store, cfg.replace(hbm_budget=smallest(two.value), lookahead=True), scored(store))
    assert ok.staging_reserve == 2 * plan_tiers(store, cfg.replace(hbm_budget=smallest(one.value)), scored(store)).staging_reserve
    # a policy that scores nothing never looks ahead: its needs do not change
    with pytest.raises(BudgetError) as exact:
        plan_tiers(store, cfg.replace(lookahead=True), dense(store))
    with pytest.raises(BudgetError) as exact_plain:
        plan_tiers(store, cfg, dense(store))
    assert smallest(exact.value) == smallest(exact_plain.value)


def test_lookahead_over_whole_layers_needs_two_of_them_in_dram(store: Store) -> None:
    # the layer computing stays pinned while the next is fetched whole
    cfg = EngineConfig(hbm_budget="1GB", dram_budget=1, preload="layer", dense_prefill=False)
    with pytest.raises(BudgetError) as one:
        plan_tiers(store, cfg, scored(store))
    with pytest.raises(BudgetError) as two:
        plan_tiers(store, cfg.replace(lookahead=True), scored(store))
    assert smallest(two.value) == 2 * smallest(one.value)


def test_the_plan_counts_a_neuron_read_as_the_blocks_and_runs_it_reads_not_its_bundles(store) -> None:
    from m2cache.engine.sizing import _neuron_read_bytes

    F = store.num_neurons
    for p in PRECISION_ORDER:
        assert _neuron_read_bytes(store, p, 0) == 0
        few = max(1, F // 10)
        # at least its bundles, padded to whole blocks; never more than the files (gate rows and up/down)
        assert few * store.bundle_bytes(p) <= _neuron_read_bytes(store, p, few) <= store.file_bytes(p)
        assert _neuron_read_bytes(store, p, F) == store.file_bytes(p)  # every neuron: the whole files, once


@pytest.mark.parametrize("direct_io", [True, False])
@pytest.mark.parametrize("cpu_direct", [True, False])
def test_the_in_ram_dram_budget_keeps_every_layer_the_policy_uses_and_a_layer_less_would_not(
        store, direct_io: bool, cpu_direct: bool) -> None:
    from m2cache.engine.sizing import dram_to_keep_all

    policy = mixed(store)
    cfg = EngineConfig(hbm_budget=2 * layer(store), dram_budget=1, direct_io=direct_io)
    budget = dram_to_keep_all(store, cfg, policy, cpu_direct=cpu_direct)
    every = {(L, p) for L in range(store.config.num_layers) for p in PRECISION_ORDER}
    plan = plan_tiers(store, cfg.replace(dram_budget=budget), policy, cpu_direct=cpu_direct)
    assert every <= set(plan.fixed_keys) and plan.decode_read_bytes == 0
    one_layer = sum(layer(store, p) for p in PRECISION_ORDER)
    less = plan_tiers(store, cfg.replace(dram_budget=budget - one_layer), policy, cpu_direct=cpu_direct)
    assert not every <= set(less.fixed_keys)
