"""Neuron bundle encodings: FP16, INT8 and INT4, each as fixed-size raw bytes per neuron.

A bundle is one neuron's ``[P, D]`` weights (P = 3 parts for a gated FFN: gate row, up row, down
column). Every precision encodes it to ``bundle_bytes(precision, P, D)`` bytes, so a tier can hold
bundles as rows of one ``uint8`` tensor and a file can be addressed by neuron id.

- ``fp16``: the values, ``P*D`` halves.
- ``int8``: symmetric in groups of ``groups.int8`` values along D, one fp32 scale per group:
  ``P*D`` int8 + ``P*D/groups.int8`` fp32. Stores of format version 1 have one scale per row
  (``groups.int8 == D``), which the same layout describes.
- ``int4``: asymmetric in groups of ``groups.int4`` values along D (one fp16 scale and one fp16
  minimum per group): ``P*D/2`` bytes of nibbles + ``P*D/groups.int4`` (scale, min) pairs.

Groups of 32 for both (since format version 2; before: one INT8 scale per row and INT4 groups of 64):
on the demo model, held-out text of another kind than the calibration prose, every neuron at INT8
costs +2.9% perplexity with one scale per row and +1.2% with groups of 32 (top-1 agreement with dense
0.89 -> 0.97); every neuron at INT4 +47% with groups of 64 and +8.4% with groups of 32 (the model's own
source grid is Q4_1, blocks of 32 along the input dimension: gate and up rows land on it exactly, the
down columns do not). A scale per 32 values costs 1/8 byte per value at INT8, 1/8 at INT4.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PRECISIONS = ("fp16", "int8", "int4")
DEFAULT_INT4_GROUP = 32
DEFAULT_INT8_GROUP = 32


@dataclass(frozen=True, slots=True)
class Groups:
    """Values per scale along D, for INT8 and INT4 (the store's ``int8_group`` and ``int4_group``)."""

    int8: int = DEFAULT_INT8_GROUP
    int4: int = DEFAULT_INT4_GROUP

    def check(self, dim: int) -> None:
        if self.int8 <= 0 or dim % self.int8:
            raise ValueError(f"INT8 group size {self.int8} must divide the hidden size {dim}")
        check_int4_group(dim, self.int4)


def bundle_bytes(precision: str, parts: int, dim: int, groups: Groups = Groups()) -> int:
    if precision == "fp16":
        return parts * dim * 2
    if precision == "int8":
        return parts * dim + parts * (dim // groups.int8) * 4
    if precision == "int4":
        return parts * dim // 2 + parts * (dim // groups.int4) * 4
    raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


def part_bytes(precision: str, dim: int, groups: Groups = Groups()) -> tuple[int, int]:
    """(values, scales) bytes of one part of a bundle: every precision lays a bundle out as its parts'
    values one after another, then their scales in the same order."""
    if precision == "fp16":
        return dim * 2, 0
    if precision == "int8":
        return dim, (dim // groups.int8) * 4
    if precision == "int4":
        return dim // 2, (dim // groups.int4) * 4
    raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


def select_parts(precision: str, raw: torch.Tensor, parts: int, dim: int, groups: Groups, first: int,
                 stop: int) -> torch.Tensor:
    """Bundles [n, B] of ``parts`` parts -> bundles [n, B'] of parts ``first``..``stop - 1`` alone, the
    same layout (a part's bytes are moved, never re-quantised): e.g. (1, 3) drops the gate, (0, 1) keeps it."""
    values, scales = part_bytes(precision, dim, groups)
    body = raw[:, first * values:stop * values]
    if not scales:
        return body.contiguous()
    meta = raw[:, parts * values + first * scales:parts * values + stop * scales]
    return torch.cat((body, meta), dim=1)


def join_parts(precision: str, first: torch.Tensor, first_parts: int, second: torch.Tensor, second_parts: int,
               dim: int, groups: Groups) -> torch.Tensor:
    """Bundles [n, B1] of ``first_parts`` parts and [n, B2] of ``second_parts`` -> [n, B1 + B2] bundles of
    both, in the one layout (values of every part, then their scales): ``select_parts``' inverse, e.g. a
    neuron's gate row and its [up|down] bundle into its [gate|up|down] bundle."""
    values, scales = part_bytes(precision, dim, groups)
    # numpy's concatenate copies row by row on the calling thread (an SSD reader's): torch's copy of these
    # uint8 slices measured 0.2 ms alone but 60 ms with 2 intra-op threads on a busy 2-core machine
    f, s = first.numpy(), second.numpy()
    if not scales:
        return torch.from_numpy(np.concatenate((f, s), axis=1))
    a, b = first_parts * values, second_parts * values
    return torch.from_numpy(np.concatenate((f[:, :a], s[:, :b], f[:, a:], s[:, b:]), axis=1))


NORM_CHUNK = 1024  # neurons dequantised at a time: on the 7B shape 50 MB, not a whole layer's 540 MB


def up_down_norms(raw_fp16: torch.Tensor, parts: int, dim: int) -> torch.Tensor:
    """||up_j||·||down_j|| [F] float32 of a layer's FP16 bundles (up and down their last two parts), a chunk
    of neurons at a time: what a gate policy weighs each neuron's gate activation by."""
    out = []
    for chunk in raw_fp16.split(NORM_CHUNK):
        w = decode("fp16", chunk, parts, dim, torch.float32)
        out.append(w[:, -2].norm(dim=1) * w[:, -1].norm(dim=1))
    return torch.cat(out) if out else torch.empty(0)


def check_int4_group(dim: int, group: int) -> None:
    if group <= 0 or dim % group or group % 2:
        raise ValueError(f"INT4 group size {group} must be even and divide the hidden size {dim}")


def int8_scales(raw: torch.Tensor, parts: int, dim: int, group: int) -> torch.Tensor:
    """raw INT8 bundles [n, B] -> their fp32 scales [n, P, D/group]."""
    return raw[:, parts * dim:].contiguous().view(torch.float32).view(raw.shape[0], parts, dim // group)


def encode(precision: str, w: torch.Tensor, groups: Groups = Groups()) -> torch.Tensor:
    """w: [n, P, D] float -> raw bytes [n, bundle_bytes] (uint8)."""
    n, parts, dim = w.shape
    w = w.float()
    if precision == "fp16":
        return w.to(torch.float16).reshape(n, parts * dim).view(torch.uint8)
    groups.check(dim)
    if precision == "int8":
        g = w.reshape(n, parts, dim // groups.int8, groups.int8)
        scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # [n, P, D/group, 1]
        q = torch.round(g / scale).clamp_(-127, 127).to(torch.int8)
        return torch.cat(
            (q.reshape(n, -1).view(torch.uint8), scale.reshape(n, -1).contiguous().view(torch.uint8)), dim=1
        )
    if precision == "int4":
        group = groups.int4
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
    groups: Groups = Groups(), out: torch.Tensor | None = None,
) -> torch.Tensor:
    """raw: [n, bundle_bytes] uint8 -> [n, P, D] in ``dtype`` (written into ``out`` when given)."""
    n = raw.shape[0]
    if precision == "fp16":
        w = raw.view(torch.float16).view(n, parts, dim)
    elif precision == "int8":
        body = parts * dim
        ng = dim // groups.int8
        q = raw[:, :body].view(torch.int8).view(n, parts, ng, groups.int8)
        scale = int8_scales(raw, parts, dim, groups.int8).unsqueeze(-1)
        w = (q.to(dtype) * scale.to(dtype)).view(n, parts, dim)
    elif precision == "int4":
        group = groups.int4
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
