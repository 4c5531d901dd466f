"""A safetensors file written one tensor at a time: memory bounded by the largest tensor, not the file.

``safetensors.torch.save_file`` takes every tensor at once; a grown model's resident file (2.7 GB) or a
checkpoint shard would then sit in memory whole. The format is simple enough to stream: an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte range (padded with
spaces to a multiple of 8), then the tensors' bytes in that order. The names, shapes and dtypes are
known before any value is made, so the header goes first and each tensor is made, written and dropped.
Files written here are read by ``safetensors.safe_open`` like any other (tested).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch

_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int8: "I8",
           torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}


def write_streamed(path: str | Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                   get: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Writes ``specs``' tensors (name -> (shape, dtype)), each made by ``get(name)`` when its turn comes,
    to ``path``; returns the bytes of tensor data. A tensor whose shape or dtype disagrees with its spec is
    a bug in the caller (the header is already written)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (shape, dtype) in specs.items():
        if dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name here")
        n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (shape, dtype) in specs.items():
            t = get(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{name}: made {tuple(t.shape)} {t.dtype}, its header says {tuple(shape)} {dtype}")
            if t.numel():
                f.write(t.contiguous().view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return offset
