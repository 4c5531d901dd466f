"""The device ("HBM") neuron cache: which (layer, precision, neuron) is in which slot, for all layers.

This module is pure policy on integer ids (numpy, no torch): the HBM manager maps the slots it
returns to rows of one preallocated device tensor per precision, and copies the misses up in one
batched copy. Every operation is vectorised over an array of ids, because a decode step calls
:meth:`DeviceCache.plan` once per layer with ~100-1536 ids per precision.

Structures
----------
- :class:`~m2cache.storage.lru.SlotPool` and :class:`~m2cache.storage.lru.NeuronLRU` (``lru.py``): the
  free slots of one precision, and one layer and precision's neuron -> slot map with last-use stamps.
- :class:`DeviceCache` — all layers x precisions; :meth:`DeviceCache.plan` is the "adjacent token
  update" for one layer and step.

Eviction order of :meth:`DeviceCache.plan`
-------------------------------------------
Each precision ``p`` has ``slots[p]`` slots and each layer a *quota* of ``slots[p] // num_layers``.
Hits are touched with the step's stamp; misses get slots, taken in this order until enough:

1. free slots of the pool;
2. entries of OTHER layers that hold more than their quota, visiting layers farthest-next-use first
   in cyclic layer order (for the current layer L: L-1, L-2, ..., L+1), skipping ``protected``
   layers, and within a layer least recently used first, never taking a layer below its quota;
3. this layer's own entries not touched at this stamp, least recently used first;
4. entries of other (unprotected) layers at or below quota, farthest-next-use first, LRU first.

Ties in recency break towards the lower neuron id, so the order is fully deterministic.
If the four sources together cannot cover the misses, :class:`~m2cache.errors.BudgetError` is
raised *before* anything changes (a failed plan leaves the cache as it was).

Why this order: decoding visits layers cyclically (0, 1, ..., L-1, then the next token), so the
layer whose next use is farthest is the one just computed — evicting it first is Belady's rule for
this access pattern. Quotas make dense runs (working set ≈ quota) keep each layer's slots between
tokens instead of thrashing one layer's neurons out for the next; sparse runs (working set < quota)
leave spare slots that other layers borrow and that give LRU reuse across adjacent tokens, which
share most active neurons. Protected layers are those whose slots are in use (being computed, or
copied up ahead of the executor) and must not be overwritten.

Complexity (N = neurons per layer, k = ids in a call, H = entries a layer holds, L = layers):
``lookup``/``touch`` O(k); ``insert`` O(k log k) (uniqueness check); ``evict`` O(N + H log H)
(scan of ``slot_of`` and a stable sort of the candidates' stamps); ``plan`` O(k log k) plus one
``evict`` per layer it takes from and an O(N) count per layer for the feasibility check, i.e.
O(L·N) worst case — a few vectorised passes over ~10^4 int64s per layer, no Python loop per id.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m2cache.errors import BudgetError, ConfigError
from m2cache.storage.lru import _EMPTY, NeuronLRU, SlotPool, _check_unique


@dataclass(frozen=True, slots=True)
class PrecisionPlan:
    """What one precision of one layer must do this step.

    ``slots`` is aligned with the request's ids; the worker copies ``miss_ids`` (fetched from
    DRAM) into ``miss_slots``. ``evicted`` lists the (layer, ids) whose slots were reused, so the
    trace and stats can say who lost what.
    """

    slots: np.ndarray
    miss_ids: np.ndarray
    miss_slots: np.ndarray
    evicted: tuple[tuple[int, np.ndarray], ...]


@dataclass(frozen=True, slots=True)
class CachePlan:
    """The adjacent-token update of one layer at one step, per precision."""

    layer: int
    stamp: int
    precisions: dict[str, PrecisionPlan]

    @property
    def num_misses(self) -> int:
        return sum(pp.miss_ids.size for pp in self.precisions.values())


class DeviceCache:
    """All layers x precisions of the HBM neuron cache; one :class:`SlotPool` per precision.

    See the module docstring for the eviction order of :meth:`plan`. Not thread-safe: the HBM
    manager actor owns it and calls it from the event loop.
    """

    def __init__(self, num_layers: int, num_neurons: int, slots: dict[str, int]) -> None:
        if num_layers <= 0:
            raise ConfigError(f"num_layers must be > 0, got {num_layers}")
        bad = {p: n for p, n in slots.items() if n < 0}
        if bad:
            raise ConfigError(f"HBM slot counts must be >= 0, got {bad}")
        self.num_layers = int(num_layers)
        self.num_neurons = int(num_neurons)
        self.capacity = dict(slots)
        self.quota = {p: n // self.num_layers for p, n in slots.items()}
        self._pools = {p: SlotPool(n) for p, n in slots.items()}
        self._lrus = {p: [NeuronLRU(num_neurons) for _ in range(num_layers)] for p in slots}
        self._counters = {p: {"hits": 0, "misses": 0, "evictions": 0} for p in slots}
        self._orders: dict[tuple[int, frozenset[int]], list[int]] = {}  # _farthest_first, memoised

    def lru(self, layer: int, precision: str) -> NeuronLRU:
        """The bookkeeping of one layer and precision (read it; mutate only through plan())."""
        return self._lrus[precision][layer]

    def pool(self, precision: str) -> SlotPool:
        return self._pools[precision]

    def _farthest_first(self, layer: int, protected: set[int] | frozenset[int]) -> list[int]:
        """Other layers, farthest next use first (L-1, L-2, ..., L+1), without protected ones."""
        key = (layer, frozenset(protected))
        order = self._orders.get(key)
        if order is None:  # a handful of distinct keys per run (the HBM manager protects the layer itself)
            n = self.num_layers
            order = [m for m in ((layer - d) % n for d in range(1, n)) if m not in protected]
            if len(self._orders) < 4 * n:
                self._orders[key] = order
        return order

    def _validate(self, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = sorted(set(ids) - set(self._pools))
        if unknown:
            raise ConfigError(
                f"precisions {unknown} have no HBM slots configured; configured: {sorted(self._pools)}")
        out = {}
        for p, raw in ids.items():
            arr = self._lrus[p][0]._checked(raw, f"ids[{p!r}]")
            _check_unique(arr, f"ids[{p!r}]")
            out[p] = arr
        return out

    def _check_room(self, layer: int, stamp: int, p: str, req: np.ndarray, hit: np.ndarray,
                    protected: set[int] | frozenset[int]) -> None:
        n_miss = int(req.size - np.count_nonzero(hit))
        if n_miss == 0:
            return
        lrus = self._lrus[p]
        own = lrus[layer]
        # Own entries not touched at this stamp, once this step's hits are touched.
        own_free = own.count_older(stamp) - int(np.count_nonzero(own.stamp_of[req[hit]] < stamp))
        # every held entry owns one slot: all layers hold capacity - free, so the unprotected others
        # hold that less this layer's and the protected layers' (no walk over every layer)
        free = self._pools[p].num_free
        shielded = sum(len(lrus[m]) for m in protected if m != layer and 0 <= m < self.num_layers)
        others = self.capacity[p] - free - len(own) - shielded
        can_free = free + own_free + others
        if can_free >= n_miss:
            return
        locked = sum(len(lrus[m]) for m in protected if m != layer and 0 <= m < self.num_layers)
        raise BudgetError(
            f"HBM budget too small: the working set of layer {layer} at precision {p} "
            f"({req.size} neurons, {req.size - n_miss} already held) needs {n_miss} more slots "
            f"and only {can_free} can be freed ({free} free, {own_free} stale in this layer, "
            f"{others} in unprotected layers; protected layers {sorted(protected)} hold {locked}) "
            f"of {self.capacity[p]} {p} slots. Raise the {p} HBM budget (at least "
            f"{self.capacity[p] + n_miss - can_free} slots) or lower the active fraction.")

    def _acquire(self, layer: int, stamp: int, p: str, need: int,
                 protected: set[int] | frozenset[int]) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """Find ``need`` slots in the documented order; _check_room() has proven they exist."""
        pool, lrus, quota = self._pools[p], self._lrus[p], self.quota[p]
        parts: list[np.ndarray] = []
        evicted: list[tuple[int, np.ndarray]] = []

        def take(m: int, n: int, older_than: int | None = None) -> int:
            ids, slots = lrus[m].evict(n, older_than=older_than)
            if ids.size:
                parts.append(slots)
                evicted.append((m, ids))
            return int(ids.size)

        n_free = min(need, pool.num_free)
        if n_free:
            parts.append(pool.alloc(n_free))
            need -= n_free
        others = self._farthest_first(layer, protected)
        for m in others:  # (2) layers above quota, down to their quota
            if need == 0:
                break
            excess = len(lrus[m]) - quota
            if excess > 0:
                need -= take(m, min(need, excess))
        if need:  # (3) this layer's entries not touched at this stamp
            need -= take(layer, need, older_than=stamp)
        for m in others:  # (4) any unprotected layer
            if need == 0:
                break
            need -= take(m, need)
        if need:
            raise RuntimeError(f"slot accounting broken: {need} {p} slots missing after feasibility check")
        slots = np.concatenate(parts) if parts else _EMPTY
        return slots, evicted

    def plan(self, layer: int, stamp: int, ids: dict[str, np.ndarray],
             protected: set[int] | frozenset[int] = frozenset()) -> CachePlan:
        """Adjacent-token update of ``layer`` at ``stamp`` for the requested ids per precision.

        ``ids`` are unique per precision, in any order; ``stamp`` must not decrease between calls
        (it is the recency clock). Raises BudgetError, changing nothing, if a precision's working
        set cannot be held.
        """
        if not 0 <= layer < self.num_layers:
            raise RuntimeError(f"layer {layer} out of range [0, {self.num_layers})")
        if stamp < 0:
            raise RuntimeError(f"stamps must be >= 0, got {stamp}")
        requests = self._validate(ids)
        lookups: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for p, req in requests.items():  # check every precision before changing anything
            slots = self._lrus[p][layer].slot_of[req]  # lookup(), its checks done by _validate
            hit = slots >= 0
            self._check_room(layer, stamp, p, req, hit, protected)
            lookups[p] = (slots, hit)
        out: dict[str, PrecisionPlan] = {}
        for p, req in requests.items():
            slots, hit = lookups[p]
            own = self._lrus[p][layer]
            own.stamp_of[req[hit]] = stamp  # touch() of ids just found held
            miss_ids = req[~hit]
            miss_slots, evicted = self._acquire(layer, stamp, p, miss_ids.size, protected)
            own.put_unchecked(miss_ids, miss_slots, stamp)
            slots[~hit] = miss_slots
            c = self._counters[p]
            c["hits"] += int(req.size - miss_ids.size)
            c["misses"] += int(miss_ids.size)
            c["evictions"] += sum(int(e.size) for _, e in evicted)
            out[p] = PrecisionPlan(slots, miss_ids, miss_slots, tuple(evicted))
        return CachePlan(layer, stamp, out)

    def forget(self, layer: int, precision: str, ids: np.ndarray) -> None:
        """Undo the insertion of planned misses whose bytes never arrived (a failed read), so a later
        lookup cannot hit a slot that holds stale bytes. Their slots go back to the free pool."""
        self._pools[precision].free(self._lrus[precision][layer].remove(ids))

    def stats(self) -> dict[str, dict[str, int]]:
        """Per precision: capacity, held, free, hits, misses, evictions (a snapshot)."""
        return {
            p: {
                "capacity": self.capacity[p],
                "held": sum(len(lru) for lru in self._lrus[p]),
                "free": self._pools[p].num_free,
                **self._counters[p],
            }
            for p in self._pools
        }
