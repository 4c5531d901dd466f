"""Bundle files: one file per FFN layer and precision, read whole or by neuron, every block verified.

A store holds one kind of them (versions 1 and 2: each neuron's gate, up and down together) or two
(version 3: [up|down] bundles, and the gate rows alone); :class:`BundleFiles` is one kind. Reads are
synchronous (the runtime calls them from its I/O threads) and go through an SSD backend
(``m2cache.storage.ssd``), so a simulated slow or faulty SSD sits under the same code as a real one.
"""
from __future__ import annotations

import logging
import mmap
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from m2cache.errors import ChecksumError, StoreNotFoundError, TransientSSDError, TruncatedStoreError, UnstableReadError
from m2cache.storage.layout import BlockGeometry, checksum_fn, coalesce

log = logging.getLogger(__name__)

FIX_HINT = "re-create the store with `m2cache convert` (or `m2cache fetch --force` for the demo model)"
TRANSIENT_RETRIES = 6  # 2 to 64 ms of backoff: ~0.13 s in all before a read error is given up
# Runs of needed blocks closer than this many bytes are read as one. A read call costs ~13 us of
# Python and syscall (an NVMe random read ~80 us); 64 KiB costs ~6 us of copying from the page
# cache. On the demo (4 KiB blocks, neuron preload, store in the page cache) merging gaps up to 16
# blocks decoded 4.2-4.6 tokens/s where gaps up to 4 gave 3.2-3.3. In bytes, not blocks, so a 7B
# store's 24 KiB FP16 blocks are not merged over 16 x 24 KiB.
MERGE_GAP_BYTES = 64 * 1024
BACKOFF_S = 0.002
# A range whose checksum fails is read again, with a doubling backoff (a busy disk or bus has time to
# settle). The same wrong bytes PERSISTENT_READS times in a row is damage where the file lies; wrong bytes
# that differ from read to read are a flaky read, retried up to CORRUPT_READS reads (~0.3 s of backoff)
# before the read is given up as unstable, never blamed on the file. Seen on the demo with 2% of reads
# flipped and one busy core: two reads in a row corrupt took down 3 generations in 5 when twice was the rule.
PERSISTENT_READS = 3
CORRUPT_READS = 8
CORRUPT_BACKOFF_S = 0.005
CORRUPT_BACKOFF_MAX_S = 0.08


class Backend(Protocol):
    def read(self, path: str | Path, offset: int, length: int, into: Any = None) -> bytes | memoryview: ...


class PlainBackend:
    """Buffered reads with no extras; used where no SSD backend is configured (``into`` is not needed)."""

    def read(self, path: str | Path, offset: int, length: int, into: Any = None) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise TruncatedStoreError(f"{path}: wanted {length} bytes at offset {offset}, file ends first; {FIX_HINT}")
        return data


Run = tuple[int, int, np.ndarray]  # (first block, blocks, the blocks of it kept, relative to first)


@dataclass(frozen=True, slots=True)
class NeuronRead:
    """What reading some neurons of one file takes: its runs of blocks, or the whole file (``runs`` None)."""

    files: "BundleFiles"
    layer: int
    precision: str
    ids: np.ndarray
    blocks: np.ndarray
    runs: list[Run] | None


