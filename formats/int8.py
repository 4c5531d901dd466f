"""Resident weights in INT8: the attention projections and the LM head at half their BF16 bytes.

A matrix ``W: [out, in]`` is kept as ``q: int8 [out, in]`` and one scale per output row
(``W ≈ q * scale[:, None]``, symmetric, ``|q| <= 127``). The product goes through torch's weight-only
INT8 kernel (``_weight_int8pack_mm``), which reads the INT8 bytes and never builds the float matrix: on
the 2-core CPU, for a 12288x4096 matrix and one BF16 row, 8.3 ms against 29 ms for ``F.linear`` over the
BF16 matrix (the product is memory-bound, and it reads half the bytes). Where that kernel is missing
(an older build, or a device without it) the rows are dequantised per call.

Used when the engine's resident part must be small (``EngineConfig.resident="int8"``); the quality
cost is measured by ``m2cache eval --resident int8``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_ROWS_PER_CHUNK = 1024  # quantise this many rows at a time: the float transient stays small
_KERNEL: dict[tuple[str, torch.dtype], bool] = {}  # (device type, dtype) -> torch has the INT8 kernel for it


@dataclass(slots=True)
class Int8Weight:
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # [out], in the compute dtype

    @classmethod
    def quantize(cls, w: torch.Tensor, dtype: torch.dtype) -> "Int8Weight":
        """w: [out, in], any float dtype -> INT8 rows and their scales (``dtype``: the compute dtype)."""
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        for start in range(0, w.shape[0], _ROWS_PER_CHUNK):
            rows = w[start:start + _ROWS_PER_CHUNK].float()
            s = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q[start:start + _ROWS_PER_CHUNK] = torch.round(rows / s[:, None]).clamp_(-127, 127).to(torch.int8)
            scale[start:start + _ROWS_PER_CHUNK] = s
        return cls(q, scale.to(dtype))

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` dequantised to the compute dtype: [n, in]."""
        return self.q[ids].to(self.scale.dtype) * self.scale[ids, None]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> x @ W.T: [T, out], in x's dtype."""
        key = (x.device.type, x.dtype)
        if _KERNEL.get(key, True):
            try:
                return torch._weight_int8pack_mm(x, self.q, self.scale.to(x.dtype))
            except (RuntimeError, NotImplementedError):  # no INT8 kernel for this device or dtype: once
                _KERNEL[key] = False
        return F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``F.linear(x, w)`` for a resident weight in either form."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w.linear(x)
