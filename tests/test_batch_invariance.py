"""Batch invariance: a request's greedy tokens are the same alone and in any batch, under every policy.

Each sequence keeps the neurons it would keep alone and computes as it would alone; the batch fetches the
union of their cuts (``m2cache.actors.rows``). Checked on a tiny random model through the tiers: eight
prompts alone, then 4, 8 and 16 concurrent requests of them, per policy (the oracle, the gate ranking on
the whole store and on a split store, trained predictors, with and without lookahead). The shared cut
(``batch_invariant=False``) is the control: its texts do change with the batch.
"""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from m2cache.actors.rows import row_view, split_rows
from m2cache.actors.messages import WeightsReady
from m2cache.engine.engine import Engine
from m2cache.errors import M2CacheError
from m2cache.formats.shares import Shares
from m2cache.model.policy import Policy
from stress.scenarios import Model, build_tiny, one_torch_thread, tokens_of

TOKENS = 8
POLICIES = ["oracle:0.1,0.2,0.2", "gate:0.1,0.2,0.7", "gate:0.2,0.2,0.2", "predictor:0.2,0.2,0.2"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Model:
    from m2cache.offline.train import train_predictors

    model = build_tiny(tmp_path_factory.mktemp("invariance"), layers=8)
    train_predictors(model.store, tokens=1024, progress=False, epochs=1)
    return model


@pytest.fixture(scope="module")
def split(tiny: Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from old_layouts import write_version2, write_version2_split

    root = tmp_path_factory.mktemp("invariance-split")  # an older version's split store: gate policies only
    return write_version2_split(write_version2(tiny.store, root / "v2"), root / "store")


async def _texts(store: Path, cfg, prompts: list[list[int]], clients: int) -> tuple[list[list[int]], int]:
    """Greedy tokens of ``clients`` concurrent requests cycling over ``prompts`` (1: each alone, in turn)."""
    async with asyncio.timeout(240):
        async with Engine.open(store, cfg) as engine:
            if clients == 1:
                got = [await tokens_of(engine, p, TOKENS) for p in prompts]
            else:
                got = list(await asyncio.gather(*(tokens_of(engine, prompts[i % len(prompts)], TOKENS)
                                                  for i in range(clients))))
            return got, max(engine.executor.batch_sizes, default=0)


async def _check(store: Path, tiny: Model, **cfg_changes) -> None:
    cfg = tiny.config(None, **cfg_changes)
    prompts = tiny.prompts
    alone, _ = await _texts(store, cfg, prompts, 1)
    for clients in (4, 8, 16):
        got, biggest = await _texts(store, cfg, prompts, clients)
        assert biggest > 1, "the requests never shared a step"
        assert got == [alone[i % len(prompts)] for i in range(clients)], (cfg_changes, clients)


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_request_gets_the_same_tokens_alone_and_in_batches_of_4_8_and_16(tiny: Model, policy: str) -> None:
    await _check(tiny.store, tiny, policy=policy)


async def test_with_lookahead_too(tiny: Model) -> None:
    await _check(tiny.store, tiny, policy="gate:0.1,0.2,0.7", lookahead=True)


async def test_on_a_split_store_too(tiny: Model, split: Path) -> None:
    await _check(split, tiny, policy="gate:0.1,0.2,0.7")


async def test_with_the_device_pool_path_too(tiny: Model) -> None:
    # the path CUDA takes (slots in the device pool, no upgrades), with a pool that holds a batch's union
    # (budgets that hold one cut: ``test_a_batch_too_big_for_the_tiers...``)
    await _check(tiny.store, tiny, policy="oracle:0.1,0.2,0.2", compute_from_dram=False, hbm_budget=tiny.ffn_bytes)


async def test_with_a_prefill_cut_by_the_policy_too(tiny: Model) -> None:
    # whole layers in DRAM: a sparse prefill's staging holds one cut, not a batch's union (that case halves)
    await _check(tiny.store, tiny, policy="gate:0.1,0.2,0.2", dense_prefill=False, preload="layer",
                 dram_budget=2 * tiny.ffn_bytes)


async def test_the_shared_cut_is_the_control_its_texts_depend_on_the_batch(tiny: Model) -> None:
    cfg = tiny.config(None, policy="oracle:0.05,0.05,0.05", batch_invariant=False)
    alone, _ = await _texts(tiny.store, cfg, tiny.prompts, 1)
    got, _ = await _texts(tiny.store, cfg, tiny.prompts, 16)
    assert got != [alone[i % len(tiny.prompts)] for i in range(16)]


async def test_a_long_prompt_prefilled_in_chunks_gives_the_same_tokens_alone_and_beside_others(tiny: Model) -> None:
    long = (tiny.prompts[0] * 40)[:150]  # several chunks of 64
    cfg = tiny.config(None, policy="gate:0.1,0.2,0.7", prefill_chunk=64)
    async with asyncio.timeout(240):
        async with Engine.open(tiny.store, cfg) as engine:
            alone = await tokens_of(engine, long, TOKENS)
            others = [asyncio.create_task(tokens_of(engine, p, 24)) for p in tiny.prompts[1:5]]
            await asyncio.sleep(0)
            beside = await tokens_of(engine, long, TOKENS)
            await asyncio.gather(*others)
    assert beside == alone


# ---- the union and each row's view of it ----------------------------------------------------------
def _ready(union: dict[str, np.ndarray], rows) -> WeightsReady:
    import torch

    slots = {p: torch.arange(100, 100 + len(v)) for p, v in union.items()}  # slot i holds union[p][i]
    return WeightsReady(0, 0, slots, (), ids=dict(union), rows=rows)


def test_the_union_holds_every_row_s_cut_once_and_each_row_sees_exactly_its_own_neurons() -> None:
    policy = Policy(1, 32, Shares(0.25, 0.25, 0.25))
    rng = np.random.default_rng(0)
    orders = [rng.permutation(32) for _ in range(5)]
    both = split_rows(policy, 0, orders)
    union, cuts = both.union, both.cuts
    for p in union:
        assert np.array_equal(union[p], np.unique(np.concatenate([c[p] for c in cuts])))
    ready = _ready(union, cuts)
    for cut in cuts:
        mine = row_view(ready, cut)
        for p, ids in cut.items():
            assert np.array_equal(mine.ids[p], ids)
            assert np.array_equal(mine.slots[p].numpy(), 100 + np.searchsorted(union[p], ids))


def test_a_row_s_int8_neurons_served_from_an_fp16_entry_are_found_there() -> None:
    union = {"fp16": np.array([1, 2, 5, 7]), "int4": np.array([3, 4])}  # INT8 {2, 7} upgraded by the plan
    ready = _ready(union, None)
    mine = row_view(ready, {"fp16": np.array([1, 5]), "int8": np.array([2, 7]), "int4": np.array([4])})
    assert np.array_equal(mine.ids["fp16"], [1, 2, 5, 7]) and np.array_equal(mine.ids["int4"], [4])
    with pytest.raises(RuntimeError, match="not served"):
        row_view(ready, {"fp16": np.array([9])})


def test_a_batch_too_big_for_the_tiers_union_runs_in_halves_with_the_same_tokens(tiny: Model, tmp_path: Path) -> None:
    store = Path(shutil.copytree(tiny.store, tmp_path / "store"))
    # the default budgets hold about one cut of a layer in flight: 16 sequences' union does not fit them
    cfg = tiny.config(None, policy="oracle:0.1,0.2,0.2", compute_from_dram=False)

    async def run() -> None:
        alone, _ = await _texts(store, cfg, tiny.prompts, 1)
        async with asyncio.timeout(240):
            async with Engine.open(store, cfg) as engine:
                got = await asyncio.gather(*(tokens_of(engine, tiny.prompts[i % 8], TOKENS) for i in range(16)))
                splits = engine.run_stats.batch_splits
        assert got == [alone[i % 8] for i in range(16)]
        assert splits > 0

    asyncio.run(run())


# ---- a fault in a batch fails only the requests that need what failed ----------------------------
async def _outcomes(store: Path, cfg, prompts: list[list[int]], together: bool) -> list[list[int] | str]:
    async def one(p: list[int]) -> list[int] | str:
        try:
            return await tokens_of(engine, p, TOKENS)
        except M2CacheError as e:
            return f"{type(e).__name__}: {e}"

    async with asyncio.timeout(240):
        async with Engine.open(store, cfg) as engine:
            if together:
                got = list(await asyncio.gather(*(one(p) for p in prompts)))
            else:
                got = [await one(p) for p in prompts]
            assert not engine.executor.active and not engine.executor.pending
            assert isinstance(await one(prompts[0]), (list, str))  # and the engine still serves
    return got


async def test_a_block_damaged_on_disk_fails_in_a_batch_exactly_the_requests_that_fail_alone(
        tiny: Model, tmp_path: Path) -> None:
    from m2cache.storage.layout import UPDOWN, ffn_file_name
    from m2cache.storage.reader import Store

    # one INT8 neuron a token (a block of the [up|down] INT8 file holds 28 of 128), so a block is needed by
    # some prompts only
    cfg = tiny.config(None, policy="gate:0.1,0.008,0.2")
    healthy, _ = await _texts(tiny.store, cfg, tiny.prompts, 1)
    geom = Store(tiny.store).geometry["int8"]  # the [up|down] files' (what a gate policy fetches)
    for block in reversed(range(geom.num_blocks(Store(tiny.store).num_neurons))):
        # a block of layer 3's INT8 file that some prompts need and others do not (a block holds many neurons)
        store = Path(shutil.copytree(tiny.store, tmp_path / f"store{block}"))
        path = store / ffn_file_name(3, "int8", UPDOWN)
        data = bytearray(path.read_bytes())
        data[block * geom.block_bytes + 10] ^= 0xFF
        path.write_bytes(bytes(data))
        alone = await _outcomes(store, cfg, tiny.prompts, together=False)
        failing = {i for i, r in enumerate(alone) if isinstance(r, str)}
        if 0 < len(failing) < len(tiny.prompts):
            break
    assert 0 < len(failing) < len(tiny.prompts), alone  # some prompts need the damaged neurons, some do not
    assert all(alone[i] == healthy[i] for i in range(len(alone)) if i not in failing)
    assert all("ChecksumError" in alone[i] and str(path) in alone[i] for i in failing)
    together = await _outcomes(store, cfg, tiny.prompts * 2, together=True)
    assert {i for i, r in enumerate(together) if isinstance(r, str)} == failing | {i + 8 for i in failing}
    assert all(together[i] == healthy[i % 8] for i in range(16) if i % 8 not in failing)