class BundleFiles:
    """The bundle files of one kind: their geometry per precision, checksums, and verified reads.

    ``what`` names the kind in messages (" (gate rows)"); ``entries`` are the manifest's file entries
    (layer, precision, path, size, crc32: the blocks' checksums, file_crc32: the whole file's)."""

    def __init__(self, root: Path, entries: list[dict[str, Any]], geometry: dict[str, dict[str, int]],
                 num_neurons: int, checksum_name: str, what: str = "") -> None:
        self.root, self.num_neurons, self.what = root, num_neurons, what
        self.checksum = checksum_fn(checksum_name)
        self.geometry = {p: BlockGeometry(**g) for p, g in geometry.items()}
        self._entries: dict[tuple[int, str], dict[str, Any]] = {}
        self._crcs: dict[tuple[int, str], np.ndarray] = {}
        self._file_crc: dict[tuple[int, str], int] = {}
        self._paths: dict[tuple[int, str], str] = {}
        for entry in entries:
            key = (entry["layer"], entry["precision"])
            self._entries[key] = entry
            self._crcs[key] = np.frombuffer(entry["crc32"], dtype=np.uint32)
            if "file_crc32" in entry:
                self._file_crc[key] = entry["file_crc32"]
            self._paths[key] = str(root / entry["path"])  # built once: pathlib costs µs per join, per read

    def check(self) -> None:
        """Every file there, none shorter than the manifest says (contents are checked as they are read)."""
        for (layer, p), entry in self._entries.items():
            f = self.root / entry["path"]
            if not f.is_file():
                raise StoreNotFoundError(f"{f} (FFN layer {layer}, {p}{self.what}) is missing; {FIX_HINT}")
            size = f.stat().st_size
            if size < entry["size"]:
                raise TruncatedStoreError(
                    f"{f} (FFN layer {layer}, {p}{self.what}) is truncated: {size} bytes, the manifest says "
                    f"{entry['size']}; {FIX_HINT}")

    def verify(self, backend: Backend) -> None:
        """Reads every file whole and checks it (ChecksumError naming the first damaged one)."""
        for layer, precision in self._entries:
            self.read_layer(layer, precision, backend)

    def files(self) -> list[Path]:
        return [self.root / e["path"] for e in self._entries.values()]

    def file_path(self, layer: int, precision: str) -> Path:
        return Path(self._paths[(layer, precision)])

    def bundle_bytes(self, precision: str) -> int:
        return self.geometry[precision].bundle_bytes

    def file_bytes(self, precision: str) -> int:
        return self.geometry[precision].file_bytes(self.num_neurons)

    # ---- reads -------------------------------------------------------------------------------
    def read_layer(self, layer: int, precision: str, backend: Backend, need: np.ndarray | None = None) -> torch.Tensor:
        """Every neuron of a layer at a precision: [F, bundle_bytes] uint8, verified (only the blocks in
        ``need`` when given: the others are not used, and a damaged one must not fail the read).

        One read of the whole file, checked against the file's own checksum in one pass (a per-block
        loop costs ~1 µs a block in Python); on a mismatch the blocks locate the damage."""
        geom = self.geometry[precision]
        nblocks = geom.num_blocks(self.num_neurons)
        data = self._read_verified(layer, precision, 0, nblocks, need, backend,
                                   self._file_crc.get((layer, precision)))
        body = data.reshape(nblocks, geom.block_bytes)[:, : geom.neurons_per_block * geom.bundle_bytes]
        rows = np.ascontiguousarray(body)
        if not rows.flags.writeable:  # unpadded blocks: still the read's immutable bytes; torch wants its own
            rows = rows.copy()
        return torch.from_numpy(rows.reshape(-1, geom.bundle_bytes)[: self.num_neurons])

    def plan(self, layer: int, precision: str, ids: np.ndarray) -> NeuronRead:
        """The reads that bring ``ids``' bundles: one per run of their blocks (runs closer than
        MERGE_GAP_BYTES merged into one larger read), or one of the whole file where they need half of
        its blocks or more (one read and one file checksum beat a checksum call, and a read call per run,
        for every block)."""
        geom = self.geometry[precision]
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_neurons):
            raise IndexError(f"neuron ids must lie in [0, {self.num_neurons})")
        blocks = np.unique(ids // geom.neurons_per_block)
        if 2 * len(blocks) >= geom.num_blocks(self.num_neurons):
            return NeuronRead(self, layer, precision, ids, blocks, None)
        runs = [(first, count, blocks[(blocks >= first) & (blocks < first + count)] - first)
                for first, count in coalesce(blocks, merge_gap(geom))]
        return NeuronRead(self, layer, precision, ids, blocks, runs)

    def read_neurons(self, layer: int, precision: str, ids: np.ndarray, backend: Backend,
                     pool: Executor | None = None) -> torch.Tensor:
        """Bundles of ``ids`` (any order, unique) at a precision: [n, bundle_bytes] uint8, aligned with ids.
        With a ``pool`` the runs are read by its threads at once: on a disk whose small reads are
        latency-bound (measured here: one thread 0.40 GB/s, eight 0.69 GB/s for 20% of an INT8 layer's
        neurons), the queue depth is the speed."""
        return read_planned([self.plan(layer, precision, ids)], backend, pool)[0]

    def run_bytes(self, precision: str, ids: np.ndarray) -> int:
        """Bytes read_neurons reads for ids (read amplification and merged gaps included)."""
        plan = self.plan(0, precision, ids)
        geom = self.geometry[precision]
        if plan.runs is None:
            return geom.file_bytes(self.num_neurons)
        return sum(count for _, count, _ in plan.runs) * geom.block_bytes

    def read_run(self, plan: NeuronRead, run: Run | None, backend: Backend, blocks: np.ndarray | None = None,
                 at: int = 0) -> torch.Tensor | None:
        """One of ``plan``'s reads. With ``run`` None the whole layer (``read_layer``'s rows, returned); else a
        run's blocks, the kept ones verified and copied into ``blocks`` (the plan's, ``new_blocks``) from row
        ``at`` on, in the reading thread: the run lands in that thread's reused buffer (``thread_buffer``), so
        a read leaves no buffer of its own behind."""
        if run is None:  # only the blocks of plan's neurons verified: a damaged other must not fail the read
            return self.read_layer(plan.layer, plan.precision, backend, need=plan.blocks)
        assert blocks is not None, "a run's blocks go into the plan's array"
        first, count, need = run
        geom = self.geometry[plan.precision]
        data = self._read_verified(plan.layer, plan.precision, first, count, need, backend, None,
                                   into=thread_buffer(count * geom.block_bytes))
        blocks[at:at + len(need)] = data.reshape(count, geom.block_bytes)[need]
        return None

    def new_blocks(self, plan: NeuronRead) -> np.ndarray | None:
        """The array a plan's runs fill with the blocks they keep (None for a whole-file read)."""
        return None if plan.runs is None else np.empty((len(plan.blocks), self.geometry[plan.precision].block_bytes),
                                                       np.uint8)

    def assemble(self, plan: NeuronRead, got: Any) -> torch.Tensor:
        """``plan.ids``' bundles [n, bundle_bytes]: from the whole layer read (``got``, its rows), or from the
        blocks its runs kept (``got``, ``new_blocks``' array, filled)."""
        if plan.runs is None:  # numpy's gather: no intra-op threads (see quant.join_parts)
            return torch.from_numpy(got.numpy()[plan.ids])
        geom = self.geometry[plan.precision]
        # the row of each id's block among the blocks kept, then the bundle inside the block
        row = np.searchsorted(plan.blocks, plan.ids // geom.neurons_per_block)
        bundles = got[:, : geom.neurons_per_block * geom.bundle_bytes].reshape(
            len(plan.blocks), geom.neurons_per_block, geom.bundle_bytes)
        return torch.from_numpy(np.ascontiguousarray(bundles[row, plan.ids % geom.neurons_per_block]))

    def _read_verified(self, layer: int, precision: str, first: int, count: int, need: np.ndarray | None,
                       backend: Backend, whole: int | None, into: Any = None) -> np.ndarray:
        """Blocks [first, first+count) as uint8; the blocks in ``need`` (all when None) verified, a range
        that fails read again (``read_checked``): never returned corrupt."""
        geom = self.geometry[precision]
        path = self._paths[(layer, precision)]
        crcs = self._crcs[(layer, precision)][first: first + count]
        offset, length = first * geom.block_bytes, count * geom.block_bytes
        what = _Describe(self, layer, precision, first, count)  # formatted only for a message

        def bad_block(data: bytes) -> tuple[str, bytes] | None:
            if whole is not None and self.checksum(data) == whole:
                return None
            bad = first_bad_block(data, crcs, geom.block_bytes, self.checksum, need)
            if bad is None:
                return None
            return f"block {first + bad}", bytes(memoryview(data)[bad * geom.block_bytes:(bad + 1) * geom.block_bytes])

        return np.frombuffer(read_checked(backend, path, offset, length, what, bad_block, into=into), dtype=np.uint8)

    def describe(self, layer: int, precision: str, first: int, count: int) -> str:
        npb = self.geometry[precision].neurons_per_block
        lo, hi = first * npb, min((first + count) * npb, self.num_neurons) - 1
        return f"FFN layer {layer} {precision} neurons {lo}-{hi}{self.what}"


def read_planned(plans: list[NeuronRead], backend: Backend, pool: Executor | None = None) -> list[torch.Tensor]:
    """The bundles each plan wants, its reads (of every plan: one file's and another's at once) run by
    ``pool``'s threads when there is more than one."""
    blocks = [plan.files.new_blocks(plan) for plan in plans]
    reads: list[tuple[NeuronRead, Run | None, np.ndarray | None, int]] = []
    for plan, out in zip(plans, blocks):
        at = 0
        for run in (plan.runs if plan.runs is not None else [None]):
            reads.append((plan, run, out, at))
            at += 0 if run is None else len(run[2])
        assert plan.runs is None or at == len(plan.blocks), "every block kept is read once"

    def read(item: tuple[NeuronRead, Run | None, np.ndarray | None, int]) -> Any:
        plan, run, out, at = item
        return plan.files.read_run(plan, run, backend, out, at)

    got = list(pool.map(read, reads) if pool is not None and len(reads) > 1 else map(read, reads))
    whole = {id(plan): g for (plan, run, _, _), g in zip(reads, got) if run is None}
    return [plan.files.assemble(plan, whole[id(plan)] if plan.runs is None else out)
            for plan, out in zip(plans, blocks)]


_THREAD = threading.local()
THREAD_BUFFER_MAX = 4 << 20  # a run up to this size lands in its thread's reused buffer; a larger one in its own


def thread_buffer(nbytes: int) -> mmap.mmap | None:
    """The calling thread's reused page-aligned buffer, for a read of ``nbytes`` whose blocks are copied out
    before the thread reads again (``read_run``); None above THREAD_BUFFER_MAX (the backend maps that read its
    own buffer). A buffer mapped a read, its pages zeroed and unmapped again, measured half the small reads a
    second of a reused one (7 against 14-16 k reads of 36 KiB a second on 8 threads, ``storage.ssd``); a
    copy of each read into memory of its own (bytes) kept the process's peak too high under a 1.5 GB limit."""
    need = -(-(nbytes + 2 * mmap.PAGESIZE) // (1 << 20)) << 20  # the read's span rounded out to pages, in MiB
    if need > THREAD_BUFFER_MAX:
        return None
    buf = getattr(_THREAD, "buf", None)
    if buf is None or len(buf) < need:  # the old one goes once nothing views it
        buf = _THREAD.buf = mmap.mmap(-1, need)
    return buf


def merge_gap(geom: BlockGeometry) -> int:
    """Blocks of gap that one read covers rather than splitting into two reads."""
    return MERGE_GAP_BYTES // geom.block_bytes


class _Describe:
    """What a read covers ("FFN layer 3 int4 neurons 0-63"), formatted only when a message needs it."""

    __slots__ = ("files", "args")

    def __init__(self, files: BundleFiles, *args: Any) -> None:
        self.files, self.args = files, args

    def __str__(self) -> str:
        return self.files.describe(*self.args)


def first_bad_block(data: bytes, crcs: np.ndarray, block_bytes: int, checksum,
                    need: np.ndarray | None = None) -> int | None:
    """Index of the first block (among ``need``, or all) whose checksum does not match."""
    view = memoryview(data)
    for i in (range(len(crcs)) if need is None else need.tolist()):
        if checksum(view[i * block_bytes: (i + 1) * block_bytes]) != int(crcs[i]):
            return i
    return None


def read_with_retries(backend: Backend, path: str | Path, offset: int, length: int, what: object,
                      into: Any = None) -> bytes | memoryview:
    """Reads, retrying transient SSD errors with bounded exponential backoff (we are in an I/O thread).
    ``into``: a buffer of the caller's for the backend to read into (``FileBackend.read``)."""
    for attempt in range(TRANSIENT_RETRIES + 1):
        try:
            return backend.read(path, offset, length, into=into)
        except TransientSSDError as e:
            if attempt == TRANSIENT_RETRIES:
                raise TransientSSDError(f"{what}: read failed {attempt + 1} times ({e}); check the disk") from e
            time.sleep(BACKOFF_S * (2**attempt))
    raise AssertionError("unreachable: the retry loop returns or raises")


def read_checked(backend: Backend, path: str | Path, offset: int, length: int, what: object,
                 find_bad: Callable[[Any], tuple[str, bytes] | None], into: Any = None) -> bytes | memoryview:
    """``length`` bytes at ``offset`` that ``find_bad`` finds nothing wrong with: transient SSD errors are
    retried (``read_with_retries``); a range whose checksum fails is read again with backoff.

    ``find_bad(data)``: None, or (which part, its bytes) of the first part that fails its checksum. The same
    wrong bytes ``PERSISTENT_READS`` reads in a row are damage on the disk: ``ChecksumError`` (re-create the
    store). Wrong bytes that change from read to read are a flaky read (a busy bus, a failing cable or
    controller): read up to ``CORRUPT_READS`` times, then ``UnstableReadError``, which does not blame the file."""
    seen: list[tuple[str, bytes]] = []
    for attempt in range(CORRUPT_READS):
        data = read_with_retries(backend, path, offset, length, what, into)
        bad = find_bad(data)
        if bad is None:
            if seen:
                log.warning("%s read correctly on read %d, after %d corrupt: a transient fault", what, attempt + 1,
                            len(seen))
            return data
        seen.append(bad)
        if len(seen) >= PERSISTENT_READS and all(b == bad for b in seen[-PERSISTENT_READS:]):
            raise ChecksumError(f"{path}: {bad[0]} of {what} fails its checksum with the same bytes on "
                                f"{PERSISTENT_READS} reads in a row: the file is damaged where it lies; {FIX_HINT}")
        log.info("checksum mismatch in %s, %s (read %d): reading again", what, bad[0], attempt + 1)
        time.sleep(min(CORRUPT_BACKOFF_S * 2**attempt, CORRUPT_BACKOFF_MAX_S))
    raise UnstableReadError(
        f"{path}: {seen[-1][0]} of {what} failed its checksum on {CORRUPT_READS} reads, with different bytes from "
        "read to read: the disk or the path to it flips bits, and the file itself is likely intact (no need to "
        "re-create the store; check the disk: `dmesg`, SMART). The request may be sent again.")
