"""A simulated slow / faulty SSD around a real backend, for tests and benchmarks.

:class:`SimulatedSSD` adds latency, a shared bandwidth cap, stalls and injected faults, configured by
one string (``"latency=5ms,bandwidth=200MB/s,fail=0.01"``), so tests and benchmarks exercise the
runtime's fault paths through the backend, never by patching. Synchronous and thread-safe, like
every backend (``m2cache.storage.ssd``): a simulated read sleeps with ``time.sleep`` on the reader's
thread.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2cache.errors import ConfigError, PermanentSSDError, SSDError, TransientSSDError
from m2cache.storage.ssd import SSDBackend, _where

log = logging.getLogger(__name__)

_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SPEC_HELP = (
    "valid keys: latency=5ms (per read; s, ms, us), bandwidth=200MB/s (B, KB, MB, GB = 10^3.., "
    "KiB, MiB, GiB = 2^10..), jitter=0.5 (fraction >= 0), seed=1 (int), fail=0.01 (probability of "
    "a transient error per attempt), fail_after=N (every read after the N-th fails permanently), "
    "fail_permanent=1 (fail errors are permanent per (file, offset)), fail_path=GLOB (faults only "
    "for matching file names, e.g. *L003*), corrupt=0.001 (probability of one flipped byte), "
    "stall=200ms@0.01 (extra delay with a probability)")
_NUM = r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)"


@dataclass(frozen=True, slots=True)
class SSDSimSpec:
    """A simulated SSD's behaviour; parse it from a string with :meth:`SimulatedSSD.parse`."""

    latency: float = 0.0  # seconds per read, overlapping between concurrent reads
    bandwidth: float | None = None  # bytes per second, shared (None: unlimited)
    jitter: float = 0.0
    seed: int = 0
    fail: float = 0.0
    fail_after: int | None = None
    fail_permanent: bool = False
    fail_path: str | None = None
    corrupt: float = 0.0
    stall: float = 0.0  # seconds
    stall_p: float = 0.0


def _bad(key: str, value: str, want: str) -> ConfigError:
    return ConfigError(f"SSD simulation spec: bad value {key}={value!r}, expected {want}; {_SPEC_HELP}")


def _duration(key: str, value: str) -> float:
    m = re.fullmatch(_NUM + r"\s*(s|ms|us|µs|ns)", value.strip().lower())
    if not m:
        raise _bad(key, value, "a duration with a unit, like 5ms, 200us or 0.005s")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def _rate(key: str, value: str) -> float:
    m = re.fullmatch(_NUM + r"\s*([kmgt]?i?b)(?:/s)?", value.strip().lower())
    if not m or m.group(2) not in _BYTE_UNITS or float(m.group(1)) <= 0:
        raise _bad(key, value, "a positive rate like 200MB/s, 1.5GB/s or 512MiB/s")
    return float(m.group(1)) * _BYTE_UNITS[m.group(2)]


def _fraction(key: str, value: str, *, upper: float | None = 1.0) -> float:
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not (x >= 0 and (upper is None or x <= upper)):
        raise _bad(key, value, "a number in [0, 1]" if upper is not None else "a number >= 0")
    return x


def _int(key: str, value: str) -> int:
    try:
        x = int(value)
    except ValueError:
        x = -1
    if x < 0:
        raise _bad(key, value, "an integer >= 0")
    return x


