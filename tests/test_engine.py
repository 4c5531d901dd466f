"""The actor runtime end to end: the tiered engine over a simulated slow SSD gives the dense model's
greedy tokens under tight budgets, refuses budgets that cannot work, never exceeds its budgets,
survives cancelled and concurrent requests, and fails a request whose store file goes bad with a
typed error, then closes cleanly.

Budgets are shares of the model's FP16 FFN bytes: HBM 20%, DRAM 30%. The tiny models have many
layers (hidden 64, 128 neurons) so that those shares still hold whole layers.
"""
from __future__ import annotations

import asyncio
import re

import pytest

from m2cache.engine.engine import Engine
from m2cache.errors import BudgetError, EngineClosedError, SSDError
from m2cache.model import kernel_reference
from stress.scenarios import (
    SLOW_SSD, Model, Watchdog, build_tiny, check_each_ffn, consume, load_model, one_torch_thread, tokens_of,
)

TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """20 layers, SiLU, untied LM head."""
    return build_tiny(tmp_path_factory.mktemp("engine"), layers=20)


@pytest.fixture(scope="module")
def deep_relu(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """10 layers, gated ReLU, LM head tied to the embeddings."""
    return build_tiny(tmp_path_factory.mktemp("engine-relu"), layers=10, seed=11, hidden_act="relu",
                      tie_word_embeddings=True)


def assert_within_budgets(engine: Engine) -> None:
    st = engine.stats()
    for tier in ("hbm", "dram"):
        assert st["peak_bytes"][tier] <= st["budgets"][tier], (tier, st["peak_bytes"], st["budgets"])
        assert st["held_bytes"][tier] <= st["budgets"][tier], (tier, st["held_bytes"], st["budgets"])


# ---- token identity ----------------------------------------------------------------------------
@pytest.mark.parametrize("preload", ["layer", "neuron", "hybrid"])
@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
async def test_dense_policy_under_tight_budgets_gives_the_dense_tokens(deep: Model, preload: str,
                                                                       prefetch: int) -> None:
    cfg = deep.config(SLOW_SSD, preload=preload, prefetch=prefetch)
    assert cfg.hbm_budget <= 0.2 * deep.ffn_bytes and cfg.dram_budget <= 0.3 * deep.ffn_bytes
    async with asyncio.timeout(60):
        async with Engine.open(deep.store, cfg) as engine:
            # 20 layers, DRAM 6 layers: the ring has room for prefetch 3 with every preload mode
            assert engine.plan.prefetch == (0 if preload == "neuron" else prefetch)
            for p in (0, 1):
                assert await tokens_of(engine, deep.prompts[p], TOKENS) == deep.reference(p, TOKENS)
            assert_within_budgets(engine)
            st = engine.stats()
            assert st["bytes"]["ssd_to_dram"] > 0  # the weights really came through the tiers


async def test_a_tied_relu_model_gives_the_dense_tokens(deep_relu: Model) -> None:
    async with asyncio.timeout(60):
        async with Engine.open(deep_relu.store, deep_relu.config(SLOW_SSD, prefetch=2)) as engine:
            assert await tokens_of(engine, deep_relu.prompts[2], TOKENS) == deep_relu.reference(2, TOKENS)
            assert_within_budgets(engine)


@pytest.fixture(scope="module")
def demo(demo_store) -> Model:
    return load_model("demo", demo_store.store)


@pytest.mark.slow
@pytest.mark.parametrize("preload,prefetch", [("hybrid", 2), ("layer", 1)])
async def test_demo_model_under_tight_budgets_gives_the_dense_tokens(demo: Model, preload: str,
                                                                     prefetch: int) -> None:
    n = 12
    cfg = demo.config("latency=1ms,bandwidth=2GB/s,seed=1", preload=preload, prefetch=prefetch)
    async with asyncio.timeout(240):
        async with Engine.open(demo.store, cfg) as engine:
            assert await tokens_of(engine, demo.prompts[0], n) == demo.reference(0, n)
            assert_within_budgets(engine)


# ---- budgets -----------------------------------------------------------------------------------
def smallest_budget(error: BudgetError) -> int:
    m = re.search(r"the smallest \w+ that works is \S+ \((\d+) bytes\)", str(error))
    assert m, f"the BudgetError does not name the smallest budget that works: {error}"
    return int(m.group(1))


@pytest.mark.parametrize("tier,preload", [("hbm_budget", "hybrid"), ("dram_budget", "layer"),
                                          ("dram_budget", "neuron"), ("dram_budget", "hybrid")])
async def test_a_budget_below_one_layer_is_refused_naming_the_smallest_that_works(
        deep: Model, tier: str, preload: str) -> None:
    async with asyncio.timeout(30):
        with pytest.raises(BudgetError, match=tier) as info:
            await Engine.open(deep.store, deep.config(SLOW_SSD, preload=preload, **{tier: 4096}))
        least = smallest_budget(info.value)
        with pytest.raises(BudgetError):
            await Engine.open(deep.store, deep.config(SLOW_SSD, preload=preload, **{tier: least - 1}))
        async with Engine.open(deep.store, deep.config(SLOW_SSD, preload=preload, **{tier: least})) as engine:
            assert await tokens_of(engine, deep.prompts[0], 3) == deep.reference(0, 3)
            assert_within_budgets(engine)


async def test_budgets_hold_at_every_moment_of_concurrent_runs(deep: Model) -> None:
    async with asyncio.timeout(60):
        async with Watchdog() as dog:
            async with Engine.open(deep.store, deep.config(SLOW_SSD, prefetch=3)) as engine:
                dog.watch(engine)
                outs = await asyncio.gather(*(tokens_of(engine, deep.prompts[p], TOKENS) for p in range(4)))
                dog.check_stats(engine)
        assert dog.samples > 0
        assert dog.violations == []
        assert outs == [deep.reference(p, TOKENS) for p in range(4)]


# ---- cancellation and concurrency --------------------------------------------------------------
async def _settled(engine: Engine) -> None:
    while engine.executor.active or engine.executor.pending:
        await asyncio.sleep(0.005)


async def test_cancelling_a_consumer_mid_stream_stops_only_that_request(deep: Model) -> None:
    async with asyncio.timeout(60):
        async with Engine.open(deep.store, deep.config(SLOW_SSD)) as engine:
            got: list[int] = []
            three = asyncio.Event()

            async def consumer() -> None:
                async for tok in engine.generate_ids(deep.prompts[0], 64):
                    got.append(tok)
                    if len(got) == 3:
                        three.set()

            task = asyncio.create_task(consumer())
            await three.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert got == deep.reference(0, len(got))
            await _settled(engine)
            assert engine.stats()["requests"]["cancelled"] == 1
            assert await tokens_of(engine, deep.prompts[1], TOKENS) == deep.reference(1, TOKENS)


async def test_breaking_out_of_async_for_stops_the_request(deep: Model) -> None:
    async with asyncio.timeout(60):
        async with Engine.open(deep.store, deep.config(SLOW_SSD)) as engine:
            got: list[int] = []
            async for tok in engine.generate_ids(deep.prompts[0], 64):
                got.append(tok)
                if len(got) == 3:
                    break
            assert got == deep.reference(0, 3)
            await _settled(engine)  # the loop's async-generator finaliser closed it
            assert engine.stats()["requests"]["cancelled"] == 1
            assert await tokens_of(engine, deep.prompts[1], TOKENS) == deep.reference(1, TOKENS)


async def test_eight_concurrent_requests_equal_running_them_one_by_one(deep: Model) -> None:
    lengths = [TOKENS, 3, 1, TOKENS, 5, 2, TOKENS, 4]
    async with asyncio.timeout(120):
        async with Engine.open(deep.store, deep.config(SLOW_SSD)) as engine:
            one_by_one = [await tokens_of(engine, deep.prompts[i], n) for i, n in enumerate(lengths)]
            together = await asyncio.gather(*(tokens_of(engine, deep.prompts[i], n) for i, n in enumerate(lengths)))
            assert_within_budgets(engine)
    assert together == one_by_one
    assert one_by_one == [deep.reference(i, n) for i, n in enumerate(lengths)]


# ---- a store file that goes bad ----------------------------------------------------------------
@pytest.mark.parametrize("fault", ["fail=1,fail_permanent=1", "fail_after=1"])
async def test_a_store_file_gone_bad_fails_the_request_with_a_typed_error_and_closes_clean(
        deep: Model, fault: str) -> None:
    """``fail_after=1``: layer 1's first read succeeds, every later one fails — it goes bad mid-run
    (its neurons leave the small tiers, so the next token must re-read them)."""
    cfg = deep.config(f"{SLOW_SSD},{fault},fail_path=*L001.fp16.updown*")
    async with asyncio.timeout(60):
        engine = await Engine.open(deep.store, cfg)
        try:
            req = deep.request(0, 32)
            await consume(engine, req, timeout=30)
            assert req.outcome == "typed", (req.outcome, req.error)
            assert isinstance(req.error, SSDError)
            message = str(req.error)
            assert "L001.fp16" in message and "layer 1" in message and "neurons" in message, message
            assert req.tokens == deep.reference(0, len(req.tokens))
            if fault.startswith("fail_after"):
                assert req.tokens, "the fault came mid-run: earlier tokens were delivered"
            # still serving: the next request meets the same typed error, it does not hang
            again = deep.request(1, 4)
            await consume(engine, again, timeout=30)
            assert again.outcome == "typed" and isinstance(again.error, SSDError)
        finally:
            await engine.close()
        with pytest.raises(EngineClosedError):
            await tokens_of(engine, deep.prompts[0], 2)


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "kernels"])
async def test_lookahead_computes_each_ffn_exactly_over_the_rows_it_was_given(tiny_store, kernels) -> None:
    # layer L+1's rows are asked for, planned and copied into the pool (on the HBM manager's copy thread)
    # while layer L computes from its own: each FFN must still be its rows' exact product, and layer L's
    # slots must survive layer L+1's plan
    from m2cache.engine.config import EngineConfig
    from m2cache.storage.reader import Store

    store = Store(tiny_store.store)
    cfg = EngineConfig(hbm_budget="80KB", dram_budget="1MB", policy="oracle:0.2,0.3,0.3", lookahead=True,
                       compute_from_dram=False, cpu_kernels=kernels)
    errors: list[float] = []
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:
            assert engine.executor.lookahead and not engine.hbm.direct_from_dram
            check_each_ffn(engine, store, errors)

            async def one(prompt: list[int]) -> list[int]:
                return [t async for t in engine.generate_ids(prompt, 6)]

            outs = await asyncio.gather(one([1, 2, 3]), one([4, 5]))  # batched decode steps too
            st = engine.stats()
    assert all(len(o) == 6 for o in outs)
    rtol = kernel_reference.BOUNDARY_RTOL if kernels else 1e-4  # kernels: their own activations' rounding
    assert len(errors) >= 2 * 5 * store.config.num_layers // 2 and max(errors) < rtol
    assert st["bytes_per_token"]["dram_to_hbm"] > 0  # the copies up ran
