"""The DRAM tier's layer-aware FIFO (the M2Cache paper's): a fixed area plus a dynamic ring.

Decoding walks the layers in a cycle, so the DRAM tier keeps the first ``fixed_layers`` layers
for good (the *fixed area*: once admitted they are never evicted, which hides the SSD latency at
the start of every token) and streams the rest through a *dynamic area* in admission order: the
preloader admits L+1..L+k ahead of the executor, and the oldest admitted entry is the one the
executor left longest ago, so FIFO order is the right eviction order for this access pattern and
costs O(1) per entry.

This is bookkeeping only (keys and byte sizes); the DRAM manager owns the buffers. Keys are any
hashable (the runtime uses ``(layer, precision)``).

Rules
-----
- ``bytes_held <= budget_bytes`` at all times; :meth:`LayerFIFO.admit` evicts unpinned dynamic
  entries, oldest admitted first, to make room, and raises :class:`~m2cache.errors.BudgetError`
  *without changing anything* if the entry cannot fit even after evicting all of them.
- Pinned entries (being read or copied up) are never evicted; pins count, so two readers pin twice.
- The fixed area is the first ``fixed_layers`` layers, or the ``fixed_keys`` given (a precision of every
  layer, say: what a small budget holds best when decode reads every layer every token).
- A fixed-layer entry joins the fixed area only while the fixed area stays within
  ``fixed_budget_bytes`` (default: half the budget, so that the dynamic ring always keeps room for
  the preload window). One that does not fit goes to the dynamic area instead, where it is
  evictable like any other — a too-small budget degrades to plain FIFO instead of failing.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from m2cache.errors import BudgetError, ConfigError


@dataclass(slots=True)
class _Entry:
    layer: int
    nbytes: int
    fixed: bool
    pins: int = 0


class LayerFIFO:
    """Byte-budgeted layer-aware FIFO. Not thread-safe: the DRAM manager actor owns it."""

    def __init__(self, budget_bytes: int, fixed_layers: int, *,
                 fixed_budget_bytes: int | None = None, fixed_keys: frozenset | None = None) -> None:
        if budget_bytes < 0:
            raise ConfigError(f"DRAM budget must be >= 0 bytes, got {budget_bytes}")
        if fixed_layers < 0:
            raise ConfigError(f"fixed_layers must be >= 0, got {fixed_layers}")
        if fixed_budget_bytes is None:
            fixed_budget_bytes = budget_bytes // 2
        if not 0 <= fixed_budget_bytes <= budget_bytes:
            raise ConfigError(
                f"fixed_budget_bytes must be in [0, budget_bytes={budget_bytes}], got {fixed_budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.fixed_layers = int(fixed_layers)
        self.fixed_budget_bytes = int(fixed_budget_bytes)
        self.fixed_keys = fixed_keys  # when given, these keys (not the first layers) form the fixed area
        self.bytes_held = 0
        self.peak_bytes = 0
        self.fixed_bytes = 0
        self.evictions = 0
        self._fixed: dict[Hashable, _Entry] = {}
        self._dynamic: OrderedDict[Hashable, _Entry] = OrderedDict()  # admission order, oldest first

    def __contains__(self, key: object) -> bool:
        return key in self._fixed or key in self._dynamic

    def __len__(self) -> int:
        return len(self._fixed) + len(self._dynamic)

    def _entry(self, key: Hashable) -> _Entry:
        entry = self._fixed.get(key)
        if entry is None:
            entry = self._dynamic.get(key)
        if entry is None:
            raise KeyError(f"{key!r} is not in the DRAM FIFO")
        return entry

    def is_fixed(self, key: Hashable) -> bool:
        return self._entry(key).fixed

    def nbytes(self, key: Hashable) -> int:
        return self._entry(key).nbytes

    def _pinned_dynamic_bytes(self) -> int:
        return sum(e.nbytes for e in self._dynamic.values() if e.pins)

    def admit(self, key: Hashable, layer: int, nbytes: int) -> list[Hashable]:
        """Admit ``key`` (``nbytes`` of ``layer``); returns the keys evicted to make room, oldest first."""
        if key in self:
            raise RuntimeError(f"{key!r} admitted twice: invariant 'no key duplicated' would break")
        if nbytes < 0:
            raise RuntimeError(f"admit({key!r}): negative size {nbytes}")
        wanted = key in self.fixed_keys if self.fixed_keys is not None else layer < self.fixed_layers
        fixed = wanted and self.fixed_bytes + nbytes <= self.fixed_budget_bytes
        pinned = self._pinned_dynamic_bytes()
        room = self.budget_bytes - self.fixed_bytes - pinned  # what evicting every unpinned entry leaves
        if nbytes > room:
            raise BudgetError(
                f"DRAM budget too small: cannot admit {key!r} (layer {layer}, {nbytes} bytes): "
                f"budget {self.budget_bytes} bytes, fixed area holds {self.fixed_bytes}, pinned "
                f"entries {pinned}, so at most {room} bytes can be made free. Raise the DRAM budget "
                f"to at least {self.fixed_bytes + pinned + nbytes} bytes, or lower the preload window.")
        evicted: list[Hashable] = []
        if self.bytes_held + nbytes > self.budget_bytes:
            for k in list(self._dynamic):
                entry = self._dynamic[k]
                if entry.pins:
                    continue
                del self._dynamic[k]
                self.bytes_held -= entry.nbytes
                evicted.append(k)
                if self.bytes_held + nbytes <= self.budget_bytes:
                    break
        self.evictions += len(evicted)
        entry = _Entry(layer, int(nbytes), fixed)
        if fixed:
            self._fixed[key] = entry
            self.fixed_bytes += entry.nbytes
        else:
            self._dynamic[key] = entry
        self.bytes_held += entry.nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes_held)
        if self.bytes_held > self.budget_bytes:
            raise RuntimeError(f"DRAM FIFO over budget: {self.bytes_held} > {self.budget_bytes}")
        return evicted

    def pin(self, key: Hashable) -> None:
        """Keep ``key`` from eviction until a matching :meth:`unpin` (pins count)."""
        self._entry(key).pins += 1

    def unpin(self, key: Hashable) -> None:
        entry = self._entry(key)
        if entry.pins <= 0:
            raise RuntimeError(f"unpin({key!r}) without a matching pin")
        entry.pins -= 1

    def pins(self, key: Hashable) -> int:
        return self._entry(key).pins

    def remove(self, key: Hashable) -> None:
        """Drop ``key`` (fixed or dynamic). Removing a pinned entry is a bug: a reader still uses it."""
        entry = self._entry(key)
        if entry.pins:
            raise RuntimeError(f"remove({key!r}) while pinned {entry.pins} time(s)")
        if entry.fixed:
            del self._fixed[key]
            self.fixed_bytes -= entry.nbytes
        else:
            del self._dynamic[key]
        self.bytes_held -= entry.nbytes

    def keys(self) -> list[Hashable]:
        """All keys in eviction order: dynamic entries oldest admitted first, then the fixed area
        (never evicted), in admission order. Pinned entries keep their place."""
        return [*self._dynamic, *self._fixed]

    def stats(self) -> dict[str, int]:
        return {
            "budget_bytes": self.budget_bytes,
            "bytes_held": self.bytes_held,
            "peak_bytes": self.peak_bytes,
            "fixed_bytes": self.fixed_bytes,
            "entries": len(self),
            "fixed_entries": len(self._fixed),
            "pinned_entries": sum(1 for e in [*self._fixed.values(), *self._dynamic.values()] if e.pins),
            "evictions": self.evictions,
        }
