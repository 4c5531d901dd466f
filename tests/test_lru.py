"""SlotPool, NeuronLRU and DeviceCache: invariants, the documented eviction order, budget errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2cache.errors import BudgetError, ConfigError
from m2cache.storage.device_cache import DeviceCache
from m2cache.storage.lru import NeuronLRU, SlotPool


def ids(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def check_invariants(cache: DeviceCache) -> None:
    """Each slot has at most one owner, held + free == capacity, slot_of agrees with the pool."""
    for p, capacity in cache.capacity.items():
        owned: list[np.ndarray] = []
        for layer in range(cache.num_layers):
            lru = cache.lru(layer, p)
            held = lru.held()
            assert len(lru) == held.size
            assert (lru.stamp_of[held] >= 0).all()
            assert (lru.stamp_of[lru.slot_of < 0] == -1).all()
            owned.append(lru.slot_of[held])
        slots = np.concatenate(owned) if owned else np.empty(0, np.int64)
        assert np.unique(slots).size == slots.size, "a slot has two owners"
        assert slots.size + cache.pool(p).num_free == capacity
        assert ((slots >= 0) & (slots < capacity)).all()
        assert not cache.pool(p)._is_free[slots].any(), "a held slot is also free"


# ------------------------------------------------------------------ SlotPool

def test_slot_pool_allocates_distinct_slots_until_empty() -> None:
    pool = SlotPool(5)
    a, b = pool.alloc(3), pool.alloc(2)
    assert sorted([*a.tolist(), *b.tolist()]) == [0, 1, 2, 3, 4]
    assert pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.alloc(1)


def test_slot_pool_free_twice_is_a_bug() -> None:
    pool = SlotPool(4)
    slots = pool.alloc(2)
    pool.free(slots[:1])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(slots[:1])
    with pytest.raises(RuntimeError):
        pool.free(ids(3))  # never allocated
    assert pool.num_free == 3


# ------------------------------------------------------------------ NeuronLRU

def test_lru_lookup_reports_misses_and_does_not_touch() -> None:
    lru = NeuronLRU(10)
    lru.insert(ids(3, 5), ids(0, 1), stamp=1)
    assert lru.lookup(ids(5, 4, 3)).tolist() == [1, -1, 0]
    assert lru.stamp_of[[3, 5]].tolist() == [1, 1]


def test_lru_evicts_least_recently_used_first_ties_by_lower_id() -> None:
    lru = NeuronLRU(10)
    lru.insert(ids(7, 2, 9), ids(0, 1, 2), stamp=1)
    lru.insert(ids(4), ids(3), stamp=2)
    lru.touch(ids(7), stamp=3)
    evicted, slots = lru.evict(3)
    assert evicted.tolist() == [2, 9, 4]
    assert slots.tolist() == [1, 2, 3]
    assert lru.held().tolist() == [7]


def test_lru_evict_older_than_spares_recent_entries() -> None:
    lru = NeuronLRU(10)
    lru.insert(ids(1, 2), ids(0, 1), stamp=1)
    lru.insert(ids(3), ids(2), stamp=5)
    evicted, _ = lru.evict(10, older_than=5)
    assert evicted.tolist() == [1, 2]
    assert lru.held().tolist() == [3]


def test_lru_insert_of_held_id_and_touch_of_absent_id_are_bugs() -> None:
    lru = NeuronLRU(4)
    lru.insert(ids(1), ids(0), stamp=0)
    with pytest.raises(RuntimeError):
        lru.insert(ids(1), ids(1), stamp=0)
    with pytest.raises(RuntimeError):
        lru.touch(ids(2), stamp=0)
    with pytest.raises(RuntimeError):
        lru.insert(ids(2, 2), ids(1, 2), stamp=0)


# ------------------------------------------------------------------ DeviceCache.plan

def test_plan_hits_are_reused_and_misses_get_slots() -> None:
    cache = DeviceCache(2, 100, {"fp16": 10})
    first = cache.plan(0, 0, {"fp16": ids(5, 6, 7)}, set())
    assert first.precisions["fp16"].miss_ids.tolist() == [5, 6, 7]
    second = cache.plan(0, 1, {"fp16": ids(7, 8, 5)}, set())
    pp = second.precisions["fp16"]
    assert pp.miss_ids.tolist() == [8]
    slot_of = dict(zip([5, 6, 7], first.precisions["fp16"].slots.tolist()))
    assert pp.slots[0] == slot_of[7] and pp.slots[2] == slot_of[5]
    assert pp.slots[1] == pp.miss_slots[0]
    s = cache.stats()["fp16"]
    assert (s["hits"], s["misses"], s["held"], s["free"]) == (2, 4, 4, 6)
    check_invariants(cache)


def test_plan_takes_from_layers_above_quota_farthest_next_use_first() -> None:
    # 4 layers, 8 slots: quota 2. Layers 1 and 2 hold 3 each (1 above quota), layer 0 holds 2.
    cache = DeviceCache(4, 50, {"fp16": 8})
    cache.plan(1, 0, {"fp16": ids(10, 11, 12)}, set())
    cache.plan(2, 1, {"fp16": ids(20, 21, 22)}, set())
    cache.plan(0, 2, {"fp16": ids(1, 2)}, set())
    assert cache.pool("fp16").num_free == 0
    # Layer 3 needs 2: farthest next use from 3 is layer 2, then 1, then 0.
    plan = cache.plan(3, 3, {"fp16": ids(30, 31)}, set())
    evicted = [(layer, e.tolist()) for layer, e in plan.precisions["fp16"].evicted]
    assert evicted == [(2, [20]), (1, [10])]  # each down to its quota, LRU (ties: lowest id) first
    check_invariants(cache)


def test_plan_takes_own_stale_entries_before_other_layers_at_quota() -> None:
    cache = DeviceCache(2, 50, {"fp16": 4})  # quota 2
    cache.plan(0, 0, {"fp16": ids(1, 2)}, set())
    cache.plan(1, 0, {"fp16": ids(5, 6)}, set())
    plan = cache.plan(0, 1, {"fp16": ids(1, 3)}, set())  # 2 is stale, 1 is a hit
    assert [(m, e.tolist()) for m, e in plan.precisions["fp16"].evicted] == [(0, [2])]
    check_invariants(cache)


def test_plan_falls_back_to_layers_at_quota_and_never_touches_protected_ones() -> None:
    cache = DeviceCache(3, 50, {"fp16": 6})  # quota 2
    cache.plan(0, 0, {"fp16": ids(1, 2)}, set())
    cache.plan(1, 0, {"fp16": ids(3, 4)}, set())
    cache.plan(2, 0, {"fp16": ids(5, 6)}, set())
    # Layer 0 needs 4 fresh ids at stamp 1: its own 2 stale ones, then layer 2 (farthest), layer 1 protected.
    plan = cache.plan(0, 1, {"fp16": ids(7, 8, 9, 10)}, {1})
    assert [(m, e.tolist()) for m, e in plan.precisions["fp16"].evicted] == [(0, [1, 2]), (2, [5, 6])]
    assert cache.lru(1, "fp16").held().tolist() == [3, 4]
    check_invariants(cache)


def test_plan_raises_budget_error_and_changes_nothing_when_the_working_set_cannot_fit() -> None:
    cache = DeviceCache(2, 50, {"fp16": 4, "int4": 4})
    cache.plan(1, 0, {"fp16": ids(1, 2)}, set())
    before = cache.stats()
    with pytest.raises(BudgetError, match=r"layer 0 at precision fp16 .* needs 5 more slots and only 4"):
        cache.plan(0, 1, {"int4": ids(1), "fp16": ids(1, 2, 3, 4, 5)}, set())
    with pytest.raises(BudgetError, match="only 2 can be freed"):
        cache.plan(0, 1, {"fp16": ids(1, 2, 3)}, {1})
    assert cache.stats() == before
    check_invariants(cache)


def test_unknown_precision_is_a_config_error() -> None:
    cache = DeviceCache(1, 8, {"fp16": 2})
    with pytest.raises(ConfigError, match="int8"):
        cache.plan(0, 0, {"int8": ids(1)}, set())


def test_dense_run_keeps_each_layer_quota_between_tokens() -> None:
    layers, quota = 4, 16
    cache = DeviceCache(layers, 64, {"fp16": layers * quota})
    working = {layer: np.arange(quota, dtype=np.int64) + layer for layer in range(layers)}
    stamp = 0
    for _token in range(3):
        for layer in range(layers):
            cache.plan(layer, stamp, {"fp16": working[layer]}, {(layer + 1) % layers})
            stamp += 1
    s = cache.stats()["fp16"]
    assert s["misses"] == layers * quota  # only the first token missed
    assert s["evictions"] == 0


# ------------------------------------------------------------------ properties

@st.composite
def workloads(draw: st.DrawFn) -> tuple[int, int, int, list[tuple[int, list[int], list[int], set[int]]]]:
    num_layers = draw(st.integers(1, 4))
    num_neurons = draw(st.integers(1, 24))
    capacity = draw(st.integers(0, 40))
    neuron = st.integers(0, num_neurons - 1)
    steps = draw(st.lists(st.tuples(
        st.integers(0, num_layers - 1),
        st.lists(neuron, unique=True, max_size=12),
        st.lists(neuron, unique=True, max_size=6),
        st.sets(st.integers(0, num_layers - 1), max_size=2),
    ), max_size=25))
    return num_layers, num_neurons, capacity, steps


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_plan_never_exceeds_capacity_loses_or_duplicates_ids(
        case: tuple[int, int, int, list[tuple[int, list[int], list[int], set[int]]]]) -> None:
    num_layers, num_neurons, capacity, steps = case
    cache = DeviceCache(num_layers, num_neurons, {"fp16": capacity, "int4": capacity // 2})
    for stamp, (layer, fp16, int4, protected) in enumerate(steps):
        protected.discard(layer)
        protected_before = {(m, p): cache.lru(m, p).slot_of.copy() for m in protected for p in ("fp16", "int4")}
        before = {(m, p): cache.lru(m, p).slot_of.copy() for m in range(num_layers) for p in ("fp16", "int4")}
        request = {"fp16": np.array(fp16, dtype=np.int64), "int4": np.array(int4, dtype=np.int64)}
        try:
            plan = cache.plan(layer, stamp, request, protected)
        except BudgetError:
            for key, slot_of in before.items():  # a refused plan changes nothing
                assert np.array_equal(cache.lru(*key).slot_of, slot_of)
            continue
        for p, req in request.items():
            pp = plan.precisions[p]
            lru = cache.lru(layer, p)
            # every requested id is now held, in the slot the plan says, and stamped now
            assert np.array_equal(lru.slot_of[req], pp.slots)
            assert (lru.stamp_of[req] == stamp).all()
            was_held = before[(layer, p)][req] >= 0
            assert np.array_equal(np.sort(pp.miss_ids), np.sort(req[~was_held]))
            # ids are lost only through eviction, and evictions are reported
            evicted = {(m, int(i)) for m, e in pp.evicted for i in e}
            for m in range(num_layers):
                gone = np.flatnonzero((before[(m, p)] >= 0) & (cache.lru(m, p).slot_of < 0))
                assert {(m, int(i)) for i in gone} == {x for x in evicted if x[0] == m}
        for key, slot_of in protected_before.items():
            assert np.array_equal(cache.lru(*key).slot_of, slot_of), "a protected layer lost an entry"
        check_invariants(cache)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "touch", "evict"]),
                          st.lists(st.integers(0, 15), unique=True, max_size=6),
                          st.integers(0, 5)), max_size=30))
def test_lru_evicts_in_stamp_then_id_order(ops: list[tuple[str, list[int], int]]) -> None:
    lru, model = NeuronLRU(16), {}  # model: id -> stamp
    pool = SlotPool(16)
    for stamp, (op, xs, n) in enumerate(ops):
        if op == "insert":
            new = [x for x in xs if x not in model]
            lru.insert(np.array(new, dtype=np.int64), pool.alloc(len(new)), stamp)
            model.update({x: stamp for x in new})
        elif op == "touch":
            held = [x for x in xs if x in model]
            lru.touch(np.array(held, dtype=np.int64), stamp)
            model.update({x: stamp for x in held})
        else:
            expected = sorted(model, key=lambda x: (model[x], x))[:n]
            evicted, slots = lru.evict(n)
            assert evicted.tolist() == expected
            pool.free(slots)
            for x in expected:
                del model[x]
        assert sorted(model) == lru.held().tolist()
        assert len(lru) + pool.num_free == 16
