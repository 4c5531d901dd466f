"""Split stores (``m2cache split-gate``): up/down bundles fetched, INT4 gate rows resident."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from m2cache import Engine, EngineConfig
from m2cache.engine.loading import load_dense
from m2cache.engine.policies import load_policy
from m2cache.errors import ChecksumError, ConfigError, StoreNotFoundError
from m2cache.model.llama import activation
from m2cache.offline.split import GATES, split_gate
from m2cache.storage import quant
from m2cache.storage.reader import PlainBackend, Store


@pytest.fixture(scope="module")
def split(tiny_models, tmp_path_factory) -> tuple[Store, Store]:
    src = tiny_models["silu"].store
    return Store(src), Store(split_gate(src, tmp_path_factory.mktemp("split") / "store", progress=False))


def test_a_split_store_holds_the_source_s_up_and_down_parts_and_its_int4_gate_rows(split) -> None:
    src, dst = split
    assert dst.split and dst.parts == 2 and not src.split
    gates, norms = dst.read_gates()
    for p in quant.PRECISIONS:
        raw = src.read_layer(1, p, PlainBackend())
        assert torch.equal(dst.read_layer(1, p, PlainBackend()), quant.select_parts(p, raw, 3, src.hidden, src.groups, 1, 3))
        assert dst.bundle_bytes(p) * 3 == src.bundle_bytes(p) * 2  # two parts of three fetched
    int4 = src.read_layer(1, "int4", PlainBackend())
    assert torch.equal(gates[1], quant.select_parts("int4", int4, 3, src.hidden, src.groups, 0, 1))
    from m2cache.engine.policies import up_down_norms

    assert torch.equal(norms[1], up_down_norms(src, src.read_layer(1, "fp16", PlainBackend())))
    assert dst.manifest["default_policy"] == "gate-40"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_the_gate_rows_are_the_process_s_own_memory_not_a_map_of_the_file(split) -> None:
    # a mapped file's pages are page cache, which the resident set at open (the memory plan's runtime)
    # does not show and a memory limit evicts
    _, dst = split
    gates, norms = dst.read_gates()
    with open("/proc/self/maps") as f:
        assert GATES not in f.read()
    del gates, norms


def test_a_split_store_streams_the_source_s_int8_attention(split) -> None:
    from m2cache.engine.loading import load_resident
    from m2cache.storage.attention_stream import AttentionStream
    from m2cache.storage.ssd import FileBackend

    src, dst = split
    want = load_resident(src, torch.float32, form="int8")
    stream = AttentionStream(dst.path / dst.manifest["resident"]["path"], dst.config, torch.float32, FileBackend(),
                             int8=dst.manifest["attention_int8"])
    try:
        wqkv, wo = stream.weights(1)
        assert torch.equal(wqkv.q, want.layers[1].wqkv.q) and torch.equal(wo.scale, want.layers[1].wo.scale)
    finally:
        stream.close()


def test_only_gate_policies_run_on_a_split_store(split) -> None:
    _, dst = split
    for name in ("dense-fp16", "oracle:0.1,0.2,0.2", "predictor:0.5,0,0"):
        with pytest.raises(ConfigError, match="split store"):
            load_policy(dst, name, torch.float32)
    with pytest.raises(ConfigError, match="split store"):
        load_dense(dst)
    with pytest.raises(ConfigError, match="already split"):
        split_gate(dst.path, dst.path.parent / "again", progress=False)


def test_a_damaged_gate_file_is_named(split, tmp_path: Path) -> None:
    import shutil

    _, dst = split
    copy = tmp_path / "store"
    shutil.copytree(dst.path, copy)
    data = bytearray((copy / GATES).read_bytes())
    data[-1] ^= 0xFF
    (copy / GATES).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="gate rows"):
        load_policy(Store(copy), None, torch.float32)
    (copy / GATES).unlink()
    with pytest.raises(StoreNotFoundError, match="gate rows"):
        Store(copy)


def reference_ffn(src: Store, h: torch.Tensor, ids: dict, gate_kernel: bool = False,
                  up_kernel: bool = False) -> torch.Tensor:
    """The FFN of the kept neurons computed from the source store: each precision's up and down rows, and
    every neuron's gate from its INT4 bundle; a product the kernels compute (the gate scores with
    ``gate_kernel``, the up rows with ``up_kernel``) meets h as they do (``cpu_kernels.product_input``)."""
    from m2cache.model import cpu_kernels

    out = torch.zeros_like(h, dtype=torch.float32)
    act = activation("silu")
    layer_int4 = src.decode("int4", src.read_layer(ids["layer"], "int4", PlainBackend()), torch.float32)
    hf = h.float()
    for p, rows in ids["rows"].items():
        idx = torch.from_numpy(rows)
        w = src.decode(p, src.read_layer(ids["layer"], p, PlainBackend()), torch.float32)[idx]
        gate = layer_int4[idx, 0]
        hg = cpu_kernels.product_input(hf, "int4", src.hidden, src.groups) if gate_kernel else hf
        hu = cpu_kernels.product_input(hf, p, src.hidden, src.groups) if up_kernel else hf
        out += (act(hg @ gate.T) * (hu @ w[:, 1].T)) @ w[:, 2]
    return out


@pytest.mark.parametrize("config", [dict(cpu_kernels=True, native_decode=False), dict(cpu_kernels=False),
                                    dict(cpu_kernels=True, compute_from_dram=False),
                                    dict(cpu_kernels=True, lookahead=True),
                                    dict(cpu_kernels=False, compute_from_dram=False, lookahead=True)],
                         ids=["kernels-from-dram", "torch", "kernels-pool", "kernels-lookahead", "torch-pool-lookahead"])
async def test_the_engine_on_a_split_store_computes_each_ffn_as_the_source_store_would(
        split, config, _no_task_left_behind) -> None:
    src, dst = split
    cfg = EngineConfig(hbm_budget="1MB", dram_budget="1MB", policy="gate:0.2,0.3,0.3", preload="hybrid", **config)
    errors: list[float] = []
    async with asyncio.timeout(60):
        async with Engine.open(dst.path, cfg) as engine:
            ex = engine.executor.ffn
            ffn = ex.compute

            def checked(h: torch.Tensor, ready, prefill: bool) -> torch.Tensor:
                out = ffn(h, ready, prefill)
                kernels = ex.use_kernels and not (prefill and ex.dense_prefill)
                ref = reference_ffn(src, h, {"layer": ready.layer, "rows": ready.ids},
                                    gate_kernel=engine.policy.kernel_act is not None, up_kernel=kernels)
                errors.append(float((out.float() - ref).abs().max() / ref.abs().max()))
                return out

            ex.compute = checked
            tokens = [t async for t in engine.generate_ids([1, 2, 3, 4], 8)]
    assert len(tokens) == 8 and len(errors) >= 3 * 8
    assert max(errors) < 1e-4
    # what moved: two parts of three of each kept bundle
    assert engine.policy.counts(0) == {"fp16": 26, "int8": 38, "int4": 38}


def test_policies_lists_what_a_split_store_runs_and_the_bytes_it_fetches(split, capsys) -> None:
    from m2cache.cli.main import main

    _, dst = split
    assert main(["policies", str(dst.path)]) == 0
    out = capsys.readouterr().out
    assert "dense-fp16" not in out.split("bytes:")[0]
    gate40 = next(line for line in out.splitlines() if line.startswith("gate-40"))
    fetched = 0.1 * 1 + 0.2 * dst.bundle_bytes("int8") / dst.bundle_bytes("fp16") \
        + 0.7 * dst.bundle_bytes("int4") / dst.bundle_bytes("fp16")
    assert float(gate40.split()[4]) == pytest.approx(fetched * 2 / 3, abs=1e-3)


def test_a_split_store_keeps_the_source_s_gate_policies_and_refuses_export(split, tmp_path: Path) -> None:
    import shutil

    from m2cache.errors import ConvertError
    from m2cache.offline.export_gguf import export_gguf
    from m2cache.storage.writer import write_manifest

    src, dst = split
    copy = tmp_path / "src"
    shutil.copytree(src.path, copy)
    m = Store(copy).manifest
    m["policies"] = {"mine": {"shares": {"fp16": 0.2, "int8": 0.3, "int4": 0.5}, "kind": "gate"},
                     "mixed-40": {"shares": {"fp16": 0.1, "int8": 0.2, "int4": 0.7}, "kind": "predictor"}}
    m["default_policy"] = "mine"
    write_manifest(copy, m)
    out = Store(split_gate(copy, tmp_path / "split", progress=False))
    assert set(out.manifest["policies"]) == {"gate-40", "mine"} and out.manifest["default_policy"] == "mine"
    with pytest.raises(ConvertError, match="split store"):
        export_gguf(dst.path, tmp_path / "x.gguf")
