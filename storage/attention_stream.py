"""Attention weights read per layer from the store's resident file, a few layers ahead of their use.

Under a memory limit that cannot hold every layer's attention projections (0.54 GB in INT8 on the
7B shape's 8 layers), ``resident="stream"`` keeps only ``depth + 1`` layers of them: the layer computing
and the next ``depth``, read with the engine's SSD backend (O_DIRECT under a limit) by one thread while
the layers before them compute. The matrices are the file's own values in the compute dtype, so the
attention is the dense model's. Decoding walks the layers in a cycle, so after the last layer come the
next step's first ones.

Stores written by this version also hold every layer's projections in INT8 (``attention-int8.bin``,
manifest ``attention_int8``: :class:`Int8AttentionLayout`), the same rows and scales the ``int8``
resident form computes at open: streamed from there, a layer is half the bytes read and held (67 MB on
the 7B shape instead of 134 in BF16), one aligned read checked against its checksum, and the attention
is the ``int8`` form's. Older stores stream the resident file's BF16/FP16 matrices.

Synchronous on purpose, like the rest of ``storage``: ``weights(layer)`` blocks until that layer is read
(the executor calls it on its compute thread, where a wait is a stall).
"""
from __future__ import annotations

import math
import mmap
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2cache.errors import ChecksumError
from m2cache.formats.int8 import Int8Weight
from m2cache.formats.config import ModelConfig
from m2cache.storage.layout import ALIGN, CHECKSUM, checksum_fn, round_up
from m2cache.storage.bundle_files import FIX_HINT, read_checked
from m2cache.storage.rows import tensor_extent
from m2cache.storage.ssd import SSDBackend

ATTENTION_INT8 = "attention-int8.bin"


