"""The device ("HBM") neuron cache's building blocks, pure bookkeeping on integer ids (numpy, no torch).

- :class:`SlotPool` — the free slots of one precision (all layers share one pool per precision).
- :class:`NeuronLRU` — one layer and precision: neuron id -> slot, and each neuron's last-use stamp.

:class:`~m2cache.storage.device_cache.DeviceCache` puts them together for all layers x precisions.
Every operation is vectorised over an array of ids. Complexity (N = neurons per layer, k = ids in a
call, H = entries a layer holds): ``lookup``/``touch`` O(k); ``insert`` O(k log k) (uniqueness check);
``evict`` O(N + H log H) (scan of ``slot_of`` and a stable sort of the candidates' stamps).
"""
from __future__ import annotations

import numpy as np

from m2cache.errors import ConfigError

_EMPTY = np.empty(0, dtype=np.int64)


def _as_id_array(ids: np.ndarray, what: str) -> np.ndarray:
    if type(ids) is np.ndarray and ids.dtype == np.int64 and ids.ndim == 1:
        return ids  # the common case, without numpy's dtype-hierarchy checks
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise RuntimeError(f"{what} must be a 1-D array of integer ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise RuntimeError(f"{what} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_unique(ids: np.ndarray, what: str) -> None:
    # Requests arrive sorted (policies sort each precision's ids): a strictly increasing array is
    # unique, checked with one compare. Otherwise a sort and a neighbour compare (still several times
    # faster than np.unique on ~10^3 ids).
    if ids.size < 2 or (ids[1:] > ids[:-1]).all():
        return
    if not np.diff(np.sort(ids)).all():
        raise RuntimeError(f"{what} must be unique ids; got duplicates")


class SlotPool:
    """Free list of the slot indices of one precision; capacity is fixed at construction.

    A stack in one int64 array (no allocation per operation beyond the returned array), plus a
    boolean "is free" map so that freeing a slot twice — which would hand one slot to two
    neurons — is caught as the bug it is.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ConfigError(f"slot pool capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        # Stack of free slots; the top is at index _top - 1. Reversed so slot 0 is handed out first.
        self._stack = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)
        self._top = self.capacity
        self._is_free = np.ones(self.capacity, dtype=bool)

    @property
    def num_free(self) -> int:
        return self._top

    def alloc(self, n: int) -> np.ndarray:
        """Take ``n`` free slots (int64). The caller must evict first when fewer are free."""
        if n < 0 or n > self._top:
            raise RuntimeError(f"cannot allocate {n} slots: {self._top} free of {self.capacity}")
        out = self._stack[self._top - n:self._top][::-1].copy()
        self._top -= n
        self._is_free[out] = False
        return out

    def free(self, slots: np.ndarray) -> None:
        """Return slots to the pool; a slot already free (or out of range) is a bug."""
        arr = _as_id_array(slots, "slots")
        if arr.size == 0:
            return
        if arr.min() < 0 or arr.max() >= self.capacity:
            raise RuntimeError(f"slot out of range [0, {self.capacity}) in free()")
        _check_unique(arr, "slots passed to free()")
        if self._is_free[arr].any():
            twice = arr[self._is_free[arr]][:8].tolist()
            raise RuntimeError(f"double free of slots {twice}: invariant 'a slot has one owner' broken")
        self._is_free[arr] = True
        self._stack[self._top:self._top + arr.size] = arr
        self._top += arr.size


class NeuronLRU:
    """One layer at one precision: which neurons are held, in which slot, and when last used.

    Dense arrays indexed by neuron id (``slot_of``, ``stamp_of``) rather than a linked list:
    every call carries an array of ids, and a vectorised gather/scatter over a dense array beats
    a per-id pointer walk in Python by orders of magnitude.
    """

    def __init__(self, num_neurons: int) -> None:
        if num_neurons <= 0:
            raise ConfigError(f"num_neurons must be > 0, got {num_neurons}")
        self.num_neurons = int(num_neurons)
        self.slot_of = np.full(self.num_neurons, -1, dtype=np.int64)  # -1: not held
        self.stamp_of = np.full(self.num_neurons, -1, dtype=np.int64)  # last use; -1 when not held
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _checked(self, ids: np.ndarray, what: str) -> np.ndarray:
        arr = _as_id_array(ids, what)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_neurons):
            raise RuntimeError(f"{what} out of range [0, {self.num_neurons})")
        return arr

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots aligned with ``ids``, -1 for misses. Does not change recency."""
        return self.slot_of[self._checked(ids, "ids")]

    def touch(self, ids: np.ndarray, stamp: int) -> None:
        """Mark held ``ids`` as last used at ``stamp``."""
        arr = self._checked(ids, "ids")
        if arr.size and (self.slot_of[arr] < 0).any():
            raise RuntimeError("touch() of ids that are not held")
        self.stamp_of[arr] = stamp

    def insert(self, ids: np.ndarray, slots: np.ndarray, stamp: int) -> None:
        """Record that absent ``ids`` now live in ``slots`` (aligned), last used at ``stamp``."""
        arr = self._checked(ids, "ids")
        slot_arr = _as_id_array(slots, "slots")
        if arr.shape != slot_arr.shape:
            raise RuntimeError(f"insert(): {arr.size} ids but {slot_arr.size} slots")
        if stamp < 0:
            raise RuntimeError(f"stamps must be >= 0, got {stamp}")
        _check_unique(arr, "ids passed to insert()")
        if arr.size and (self.slot_of[arr] >= 0).any():
            raise RuntimeError("insert() of ids that are already held")
        self.slot_of[arr] = slot_arr
        self.stamp_of[arr] = stamp
        self._count += arr.size

    def put_unchecked(self, ids: np.ndarray, slots: np.ndarray, stamp: int) -> None:
        """insert() for a caller that has proven its preconditions (DeviceCache.plan: ids validated,
        unique and just looked up absent): its checks cost more than the insertion itself."""
        self.slot_of[ids] = slots
        self.stamp_of[ids] = stamp
        self._count += ids.size

    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Drop held ``ids`` (whatever their recency); returns their slots, now the caller's."""
        arr = self._checked(ids, "ids")
        slots = self.slot_of[arr]
        if arr.size and (slots < 0).any():
            raise RuntimeError("remove() of ids that are not held")
        self.slot_of[arr] = -1
        self.stamp_of[arr] = -1
        self._count -= arr.size
        return slots

    def held(self) -> np.ndarray:
        """Ids held, ascending."""
        return np.flatnonzero(self.slot_of >= 0).astype(np.int64, copy=False)

    def count_older(self, stamp: int) -> int:
        """How many held entries were last used before ``stamp`` (what ``evict(older_than=stamp)`` can take)."""
        return int(np.count_nonzero((self.slot_of >= 0) & (self.stamp_of < stamp)))

    def evict(self, n: int, *, older_than: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Remove up to ``n`` entries, least recently used first (ties: lower id first).

        With ``older_than``, only entries whose stamp is < ``older_than`` are candidates.
        Returns ``(ids, slots)`` removed, in eviction order; the caller owns the slots now.
        """
        if n <= 0 or self._count == 0:
            return _EMPTY, _EMPTY
        held = self.held()  # ascending ids, so a stable sort on stamps breaks ties by id
        stamps = self.stamp_of[held]
        if older_than is not None:
            keep = stamps < older_than
            held, stamps = held[keep], stamps[keep]
        order = np.argsort(stamps, kind="stable")[:n]
        ids = held[order]
        slots = self.slot_of[ids].copy()
        self.slot_of[ids] = -1
        self.stamp_of[ids] = -1
        self._count -= ids.size
        return ids, slots
