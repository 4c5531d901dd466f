"""The sparse mixed-precision FFN over gathered raw neuron bundles.

The engine gathers, per precision, the kept neurons' raw bundles from its device pool (``raw[p]:
[n_p, bundle_bytes] uint8``) and calls ``ffn_groups``. Each precision group is one gate, one up and
one down product; the groups' outputs add up (the FFN is a sum over neurons, so splitting the kept
set by precision changes nothing but each group's weights).

- FP16 groups go through exactly the dense model's code (decode, then ``ffn_bundles``), so the
  policy "every neuron at FP16" reproduces the dense model bit for bit.
- INT8 groups with one scale per row (stores of format version 1) use ``torch._weight_int8pack_mm``
  on the CPU when the compute dtype is BF16 (the kernel wants BF16 activations: with FP32 ones it is
  ten times slower, docs/architecture.md §7), or apply the scales to the products; INT8 in groups along D (the
  kernel takes one scale per output row only) is dequantised and multiplied in the compute dtype.
- INT4 groups use ``torch._weight_int4pack_mm_for_cpu`` for gate and up only when asked
  (``int4_kernel=True``): its packed layout differs from the store's, so each call repacks the gathered
  rows, which costs about what dequantising does; by default INT4 rows are dequantised. The down part
  is always dequantised: its groups run along the output dimension, which the kernel cannot express.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from m2cache.model.llama import ffn_bundles
from m2cache.formats import quant

GATED_PARTS = 3


def ffn_groups(
    h: torch.Tensor, raw: dict[str, torch.Tensor], parts: int, dim: int, groups: quant.Groups, act, dtype: torch.dtype,
    *, int8_kernel: bool | None = None, int4_kernel: bool = False, gacts: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sum over precision groups of the FFN restricted to that group's neurons. h: [T, D] -> [T, D].

    ``int8_kernel``: None picks the weight-only kernel where it helps (CPU, BF16); True/False force it.
    ``gacts``: a split store's (up, down) bundles take their gate activations from here ([n_p, T] each).
    """
    if gacts is not None:
        return ffn_split(h, raw, dim, groups, dtype, gacts)
    if parts != GATED_PARTS:
        raise RuntimeError(f"ffn_groups computes gated FFNs (3 parts per bundle), got {parts}")
    out: torch.Tensor | None = None
    for precision, rows in raw.items():
        if rows.shape[0] == 0:
            continue
        if precision == "fp16":
            y = ffn_bundles(h, quant.decode("fp16", rows, parts, dim, dtype), act)
        elif precision == "int8" and groups.int8 == dim and _use_int8_kernel(h, dtype, int8_kernel):
            y = ffn_int8_kernel(h, rows, dim, act)
        elif precision == "int8" and groups.int8 == dim:
            y = ffn_int8_scaled(h, rows, dim, act, dtype)
        elif precision == "int4" and int4_kernel and h.device.type == "cpu":
            y = ffn_int4_kernel(h, rows, dim, groups.int4, act, dtype)
        else:
            y = ffn_bundles(h, quant.decode(precision, rows, parts, dim, dtype, groups), act)
        out = y if out is None else out.add_(y)
    if out is None:
        return torch.zeros_like(h)
    return out.to(dtype)


