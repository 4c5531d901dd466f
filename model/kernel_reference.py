"""What the CPU kernels compute for a group of FFN rows, in torch: the reference the kernel tests hold them to.

The kernels round where a float product would not: INT8 and INT4 rows meet activations quantised to INT8
(``cpu_kernels.product_input``), and INT8 and INT4 rows' down columns go in blocks of ``DOWN_BLOCK`` rows with
each row's coefficient per group rounded to int16 (INT8 rows) or int8 (INT4 rows) steps of the block's largest
(``csrc/block_down.h``). This module
rounds the same way with torch's operators, so that a test can ask the kernels for float32 agreement instead of
a tolerance wide enough to hide a bug.
"""
from __future__ import annotations

from typing import Callable

import torch

from m2cache.model import cpu_kernels
from m2cache.formats import quant

DOWN_BLOCK = 16  # csrc/block_down.h: rows a block; blocks start at every 16th row of a group, in the order given
# Where the activations a kernel rounds differ from torch's in their last bits (another order of sums, the
# kernels' own exp), a coefficient on the boundary between two int8 steps rounds either way: one step (1/127 of
# the block's largest) moves the FFN's output by ~1e-3 of its largest value at most. An engine's FFN, whose
# activations come from its own kernels, is held to this; a kernel given the same activations, to float32.
BOUNDARY_RTOL = 2e-3


def block_down(precision: str, dim: int, groups: quant.Groups) -> bool:
    """Whether the kernels add ``precision`` rows' down columns in blocks (the C side's rule, ``m2c_block_down``)."""
    lib = cpu_kernels.library()
    group = {"int8": groups.int8, "int4": groups.int4}.get(precision)
    return lib is not None and group is not None and bool(lib.m2c_block_down(cpu_kernels.KINDS[precision], dim, group))


def _rounded(c: torch.Tensor, steps: float) -> torch.Tensor:
    """c [T, n, ng] rounded per block of DOWN_BLOCK rows and group to the nearest of 2 * steps + 1 levels of the
    block's largest |c| (as block_down.h rounds coefficients)."""
    T, n, ng = c.shape
    blocks = -(-n // DOWN_BLOCK)
    padded = torch.zeros(T, blocks * DOWN_BLOCK, ng)
    padded[:, :n] = c
    padded = padded.view(T, blocks, DOWN_BLOCK, ng)
    largest = padded.abs().amax(2, keepdim=True)
    inv = torch.where(largest > 0, steps / largest, torch.zeros_like(largest))
    return (torch.round(padded * inv) * (largest * (1.0 / steps))).view(T, blocks * DOWN_BLOCK, ng)[:, :n]


def int8_down_rounded(acts: torch.Tensor, raw: torch.Tensor, parts: int, dim: int, group: int) -> torch.Tensor:
    """acts [T, n] @ the INT8 rows' down parts -> [T, D], as block_down.h adds them (coefficients act * scale
    rounded to int16 steps of the block's largest per group)."""
    n, ng = raw.shape[0], dim // group
    q = raw[:, (parts - 1) * dim:parts * dim].contiguous().view(torch.int8).view(n, ng, group).float()
    scale = quant.int8_scales(raw, parts, dim, group)[:, parts - 1].float()  # [n, ng]
    coef = _rounded(acts.float().unsqueeze(-1) * scale, 32767.0)
    return torch.einsum("tng,ngk->tgk", coef, q).reshape(acts.shape[0], dim)


def int4_down_rounded(acts: torch.Tensor, raw: torch.Tensor, parts: int, dim: int, group: int) -> torch.Tensor:
    """acts [T, n] @ the INT4 rows' down parts (raw [n, bundle_bytes]) -> [T, D], as block_down.h adds them: per
    block of 16 rows and group of 32 values, c = act * scale rounded to the nearest of 255 steps of the block's
    largest |c|, the minimums' term a * min in float."""
    T, n = acts.shape
    ng, half = dim // group, dim // 2
    down = raw[:, (parts - 1) * half:parts * half]
    codes = torch.stack((down & 15, down >> 4), dim=-1).reshape(n, ng, group).float()  # value 2k: low nibble of k
    meta = raw[:, parts * half:].contiguous().view(torch.float16).view(n, parts, ng, 2)[:, parts - 1].float()
    scale, mins = meta[..., 0], meta[..., 1]  # [n, ng]
    coef = _rounded(acts.float().unsqueeze(-1) * scale, 127.0)
    y = torch.einsum("tng,ngk->tgk", coef, codes) + (acts.float() @ mins).unsqueeze(-1)
    return y.reshape(T, dim)


def ffn(h: torch.Tensor, precision: str, raw: torch.Tensor, parts: int, dim: int, groups: quant.Groups,
        act: Callable[[torch.Tensor], torch.Tensor], gact: torch.Tensor | None = None) -> torch.Tensor:
    """The FFN of one precision group's rows (raw [n, bundle_bytes], in the order the kernel takes them) for h
    [T, D] float32 -> [T, D], as ``cpu_kernels.ffn_group`` computes it; gact [n, T]: a split store's rows' gate
    activations (parts = 2), else the gate part's."""
    x = cpu_kernels.product_input(h, precision, dim, groups)
    w = quant.decode(precision, raw, parts, dim, torch.float32, groups)
    up = x @ w[:, parts - 2].T  # [T, n]
    acts = (act(x @ w[:, 0].T) if gact is None else gact.T) * up
    if precision == "int4" and block_down("int4", dim, groups):
        return int4_down_rounded(acts, raw, parts, dim, groups.int4)
    if precision == "int8" and block_down("int8", dim, groups):
        return int8_down_rounded(acts, raw, parts, dim, groups.int8)
    return acts @ w[:, parts - 1]
