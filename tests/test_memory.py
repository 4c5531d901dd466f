"""One memory limit for the process (``EngineConfig.memory``), the INT8 resident form, the embeddings read
by row from the store, and the KV reserve that bounds the requests admitted together."""
from __future__ import annotations

import asyncio
import re

import pytest
import torch


from m2cache.engine.config import EngineConfig
from m2cache.formats.int8 import RESIDENT_GROUP
from m2cache.engine.engine import Engine
from m2cache.engine.loading import load_dense, load_resident, resident_bytes
from m2cache.engine.memory import plan_memory, process_rss, resident_bytes_of
from m2cache.engine.policies import load_policy
from m2cache.errors import BudgetError, ChecksumError, ConfigError, StoreNotFoundError, TruncatedStoreError
from m2cache.model import cpu_kernels, kernel_reference
from m2cache.formats.int8 import Int8Weight
from m2cache.model.llama import DenseModel
from m2cache.storage.reader import Store
from m2cache.storage.rows import EmbeddingRows
from stress.scenarios import check_each_ffn

MB = 1 << 20


def smallest_in(message: str) -> int:
    m = re.search(r"the smallest memory that works is about \S+ \((\d+) bytes\)", message)
    assert m, message
    return int(m.group(1))


def dense_greedy(model: DenseModel, prompt: list[int], n: int) -> list[int]:
    """The reference's ``n`` greedy tokens after ``prompt``."""
    kv, out = model.new_cache(), []
    logits = model.forward(prompt, kv)
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model.forward([out[-1]], kv)
    return out


async def generate(engine: Engine, prompt: list[int], n: int, seen: list[dict] | None = None) -> list[int]:
    out = []
    async for t in engine.generate_ids(prompt, n):
        out.append(t)
        if seen is not None:
            seen.append(engine.stats())
    return out


def test_int8_rows_reproduce_the_matrix_within_half_a_step_of_each_row_scale() -> None:
    w = torch.randn(300, 64, dtype=torch.bfloat16) * torch.linspace(0.01, 3, 300, dtype=torch.bfloat16)[:, None]
    q = Int8Weight.quantize(w, torch.float32)
    err = (q.rows(torch.arange(300)) - w.float()).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-6).all()
    x = torch.randn(5, 64)
    torch.testing.assert_close(q.linear(x), x @ q.rows(torch.arange(300)).T, rtol=1e-4, atol=1e-4)


def test_embedding_rows_read_from_the_store_equal_the_resident_matrix(tiny_store) -> None:
    store = Store(tiny_store.store)
    full = load_resident(store, torch.float32)
    rows = EmbeddingRows(store.path / store.manifest["resident"]["path"], "model.embed_tokens.weight", torch.float32)
    ids = torch.tensor([0, 5, 5, store.config.vocab_size - 1])
    try:
        assert torch.equal(rows[ids], full.embed[ids])
        with pytest.raises(IndexError, match="outside the vocabulary"):
            rows[torch.tensor([store.config.vocab_size])]
    finally:
        rows.close()


def test_a_truncated_resident_file_is_named_when_an_embedding_row_is_missing(tiny_store, tmp_path) -> None:
    store = Store(tiny_store.store)
    src = store.path / store.manifest["resident"]["path"]
    cut = tmp_path / "resident.safetensors"
    rows = EmbeddingRows(src, "model.embed_tokens.weight", torch.float32)
    cut.write_bytes(src.read_bytes()[:rows.offset + rows.row_bytes * 3])
    rows.close()
    short = EmbeddingRows(cut, "model.embed_tokens.weight", torch.float32)
    try:
        with pytest.raises(TruncatedStoreError, match="truncated"):
            short[torch.tensor([10])]
    finally:
        short.close()


def test_the_int8_resident_form_holds_what_the_plan_counts_and_keeps_the_dense_top1(tiny_store) -> None:
    store = Store(tiny_store.store)
    full = load_dense(store, torch.float32)
    small = load_dense(store, torch.float32, resident="int8")
    assert resident_bytes(small.res) == resident_bytes_of(store, "int8", 4)
    assert resident_bytes(full.res) == resident_bytes_of(store, "full", 4)
    assert resident_bytes(small.res) < resident_bytes(full.res) / 2
    ids = list(range(3, 40))
    a = full.forward(ids, full.new_cache(), all_logits=True)
    b = small.forward(ids, small.new_cache(), all_logits=True)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    small.res.embed.close()


