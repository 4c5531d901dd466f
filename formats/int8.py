"""Resident weights in INT8: the attention projections and the LM head at half their BF16 bytes.

A matrix ``W: [out, in]`` is kept as ``q: int8 [out, in]`` and one scale per output row
(``W ≈ q * scale[:, None]``, symmetric, ``|q| <= 127``), or one float32 scale per ``group`` values of a row
(``group=32``: as llama.cpp's Q8_0 and the store's INT8 neurons; the form the CPU kernels read, which
measured as good as the compute dtype's weights on held-out text where one scale a row cost +0.3% perplexity:
``docs/results/eval_resident_int8_groups.txt``). The product goes through torch's weight-only
INT8 kernel (``_weight_int8pack_mm``; one scale a row only), which reads the INT8 bytes and never builds the float matrix: on
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

RESIDENT_GROUP = 32  # values per scale of the resident INT8 form where the CPU kernels read it
_ROWS_PER_CHUNK = 1024  # quantise this many rows at a time: the float transient stays small
_KERNEL: dict[tuple[str, torch.dtype], bool] = {}  # (device type, dtype) -> torch has the INT8 kernel for it


@dataclass(slots=True)
class Int8Weight:
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # group 0: [out], in the compute dtype; else [out, in / group] float32
    group: int = 0  # values a scale covers along a row; 0: the whole row

    @classmethod
    def quantize(cls, w: torch.Tensor, dtype: torch.dtype, group: int = 0) -> "Int8Weight":
        """w: [out, in], any float dtype -> INT8 rows and their scales (``dtype``: the compute dtype), one per
        row (``group=0``) or per ``group`` values of a row."""
        out, cols = w.shape
        if group and cols % group:
            raise ValueError(f"an INT8 group of {group} values must divide the rows' {cols}")
        per = cols // group if group else 1
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(out, per, dtype=torch.float32, device=w.device)
        for start in range(0, out, _ROWS_PER_CHUNK):
            rows = w[start:start + _ROWS_PER_CHUNK].float().view(-1, per, cols // per)
            s = rows.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / 127.0
            q[start:start + _ROWS_PER_CHUNK] = torch.round(rows / s).clamp_(-127, 127).to(torch.int8).view(-1, cols)
            scale[start:start + _ROWS_PER_CHUNK] = s.squeeze(2)
        return cls(q, scale.contiguous(), group) if group else cls(q, scale.view(out).to(dtype))

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    def rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``ids`` dequantised: [n, in] (in the compute dtype, or ``dtype``)."""
        dtype = dtype or (self.scale.dtype if not self.group else torch.float32)
        if not self.group:
            return self.q[ids].to(dtype) * self.scale[ids, None].to(dtype)
        q = self.q[ids].view(len(ids), -1, self.group).float()
        return (q * self.scale[ids].unsqueeze(-1)).view(len(ids), -1).to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> x @ W.T: [T, out], in x's dtype."""
        if self.group:  # torch has no kernel for groups: a block of rows dequantised at a time
            # in float32 on the CPU: torch's bfloat16 products there (no AVX-512 BF16) are several times slower
            # than its float32 ones, and a block's float32 copy is small (1024 rows)
            work = torch.float32 if x.device.type == "cpu" else x.dtype
            xw = x.to(work)
            out = torch.empty(x.shape[0], self.q.shape[0], dtype=x.dtype, device=x.device)
            for start in range(0, self.q.shape[0], _ROWS_PER_CHUNK):
                ids = torch.arange(start, min(start + _ROWS_PER_CHUNK, self.q.shape[0]), device=self.q.device)
                out[:, start:start + len(ids)] = F.linear(xw, self.rows(ids, work))
            return out
        key = (x.device.type, x.dtype)
        if _KERNEL.get(key, True):
            try:
                return torch._weight_int8pack_mm(x, self.q, self.scale.to(x.dtype))
            except (RuntimeError, NotImplementedError):  # no INT8 kernel for this device or dtype: once
                _KERNEL[key] = False
        return F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)


def scale_group(w: torch.Tensor | Int8Weight) -> int:
    """Values a scale covers along a row of a resident matrix: an INT8 one's group (0: one scale a row); 0 for a
    matrix in the compute dtype."""
    return w.group if isinstance(w, Int8Weight) else 0


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``F.linear(x, w)`` for a resident weight in either form."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w.linear(x)
