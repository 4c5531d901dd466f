"""Rows of one matrix in a safetensors file, read on demand: the embeddings without holding them.

A LLaMA-2-7B embedding matrix is 32000 x 4096 BF16, 262 MB, and a token needs one 8 KB row of it. When
the engine's resident part must be small, :class:`EmbeddingRows` keeps the file open and reads the rows
of the tokens in use (``os.pread``; the page cache keeps the frequent ones), so ``embed[ids]`` gives the
same values as the resident matrix without its bytes.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import torch

from m2cache.errors import StoreError, TruncatedStoreError

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def tensor_extent(path: Path, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(dtype, shape, byte offset of its data) of tensor ``name`` in a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.get(name)
    if meta is None or meta.get("dtype") not in _DTYPES:
        raise StoreError(f"{path} has no tensor {name!r} in a float dtype; the store is incomplete: "
                               "convert the model again")
    return _DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + int(meta["data_offsets"][0])


class EmbeddingRows:
    """``rows[ids]`` -> [len(ids), D] in ``dtype`` on ``device``, read from the file per call."""

    def __init__(self, path: Path, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        self.file_dtype, shape, self.offset = tensor_extent(self.path, name)
        if len(shape) != 2:
            raise StoreError(f"{name} in {path} has shape {shape}; expected [vocab, hidden]")
        self.num_rows, self.dim = shape
        self.row_bytes = self.dim * self.file_dtype.itemsize
        self.dtype, self.device = dtype, torch.device(device)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._lock = threading.Lock()  # close() against a read in flight

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_rows, self.dim)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = [int(i) for i in torch.as_tensor(ids).reshape(-1)]
        bad = [i for i in flat if not 0 <= i < self.num_rows]
        if bad:
            raise IndexError(f"token ids {bad[:4]} are outside the vocabulary of {self.num_rows}")
        buf = bytearray(len(flat) * self.row_bytes)
        with self._lock:
            if self._fd < 0:
                raise RuntimeError(f"{self.path}: the embedding rows were read after close()")
            for k, i in enumerate(flat):
                got = os.preadv(self._fd, [memoryview(buf)[k * self.row_bytes:(k + 1) * self.row_bytes]],
                                self.offset + i * self.row_bytes)
                if got != self.row_bytes:
                    raise TruncatedStoreError(f"{self.path} ends inside embedding row {i}: the file is truncated; "
                                           "convert the model again")
        rows = torch.frombuffer(buf, dtype=self.file_dtype).view(len(flat), self.dim)
        return rows.to(device=self.device, dtype=self.dtype)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