async def test_a_memory_limit_too_small_is_refused_with_the_smallest_that_works(tiny_store) -> None:
    async with asyncio.timeout(60):
        with pytest.raises(BudgetError, match="memory 1.0MB is too small") as err:
            await Engine.open(tiny_store.store, EngineConfig(memory="1MB"))
        smallest = smallest_in(str(err.value))
        # the process holds what it held: the limit said is enough (with room for the RSS to move a little)
        async with Engine.open(tiny_store.store, EngineConfig(memory=smallest + 32 * MB)) as engine:
            assert await generate(engine, [1, 2, 3], 4)


async def test_an_engine_under_a_memory_limit_never_holds_more_than_the_limit_leaves_it(tiny_store) -> None:
    limit = process_rss() + 256 * MB
    seen: list[dict] = []
    async with asyncio.timeout(120):
        async with Engine.open(tiny_store.store, EngineConfig(memory=limit)) as engine:
            plan = engine.memory
            assert plan is not None and plan.total <= limit
            outs = await asyncio.gather(*(generate(engine, [1, 2, 3 + i], 12, seen) for i in range(3)))
            final = engine.stats()
    assert all(len(o) == 12 for o in outs)
    mine = limit - plan.runtime - plan.margin  # what the engine may hold itself
    for st in seen + [final]:
        held = st["memory"]["held"]
        assert held["resident"] + held["hbm"] + held["dram_peak"] + held["kv"] <= mine, held
        assert held["kv"] <= plan.kv
    assert final["memory"]["limit"] == limit


async def test_budgets_given_explicitly_win_and_must_fit_the_limit(tiny_store) -> None:
    store = Store(tiny_store.store)
    cfg = EngineConfig(memory=process_rss() + 256 * MB, dram_budget="3MB")
    policy = load_policy(store, None, torch.float32, "cpu")
    plan = plan_memory(store, cfg, policy, cpu_direct=True)
    assert plan.dram_budget == 3_000_000
    with pytest.raises(BudgetError, match=r"tiers of at least 10\.0GB \(the budgets given\)"):
        plan_memory(store, cfg.replace(dram_budget="10GB"), policy, cpu_direct=True)


async def test_kv_tokens_admit_requests_only_while_their_caches_fit(tiny_store) -> None:
    cfg = EngineConfig(kv_tokens=3 + 10, hbm_budget="4MB", dram_budget="4MB")
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:
            with pytest.raises(ConfigError, match="needs 14 tokens of KV cache"):
                await generate(engine, [1, 2, 3], 11)
            outs = await asyncio.gather(*(generate(engine, [1, 2, 3 + i], 10) for i in range(3)))
            sizes = engine.executor.batch_sizes
    assert all(len(o) == 10 for o in outs)
    assert max(sizes) == 1, sizes  # one request's cache at a time fits: never two in a step


async def test_entries_kept_for_good_are_read_once_and_serve_every_later_token(tiny_store) -> None:
    store = Store(tiny_store.store)
    n = store.config.num_layers
    dram = store.layer_bytes("fp16") + n * store.layer_bytes("int4") + store.layer_bytes("int8")  # staging + held
    # on the CPU the device pool's budget is lent to DRAM: give it nothing, so DRAM is what is said here
    # without the window (tests/test_window.py), whose room would otherwise come before the INT8 layer's
    cfg = EngineConfig(hbm_budget=0, dram_budget=dram, policy="oracle:0.1,0.2,0.7", direct_io=True, window=0)
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:
            fixed = engine.plan.fixed_keys
            assert fixed[:n] == tuple((i, "int4") for i in range(n)) and fixed[n:] == ((0, "int8"),)
            def whole_reads() -> int:  # on demand, or ahead of the executor
                return engine.dram.counts["layer_reads"] + engine.dram.counts["preloads"]

            await generate(engine, [1, 2, 3], 4)
            reads = whole_reads()
            await generate(engine, [4, 5, 6], 4)
            assert whole_reads() == reads == len(fixed)  # each read whole once, then held
            assert all(engine.dram.fifo.is_fixed(k) for k in fixed)