def _flag(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v not in ("0", "1", "true", "false"):
        raise _bad(key, value, "0 or 1")
    return v in ("1", "true")


def _stall(key: str, value: str) -> tuple[float, float]:
    delay, at, prob = value.partition("@")
    if not at:
        raise _bad(key, value, "DELAY@PROBABILITY, like 200ms@0.01")
    return _duration(key, delay), _fraction(key, prob)


def parse_spec(spec: str) -> SSDSimSpec:
    """Parse ``"key=value,..."``; an unknown key or bad value raises ConfigError listing the formats."""
    values: dict[str, object] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not value:
            raise ConfigError(f"SSD simulation spec: {item!r} is not key=value; {_SPEC_HELP}")
        if key in values or (key == "stall" and "stall_p" in values):
            raise ConfigError(f"SSD simulation spec: {key!r} given twice")
        if key == "latency":
            values[key] = _duration(key, value)
        elif key == "bandwidth":
            values[key] = _rate(key, value)
        elif key == "jitter":
            values[key] = _fraction(key, value, upper=None)
        elif key in ("seed", "fail_after"):
            values[key] = _int(key, value)
        elif key in ("fail", "corrupt"):
            values[key] = _fraction(key, value)
        elif key == "fail_permanent":
            values[key] = _flag(key, value)
        elif key == "fail_path":
            values[key] = value
        elif key == "stall":
            values["stall"], values["stall_p"] = _stall(key, value)
        else:
            raise ConfigError(f"SSD simulation spec: unknown key {key!r}; {_SPEC_HELP}")
    return SSDSimSpec(**values)  # type: ignore[arg-type]


def _uniforms(*parts: object, count: int) -> list[float]:
    """``count`` uniforms in [0, 1) that depend only on ``parts`` (not on threads or call order)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8 * count).digest()
    return [(x >> 11) / float(1 << 53) for x in struct.unpack(f"<{count}Q", digest)]


class SimulatedSSD:
    """A slow and faulty SSD around a real backend, for tests and benchmarks.

    Timing: each read waits its latency (× (1 + jitter·u), plus a stall with probability
    ``stall_p``) concurrently with other reads, then its transfer (length / bandwidth) through
    one lock-protected "busy until" clock, so transfers are serialised as on one device.
    ``simulated_seconds`` adds up the delays the model charged (latency + stall + transfer), which
    tests check instead of wall time.

    Determinism: each read's random draws are a hash of (seed, file name, offset, length, attempt
    number of that (path, offset)), so a seed gives the same faults however threads interleave.
    ``fail_after`` counts read attempts of matching files in arrival order, so it is deterministic
    only for serial reads. All faults apply only to files whose name (or full path) matches
    ``fail_path`` when it is given.
    """

    def __init__(self, inner: SSDBackend, spec: str | SSDSimSpec = "") -> None:
        self.inner = inner
        self.spec = spec if isinstance(spec, SSDSimSpec) else parse_spec(spec)
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self._attempts: dict[tuple[str, int], int] = {}
        self._matching_reads = 0
        self.reads = 0
        self.bytes = 0
        self.failures = 0
        self.permanent_failures = 0
        self.corruptions = 0
        self.stalls = 0
        self.simulated_seconds = 0.0

    @classmethod
    def parse(cls, spec: str) -> SSDSimSpec:
        """Parse a spec string (see :func:`parse_spec`)."""
        return parse_spec(spec)

    def _matches(self, path: str) -> bool:
        pattern = self.spec.fail_path
        return pattern is None or fnmatch.fnmatch(Path(path).name, pattern) or fnmatch.fnmatch(path, pattern)

    def _fault(self, path: str, name: str, offset: int, length: int, n: int, u_fail: float) -> SSDError | None:
        spec, where = self.spec, _where(path, offset, length)
        if spec.fail_after is not None and n > spec.fail_after:
            return PermanentSSDError(f"simulated SSD failure (fail_after={spec.fail_after}): read of {where}")
        if spec.fail and spec.fail_permanent:
            (u_perm,) = _uniforms(spec.seed, name, offset, length, "permanent", count=1)
            if u_perm < spec.fail:
                return PermanentSSDError(f"simulated permanent SSD error: read of {where}")
        elif u_fail < spec.fail:
            return TransientSSDError(f"simulated transient SSD error: read of {where}")
        return None

    @property
    def bytes_read(self) -> int:
        """What the reads that came back brought, as ``FileBackend.bytes_read`` counts it."""
        return self.bytes

    def read(self, path: str | Path, offset: int, length: int, into: Any = None) -> bytes | memoryview:
        # Interned: the attempt table holds one entry per distinct (path, offset) ever read (about
        # 100 bytes each, so ~100 MB per million distinct blocks); one string per file, not per read.
        spec, spath = self.spec, sys.intern(os.fspath(path))
        name = Path(spath).name
        faulty = self._matches(spath)
        with self._lock:
            attempt = self._attempts.get((spath, offset), 0)
            self._attempts[(spath, offset)] = attempt + 1
            if faulty:
                self._matching_reads += 1
            n = self._matching_reads
            self.reads += 1
        u_fail, u_jit, u_stall, u_corrupt, u_pos, u_bit = _uniforms(
            spec.seed, name, offset, length, attempt, count=6)
        delay = spec.latency * (1.0 + spec.jitter * u_jit)
        stalled = faulty and u_stall < spec.stall_p
        if stalled:
            delay += spec.stall
        error = self._fault(spath, name, offset, length, n, u_fail) if faulty else None
        transfer = 0.0 if error or not spec.bandwidth else length / spec.bandwidth
        self._wait(delay, transfer, stalled)
        if error is not None:
            with self._lock:
                self.failures += isinstance(error, TransientSSDError)
                self.permanent_failures += isinstance(error, PermanentSSDError)
            raise error
        data = self.inner.read(path, offset, length, into=into)
        if faulty and length and u_corrupt < spec.corrupt:
            pos = min(int(u_pos * length), length - 1)
            bit = min(int(u_bit * 8), 7)
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            data = bytes(flipped)
            with self._lock:
                self.corruptions += 1
            log.debug("simulated corruption of %s: byte %d", _where(spath, offset, length), pos)
        with self._lock:
            self.bytes += len(data)
        return data

    def _wait(self, delay: float, transfer: float, stalled: bool) -> None:
        """Latency overlaps other reads; transfer time is serialised through the busy-until clock."""
        ready = time.monotonic() + delay
        with self._lock:
            start = max(ready, self._busy_until) if transfer else ready
            done = start + transfer
            if transfer:
                self._busy_until = done
            self.simulated_seconds += delay + transfer
            self.stalls += stalled
        remaining = done - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)

    def evict_page_cache(self, paths: Iterable[str | Path]) -> None:
        self.inner.evict_page_cache(paths)

    def close(self) -> None:
        self.inner.close()

    def stats(self) -> dict[str, float | int]:
        with self._lock:
            return {
                "reads": self.reads, "bytes": self.bytes, "failures": self.failures,
                "permanent_failures": self.permanent_failures, "corruptions": self.corruptions,
                "stalls": self.stalls, "simulated_seconds": self.simulated_seconds,
            }


__all__ = ["SimulatedSSD", "SSDSimSpec", "parse_spec"]
