"""Every policy shape runs in every compute dtype: finite logits, and the greedy tokens of the FP32
run of the same policy, on the real demo model through the real engine.

The shapes cover one, two and three precision groups, with and without skipped neurons, and group
sizes that are not multiples of the CPU kernels' blocks of 16 (the INT8 weight-only kernel once read
past its inputs there and turned every BF16 logit into NaN). The ranking is the oracle's, so no
predictor has to be trained for the suite.
"""
from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from m2cache import Engine, EngineConfig
from m2cache.model.sparse_ffn import ffn_groups
from m2cache.model.llama import ffn_bundles
from m2cache.formats import quant

SHAPES = (
    "1,0,0", "0,1,0", "0,0,1",  # one group, every neuron
    "0.5,0.5,0", "0,0.5,0.5", "0.5,0,0.5",  # two groups
    "0.1,0.2,0.7",  # three groups: the shape that produced NaN in BF16
    "0,0.4,0", "0.13,0.21,0.27", "0.05,0.1,0.15",  # skipped neurons, odd group sizes
)
PROMPT = "Why is the sky blue?"
NEW_TOKENS = 6
_fp32_tokens: dict[str, list[int]] = {}  # the reference run of each shape, shared by both dtypes


async def greedy(store, policy: str, dtype: str) -> list[int]:
    cfg = EngineConfig(hbm_budget="1GB", dram_budget="1GB", policy=f"oracle:{policy}", dtype=dtype)
    async with asyncio.timeout(120):
        async with Engine.open(store, cfg) as engine:
            ids = engine.tokenizer.encode(PROMPT)
            return [t async for t in engine.generate_ids(ids, NEW_TOKENS)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shares", SHAPES)
async def test_policy_shape_in_low_precision_decodes_the_fp32_tokens(demo_store, shares: str, dtype: str,
                                                                     _no_task_left_behind) -> None:
    if shares not in _fp32_tokens:
        _fp32_tokens[shares] = await greedy(demo_store.store, shares, "float32")
    want = _fp32_tokens[shares]
    got = await greedy(demo_store.store, shares, dtype)
    assert got == want


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("n", [1, 7, 100, 307, 333])
def test_weight_only_kernels_handle_group_sizes_off_their_blocks(precision: str, n: int) -> None:
    D, group = 576, quant.Groups(int8=576, int4=64)  # one INT8 scale per row: torch's kernel
    w = torch.randn(n, 3, D, generator=torch.Generator().manual_seed(n)) * 0.05
    raw = quant.encode(precision, w, group)
    h = torch.randn(2, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = ffn_bundles(h.float(), quant.decode(precision, raw, 3, D, torch.float32, group), F.silu)
    kernels = {"int8_kernel": True} if precision == "int8" else {"int4_kernel": True}
    got = ffn_groups(h, {precision: raw}, 3, D, group, F.silu, torch.bfloat16, **kernels)
    assert torch.isfinite(got).all()
    assert float((got.float() - ref).norm() / ref.norm()) < 2e-2
