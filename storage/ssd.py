"""SSD backends: exact byte-range reads off files (the simulated slow / faulty SSD is ``ssd_sim``).

Synchronous on purpose: the SSD reader actor calls ``read()`` from a thread pool, so a read may
block without blocking the event loop. Every backend is thread-safe.

- :class:`FileBackend` — ``os.pread`` on cached file descriptors; optional ``O_DIRECT`` (bypasses
  the page cache: the engine's tiers are then the only copy, and cold-SSD benchmarks measure the SSD)
  into a page-aligned buffer the caller keeps.
- :class:`~m2cache.storage.ssd_sim.SimulatedSSD` — wraps any backend and adds latency, a shared
  bandwidth cap, stalls and injected faults (``m2cache.storage.ssd_sim``).
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from m2cache.errors import PermanentSSDError, SSDError, TransientSSDError

log = logging.getLogger(__name__)

_ALIGN = 4096  # O_DIRECT needs offset, length and buffer aligned to the logical block size
# a read's own mapping, its pages made at once rather than faulted in one by one as the read fills them: 14 MB
# reads measured 21 ms each instead of 25 (sys 7 ms instead of 13); a buffer the caller reuses (``into``, as the
# attention stream and the neuron runs do: ``bundle_files.thread_buffer``) 13 ms (sys 0.7)
_FRESH_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT}


class SSDBackend(Protocol):
    def read(self, path: str | Path, offset: int, length: int, into: mmap.mmap | None = None
             ) -> bytes | memoryview: ...
    def evict_page_cache(self, paths: Iterable[str | Path]) -> None: ...
    def close(self) -> None: ...


def _where(path: str | Path, offset: int, length: int) -> str:
    return f"{path} at offset {offset}, length {length}"


def _os_error(exc: OSError, path: str | Path, offset: int, length: int) -> SSDError:
    cls = TransientSSDError if exc.errno in _TRANSIENT_ERRNOS else PermanentSSDError
    return cls(f"read of {_where(path, offset, length)} failed: {exc.strerror or exc}")


class FileBackend:
    """Reads exact byte ranges with ``os.pread`` on file descriptors kept open per path.

    With ``direct=True`` it opens files with ``O_DIRECT`` and reads whole aligned blocks into a
    fresh anonymous ``mmap`` (page-aligned, as ``O_DIRECT`` requires) and returns a view of the range
    asked for. Where the OS or filesystem refuses ``O_DIRECT`` (no such flag, or ``EINVAL``
    as on tmpfs) it logs once and falls back to buffered reads for good: ``direct_active`` says
    which mode is in use.
    """

    def __init__(self, *, direct: bool = False) -> None:
        self.direct_requested = direct
        self.direct_active = direct and hasattr(os, "O_DIRECT")
        if direct and not self.direct_active:
            log.warning("O_DIRECT is not available on this OS; using buffered reads")
        self.reads = 0
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds: dict[tuple[str, bool], int] = {}

    def _fd(self, path: str, direct: bool) -> int:
        key = (path, direct)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
                fd = os.open(path, flags)
                self._fds[key] = fd
            return fd

    def _fall_back(self, path: str, exc: OSError) -> None:
        if self.direct_active:
            self.direct_active = False
            log.warning("O_DIRECT refused for %s (%s); falling back to buffered reads", path, exc)

    def _read_direct(self, path: str, offset: int, length: int, into: mmap.mmap | None = None
                     ) -> bytes | memoryview | None:
        """Aligned O_DIRECT read; None when the filesystem refuses it (caller falls back).

        The blocks land in the caller's page-aligned buffer ``into`` (an mmap covering the aligned span), or
        in a fresh anonymous mmap (page-aligned, as O_DIRECT needs), and the caller gets a view of the range
        asked for: no second copy, so a whole-layer read holds its own bytes once (the mmap goes back to the
        OS when the last view of it is dropped)."""
        start = offset - offset % _ALIGN
        end = -(-(offset + length) // _ALIGN) * _ALIGN
        want = offset - start + length
        if into is not None:
            if len(into) < end - start:
                raise ValueError(f"a buffer of {len(into)} bytes cannot take the {end - start} of {_where(path, offset, length)}")
            buf = into
        else:
            buf = mmap.mmap(-1, end - start, flags=_FRESH_FLAGS)
        got = 0
        try:
            fd = self._fd(path, True)
            with memoryview(buf) as whole:
                while got < want:  # a short read before the end of the file: read on from there
                    n = os.preadv(fd, [whole[got:end - start]], start + got)
                    if n == 0:
                        break
                    got += n
        except OSError as exc:
            if into is None:
                buf.close()
            if exc.errno == errno.EINVAL:
                self._fall_back(path, exc)
                return None
            raise
        if got < want:
            if into is None:
                buf.close()
            raise PermanentSSDError(
                f"short read of {_where(path, offset, length)}: file ends at byte "
                f"{start + got} (truncated store file?)")
        return memoryview(buf)[offset - start:offset - start + length]

    def _read_buffered(self, path: str, offset: int, length: int) -> bytes:
        fd = self._fd(path, False)
        parts: list[bytes] = []
        done = 0
        while done < length:
            chunk = os.pread(fd, length - done, offset + done)
            if not chunk:
                raise PermanentSSDError(
                    f"short read of {_where(path, offset, length)}: file ends at byte "
                    f"{offset + done} (truncated store file?)")
            parts.append(chunk)
            done += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, path: str | Path, offset: int, length: int, into: mmap.mmap | None = None) -> bytes | memoryview:
        """Exactly ``length`` bytes at ``offset`` (bytes, or a writable view of its own buffer with
        O_DIRECT); a file too short raises PermanentSSDError. ``into``: with O_DIRECT, a page-aligned buffer
        of the caller's that the read fills (the view is of it), reused from read to read; buffered reads
        ignore it."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: {_where(path, offset, length)}")
        spath = os.fspath(path)
        if length == 0:
            return b""
        try:
            data: bytes | memoryview | None = self._read_direct(spath, offset, length, into) if self.direct_active else None
            if data is None:
                data = self._read_buffered(spath, offset, length)
        except OSError as exc:
            raise _os_error(exc, spath, offset, length) from exc
        with self._lock:
            self.reads += 1
            self.bytes_read += length
        return data

    def evict_page_cache(self, paths: Iterable[str | Path]) -> None:
        """Drop the files' pages from the OS page cache, so the next run reads from the SSD (cold)."""
        if not hasattr(os, "posix_fadvise"):
            log.warning("posix_fadvise is not available; page cache not evicted")
            return
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise PermanentSSDError(f"cannot open {path} to evict its page cache: {exc.strerror}") from exc
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def stats(self) -> dict[str, int | bool]:
        return {"reads": self.reads, "bytes_read": self.bytes_read, "direct_active": self.direct_active}


__all__ = ["FileBackend", "SSDBackend"]
