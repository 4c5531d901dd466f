"""LayerFIFO: budget, FIFO order, the fixed area, pins, budget errors."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2cache.errors import BudgetError, ConfigError
from m2cache.storage.fifo import LayerFIFO


def test_evicts_oldest_admitted_dynamic_entry_first() -> None:
    fifo = LayerFIFO(300, fixed_layers=0)
    for layer in range(3):
        assert fifo.admit(layer, layer, 100) == []
    assert fifo.admit(3, 3, 150) == [0, 1]
    assert fifo.keys() == [2, 3]
    assert fifo.bytes_held == 250 and fifo.peak_bytes == 300


def test_fixed_area_is_never_evicted() -> None:
    fifo = LayerFIFO(400, fixed_layers=2)
    fifo.admit("L0", 0, 100)
    fifo.admit("L1", 1, 100)
    fifo.admit("L2", 2, 100)
    assert fifo.admit("L3", 3, 200) == ["L2"]
    assert fifo.admit("L4", 4, 200) == ["L3"]
    assert fifo.is_fixed("L0") and fifo.is_fixed("L1")
    assert fifo.keys() == ["L4", "L0", "L1"]  # eviction order: dynamic first, fixed area last


def test_fixed_layer_that_overflows_the_fixed_area_goes_to_the_dynamic_area() -> None:
    fifo = LayerFIFO(400, fixed_layers=3)  # fixed area: half the budget by default
    fifo.admit("L0", 0, 150)
    fifo.admit("L1", 1, 100)  # 250 > 200: dynamic
    assert fifo.is_fixed("L0") and not fifo.is_fixed("L1")
    assert fifo.admit("L2", 2, 250) == ["L1"]
    full = LayerFIFO(400, fixed_layers=3, fixed_budget_bytes=400)
    full.admit("L0", 0, 150)
    full.admit("L1", 1, 100)
    assert full.is_fixed("L1")


def test_pinned_entries_are_skipped_by_eviction_until_unpinned() -> None:
    fifo = LayerFIFO(300, fixed_layers=0)
    for layer in range(3):
        fifo.admit(layer, layer, 100)
    fifo.pin(0)
    fifo.pin(0)
    assert fifo.admit(3, 3, 100) == [1]
    fifo.unpin(0)
    assert fifo.admit(4, 4, 100) == [2]  # still pinned once
    fifo.unpin(0)
    assert fifo.admit(5, 5, 100) == [0]
    with pytest.raises(RuntimeError):
        fifo.unpin(3)


def test_budget_error_names_sizes_and_changes_nothing() -> None:
    fifo = LayerFIFO(300, fixed_layers=1)
    fifo.admit("L0", 0, 100)
    fifo.admit("L1", 1, 100)
    fifo.pin("L1")
    with pytest.raises(BudgetError, match=r"150 bytes.*at most 100 bytes.*at least 350"):
        fifo.admit("L2", 2, 150)
    assert fifo.keys() == ["L1", "L0"] and fifo.bytes_held == 200


def test_remove_of_pinned_entry_and_double_admit_are_bugs() -> None:
    fifo = LayerFIFO(100, fixed_layers=0)
    fifo.admit("a", 0, 10)
    with pytest.raises(RuntimeError):
        fifo.admit("a", 0, 10)
    fifo.pin("a")
    with pytest.raises(RuntimeError):
        fifo.remove("a")
    fifo.unpin("a")
    fifo.remove("a")
    assert "a" not in fifo and fifo.bytes_held == 0
    with pytest.raises(KeyError):
        fifo.pin("a")


def test_bad_configuration_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        LayerFIFO(-1, 0)
    with pytest.raises(ConfigError):
        LayerFIFO(100, 0, fixed_budget_bytes=200)


ops = st.lists(st.tuples(
    st.sampled_from(["admit", "admit", "admit", "pin", "unpin", "remove"]),
    st.integers(0, 9),  # key == layer
    st.integers(0, 120),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.integers(0, 3), ops)
def test_budget_order_fixed_area_and_pins_hold_under_any_sequence(
        budget: int, fixed_layers: int, sequence: list[tuple[str, int, int]]) -> None:
    fifo = LayerFIFO(budget, fixed_layers)
    model: dict[int, int] = {}  # key -> nbytes
    pins: dict[int, int] = {}
    order: list[int] = []  # dynamic keys in admission order
    fixed: set[int] = set()
    for op, key, nbytes in sequence:
        if op == "admit" and key not in model:
            try:
                evicted = fifo.admit(key, key, nbytes)
            except BudgetError:
                assert nbytes > budget - sum(model[k] for k in fixed) - sum(
                    model[k] for k in order if pins.get(k))
                continue
            unpinned = [k for k in order if not pins.get(k)]
            assert evicted == unpinned[:len(evicted)], "eviction is not oldest-unpinned-first"
            for k in evicted:
                order.remove(k)
                del model[k]
            model[key] = nbytes
            if fifo.is_fixed(key):
                fixed.add(key)
            else:
                order.append(key)
            assert not fifo.is_fixed(key) or key < fixed_layers
        elif op == "pin" and key in model:
            fifo.pin(key)
            pins[key] = pins.get(key, 0) + 1
        elif op == "unpin" and pins.get(key):
            fifo.unpin(key)
            pins[key] -= 1
        elif op == "remove" and key in model and not pins.get(key):
            fifo.remove(key)
            del model[key]
            if key in fixed:
                fixed.discard(key)
            else:
                order.remove(key)
        assert fifo.bytes_held == sum(model.values()) <= budget
        assert fifo.peak_bytes <= budget
        assert fifo.keys() == order + [k for k in fifo.keys() if k in fixed]
        assert sorted(fifo.keys()) == sorted(model)
        assert fixed <= set(fifo.keys()), "a fixed-area entry was evicted"
