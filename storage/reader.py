"""Opens a store, validates it, and reads any set of neurons at any precision, verifying checksums.

Reads are synchronous (the runtime calls them from its I/O threads) and go through an SSD backend
(``m2cache.storage.ssd``), so a simulated slow or faulty SSD sits under the same code as a real one.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Callable, Protocol

import msgpack
import numpy as np
import torch

from m2cache.errors import (
    ChecksumError, StoreError, StoreNotFoundError, StoreVersionError, TransientSSDError, TruncatedStoreError,
    UnstableReadError, UnsupportedArchitectureError,
)
from m2cache.model.config import ModelConfig
from m2cache.model.families import SUPPORTED_MODEL_TYPES, supported
from m2cache.storage import quant
from m2cache.storage.layout import (
    FORMAT_NAME, FORMAT_VERSION, MANIFEST, READABLE_VERSIONS, BlockGeometry, checksum_fn, coalesce, ffn_file_name,
    file_checksum,
)

log = logging.getLogger(__name__)

FIX_HINT = "re-create the store with `m2cache convert` (or `m2cache fetch` for the demo model)"
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
    def read(self, path: str | Path, offset: int, length: int) -> bytes: ...


class PlainBackend:
    """Buffered reads with no extras; used where no SSD backend is configured."""

    def read(self, path: str | Path, offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise TruncatedStoreError(f"{path}: wanted {length} bytes at offset {offset}, file ends first; {FIX_HINT}")
        return data


def _unpack_manifest(path: Path) -> dict[str, Any]:
    if not path.parent.is_dir():
        raise StoreNotFoundError(f"no store at {path.parent}: the folder does not exist; "
                                 "create one with `m2cache convert SRC DST` or `m2cache fetch smollm2`")
    if not path.is_file():
        raise StoreNotFoundError(f"{path} is missing, so {path.parent} is not a store; {FIX_HINT}")
    try:
        manifest = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise StoreError(f"{path} is not a readable manifest ({e}); {FIX_HINT}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is not an m2cache manifest; {FIX_HINT}")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise StoreVersionError(
            f"{path} has store format version {manifest.get('version')!r}; this m2cache reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} and writes {FORMAT_VERSION}: {FIX_HINT} with this "
            "version of m2cache"
        )
    return manifest


class Store:
    """A validated store folder. Cheap to open: reads the manifest and stats the files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = _unpack_manifest(self.path / MANIFEST)
        cfg = self.manifest["config"]
        if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"{self.path / MANIFEST} describes a {cfg.get('model_type')!r} model; {supported()}"
            )
        self.config = ModelConfig.from_dict(cfg)
        self.checksum_name: str = self.manifest.get("checksum", "crc32")
        try:
            self.checksum = checksum_fn(self.checksum_name)
        except ValueError as e:
            raise StoreVersionError(f"{self.path / MANIFEST}: {e}; {FIX_HINT}") from e
        ffn = self.manifest["ffn"]
        self.parts: int = ffn["parts"]
        self.num_neurons: int = ffn["num_neurons"]
        self.hidden: int = ffn["hidden"]
        # version 1 stores have one INT8 scale per row: a group as wide as the row
        self.groups = quant.Groups(int8=ffn.get("int8_group", self.hidden), int4=ffn["int4_group"])
        self.geometry = {p: BlockGeometry(**g) for p, g in ffn["geometry"].items()}
        self._files: dict[tuple[int, str], dict[str, Any]] = {}
        self._crcs: dict[tuple[int, str], np.ndarray] = {}
        self._file_crc: dict[tuple[int, str], int] = {}
        self._paths: dict[tuple[int, str], str] = {}
        for entry in ffn["files"]:
            key = (entry["layer"], entry["precision"])
            self._files[key] = entry
            self._crcs[key] = np.frombuffer(entry["crc32"], dtype=np.uint32)
            if "file_crc32" in entry:
                self._file_crc[key] = entry["file_crc32"]
        self._check_files()

    def _check_files(self) -> None:
        for (layer, p), entry in self._files.items():
            f = self.path / entry["path"]
            if not f.is_file():
                raise StoreNotFoundError(f"{f} (FFN layer {layer}, {p}) is missing; {FIX_HINT}")
            size = f.stat().st_size
            if size < entry["size"]:
                raise TruncatedStoreError(
                    f"{f} (FFN layer {layer}, {p}) is truncated: {size} bytes, the manifest says {entry['size']}; "
                    f"{FIX_HINT}"
                )
        gates = self.manifest["ffn"].get("gates")
        if gates is not None:
            g = self.path / gates["path"]
            if not g.is_file():
                raise StoreNotFoundError(f"{g} (the split store's gate rows) is missing; {FIX_HINT}")
            if g.stat().st_size < gates["size"]:
                raise TruncatedStoreError(f"{g} (the split store's gate rows) is truncated; {FIX_HINT}")
        attention = self.manifest.get("attention_int8")
        if attention:  # optional: stores written before it stream BF16/FP16 attention instead
            a = self.path / attention["path"]
            if not a.is_file():
                raise StoreNotFoundError(f"{a} (the INT8 attention weights) is missing; {FIX_HINT}")
            if a.stat().st_size < attention["size"]:
                raise TruncatedStoreError(f"{a} (the INT8 attention weights) is truncated; {FIX_HINT}")
            from m2cache.storage.attention_stream import Int8AttentionLayout

            n = self.config.num_layers
            if (attention["layer_bytes"] != Int8AttentionLayout.of(self.config).stride
                    or len(attention["crc32"]) != 4 * n or attention["size"] != n * attention["layer_bytes"]):
                raise StoreVersionError(f"{self.path / MANIFEST}: the INT8 attention file's layout is not the one this "
                                        f"m2cache reads; {FIX_HINT}")
        res = self.path / self.manifest["resident"]["path"]
        if not res.is_file():
            raise StoreNotFoundError(f"{res} is missing; {FIX_HINT}")
        if res.stat().st_size < self.manifest["resident"]["size"]:
            raise TruncatedStoreError(f"{res} is truncated; {FIX_HINT}")

    @property
    def split(self) -> bool:
        """A split store (``m2cache split-gate``): bundles of (up, down), the gate rows resident."""
        return "gates" in self.manifest["ffn"]

    def read_gates(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A split store's packed INT4 gate rows, one [F, D/2 + 4·D/group] uint8 tensor per layer, and its
        ||up_j||·||down_j|| [F] float32 per layer, the file checked against its checksum first."""
        entry = self.manifest["ffn"]["gates"]
        path = self.path / entry["path"]
        if file_checksum(path, self.checksum_name) != entry["crc32"]:
            raise ChecksumError(f"{path} (the split store's gate rows) does not match its checksum; {FIX_HINT}")
        from safetensors.torch import load_file

        # load_file maps the file: its pages would come in when first scored, as page cache the process's
        # resident set at open does not show and a memory limit then evicts and faults back in 4 KiB at a
        # time (on the 7B shape 193 MB a token). Copied, they are the process's own memory, counted at open.
        tensors = load_file(str(path))
        layers = range(self.config.num_layers)
        return ([tensors.pop(f"gate.{L}").clone() for L in layers],
                [tensors.pop(f"norms.{L}").clone() for L in layers])

    # ---- geometry -------------------------------------------------------------------------
    def file_path(self, layer: int, precision: str) -> Path:
        return self.path / ffn_file_name(layer, precision)

    def all_files(self) -> list[Path]:
        files = [self.path / e["path"] for e in self._files.values()]
        return files + [self.path / self.manifest["resident"]["path"], self.path / MANIFEST]

    def bundle_bytes(self, precision: str) -> int:
        return self.geometry[precision].bundle_bytes

    def layer_bytes(self, precision: str) -> int:
        """Bytes of one layer's bundles at a precision (no padding): what a tier holds for it."""
        return self.num_neurons * self.bundle_bytes(precision)

    # ---- reads -------------------------------------------------------------------------------
    def read_layer(self, layer: int, precision: str, backend: Backend, need: np.ndarray | None = None) -> torch.Tensor:
        """Every neuron of a layer at a precision: [F, bundle_bytes] uint8, verified (only the blocks in
        ``need`` when given: the others are not used, and a damaged one must not fail the read).

        One read of the whole file, checked against the file's own checksum in one pass (a per-block
        loop costs ~1 µs a block in Python); on a mismatch the blocks locate the damage.
        """
        geom = self.geometry[precision]
        nblocks = geom.num_blocks(self.num_neurons)
        data = self._read_verified(layer, precision, 0, nblocks, need, backend, self._file_crc.get((layer, precision)))
        body = data.reshape(nblocks, geom.block_bytes)[:, : geom.neurons_per_block * geom.bundle_bytes]
        rows = np.ascontiguousarray(body)
        if not rows.flags.writeable:  # unpadded blocks: still the read's immutable bytes; torch wants its own
            rows = rows.copy()
        return torch.from_numpy(rows.reshape(-1, geom.bundle_bytes)[: self.num_neurons])

    def read_neurons(self, layer: int, precision: str, ids: np.ndarray, backend: Backend,
                     pool: Executor | None = None) -> torch.Tensor:
        """Bundles of ``ids`` (any order, unique) at a precision: [n, bundle_bytes] uint8, aligned with ids.

        Reads the blocks that hold them — one read per run of blocks, runs closer than MERGE_GAP_BYTES
        merged into one larger read — and verifies each block it uses. With a ``pool`` the runs are read
        by its threads at once: on a disk whose small reads are latency-bound (measured here: one thread
        0.40 GB/s, eight 0.69 GB/s for 20% of an INT8 layer's neurons), the queue depth is the speed.
        """
        geom = self.geometry[precision]
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_neurons):
            raise IndexError(f"neuron ids must lie in [0, {self.num_neurons})")
        blocks = np.unique(ids // geom.neurons_per_block)
        if self._whole_file_is_cheaper(precision, blocks):
            return self.read_layer(layer, precision, backend, need=blocks)[torch.from_numpy(ids)]
        data = np.empty((len(blocks), geom.block_bytes), np.uint8)  # the blocks kept, filled run by run
        runs = [(first, count, blocks[(blocks >= first) & (blocks < first + count)] - first)
                for first, count in coalesce(blocks, merge_gap(geom))]

        def read_run(run: tuple[int, int, np.ndarray]) -> np.ndarray:
            first, count, need = run
            return self._read_verified(layer, precision, first, count, need, backend, None)

        done = 0
        for (_, count, need), got in zip(runs, pool.map(read_run, runs) if pool and len(runs) > 1 else map(read_run, runs)):
            data[done:done + len(need)] = got.reshape(count, geom.block_bytes)[need]
            done += len(need)
        assert done == len(blocks), "every block kept was read once"
        # the row of each id's block among the blocks kept, then the bundle inside the block
        row = np.searchsorted(blocks, ids // geom.neurons_per_block)
        bundles = data[:, : geom.neurons_per_block * geom.bundle_bytes].reshape(
            len(blocks), geom.neurons_per_block, geom.bundle_bytes
        )
        return torch.from_numpy(np.ascontiguousarray(bundles[row, ids % geom.neurons_per_block]))

    def run_bytes(self, precision: str, ids: np.ndarray) -> int:
        """Bytes read_neurons reads for ids (read amplification and merged gaps included)."""
        geom = self.geometry[precision]
        blocks = np.unique(np.asarray(ids, dtype=np.int64) // geom.neurons_per_block)
        if self._whole_file_is_cheaper(precision, blocks):
            return geom.file_bytes(self.num_neurons)
        return sum(count for _, count in coalesce(blocks, merge_gap(geom))) * geom.block_bytes

    def _whole_file_is_cheaper(self, precision: str, blocks: np.ndarray) -> bool:
        """Needing half of a file's blocks or more, one read and one file checksum beat a checksum call
        (and a read call per run) for every block."""
        return 2 * len(blocks) >= self.geometry[precision].num_blocks(self.num_neurons)

    def _read_verified(self, layer: int, precision: str, first: int, count: int, need: np.ndarray | None,
                       backend: Backend, whole: int | None) -> np.ndarray:
        """Blocks [first, first+count) as uint8; the blocks in ``need`` (all when None) verified, a range
        that fails read again (``read_checked``): never returned corrupt."""
        geom = self.geometry[precision]
        path = self._path_str(layer, precision)
        crcs = self._crcs[(layer, precision)][first : first + count]
        offset, length = first * geom.block_bytes, count * geom.block_bytes
        what = _Describe(self, layer, precision, first, count)  # formatted only for a message

        def bad_block(data: bytes) -> tuple[str, bytes] | None:
            if whole is not None and self.checksum(data) == whole:
                return None
            bad = first_bad_block(data, crcs, geom.block_bytes, self.checksum, need)
            if bad is None:
                return None
            return f"block {first + bad}", bytes(memoryview(data)[bad * geom.block_bytes:(bad + 1) * geom.block_bytes])

        return np.frombuffer(read_checked(backend, path, offset, length, what, bad_block), dtype=np.uint8)

    def _path_str(self, layer: int, precision: str) -> str:
        """The file's path as a string, built once (pathlib costs several µs per join, per read)."""
        key = (layer, precision)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = str(self.file_path(layer, precision))
        return path

    def _describe(self, layer: int, precision: str, first: int, count: int) -> str:
        npb = self.geometry[precision].neurons_per_block
        lo, hi = first * npb, min((first + count) * npb, self.num_neurons) - 1
        return f"FFN layer {layer} {precision} neurons {lo}-{hi}"

    def decode(self, precision: str, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return quant.decode(precision, raw, self.parts, self.hidden, dtype, self.groups)


def merge_gap(geom: BlockGeometry) -> int:
    """Blocks of gap that one read covers rather than splitting into two reads."""
    return MERGE_GAP_BYTES // geom.block_bytes


class _Describe:
    """What a read covers ("FFN layer 3 int4 neurons 0-63"), formatted only when a message needs it."""

    __slots__ = ("store", "args")

    def __init__(self, store: Store, *args: Any) -> None:
        self.store, self.args = store, args

    def __str__(self) -> str:
        return self.store._describe(*self.args)


def first_bad_block(data: bytes, crcs: np.ndarray, block_bytes: int, checksum,
                    need: np.ndarray | None = None) -> int | None:
    """Index of the first block (among ``need``, or all) whose checksum does not match."""
    view = memoryview(data)
    for i in (range(len(crcs)) if need is None else need.tolist()):
        if checksum(view[i * block_bytes : (i + 1) * block_bytes]) != int(crcs[i]):
            return i
    return None


def read_with_retries(backend: Backend, path: str | Path, offset: int, length: int, what: object) -> bytes:
    """Reads, retrying transient SSD errors with bounded exponential backoff (we are in an I/O thread)."""
    for attempt in range(TRANSIENT_RETRIES + 1):
        try:
            return backend.read(path, offset, length)
        except TransientSSDError as e:
            if attempt == TRANSIENT_RETRIES:
                raise TransientSSDError(f"{what}: read failed {attempt + 1} times ({e}); check the disk") from e
            time.sleep(BACKOFF_S * (2**attempt))
    raise AssertionError("unreachable: the retry loop returns or raises")


def read_checked(backend: Backend, path: str | Path, offset: int, length: int, what: object,
                 find_bad: Callable[[bytes], tuple[str, bytes] | None]) -> bytes:
    """``length`` bytes at ``offset`` that ``find_bad`` finds nothing wrong with: transient SSD errors are
    retried (``read_with_retries``); a range whose checksum fails is read again with backoff.

    ``find_bad(data)``: None, or (which part, its bytes) of the first part that fails its checksum. The same
    wrong bytes ``PERSISTENT_READS`` reads in a row are damage on the disk: ``ChecksumError`` (re-create the
    store). Wrong bytes that change from read to read are a flaky read (a busy bus, a failing cable or
    controller): read up to ``CORRUPT_READS`` times, then ``UnstableReadError``, which does not blame the file."""
    seen: list[tuple[str, bytes]] = []
    for attempt in range(CORRUPT_READS):
        data = read_with_retries(backend, path, offset, length, what)
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
