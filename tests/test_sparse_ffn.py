"""The sparse mixed-precision FFN: FP16 groups equal the dense code bit for bit; the weight-only
kernels agree with dequantised weights; masks and splits keep exactly the shares asked for."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2cache.model.llama import ffn_bundles
from m2cache.formats.shares import Shares
from m2cache.model.policy import Policy
from m2cache.model.sparse_ffn import ffn_groups, ffn_masked
from m2cache.formats import quant

D, N, GROUP = 128, 96, quant.Groups(int8=32, int4=32)
# BF16 activations round h and the intermediate products to 8 bits of mantissa: a few parts in a
# thousand per product, about 1% relative on the output norm (measured ~0.6% INT8, ~0.8% INT4)
KERNEL_RTOL = 2e-2


def bundles(seed: int = 0, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, D, generator=g) * 0.1


def raw_of(w: torch.Tensor) -> dict[str, torch.Tensor]:
    return {p: quant.encode(p, w, GROUP) for p in quant.PRECISIONS}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 5])
def test_fp16_only_is_bit_identical_to_ffn_bundles(dtype: torch.dtype, T: int) -> None:
    raw = raw_of(bundles())["fp16"]
    h = torch.randn(T, D).to(dtype)
    want = ffn_bundles(h, quant.decode("fp16", raw, 3, D, dtype), F.silu)
    got = ffn_groups(h, {"fp16": raw}, 3, D, GROUP, F.silu, dtype)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("int8_group", [D, 32])  # one scale per row (format version 1): torch's kernel
def test_int8_kernel_matches_dequantised_reference(T: int, int8_group: int) -> None:
    groups = quant.Groups(int8=int8_group, int4=32)
    raw = quant.encode("int8", bundles(1), groups)
    h = torch.randn(T, D).bfloat16()
    ref = ffn_bundles(h.float(), quant.decode("int8", raw, 3, D, torch.float32, groups), F.silu)
    for kernel in (True, False):  # groups along D are dequantised whatever is asked
        got = ffn_groups(h, {"int8": raw}, 3, D, groups, F.silu, torch.bfloat16, int8_kernel=kernel)
        assert rel_err(got, ref) < KERNEL_RTOL


@pytest.mark.parametrize("T", [1, 4])
def test_int4_kernel_matches_dequantised_reference(T: int) -> None:
    raw = raw_of(bundles(2))["int4"]
    h = torch.randn(T, D).bfloat16()
    ref = ffn_bundles(h.float(), quant.decode("int4", raw, 3, D, torch.float32, GROUP), F.silu)
    got = ffn_groups(h, {"int4": raw}, 3, D, GROUP, F.silu, torch.bfloat16, int4_kernel=True)
    assert rel_err(got, ref) < KERNEL_RTOL


def test_dequantised_groups_add_up_to_each_group_alone() -> None:
    w = bundles(3)
    raw = raw_of(w)
    ids = {"fp16": slice(0, 20), "int8": slice(20, 50), "int4": slice(50, 80)}
    parts = {p: raw[p][s] for p, s in ids.items()}
    h = torch.randn(3, D)
    got = ffn_groups(h, parts, 3, D, GROUP, F.silu, torch.float32)
    want = sum(ffn_bundles(h, quant.decode(p, r, 3, D, torch.float32, GROUP), F.silu) for p, r in parts.items())
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_empty_groups_contribute_nothing() -> None:
    raw = raw_of(bundles())
    h = torch.randn(2, D)
    only = ffn_groups(h, {"fp16": raw["fp16"]}, 3, D, GROUP, F.silu, torch.float32)
    with_empty = ffn_groups(h, {"fp16": raw["fp16"], "int8": raw["int8"][:0]}, 3, D, GROUP, F.silu, torch.float32)
    assert torch.equal(only, with_empty)


def test_masked_batch_equals_per_position_gathered_groups() -> None:
    """The evaluator's batched per-position masks compute what the engine computes token by token."""
    w = bundles(4)
    raw = raw_of(w)
    deq = {p: quant.decode(p, raw[p], 3, D, torch.float32, GROUP) for p in quant.PRECISIONS}
    T = 6
    h = torch.randn(T, D)
    g = torch.Generator().manual_seed(5)
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(T)])  # each position's ranking
    bounds = {"fp16": (0, 10), "int8": (10, 30), "int4": (30, 50)}
    masks = {p: torch.zeros(T, N) for p in bounds}
    for t in range(T):
        for p, (lo, hi) in bounds.items():
            masks[p][t, perm[t, lo:hi]] = 1.0
    got = ffn_masked(h, deq, masks, F.silu)
    for t in range(T):
        parts = {p: raw[p][perm[t, lo:hi].sort().values] for p, (lo, hi) in bounds.items()}
        want = ffn_groups(h[t:t + 1], parts, 3, D, GROUP, F.silu, torch.float32)
        assert torch.allclose(got[t:t + 1], want, rtol=1e-4, atol=1e-5)


def test_policy_split_keeps_each_share_disjoint_and_sorted() -> None:
    pol = Policy(2, 1000, Shares(0.1, 0.2, 0.25))
    order = np.random.default_rng(0).permutation(1000)
    ids = pol.split(0, order)
    assert {p: len(v) for p, v in ids.items()} == {"fp16": 100, "int8": 200, "int4": 250}
    assert set(ids["fp16"]) == set(order[:100])
    assert set(ids["int8"]) == set(order[100:300])
    assert set(ids["int4"]) == set(order[300:550])
    for v in ids.values():
        assert np.all(np.diff(v) > 0)


@pytest.mark.parametrize("shares", [Shares(0.1, 0.2, 0.7), Shares(0.1, 0.2, 0.2), Shares(0.5, 0, 0), Shares(1, 0, 0),
                                    Shares(0, 0.3, 0.3), Shares(0.13, 0.21, 0.27)])
@pytest.mark.parametrize("seed", range(5))
def test_partial_ranking_cuts_the_same_groups_as_a_full_sort(shares: Shares, seed: int) -> None:
    policy = Policy(1, 300, shares)
    scores = torch.randn(300, generator=torch.Generator().manual_seed(seed))
    fast = policy.split(0, policy.rank(0, scores))
    full = policy.split(0, torch.argsort(scores, descending=True).numpy())
    assert fast.keys() == full.keys()
    assert all(np.array_equal(fast[p], full[p]) for p in full)
