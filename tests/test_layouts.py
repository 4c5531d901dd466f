"""One store runs every policy (format version 3: [up|down] bundles and gate rows in files of their own), and
older layouts are read, or refused with the one command that converts them."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from m2cache import Engine, EngineConfig
from m2cache.cli.main import main
from m2cache.engine.loading import load_dense
from m2cache.engine.policies import load_policy, store_for_policy
from m2cache.errors import ChecksumError, ConfigError, StoreNotFoundError
from m2cache.model.llama import activation
from m2cache.offline.upgrade import upgrade
from m2cache.formats import quant
from m2cache.formats.shares import DEFAULT_POLICY
from m2cache.storage.layout import GATE_NORMS
from m2cache.storage.reader import SPLIT, WHOLE, PlainBackend, Store
from m2cache.storage.writer import write_manifest
from old_layouts import write_version2, write_version2_split

PROMPT = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def v2(tiny_models, tmp_path_factory) -> Path:
    return write_version2(tiny_models["silu"].store, tmp_path_factory.mktemp("v2") / "store")


@pytest.fixture(scope="module")
def v2_split(v2, tmp_path_factory) -> Path:
    return write_version2_split(v2, tmp_path_factory.mktemp("v2split") / "store")


async def tokens(store: Path, policy: str | None, **kw) -> tuple[list[int], Engine]:
    cfg = EngineConfig(hbm_budget="1MB", dram_budget="1MB", policy=policy, **kw)
    async with asyncio.timeout(60):
        async with Engine.open(store, cfg) as engine:
            out = [t async for t in engine.generate_ids(PROMPT, 8)]
    return out, engine


def dense_tokens(store: Path, n: int = 8) -> list[int]:
    model = load_dense(Store(store), torch.float32)
    kv = model.new_cache()
    out = [int(model.forward(PROMPT, kv).argmax())]
    while len(out) < n:
        out.append(int(model.forward([out[-1]], kv).argmax()))
    return out


# ---- one store, every policy ------------------------------------------------------------------------
async def test_one_store_runs_the_dense_reference_dense_fp16_the_gate_policies_and_the_oracle(
        tiny_store, _no_task_left_behind) -> None:
    store = Store(tiny_store.store)
    assert store.version == 3 and store.views == (WHOLE, SPLIT) and store.manifest["default_policy"] == DEFAULT_POLICY
    exact, engine = await tokens(tiny_store.store, "dense-fp16")
    assert exact == dense_tokens(tiny_store.store) and not engine.store.split and engine.store.parts == 3
    for policy in (None, "gate:0.2,0.3,0.3", "oracle:0.3,0.3,0.2"):
        got, engine = await tokens(tiny_store.store, policy)
        assert len(got) == 8
        assert engine.store.split == (policy != "oracle:0.3,0.3,0.2")  # gate policies fetch up and down only


def test_a_gate_policy_fetches_two_parts_of_three_and_the_others_all_three(tiny_store) -> None:
    store = Store(tiny_store.store)
    split, whole = store_for_policy(store, "gate-40"), store_for_policy(store, "dense-fp16")
    for p in quant.PRECISIONS:
        assert split.bundle_bytes(p) * 3 == whole.bundle_bytes(p) * 2
        assert whole.bundle_bytes(p) == quant.bundle_bytes(p, 3, store.hidden, store.groups)


def reference_ffn(whole: Store, h: torch.Tensor, layer: int, ids: dict) -> torch.Tensor:
    """The FFN of the kept neurons from the whole view: each precision's up and down rows, and every
    neuron's gate from its INT4 bundle (the resident copy's values)."""
    out = torch.zeros_like(h, dtype=torch.float32)
    act = activation("silu")
    int4 = whole.decode("int4", whole.read_layer(layer, "int4", PlainBackend()), torch.float32)
    for p, rows in ids.items():
        idx = torch.from_numpy(rows)
        w = whole.decode(p, whole.read_layer(layer, p, PlainBackend()), torch.float32)[idx]
        out += (act(h.float() @ int4[idx, 0].T) * (h.float() @ w[:, 1].T)) @ w[:, 2]
    return out


@pytest.mark.parametrize("config", [dict(cpu_kernels=True), dict(cpu_kernels=False),
                                    dict(cpu_kernels=True, compute_from_dram=False),
                                    dict(cpu_kernels=True, lookahead=True),
                                    dict(cpu_kernels=False, compute_from_dram=False, lookahead=True)],
                         ids=["kernels-from-dram", "torch", "kernels-pool", "kernels-lookahead", "torch-pool-lookahead"])
async def test_a_gate_policy_computes_each_ffn_from_the_resident_gate_rows_and_the_fetched_up_and_down(
        tiny_store, config, float_activations, _no_task_left_behind) -> None:
    whole = Store(tiny_store.store)
    # layer by layer (the native step's one call would pass by the check), float32 products (torch's reference)
    cfg = EngineConfig(hbm_budget="1MB", dram_budget="1MB", policy="gate:0.2,0.3,0.3", preload="hybrid",
                       native_decode=False, **config)
    errors: list[float] = []
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:
            ffn = engine.executor.ffn.compute

            def checked(h: torch.Tensor, ready, prefill: bool) -> torch.Tensor:
                out = ffn(h, ready, prefill)
                ref = reference_ffn(whole, h, ready.layer, ready.ids)
                errors.append(float((out.float() - ref).abs().max() / ref.abs().max()))
                return out

            engine.executor.ffn.compute = checked
            got = [t async for t in engine.generate_ids(PROMPT, 8)]
    assert len(got) == 8 and len(errors) >= 3 * 8 and max(errors) < 1e-4
    assert engine.store.split and engine.policy.counts(0) == {"fp16": 26, "int8": 38, "int4": 38}


async def test_what_policies_prints_is_what_the_engine_fetches_reads_and_keeps_resident(
        tiny_store, capsys, _no_task_left_behind) -> None:
    assert main(["policies", tiny_store.store.as_posix(), "--json"]) == 0
    printed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    default = printed[DEFAULT_POLICY]
    assert default["default"] and default["fetched"] < 0.3 * printed["dense-fp16"]["fetched"]
    # nothing kept between layers: a pool of one layer's working set, no DRAM layers, neuron-level reads
    whole = Store(tiny_store.store)
    split = whole.with_view(SPLIT)
    pool = sum(c * split.bundle_bytes(p) for p, c in load_policy(split, None, torch.float32).counts(0).items())
    cfg = EngineConfig(hbm_budget=pool, dram_budget="1MB", preload="neuron", fixed_layers=0, dense_prefill=False,
                       compute_from_dram=False)
    wanted: list[tuple[str, np.ndarray]] = []
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:
            ffn = engine.executor.ffn.compute

            def recorded(h: torch.Tensor, ready, prefill: bool) -> torch.Tensor:
                wanted.extend(ready.ids.items())
                return ffn(h, ready, prefill)

            engine.executor.ffn.compute = recorded
            got = [t async for t in engine.generate_ids(PROMPT, 6)]
    st = engine.stats()
    steps = len(got)  # the prefill's and five decode steps, each one plan a layer
    assert st["actors"]["hbm"]["hits"] == 0 and len(wanted) == 3 * 3 * steps
    assert st["ffn_bytes"]["fetched_per_token"] == default["fetched"]
    assert st["bytes"]["dram_to_hbm"] == steps * default["fetched"]
    assert st["bytes"]["ssd_to_dram"] == sum(split.run_bytes(p, ids) for p, ids in wanted)
    assert st["ffn_bytes"]["policy_resident"] == engine.policy.resident_bytes == default["resident"]
    held = sum(g.numel() * g.element_size() for g in engine.policy.gates) + 4 * sum(n.numel() for n in engine.policy.norms)
    assert held == default["resident"]  # packed INT4 rows and float32 norms, as the C kernels take them


def test_policies_says_what_each_policy_fetches_and_costs(tiny_store, capsys) -> None:
    assert main(["policies", str(tiny_store.store)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(DEFAULT_POLICY + " "))
    assert "(default)" in line and "gate" in line
    assert "fetched a token" in out and "resident" in out


# ---- older layouts -----------------------------------------------------------------------------------
async def test_a_version_2_store_is_read_and_computes_what_the_same_model_does_in_version_3(
        tiny_store, v2, capsys, _no_task_left_behind) -> None:
    old, new = Store(v2), Store(tiny_store.store)
    assert old.version == 2 and old.views == (WHOLE,) and old.parts == 3
    for p in quant.PRECISIONS:
        assert torch.equal(old.read_layer(1, p, PlainBackend()), new.read_layer(1, p, PlainBackend()))
    assert (await tokens(v2, "dense-fp16"))[0] == (await tokens(tiny_store.store, "dense-fp16"))[0]
    got, engine = await tokens(v2, "gate:0.2,0.3,0.3")
    assert len(got) == 8 and engine.store.parts == 3  # the gate rows come with every bundle there
    assert main(["policies", str(v2)]) == 0
    assert f"m2cache upgrade {v2}" in capsys.readouterr().out


def test_upgrade_lays_a_version_2_store_out_as_version_3_moving_every_byte(v2, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(v2, tmp_path / "store"))
    m = Store(copy).manifest
    m["policies"] = {"mine": {"shares": {"fp16": 0.2, "int8": 0.3, "int4": 0.5}, "kind": "gate"}}
    m["default_policy"] = "mine"  # chosen by its user: kept
    write_manifest(copy, m)
    assert upgrade(copy, progress=False) == copy
    old, new = Store(v2), Store(copy)
    assert new.version == 3 and new.views == (WHOLE, SPLIT)
    for layer in range(old.config.num_layers):
        for p in quant.PRECISIONS:
            assert torch.equal(old.read_layer(layer, p, PlainBackend()), new.read_layer(layer, p, PlainBackend()))
    assert new.manifest["default_policy"] == "mine" and {"mine", "gate-40"} <= set(new.manifest["policies"])
    gates, norms = new.read_gates()
    want_gates, want_norms = old.read_gates()  # a version 2 store's: from its INT4 and FP16 bundles
    assert all(torch.equal(a, b) for a, b in zip(gates, want_gates))
    assert all(torch.equal(a, b) for a, b in zip(norms, want_norms))
    assert not list(tmp_path.glob("store.*"))  # no partial or old folder left beside it


def test_upgrade_makes_this_versions_default_the_default_where_the_old_one_was_automatic(v2, tmp_path: Path) -> None:
    assert Store(v2).manifest["default_policy"] == "dense-fp16"  # what version 2 set by itself
    out = upgrade(v2, tmp_path / "new", progress=False)
    assert Store(out).manifest["default_policy"] == DEFAULT_POLICY and Store(v2).version == 2


def test_upgrade_of_a_current_store_offers_the_presets_and_keeps_a_default_its_user_chose(
        tiny_store, tmp_path: Path) -> None:
    for old, want in (("gate-40", DEFAULT_POLICY), ("mine", "mine")):
        copy = Path(shutil.copytree(tiny_store.store, tmp_path / old))
        m = Store(copy).manifest
        m["policies"] = {"mine": {"shares": {"fp16": 0.2, "int8": 0.3, "int4": 0.5}, "kind": "gate"}}
        m["default_policy"] = old
        write_manifest(copy, m)
        assert upgrade(copy, progress=False) == copy
        new = Store(copy).manifest
        assert new["default_policy"] == want and {"mine", "gate-25", "gate-40"} <= set(new["policies"])


async def test_a_version_2_split_store_runs_gate_policies_and_refuses_the_rest_naming_the_command(
        v2_split, _no_task_left_behind) -> None:
    store = Store(v2_split)
    assert store.views == (SPLIT,) and store.split and store.manifest["default_policy"] == "gate-40"
    got, engine = await tokens(v2_split, None)
    assert len(got) == 8 and engine.store.parts == 2
    for name in ("dense-fp16", "oracle:0.1,0.2,0.2", "predictor:0.5,0,0"):
        with pytest.raises(ConfigError, match="m2cache upgrade"):
            load_policy(store, name, torch.float32)
    for refused in (lambda: load_dense(store), lambda: upgrade(v2_split, progress=False)):
        with pytest.raises(ConfigError, match="split store"):
            refused()


def test_a_version_2_split_store_computes_what_version_3_s_split_view_does(tiny_store, v2_split) -> None:
    old, new = Store(v2_split), Store(tiny_store.store).with_view(SPLIT)
    for p in quant.PRECISIONS:
        assert torch.equal(old.read_layer(2, p, PlainBackend()), new.read_layer(2, p, PlainBackend()))
    (g_old, n_old), (g_new, n_new) = old.read_gates(), new.read_gates()
    assert torch.equal(g_old[2], g_new[2]) and torch.equal(n_old[2], n_new[2])


# ---- damage ----------------------------------------------------------------------------------------------
def test_a_damaged_or_missing_gate_norms_file_is_named(tiny_store, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_store.store, tmp_path / "store"))
    data = bytearray((copy / GATE_NORMS).read_bytes())
    data[-1] ^= 0xFF
    (copy / GATE_NORMS).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="norms"):
        load_policy(Store(copy), None, torch.float32)
    with pytest.raises(ChecksumError, match="norms"):
        Store(copy).verify()
    (copy / GATE_NORMS).unlink()
    with pytest.raises(StoreNotFoundError, match="norms"):
        Store(copy)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_the_gate_rows_are_the_process_s_own_memory_not_a_map_of_a_file(tiny_store) -> None:
    # a mapped file's pages are page cache, which the resident set at open (the memory plan's runtime)
    # does not show and a memory limit evicts
    gates, norms = Store(tiny_store.store).with_view(SPLIT).read_gates()
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert GATE_NORMS not in maps and ".int4.gate.bin" not in maps
    del gates, norms