async def test_a_prefill_split_by_the_policy_needs_only_the_policys_staging(tiny_store) -> None:
    store = Store(tiny_store.store)
    decode = store.num_neurons * (store.bundle_bytes("fp16") + store.bundle_bytes("int8")) // 2
    cfg = EngineConfig(hbm_budget=0, dram_budget=decode + 4096, policy="oracle:0.5,0.5,0", preload="hybrid")
    with pytest.raises(BudgetError, match="dram_budget"):  # a dense prefill stages a whole FP16 layer
        await Engine.open(tiny_store.store, cfg)
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg.replace(dense_prefill=False)) as engine:
            assert len(await generate(engine, list(range(3, 30)), 6)) == 6
            assert engine.dram.peak_staged <= decode + 4096


async def test_auto_threads_take_every_core_only_when_decode_reads_little_off_the_store(tiny_store) -> None:
    import dataclasses
    import os

    from m2cache.engine.engine import THREADS_READ_SHARE, compute_threads, fetched_bytes

    before = torch.get_num_threads()
    cfg = EngineConfig(hbm_budget=0, dram_budget="8MB", policy="oracle:0.1,0.2,0.7", direct_io=True)
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:  # every entry fits: kept for good
            assert engine.plan.decode_read_bytes == 0
            assert torch.get_num_threads() == (os.cpu_count() or 1)
        assert torch.get_num_threads() == before  # restored at close
        store = Store(tiny_store.store)
        tight = cfg.replace(dram_budget=store.layer_bytes("fp16") + store.layer_bytes("int4"))
        async with Engine.open(tiny_store.store, tight) as engine:
            fetched = fetched_bytes(store, engine.policy)
            assert engine.plan.decode_read_bytes > THREADS_READ_SHARE * fetched
            assert torch.get_num_threads() == 1
            # a little read a token (a few entries DRAM cannot keep) still takes every core
            little = dataclasses.replace(engine.plan, decode_read_bytes=int(THREADS_READ_SHARE * fetched) - 1)
            assert compute_threads(cfg, little, fetched) == (os.cpu_count() or 1)
            assert compute_threads(cfg, dataclasses.replace(engine.plan, decode_read_bytes=-1), fetched) == 1


async def test_the_kernels_split_over_threads_give_the_tokens_of_one_thread(tiny_store) -> None:
    cfg = EngineConfig(hbm_budget=0, dram_budget="8MB", policy="oracle:0.1,0.2,0.7", direct_io=True)
    got = {}
    before = cpu_kernels.threads()
    async with asyncio.timeout(60):
        for threads in (1, 3):
            async with Engine.open(tiny_store.store, cfg.replace(compute_threads=threads)) as engine:
                assert cpu_kernels.threads() == (threads if cpu_kernels.available() else 1)
                got[threads] = await generate(engine, [5, 6, 7, 8], 12)
    assert got[1] == got[3]
    assert cpu_kernels.threads() == before  # given back at close


def test_streamed_attention_is_the_files_own_and_holds_a_window_of_layers(tiny_store) -> None:
    from m2cache.storage.attention_stream import AttentionStream
    from m2cache.storage.ssd import FileBackend

    store = Store(tiny_store.store)
    full = load_resident(store, torch.float32)
    n = store.config.num_layers
    stream = AttentionStream(store.path / store.manifest["resident"]["path"], store.config, torch.float32,
                             FileBackend(), depth=1)  # no INT8 file named: the resident file's matrices
    try:
        for step in range(2):  # the layers in a cycle, twice
            for layer in range(n):
                wqkv, wo = stream.weights(layer)
                assert torch.equal(wqkv, full.layers[layer].wqkv) and torch.equal(wo, full.layers[layer].wo)
                assert len(stream._held) <= stream.held_layers()
    finally:
        stream.close()


