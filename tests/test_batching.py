"""Batched decode: the sequences past their prefill step together, one fetch per layer for all.

Under ``dense-fp16`` a batched request's tokens are the dense model's, whatever it is batched with;
``max_batch`` bounds the batch; a newcomer's prefill runs between decode steps; cancelling one request
of a batch leaves the others' tokens as they were.
"""
from __future__ import annotations

import asyncio

import pytest

from m2cache.engine.engine import Engine
from m2cache.storage.reader import Store
from stress.scenarios import Model, build_tiny, one_torch_thread, tokens_of


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return build_tiny(tmp_path_factory.mktemp("batching"), layers=12)


async def test_concurrent_requests_decode_in_batches_and_each_gets_the_dense_tokens(deep: Model) -> None:
    async with asyncio.timeout(120):
        async with Engine.open(deep.store, deep.config(None)) as engine:
            got = await asyncio.gather(*(tokens_of(engine, deep.prompts[i % 8], 10) for i in range(12)))
            sizes = engine.executor.batch_sizes
    assert got == [deep.reference(i % 8, 10) for i in range(12)]
    assert max(sizes) > 1, sizes


async def test_max_batch_bounds_every_decode_step(deep: Model) -> None:
    async with asyncio.timeout(120):
        async with Engine.open(deep.store, deep.config(None, max_batch=3)) as engine:
            got = await asyncio.gather(*(tokens_of(engine, deep.prompts[i], 6) for i in range(7)))
            sizes = engine.executor.batch_sizes
    assert got == [deep.reference(i, 6) for i in range(7)]
    assert max(sizes) == 3


async def test_a_newcomer_gets_its_first_token_while_a_long_request_still_decodes(deep: Model) -> None:
    async with asyncio.timeout(120):
        async with Engine.open(deep.store, deep.config(None)) as engine:
            long_tokens: list[int] = []
            first_seen_at: list[int] = []

            async def long() -> None:
                async for t in engine.generate_ids(deep.prompts[0], 40):
                    long_tokens.append(t)

            task = asyncio.create_task(long())
            while len(long_tokens) < 3:
                await asyncio.sleep(0.001)
            async for _ in engine.generate_ids(deep.prompts[1], 2):
                first_seen_at.append(len(long_tokens))
                break
            await task
    assert first_seen_at[0] < 40 and long_tokens == deep.reference(0, 40)


async def test_cancelling_one_request_of_a_batch_leaves_the_others_tokens_unchanged(deep: Model) -> None:
    async with asyncio.timeout(120):
        async with Engine.open(deep.store, deep.config(None)) as engine:
            async def cut_short() -> None:
                async for t in engine.generate_ids(deep.prompts[2], 30):
                    if t is not None:
                        raise asyncio.CancelledError  # leaves mid-stream, as a cancelled consumer does

            others = [asyncio.create_task(tokens_of(engine, deep.prompts[i], 12)) for i in (3, 4, 5)]
            victim = asyncio.create_task(cut_short())
            await asyncio.gather(victim, return_exceptions=True)
            got = await asyncio.gather(*others)
            cancelled = engine.run_stats.cancelled
    assert got == [deep.reference(i, 12) for i in (3, 4, 5)]
    assert cancelled == 1


async def test_a_sparse_policy_decodes_a_batch_with_one_plan_per_layer(deep: Model) -> None:
    cfg = deep.config(None, policy="oracle:0.1,0.2,0.2")
    layers = Store(deep.store).config.num_layers
    async with asyncio.timeout(120):
        async with Engine.open(deep.store, cfg) as engine:
            got = await asyncio.gather(*(tokens_of(engine, deep.prompts[i], 6) for i in range(6)))
            steps, handled, sizes = engine.executor.step_no, engine.hbm.stats()["handled"], engine.executor.batch_sizes
    assert all(len(t) == 6 for t in got)
    assert max(sizes) > 1
    assert handled == steps * layers  # one neuron request per layer per step, whatever the batch


def test_batched_attention_projections_match_each_sequence_alone(deep: Model) -> None:
    import torch

    from m2cache.engine.loading import load_resident
    from m2cache.model.llama import KVCache, Rotary, attention_block, attention_rows, rope_slice

    store = Store(deep.store)
    cfg, res = store.config, load_resident(store, torch.float32)
    rope, gen = Rotary(cfg), torch.Generator().manual_seed(0)
    past = [0, 3, 7]  # each sequence at its own position, one with a chunk of 2 rows
    xs = [torch.randn(t, cfg.hidden_size, generator=gen) for t in (1, 2, 1)]
    alone_kv = [KVCache(cfg, torch.float32, "cpu", 16) for _ in xs]
    batch_kv = [KVCache(cfg, torch.float32, "cpu", 16) for _ in xs]
    for kv in alone_kv + batch_kv:
        kv.data.copy_(torch.randn(kv.data.shape, generator=torch.Generator().manual_seed(1)))
    ropes = [rope_slice(rope, p, x.shape[0], torch.float32) for p, x in zip(past, xs)]
    w = res.layers[0]
    alone = [attention_block(cfg, w, x, 0, kv, p, r) for x, kv, p, r in zip(xs, alone_kv, past, ropes)]
    batched = attention_rows(cfg, w, xs, 0, batch_kv, past, ropes)
    for a, b in zip(alone, batched):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(alone_kv, batch_kv):
        torch.testing.assert_close(a.data, b.data, rtol=1e-5, atol=1e-5)


async def test_newcomers_arriving_together_share_one_prefill_step(deep: Model) -> None:
    async with asyncio.timeout(120):
        async with Engine.open(deep.store, deep.config(None)) as engine:
            got = await asyncio.gather(*(tokens_of(engine, deep.prompts[i], 1) for i in range(6)))
            steps = engine.executor.step_no
    assert got == [deep.reference(i, 1) for i in range(6)]
    assert steps < 6


@pytest.mark.parametrize("chunk", [16, None], ids=["chunked", "whole"])
async def test_a_running_stream_gets_tokens_between_the_chunks_of_a_long_prompt(deep: Model, chunk) -> None:
    long_prompt = (deep.prompts[0] * 40)[:160]  # ten chunks of 16
    async with asyncio.timeout(120):
        async with Engine.open(deep.store, deep.config(None, prefill_chunk=chunk)) as engine:
            running: list[int] = []

            async def stream() -> None:
                async for t in engine.generate_ids(deep.prompts[1], 60):
                    running.append(t)

            task = asyncio.create_task(stream())
            while len(running) < 2:
                await asyncio.sleep(0.001)
            seen = len(running)
            async for _ in engine.generate_ids(long_prompt, 1):
                between = len(running) - seen  # the running stream's tokens while the long prompt was prefilled
            await task
    assert running == deep.reference(1, 60)
    if chunk:
        assert between >= 5  # a decode step after each of the ten chunks but the last (its consumer may lag)
    else:
        assert between <= 2  # at most the step in flight when it arrived, and the one before its prefill


async def test_a_prompt_prefilled_in_chunks_gives_the_dense_model_s_tokens(deep: Model) -> None:
    long_prompt = (deep.prompts[2] * 30)[:100]
    from m2cache.engine.dense import DenseGenerator

    want = list(DenseGenerator(str(deep.store), prefill_chunk=16).generate_ids(long_prompt, 8))
    async with asyncio.timeout(120):
        async with Engine.open(deep.store, deep.config(None, prefill_chunk=16)) as engine:
            got = await tokens_of(engine, long_prompt, 8)
    assert got == want