@dataclass(frozen=True)
class Int8AttentionLayout:
    """One layer's region of ``attention-int8.bin``, ``stride`` bytes (a multiple of 4 KiB), layer L at
    ``L * stride``: wqkv's INT8 rows [(H+2KV)*hd, D], wo's INT8 rows [D, H*hd], then their float32 scales (one
    a row, or with ``group`` one per ``group`` values of a row, as the resident INT8 form the CPU kernels read:
    the manifest's ``group``), zero padding to the stride. Quantised as :meth:`Int8Weight.quantize` does at
    open. One scale a row measured +1.15% perplexity on the grown SmolLM2 at 40% where groups of 32 gave
    +0.59% (``docs/results/bench_grown_40pct_policies.txt``): stores written now take groups of 32."""
    qkv_rows: int
    dim: int
    o_cols: int
    group: int = 0

    @classmethod
    def of(cls, cfg: ModelConfig, group: int = 0) -> "Int8AttentionLayout":
        return cls((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size, cfg.num_heads * cfg.head_dim,
                   group)

    @classmethod
    def of_entry(cls, cfg: ModelConfig, entry: dict[str, Any]) -> "Int8AttentionLayout":
        """The layout a store's manifest entry ``attention_int8`` says its file has."""
        return cls.of(cfg, int(entry.get("group", 0)))

    def _scales(self, cols: int) -> int:
        return cols // self.group if self.group else 1

    @property
    def _offsets(self) -> tuple[int, int, int, int]:
        """Byte offsets of wqkv's q, wo's q, wqkv's scales, wo's scales, and where the data ends."""
        o_q = self.qkv_rows * self.dim
        qkv_s = round_up(o_q + self.dim * self.o_cols, 16)
        o_s = qkv_s + 4 * self.qkv_rows * self._scales(self.dim)
        return o_q, qkv_s, o_s, o_s + 4 * self.dim * self._scales(self.o_cols)

    @property
    def stride(self) -> int:
        return round_up(self._offsets[3], ALIGN)

    def held_bytes(self, dtype_bytes: int) -> int:
        """What one layer streamed from the file holds: its region as read, and with one scale a row its
        scales in the compute dtype (groups' float32 scales are used where they lie)."""
        return self.stride + (0 if self.group else (self.qkv_rows + self.dim) * dtype_bytes)

    def pack(self, wqkv: Int8Weight, wo: Int8Weight) -> bytes:
        """A layer's region: the weights quantised with float32 scales."""
        if wqkv.group != self.group or wo.group != self.group:
            raise ValueError(f"weights quantised in groups of {wqkv.group}/{wo.group} for a layout of {self.group}")
        o_q, qkv_s, o_s, end = self._offsets
        buf = np.zeros(self.stride, dtype=np.uint8)
        buf[:o_q] = wqkv.q.numpy().view(np.uint8).reshape(-1)
        buf[o_q:o_q + self.dim * self.o_cols] = wo.q.numpy().view(np.uint8).reshape(-1)
        buf[qkv_s:o_s] = wqkv.scale.float().contiguous().numpy().view(np.uint8).reshape(-1)
        buf[o_s:end] = wo.scale.float().contiguous().numpy().view(np.uint8).reshape(-1)
        return buf.tobytes()

    def unpack(self, data: Any, dtype: torch.dtype) -> tuple[Int8Weight, Int8Weight]:
        """(wqkv, wo) viewing ``data`` (one layer's region; INT8 rows not copied, one scale a row in ``dtype``,
        groups' scales float32 as they lie)."""
        o_q, qkv_s, o_s, end = self._offsets
        raw = torch.frombuffer(data, dtype=torch.uint8)
        q = raw[:qkv_s].view(torch.int8)
        wq, woq = q[:o_q].view(self.qkv_rows, self.dim), q[o_q:o_q + self.dim * self.o_cols].view(self.dim, self.o_cols)
        if self.group:
            return (Int8Weight(wq, raw[qkv_s:o_s].view(torch.float32).view(self.qkv_rows, -1), self.group),
                    Int8Weight(woq, raw[o_s:end].view(torch.float32).view(self.dim, -1), self.group))
        scales = raw[qkv_s:end].view(torch.float32).to(dtype)
        return Int8Weight(wq, scales[:self.qkv_rows]), Int8Weight(woq, scales[self.qkv_rows:])


class AttentionStream:
    """``weights(layer)`` -> (wqkv [(H+2KV)*hd, D], wo [D, H*hd]): INT8 from the store's ``attention_int8``
    file where it has one (``int8``), else the resident file's matrices in the compute dtype."""

    def __init__(self, path: Path, cfg: ModelConfig, dtype: torch.dtype, backend: SSDBackend, depth: int = 1,
                 int8: dict[str, Any] | None = None) -> None:
        self.path, self.num_layers, self.dtype, self.backend = Path(path), cfg.num_layers, dtype, backend
        self.depth = min(depth, self.num_layers - 1)
        self.int8 = None if int8 is None else (self.path.parent / int8["path"], Int8AttentionLayout.of_entry(cfg, int8),
                                               np.frombuffer(int8["crc32"], dtype=np.uint32),
                                               checksum_fn(int8.get("checksum", CHECKSUM)))
        self._extents = [{x: tensor_extent(self.path, f"model.layers.{i}.self_attn.{x}_proj.weight") for x in "qkvo"}
                         for i in range(self.num_layers)] if int8 is None else []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="m2cache-attn")
        self._held: dict[int, Future] = {}
        # INT8 layers are read into buffers reused from layer to layer (a fresh mapping a read made each 14 MB
        # region of the grown SmolLM2 take 25 ms instead of 13: ``storage.ssd``'s _FRESH_FLAGS); a layer's goes
        # back to ``_free`` when it leaves the window, once the executor is past it (``weights`` is called on
        # its compute thread, one layer after another), and its reads run one after another on one thread
        self._buffers: dict[int, mmap.mmap] = {}
        self._free: list[mmap.mmap] = []
        self.bytes_read = 0

    @property
    def layer_bytes(self) -> int:
        """Bytes one held layer takes."""
        if self.int8 is not None:
            return self.int8[1].held_bytes(self.dtype.itemsize)
        ext = self._extents[0]
        return sum(math.prod(ext[x][1]) for x in "qkvo") * self.dtype.itemsize

    def held_layers(self) -> int:
        return self.depth + 1

    def weights(self, layer: int) -> tuple[torch.Tensor | Int8Weight, torch.Tensor | Int8Weight]:
        window = [(layer + j) % self.num_layers for j in range(self.depth + 1)]
        for old in [k for k in self._held if k not in window]:
            self._drop(old)  # the oldest first: room before the next read starts
        for k in window:
            if k not in self._held:
                if self.int8 is None:
                    self._held[k] = self._pool.submit(self._read, k)
                else:
                    buf = self._buffers[k] = self._free.pop() if self._free else mmap.mmap(-1, self._span())
                    self._held[k] = self._pool.submit(self._read_int8, k, buf)
        try:
            return self._held[layer].result()
        except BaseException:
            self._drop(layer)  # a failed read is not kept: the next step that needs the layer reads again
            raise

    def _drop(self, layer: int) -> None:
        del self._held[layer]
        buf = self._buffers.pop(layer, None)
        if buf is not None:
            self._free.append(buf)

    def _span(self) -> int:
        """A buffer that takes a layer's region with the alignment O_DIRECT reads round it to on both sides."""
        assert self.int8 is not None
        return self.int8[1].stride + 2 * mmap.PAGESIZE

    def _read_int8(self, layer: int, buf: mmap.mmap | None = None) -> tuple[Int8Weight, Int8Weight]:
        """One layer's region, checked: transient SSD errors retried, a region whose checksum fails read
        again (``read_checked``: the same wrong bytes three times is a damaged file)."""
        assert self.int8 is not None
        path, layout, crcs, checksum = self.int8
        what = f"{path} (layer {layer}'s INT8 attention)"

        def bad_region(data: bytes) -> tuple[str, bytes] | None:
            return None if checksum(data) == int(crcs[layer]) else ("the region", bytes(data))

        data = read_checked(self.backend, path, layer * layout.stride, layout.stride, what, bad_region, into=buf)
        if isinstance(data, bytes):  # a buffered read: torch wants a writable buffer
            data = bytearray(data)
        self.bytes_read += layout.stride
        return layout.unpack(data, self.dtype)

    def _read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        ext = self._extents[layer]
        rows = [ext[x][1][0] for x in "qkv"]
        wqkv = torch.empty(sum(rows), ext["q"][1][1], dtype=self.dtype)
        start = 0
        for x, n in zip("qkv", rows):
            wqkv[start:start + n] = self._tensor(ext[x])
            start += n
        return wqkv, self._tensor(ext["o"]).to(self.dtype).contiguous()

    def _tensor(self, extent: tuple[torch.dtype, tuple[int, ...], int]) -> torch.Tensor:
        file_dtype, shape, offset = extent
        nbytes = math.prod(shape) * file_dtype.itemsize
        data = self.backend.read(self.path, offset, nbytes)
        if isinstance(data, bytes):  # a buffered read: torch wants a writable buffer
            data = bytearray(data)
        self.bytes_read += nbytes
        return torch.frombuffer(data, dtype=file_dtype).view(shape)

    def close(self) -> None:
        self._held.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._buffers.clear()  # the mappings go when the last tensor viewing them does
        self._free.clear()


def verify_int8_file(store: Path, entry: dict[str, Any], num_layers: int) -> None:
    """Checks every layer's region of a store's INT8 attention file (ChecksumError naming the first bad one)."""
    path, fn = store / entry["path"], checksum_fn(entry.get("checksum", CHECKSUM))
    crcs = np.frombuffer(entry["crc32"], dtype=np.uint32)
    with open(path, "rb") as f:
        for layer in range(num_layers):
            if fn(f.read(entry["layer_bytes"])) != int(crcs[layer]):
                raise ChecksumError(f"{path} (layer {layer}'s INT8 attention) does not match its checksum; {FIX_HINT}")