def _check_stream(store: Store, direct: bool, group: int) -> None:
    from m2cache.storage.attention_stream import AttentionStream
    from m2cache.storage.ssd import FileBackend

    full = load_resident(store, torch.float32, form="full")
    stream = AttentionStream(store.path / store.manifest["resident"]["path"], store.config, torch.bfloat16,
                             FileBackend(direct=direct), depth=1, int8=store.manifest["attention_int8"])
    try:
        for layer in list(range(store.config.num_layers)) * 2:
            for got, w in zip(stream.weights(layer), (full.layers[layer].wqkv, full.layers[layer].wo)):
                want = Int8Weight.quantize(w, torch.bfloat16, group)
                assert got.group == group and torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
        # each layer read once per cycle (and the next cycle's layer 0 ahead, maybe still in flight)
        reads = stream.bytes_read // store.manifest["attention_int8"]["layer_bytes"]
        assert 2 * store.config.num_layers <= reads <= 2 * store.config.num_layers + 1
    finally:
        stream.close()


@pytest.mark.parametrize("direct", [False, True])
def test_streamed_int8_attention_is_the_resident_weights_quantised_in_groups(tiny_store, direct: bool) -> None:
    # a store written now holds its INT8 attention as the int8 form at open on the CPU: a scale per 32 values
    _check_stream(Store(tiny_store.store), direct, RESIDENT_GROUP)


def test_a_file_with_a_scale_a_row_is_read_as_it_is_and_regrouped_by_upgrade(tiny_store, tmp_path) -> None:
    import shutil

    from m2cache.offline.upgrade import regroup_attention
    from m2cache.storage.tensors import StoreTensors
    from m2cache.storage.writer import write_attention_int8, write_manifest

    path = tmp_path / "store"
    shutil.copytree(tiny_store.store, path)
    store = Store(path)
    m = store.manifest
    m["attention_int8"] = write_attention_int8(path, StoreTensors(store), store.config, group=0)  # as older ones
    write_manifest(path, m)
    assert "group" not in {k for k, v in m["attention_int8"].items() if v}  # group 0: one scale a row
    _check_stream(Store(path), True, 0)
    assert regroup_attention(path) and not regroup_attention(path)  # once
    _check_stream(Store(path), True, RESIDENT_GROUP)
    Store(path).verify()


async def test_an_engine_streaming_attention_gives_the_tokens_of_the_int8_form(tiny_store) -> None:
    store = Store(tiny_store.store)
    dense = load_dense(store, torch.float32)
    model = DenseModel(store.config, load_resident(store, torch.float32, form="int8"), dense.ffn, dense.device)
    prompt, n = [3, 4, 5, 6], 10
    want = dense_greedy(model, prompt, n)
    cfg = EngineConfig(hbm_budget="1MB", dram_budget="1MB", policy="dense-fp16", resident="stream")
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:
            got = await generate(engine, prompt, n)
            assert engine.attention is not None and engine.attention.int8 is not None
            assert engine.attention.bytes_read > 0
    assert got == want


async def test_a_corrupt_int8_attention_layer_fails_the_step_that_reads_it_and_a_mended_one_is_read_again(
        tiny_store, tmp_path) -> None:
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(tiny_store.store, copy)
    entry = Store(copy).manifest["attention_int8"]

    def flip() -> None:  # a byte of layer 1's region
        with open(copy / entry["path"], "r+b") as f:
            f.seek(entry["layer_bytes"] + 10)
            b = f.read(1)
            f.seek(entry["layer_bytes"] + 10)
            f.write(bytes([b[0] ^ 0xFF]))

    flip()
    cfg = EngineConfig(hbm_budget="1MB", dram_budget="1MB", policy="dense-fp16", resident="stream")
    async with asyncio.timeout(60):
        async with Engine.open(copy, cfg) as engine:
            with pytest.raises(ChecksumError, match="layer 1's INT8 attention"):
                await generate(engine, [3, 4, 5], 2)
            flip()  # mended: the failed read is not kept, the next request reads the layer again
            assert len(await generate(engine, [3, 4, 5], 2)) == 2


def test_a_store_whose_int8_attention_layout_is_not_this_version_s_is_refused(tiny_store, tmp_path) -> None:
    import shutil

    from m2cache.errors import StoreVersionError
    from m2cache.storage.writer import write_manifest

    copy = tmp_path / "store"
    shutil.copytree(tiny_store.store, copy)
    m = Store(copy).manifest
    m["attention_int8"]["layer_bytes"] += 4096
    write_manifest(copy, m)
    with pytest.raises(StoreVersionError, match="INT8 attention file's layout"):
        Store(copy)


