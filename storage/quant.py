"""Neuron bundle encodings: FP16, INT8 and INT4, each as fixed-size raw bytes per neuron.

A bundle is one neuron's ``[P, D]`` weights (P = 3 parts for a gated FFN: gate row, up row, down
column). Every precision encodes it to ``bundle_bytes(precision, P, D)`` bytes, so a tier can hold
bundles as rows of one ``uint8`` tensor and a file can be addressed by neuron id.

- ``fp16``: the values, ``P*D`` halves.
- ``int8``: symmetric, one fp32 scale per part (per neuron row): ``P*D`` int8 + ``P`` fp32.
- ``int4``: asymmetric in groups of ``group`` values along D (one fp16 scale and one fp16 minimum
  per group): ``P*D/2`` bytes of nibbles + ``P*D/group`` (scale, min) pairs. One scale per whole row
  is too crude for INT4 (DESIGN.md §3), hence groups.
"""
from __future__ import annotations

import torch

PRECISIONS = ("fp16", "int8", "int4")
DEFAULT_INT4_GROUP = 64


def bundle_bytes(precision: str, parts: int, dim: int, group: int = DEFAULT_INT4_GROUP) -> int:
    if precision == "fp16":
        return parts * dim * 2
    if precision == "int8":
        return parts * dim + parts * 4
    if precision == "int4":
        return parts * dim // 2 + parts * (dim // group) * 4
    raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


def check_int4_group(dim: int, group: int) -> None:
    if group <= 0 or dim % group or group % 2:
        raise ValueError(f"INT4 group size {group} must be even and divide the hidden size {dim}")


def encode(precision: str, w: torch.Tensor, group: int = DEFAULT_INT4_GROUP) -> torch.Tensor:
    """w: [n, P, D] float -> raw bytes [n, bundle_bytes] (uint8)."""
    n, parts, dim = w.shape
    w = w.float()
    if precision == "fp16":
        return w.to(torch.float16).reshape(n, parts * dim).view(torch.uint8)
    if precision == "int8":
        scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # [n, P, 1]
        q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
        return torch.cat(
            (q.reshape(n, -1).view(torch.uint8), scale.reshape(n, parts).contiguous().view(torch.uint8)), dim=1
        )
    if precision == "int4":
        check_int4_group(dim, group)
        g = w.reshape(n, parts, dim // group, group)
        lo = g.amin(dim=-1, keepdim=True)
        hi = g.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15.0).clamp_min(1e-12)
        # store scale/min as fp16 and quantise against those rounded values, so decode inverts exactly
        scale16, lo16 = scale.to(torch.float16), lo.to(torch.float16)
        q = torch.round((g - lo16.float()) / scale16.float()).clamp_(0, 15).to(torch.uint8)
        q = q.reshape(n, parts * dim)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)  # [n, P*D/2]
        meta = torch.cat((scale16, lo16), dim=-1).reshape(n, -1).contiguous().view(torch.uint8)
        return torch.cat((packed, meta), dim=1)
    raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


_NIBBLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _nibble_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256] entries, each the two values (b & 15, b >> 4) of byte b in ``dtype`` packed into one
    element twice as wide: a gather of these, viewed as ``dtype``, is the unpacked sequence."""
    key = (dtype, device)
    if key not in _NIBBLES:
        b = torch.arange(256)
        pairs = torch.stack((b & 15, b >> 4), dim=1).to(dtype).contiguous()
        wide = {4: torch.int64, 2: torch.int32}[pairs.element_size()]
        _NIBBLES[key] = pairs.view(wide).view(256).to(device)
    return _NIBBLES[key]


def decode(
    precision: str, raw: torch.Tensor, parts: int, dim: int, dtype: torch.dtype,
    group: int = DEFAULT_INT4_GROUP, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """raw: [n, bundle_bytes] uint8 -> [n, P, D] in ``dtype`` (written into ``out`` when given)."""
    n = raw.shape[0]
    if precision == "fp16":
        w = raw.view(torch.float16).view(n, parts, dim)
    elif precision == "int8":
        body = parts * dim
        q = raw[:, :body].view(torch.int8).view(n, parts, dim)
        scale = raw[:, body:].contiguous().view(torch.float32).view(n, parts, 1)
        w = q.to(dtype) * scale.to(dtype)
    elif precision == "int4":
        body = parts * dim // 2
        # one table lookup turns each byte into its two nibbles' values, in order (low nibble first):
        # three torch calls instead of seven for unpack, interleave, convert, scale and shift
        codes = raw[:, :body].reshape(-1).int()
        q = _nibble_table(dtype, raw.device).index_select(0, codes).view(dtype).view(n, parts, dim // group, group)
        meta = raw[:, body:].contiguous().view(torch.float16).view(n, parts, dim // group, 2)
        scale, lo = meta[..., :1].to(dtype), meta[..., 1:].to(dtype)
        w = torch.addcmul(lo, q, scale).view(n, parts, dim)
    else:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if out is not None:
        out.copy_(w)
        return out
    return w.to(dtype)