def ffn_split(h: torch.Tensor, raw: dict[str, torch.Tensor], dim: int, groups: quant.Groups, dtype: torch.dtype,
              gacts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The FFN over split (up, down) bundles, each neuron's gate activation given ([n_p, T] per precision)."""
    out = torch.zeros(h.shape[0], dim, dtype=dtype, device=h.device)
    for precision, rows in raw.items():
        if rows.shape[0] == 0:
            continue
        w = quant.decode(precision, rows, 2, dim, dtype, groups)  # [n, 2, D]
        a = gacts[precision].T.to(device=h.device, dtype=dtype) * F.linear(h.to(dtype), w[:, 0])
        out += a @ w[:, 1]
    return out


# torch's CPU ``_weight_int8pack_mm`` walks the reduction dimension K in blocks of 16 and reads past
# the end of A and B when K is not a multiple of 16: NaN outputs, or a crash (seen with K=300). The
# hidden size must be one; the down product's K (the group's neuron count) is padded with zeros.
INT8_KERNEL_K = 16
INT4_KERNEL_N = 16  # ``_convert_weight_to_int4pack_for_cpu`` refuses other output sizes


def _use_int8_kernel(h: torch.Tensor, dtype: torch.dtype, forced: bool | None) -> bool:
    if h.device.type != "cpu" or h.shape[-1] % INT8_KERNEL_K:
        return False
    if forced is not None:
        return forced
    return dtype == torch.bfloat16


def _int8_parts(rows: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """raw INT8 bundles with one scale per row [n, B] -> int8 values [n, 3, D] (a strided view) and fp32
    scales [n, 3]."""
    n, body = rows.shape[0], GATED_PARTS * dim
    q = rows[:, :body].view(torch.int8).view(n, GATED_PARTS, dim)
    return q, quant.int8_scales(rows, GATED_PARTS, dim, dim).view(n, GATED_PARTS)


def ffn_int8_kernel(h: torch.Tensor, rows: torch.Tensor, dim: int, act) -> torch.Tensor:
    """INT8 group with the CPU weight-only kernel: BF16 activations, per-row scales. -> [T, D] BF16."""
    q, scale = _int8_parts(rows, dim)
    hb = h.to(torch.bfloat16)
    sb = scale.to(torch.bfloat16)
    # gate and up rows in one kernel call: B = [2n, D] (the kernel needs B contiguous)
    gu = torch._weight_int8pack_mm(hb, q[:, :2].transpose(0, 1).reshape(-1, dim), sb[:, :2].t().reshape(-1))
    n = rows.shape[0]
    a = act(gu[:, :n]) * gu[:, n:]  # [T, n]
    # down: out = (a * s_down) @ q_down; the kernel multiplies by B^T with B = q_down^T [D, n_pad],
    # n padded to the kernel's K block with zero activations and zero weights (they add nothing)
    pad = -n % INT8_KERNEL_K
    a_pad = F.pad(a * sb[:, 2], (0, pad))
    b_pad = F.pad(q[:, 2].t(), (0, pad)).contiguous()
    ones = torch.ones(dim, dtype=torch.bfloat16, device=h.device)
    return torch._weight_int8pack_mm(a_pad, b_pad, ones)


def ffn_int8_scaled(h: torch.Tensor, rows: torch.Tensor, dim: int, act, dtype: torch.dtype) -> torch.Tensor:
    """INT8 group without a kernel: the per-row scales are applied to the [T, n] products instead of
    to the [n, 3, D] weights, so the only full-size pass is the int8 -> float conversion."""
    q, scale = _int8_parts(rows, dim)
    w = q.to(dtype)  # [n, 3, D]
    s = scale.to(dtype)
    gate = F.linear(h, w[:, 0]) * s[:, 0]  # [T, n]
    up = F.linear(h, w[:, 1]) * s[:, 1]
    return (act(gate) * up * s[:, 2]) @ w[:, 2]  # [T, D]


def _int4_parts(rows: torch.Tensor, dim: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw INT4 bundles -> nibbles [n, 3, D] (uint8), scales and minimums [n, 3, D/group] (fp16)."""
    n, body = rows.shape[0], GATED_PARTS * dim // 2
    packed = rows[:, :body]
    q = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(n, GATED_PARTS, dim)
    meta = rows[:, body:].contiguous().view(torch.float16).view(n, GATED_PARTS, dim // group, 2)
    return q, meta[..., 0], meta[..., 1]


def ffn_int4_kernel(h: torch.Tensor, rows: torch.Tensor, dim: int, group: int, act, dtype: torch.dtype) -> torch.Tensor:
    """INT4 group: gate and up with the CPU INT4 kernel (BF16), down dequantised. -> [T, D]."""
    n = rows.shape[0]
    q, scale, lo = _int4_parts(rows, dim, group)
    pad = -2 * n % INT4_KERNEL_N  # the packer wants N = 2n a multiple of 16: zero rows, sliced off below
    gu_q = F.pad(q[:, :2].transpose(0, 1).reshape(2 * n, dim).to(torch.int32), (0, 0, 0, pad))
    packed = torch._convert_weight_to_int4pack_for_cpu(gu_q, 1)
    # the kernel computes (q - 8) * scale + zero; the store's code is q * scale + lo
    s = F.pad(scale[:, :2].transpose(0, 1).reshape(2 * n, -1).float(), (0, 0, 0, pad))
    zero = F.pad(lo[:, :2].transpose(0, 1).reshape(2 * n, -1).float(), (0, 0, 0, pad)) + 8 * s
    sz = torch.stack((s, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [D/g, 2n+pad, 2]
    gu = torch._weight_int4pack_mm_for_cpu(h.to(torch.bfloat16), packed, group, sz)[:, : 2 * n]
    a = (act(gu[:, :n]) * gu[:, n:]).to(dtype)
    down = (q[:, 2].view(n, dim // group, group).to(dtype) * scale[:, 2, :, None].to(dtype)
            + lo[:, 2, :, None].to(dtype)).view(n, dim)
    return a @ down


def ffn_masked(h: torch.Tensor, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], act) -> torch.Tensor:
    """Every position with its own kept set: the batched equal of ``ffn_groups`` over dequantised weights.

    h: [T, D]; weights[p]: [F, 3, D] (all neurons, dequantised); masks[p]: [T, F] (1 where position t keeps
    neuron j at precision p). Skipped neurons contribute exactly zero, as in the per-token engine.
    """
    out: torch.Tensor | None = None
    for p, m in masks.items():
        W = weights[p]
        a = act(F.linear(h, W[:, 0])) * F.linear(h, W[:, 1]) * m  # [T, F]
        y = a @ W[:, 2]
        out = y if out is None else out + y
    assert out is not None, "ffn_masked needs at least one precision group"
    return out