def test_a_store_missing_its_int8_attention_file_is_refused_by_name(tiny_store, tmp_path) -> None:
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(tiny_store.store, copy)
    (copy / Store(copy).manifest["attention_int8"]["path"]).unlink()
    with pytest.raises(StoreNotFoundError, match="INT8 attention"):
        Store(copy)


async def test_a_memory_limit_works_with_neuron_level_preloads(tiny_store) -> None:
    cfg = EngineConfig(memory=process_rss() + 256 * MB, preload="neuron", policy="oracle:0.1,0.2,0.7")
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:
            assert engine.memory is not None and engine.memory.hbm_budget > 0  # neuron mode keeps its pool
            assert len(await generate(engine, [1, 2, 3], 4)) == 4


def test_a_memory_limit_is_refused_at_construction_where_it_cannot_size_the_engine() -> None:
    with pytest.raises(ConfigError, match="on CUDA give hbm_budget"):
        EngineConfig(memory="2GB", device="cuda")
    with pytest.raises(ConfigError, match="memory must be above 0"):
        EngineConfig(memory=0)



async def test_dram_serves_int8_neurons_from_the_fp16_entry_it_keeps_when_that_reads_nothing(tiny_store) -> None:
    # room for every layer's FP16 and INT4 entries but not the INT8 ones too: DRAM keeps FP16 + INT4 and the
    # INT8 neurons compute from the FP16 rows (no read, more exact); each FFN is still its rows' exact product

    store = Store(tiny_store.store)
    n = store.config.num_layers
    staging = store.layer_bytes("fp16")  # a dense prefill's layer
    room = n * (store.layer_bytes("fp16") + store.layer_bytes("int4")) + staging
    assert room < n * sum(store.layer_bytes(p) for p in ("fp16", "int8", "int4")) + staging
    cfg = EngineConfig(hbm_budget=0, dram_budget=room, policy="oracle:0.1,0.2,0.7", direct_io=True)
    errors: list[float] = []
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:
            assert engine.plan.direct and engine.plan.decode_read_bytes == 0
            assert {p for _, p in engine.plan.fixed_keys} == {"fp16", "int4"}

            def one_group_at_fp16(ready, prefill: bool) -> None:
                if not prefill:
                    assert "int8" not in ready.ids or not len(ready.ids["int8"])
                    assert len(ready.ids["fp16"]) == engine.policy.counts(ready.layer)["fp16"] + \
                        engine.policy.counts(ready.layer)["int8"]

            check_each_ffn(engine, store, errors, one_group_at_fp16)
            assert len(await generate(engine, [5, 6, 7, 8], 6)) == 6
            assert engine.dram.counts["upgraded"] > 0 and engine.dram.counts["neuron_reads"] == 0
    assert max(errors) < kernel_reference.BOUNDARY_RTOL  # the kernels' activations and their rounding


async def test_streamed_attention_holds_what_the_memory_plan_counts_for_it(tiny_store) -> None:
    from m2cache.engine.metrics import _resident_held

    cfg = EngineConfig(memory=process_rss() + 256 * MB, resident="stream", policy="oracle:0.1,0.2,0.7")
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:
            assert engine.memory is not None and engine.memory.resident_form == "stream"
            await generate(engine, [1, 2, 3], 4)
            assert _resident_held(engine) == engine.memory.resident


async def test_a_store_without_the_int8_attention_file_streams_its_16_bit_matrices(tiny_store, tmp_path) -> None:
    import shutil

    from m2cache.storage.writer import write_manifest

    copy = tmp_path / "store"
    shutil.copytree(tiny_store.store, copy)
    m = Store(copy).manifest
    (copy / m.pop("attention_int8")["path"]).unlink()  # as a store converted before the file existed
    write_manifest(copy, m)
    store = Store(copy)
    model = load_dense(store, torch.float32)
    model.res.lm_head = load_resident(store, torch.float32, form="int8").lm_head  # what "stream" keeps
    prompt, n = [3, 4, 5, 6], 8
    want = dense_greedy(model, prompt, n)
    cfg = EngineConfig(hbm_budget="1MB", dram_budget="1MB", policy="dense-fp16", resident="stream")
    async with asyncio.timeout(60):
        async with Engine.open(copy, cfg) as engine:
            assert engine.attention is not None and engine.attention.int8 is None
            assert await generate(engine, prompt, n) == want
