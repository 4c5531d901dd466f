"""DRAM's window (``actors.dram``): the neurons a token read one by one stay, at their precision, for the next
tokens; its room comes out of the DRAM budget (``engine.sizing``), and the text is the one without it."""
from __future__ import annotations

import asyncio

import pytest

from m2cache.engine.config import EngineConfig
from m2cache.engine.engine import Engine
from m2cache.errors import ConfigError, M2CacheError
from m2cache.storage.reader import Store

pytestmark = pytest.mark.usefixtures("_no_task_left_behind")


async def generate(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return [t async for t in engine.generate_ids(prompt, n)]


def tight(store: Store, policy: str, **kw) -> EngineConfig:
    """A DRAM budget that keeps every INT4 layer and a layer's FP16 bytes more, well short of the rest: the
    window's setting (the staging for a dense prefill: a whole FP16 layer, beside it)."""
    n = store.config.num_layers
    dram = 2 * store.layer_bytes("fp16") + n * store.layer_bytes("int4")
    return EngineConfig(hbm_budget=0, dram_budget=dram, policy=policy, direct_io=True, **kw)


async def test_the_window_serves_the_next_tokens_what_earlier_ones_read_and_the_text_is_the_same(tiny_store) -> None:
    store = Store(tiny_store.store)
    # FP16 and INT4 only: nothing is served at a higher precision than asked, so the logits are the same bytes'
    cfg = tight(store, "oracle:0.2,0,0.8")
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg.replace(window=0)) as plain:
            assert plain.plan.window_slots == {}
            want = [await generate(plain, [1, 2, 3], 6), await generate(plain, [1, 2, 3], 6)]
        async with Engine.open(tiny_store.store, cfg) as engine:
            slots = engine.plan.window_slots
            assert set(slots) == {"fp16"} and slots["fp16"] >= 3 * round(0.2 * store.num_neurons)
            assert all((layer, "int4") in engine.plan.fixed_keys for layer in range(store.config.num_layers))
            got = [await generate(engine, [1, 2, 3], 6)]
            first = engine.reader.bytes_read
            got.append(await generate(engine, [1, 2, 3], 6))
            second = engine.reader.bytes_read - first
            st = engine.stats()
            dram = engine.dram
    assert got == want
    hits, misses = dram.window_counts()
    assert hits > 0 and st["hit_ratio"]["window"] == pytest.approx(hits / (hits + misses))
    assert second < first  # the same text again: its neurons are mostly still there
    assert not any(dram.window_busy.values())  # every reply's rows released
    assert dram.peak_total <= dram.budget
    assert st["reads_per_token"] > 0 and st["bytes_per_read"] > 0


async def test_int8_neurons_held_at_fp16_are_served_from_there_unless_the_text_must_not_depend_on_it(tiny_store) -> None:
    """With a shared cut (``batch_invariant=False``) an INT8 neuron the window holds at FP16 is served at FP16; a
    batch-invariant request (the default) keeps the precisions its own plan gave, whatever the window holds, so
    its text never depends on the requests before it."""
    store = Store(tiny_store.store)
    for invariant in (False, True):
        async with asyncio.timeout(60):
            cfg = tight(store, "oracle:0.1,0.2,0.7", batch_invariant=invariant)
            async with Engine.open(tiny_store.store, cfg) as engine:
                assert set(engine.plan.window_slots) == {"fp16", "int8"}
                out = [await generate(engine, [5, 6, 7, i], 8) for i in range(3)]
                counts, window = engine.dram.counts, engine.dram.window.stats()  # type: ignore[union-attr]
        assert all(len(o) == 8 for o in out)
        # a neuron's rank moves across the FP16/INT8 line from token to token
        assert (counts["window_upgraded"] > 0) is not invariant
        assert window["fp16"]["held"] <= window["fp16"]["capacity"]


async def test_a_failed_read_leaves_no_slot_that_claims_its_neurons(tiny_store) -> None:
    """Reads of one layer's FP16 file fail for good: each request that needs them fails with a typed error, and
    the window holds none of the neurons whose bytes never came (a later hit would serve stale bytes)."""
    store = Store(tiny_store.store)
    cfg = tight(store, "oracle:0.2,0,0.8", ssd_sim="fail=1,fail_permanent=1,fail_path=*L001.fp16*")
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:
            for _ in range(2):
                with pytest.raises(M2CacheError):
                    await generate(engine, [1, 2, 3], 4)
            lru = engine.dram.window.lru(1, "fp16")  # type: ignore[union-attr]
            assert len(lru) == 0
            assert not any(engine.dram.window_busy.values())


def test_window_must_be_a_number_of_tokens() -> None:
    with pytest.raises(ConfigError, match="window must be"):
        EngineConfig(window=-1)
