"""Attention weights read per layer from the store's resident file, a few layers ahead of their use.

Under a memory limit that cannot hold every layer's attention projections (0.54 GB in INT8 on the
7B shape's 8 layers), ``resident="stream"`` keeps only ``depth + 1`` layers of them: the layer computing
and the next ``depth``, read with the engine's SSD backend (O_DIRECT under a limit) by one thread while
the layers before them compute. The matrices are the file's own values in the compute dtype, so the
attention is the dense model's. Decoding walks the layers in a cycle, so after the last layer come the
next step's first ones.

Synchronous on purpose, like the rest of ``storage``: ``weights(layer)`` blocks until that layer is read
(the executor calls it on its compute thread, where a wait is a stall).
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from m2cache.storage.rows import tensor_extent


class AttentionStream:
    """``weights(layer)`` -> (wqkv [(H+2KV)*hd, D], wo [D, H*hd]) in the compute dtype."""

    def __init__(self, path: Path, num_layers: int, dtype: torch.dtype, backend, depth: int = 2) -> None:
        self.path, self.num_layers, self.dtype, self.backend = Path(path), num_layers, dtype, backend
        self.depth = min(depth, num_layers - 1)
        self._extents = [{x: tensor_extent(self.path, f"model.layers.{i}.self_attn.{x}_proj.weight") for x in "qkvo"}
                         for i in range(num_layers)]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="m2cache-attn")
        self._held: dict[int, Future] = {}
        self.bytes_read = 0

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's projections in the compute dtype (what each held layer takes)."""
        ext = self._extents[0]
        return sum(math.prod(ext[x][1]) for x in "qkvo") * self.dtype.itemsize

    def held_layers(self) -> int:
        return self.depth + 1

    def weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = [(layer + j) % self.num_layers for j in range(self.depth + 1)]
        for old in [k for k in self._held if k not in window]:
            del self._held[old]  # the oldest first: room before the next read starts
        for k in window:
            if k not in self._held:
                self._held[k] = self._pool.submit(self._read, k)
        return self._held[layer].result()

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

