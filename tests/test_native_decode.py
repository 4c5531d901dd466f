"""The native decode step (``m2cache.actors.native_step``): once DRAM holds every layer of every precision the gate
policy uses, a decode token of one sequence runs as one call, and gives exactly the tokens and logits of the
layer-by-layer step over the same kernels; where DRAM does not hold everything, or for a batch, the layer-by-layer
step runs."""
from __future__ import annotations

import asyncio

import pytest
import torch

from m2cache import Engine, EngineConfig
from m2cache.model import cpu_kernels
from m2cache.storage.reader import SPLIT, Store

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: no native step")

PROMPTS = ([1, 2, 3, 4], [7, 9, 11], [5])


@pytest.fixture(scope="module")
def split_store(tiny_models, tmp_path_factory) -> Store:
    return Store(tiny_models["silu"].store).with_view(SPLIT)  # what a gate policy fetches: up and down


async def run(store, *, native: bool, dtype: str = "float32", policy: str = "gate:0.2,0.3,0.3", prompts=PROMPTS,
              tokens: int = 10, trace: bool = False, **config) -> tuple[list[list[int]], list[torch.Tensor], Engine]:
    """Each prompt alone, greedy; every decode step's logits captured (on the compute thread)."""
    config = {"hbm_budget": "1MB", "dram_budget": "4MB", **config}
    cfg = EngineConfig(policy=policy, dtype=dtype, native_decode=native, trace=True if trace else None, **config)
    logits: list[torch.Tensor] = []
    async with asyncio.timeout(60):
        async with Engine.open(store, cfg) as engine:
            ex = engine.executor
            sample = ex._sample

            def captured(batch, out):
                logits.extend(x.clone() for x in out)
                return sample(batch, out)

            ex._sample = captured
            outs = [[t async for t in engine.generate_ids(p, tokens)] for p in prompts]
    return outs, logits, engine


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["split", "whole"])
async def test_the_native_step_gives_the_layer_by_layer_steps_tokens_and_logits(split_store, tiny_store, dtype: str,
                                                                                 which: str, _no_task_left_behind) -> None:
    store = split_store.path if which == "split" else tiny_store.store
    native, native_logits, engine = await run(store, native=True, dtype=dtype)
    assert engine.executor.native is not None and engine.executor.native.tokens == len(PROMPTS) * 9  # every decode step
    layered, layered_logits, other = await run(store, native=False, dtype=dtype)
    assert other.executor.native is None
    assert native == layered
    assert len(native_logits) == len(layered_logits) == len(PROMPTS) * 10
    assert all(torch.equal(a, b) for a, b in zip(native_logits, layered_logits))


async def test_the_native_step_takes_int8_resident_weights_as_the_layer_path_does(split_store,
                                                                                  _no_task_left_behind) -> None:
    native, a, engine = await run(split_store.path, native=True, resident="int8")
    assert engine.executor.native is not None and engine.executor.native.tokens > 0
    layered, b, _ = await run(split_store.path, native=False, resident="int8")
    assert native == layered and all(torch.equal(x, y) for x, y in zip(a, b))


async def test_without_every_layer_in_dram_the_layers_go_through_the_actors(split_store, _no_task_left_behind) -> None:
    store = split_store
    one_layer = sum(store.layer_bytes(p) for p in ("fp16", "int8", "int4"))
    cfg = dict(dram_budget=one_layer * 2 + store.layer_bytes("fp16"), hbm_budget=0)
    outs, _, engine = await run(store.path, native=True, prompts=PROMPTS[:1], **cfg)
    assert engine.executor.native is None  # DRAM cannot keep every layer: never native
    layered, _, _ = await run(store.path, native=False, prompts=PROMPTS[:1], **cfg)
    assert outs == layered


async def test_a_batch_of_sequences_steps_layer_by_layer_and_one_alone_natively(split_store,
                                                                               _no_task_left_behind) -> None:
    cfg = EngineConfig(hbm_budget="1MB", dram_budget="4MB", policy="gate:0.2,0.3,0.3")
    async with asyncio.timeout(60):
        async with Engine.open(split_store.path, cfg) as engine:
            ex = engine.executor

            async def one(prompt: list[int], n: int) -> list[int]:
                return [t async for t in engine.generate_ids(prompt, n)]

            await asyncio.gather(one([1, 2, 3], 6), one([4, 5], 6))
            batched = ex.native.tokens  # type: ignore[union-attr]
            await one([6, 7], 6)
            assert ex.native.tokens == batched + 5  # type: ignore[union-attr]
            assert max(ex.batch_sizes) == 2


async def test_dense_fp16_never_takes_the_native_step(tiny_store, _no_task_left_behind) -> None:
    _, _, engine = await run(tiny_store.store, native=True, policy="dense-fp16", prompts=PROMPTS[:1], tokens=4)
    assert engine.executor.native is None


async def test_the_native_step_counts_what_the_layer_path_counts_and_traces_each_layer(split_store,
                                                                                     _no_task_left_behind) -> None:
    _, _, native = await run(split_store.path, native=True, prompts=PROMPTS[:1], trace=True)
    _, _, layered = await run(split_store.path, native=False, prompts=PROMPTS[:1])
    a, b = native.stats(), layered.stats()
    assert a["decode_tokens"] == b["decode_tokens"] == 9
    assert a["actors"]["dram"]["served"] == b["actors"]["dram"]["served"]
    assert a["hit_ratio"] == b["hit_ratio"]
    spans = native.recorder.spans()
    layers = split_store.config.num_layers
    decode_steps = {s.step for s in spans if s.kind == "select"}
    assert len(decode_steps) == 9
    for kind in ("attention", "select", "ffn"):
        assert sum(1 for s in spans if s.kind == kind and s.step in decode_steps) == 9 * layers
    assert all(s.end_ns >= s.start_ns for s in spans)


@pytest.mark.parametrize("feature", [{"qk_norm": True}, {"sandwich_norm": True}, {"embed_scale": 8.0},
                                     {"norm_offset": 1.0}, {"qkv_bias": True}, {"sliding_window": 16}])
def test_the_native_step_takes_only_llamas_block(tiny_models, feature: dict) -> None:
    """Other families' extras (Gemma's norms and scalings, Qwen's biases, windows) go through the layer path."""
    import dataclasses

    from m2cache.model.native_decode import _plain_llama

    cfg = Store(tiny_models["silu"].store).config
    assert _plain_llama(cfg)
    assert not _plain_llama(dataclasses.replace(cfg, **feature))
