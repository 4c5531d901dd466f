"""``m2cache synth`` and ``m2cache bench`` on a tiny random model: the plumbing, never the timings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from m2cache.bench.harness import main
from m2cache.bench.plan import SYSTEMS
from m2cache.storage.reader import PlainBackend, Store
from m2cache.offline.synth import synth


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return synth(tmp_path_factory.mktemp("synth") / "tiny", "tiny", train_tokens=1024, device="cpu", progress=False)


def test_synth_writes_the_same_weights_to_the_store_and_the_hf_folder(tiny_synth: dict[str, Path]) -> None:
    store = Store(tiny_synth["store"])
    bundles = store.decode("fp16", store.read_layer(1, "fp16", PlainBackend()), torch.float32)  # [F, 3, D]
    index = json.loads((tiny_synth["hf"] / "model.safetensors.index.json").read_text())["weight_map"]
    p = "model.layers.1.mlp."
    with safe_open(str(tiny_synth["hf"] / index[p + "gate_proj.weight"]), framework="pt") as f:
        gate, down = f.get_tensor(p + "gate_proj.weight").float(), f.get_tensor(p + "down_proj.weight").float()
    assert torch.equal(bundles[:, 0], gate)
    assert torch.equal(bundles[:, 2], down.t())
    assert store.manifest["default_policy"] != "dense-fp16"  # predictors were fitted and registered


def test_bench_runs_every_system_once_without_a_limit_and_writes_the_report(tiny_synth: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    rc = main(["--store", str(tiny_synth["store"]), "--hf", str(tiny_synth["hf"]), "--tokens", "4", "--runs", "1",
               "--memory", "none", "--prompts", "Hello there", "--hbm-budget", "100%", "--dram-budget", "100%",
               "--no-direct-io", "--no-quality", "--policies", "gate:0,0,1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"config", "limits", "notes"}
    (part,) = report["limits"]
    assert part["limit"]["mechanism"] == "none"
    # the frontier (here one policy) runs from the store's own split view
    want = [x for s in SYSTEMS for x in (["m2cache:gate:0,0,1"] if s == "m2cache-frontier" else [s])]
    assert list(part["systems"]) == want
    for name, row in part["systems"].items():
        if row["status"] == "skipped":  # llama-cpp-python is an optional extra
            assert name.startswith("llama") and "make peers" in row["reason"]
            continue
        assert row["runs_ok"] == 1, f"{name}: {row['errors']}"
        for key in ("decode_tokens_per_s", "ttft_s", "peak_rss_bytes", "disk_read_bytes_per_token",
                    "moved_bytes_per_token", "floor_tokens_per_s", "bytes_per_weight", "available_seen_bytes"):
            assert key in row
        assert row["peak_rss_bytes"] > 0
    assert "vs_hf-bf16" in part["ratios"]
    assert "stall_fraction" in part["systems"]["m2cache"]["m2cache_stats"]
    assert "device_map_bytes" in part["systems"]["hf-offload"]


def test_systems_whose_weights_exceed_the_limit_are_listed_with_what_they_need(tiny_synth: dict[str, Path]) -> None:
    from m2cache.bench.harness import build_args
    from m2cache.bench.plan import HF_OVERHEAD, Model, Plan

    args = build_args(["--store", str(tiny_synth["store"]), "--systems", "hf-bf16,hf-fp32,layer-stream,m2cache"])
    plan = Plan(args, Model(tiny_synth["store"], tiny_synth["hf"]))
    limit = HF_OVERHEAD - 1
    jobs, rows = plan.jobs(limit)
    for s in plan.systems:  # a system runs exactly when what it needs fits the limit
        assert (s in {j.system for j in jobs}) == (plan.needs(s)[0] <= limit), s
    assert "layer-stream" in {j.system for j in jobs}
    for s in ("hf-bf16", "hf-fp32"):
        assert rows[s]["status"] == "does not fit" and rows[s]["needs_bytes"] > limit and rows[s]["needs"]
    assert rows["hf-fp32"]["needs_bytes"] > rows["hf-bf16"]["needs_bytes"]
    roomy = 2 * plan.needs("m2cache")[0]
    m2 = next(j for j in plan.jobs(roomy)[0] if j.system == "m2cache")
    # the engine sizes itself from the limit, in its own process
    assert m2.direct_io and m2.memory == roomy and m2.hbm_budget is None and m2.dram_budget is None


def test_the_floor_is_the_disk_bandwidth_over_the_disk_bytes_per_token() -> None:
    from m2cache.bench.report import add_floor

    rows = {"a": {"disk_read_bytes_per_token": 2e9, "decode_tokens_per_s": 0.25},
            "in-ram": {"disk_read_bytes_per_token": 0.0, "decode_tokens_per_s": 9.0}}
    add_floor(rows, 1e9)
    assert rows["a"]["floor_tokens_per_s"] == 0.5 and rows["a"]["share_of_floor"] == 0.5
    assert rows["in-ram"]["floor_tokens_per_s"] is None  # nothing read from disk: no disk bound


def test_the_plot_has_a_line_per_system_that_ran_and_marks_those_that_do_not_fit(tmp_path: Path) -> None:
    from m2cache.bench.report import plot

    def part(limit: int, rate: float | None) -> dict:
        fits = {"status": "ok", "decode_tokens_per_s": rate} if rate else {"status": "does not fit"}
        return {"limit": {"limit_bytes": limit}, "fp16_bytes": 4 * 10**9,
                "systems": {"llama-f16": {"status": "ok", "decode_tokens_per_s": 0.3}, "m2cache": fits}}

    report = {"config": {"title": "t"}, "limits": [part(10**9, None), part(2 * 10**9, 0.5)]}
    out = plot(report, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bench_child_imports_no_torch_before_its_system_does() -> None:
    """llama.cpp's rows must not carry torch's ~150 MB into a memory-limited run."""
    import subprocess
    import sys

    code = "import sys, m2cache.bench.harness, m2cache.bench.systems; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_an_optional_part_without_its_extra_names_the_extra_to_install() -> None:
    from m2cache.errors import MissingExtraError, require_extra

    with pytest.raises(MissingExtraError, match=r"pip install 'm2cache\[bench\]'") as err:
        require_extra("bench", "json", "m2cache_no_such_module", what="the bench plot")
    assert "m2cache_no_such_module" in str(err.value) and "json," not in str(err.value)


def test_a_gate_policy_row_needs_its_gate_copy_beside_what_its_shares_need(tiny_synth: dict[str, Path],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from m2cache.bench.harness import build_args
    from m2cache.bench.plan import Model, Plan

    def needs(policy: str) -> int:
        args = build_args(["--store", str(tiny_synth["store"]), "--systems", "m2cache", "--policy", policy])
        return Plan(args, Model(tiny_synth["store"], tiny_synth["hf"])).needs("m2cache")[0]

    plan = Plan(build_args(["--store", str(tiny_synth["store"])]), Model(tiny_synth["store"], tiny_synth["hf"]))
    copy = plan.gate_copy_bytes("gate:0.1,0.2,0.7")
    store = plan.store
    from m2cache.formats import quant

    # the packed INT4 gate rows and a float32 norm, every neuron of every layer
    assert copy == (quant.bundle_bytes("int4", 1, store.hidden, store.groups) + 4) * store.num_neurons \
        * store.config.num_layers
    assert plan.gate_copy_bytes("predictor:0.1,0.2,0.7") == 0
    # the same policy with its copy counted and without: what differs is the copy (the margin grows a little)
    with_copy = needs("gate:0.1,0.2,0.7")
    monkeypatch.setattr(Plan, "gate_copy_bytes", lambda self, name, store=None: 0)
    assert with_copy - needs("gate:0.1,0.2,0.7") >= copy


def test_every_row_carries_its_quality_beside_its_speed(tiny_synth: dict[str, Path], tmp_path: Path) -> None:
    """ppl on the same held-out tokens for every system, Δ against dense FP32, bytes per weight and fits;
    transformers in FP32 computes the dense FP32 model, so its perplexity is the reference's."""
    out = tmp_path / "bench.json"
    systems = "m2cache,m2cache-frontier,m2cache-dense-fp16,hf-fp32,llama-f16"
    rc = main(["--store", str(tiny_synth["store"]), "--hf", str(tiny_synth["hf"]),
               "--tokens", "3", "--runs", "1", "--memory", "none", "--prompts", "Hello there", "--hbm-budget", "100%",
               "--dram-budget", "100%", "--no-direct-io", "--systems", systems, "--policies", "gate:0,0,1",
               "--json", str(out)])
    assert rc == 0
    (part,) = json.loads(out.read_text())["limits"]
    rows = part["systems"]
    assert {"m2cache", "m2cache:gate:0,0,1", "m2cache-dense-fp16", "hf-fp32"} <= set(rows)
    for name, row in rows.items():
        if row["status"] == "skipped":
            continue
        for key in ("ppl", "dense_ppl", "ppl_delta", "bytes_per_weight", "fits"):
            assert row.get(key) is not None, (name, key)
        assert row["fits"] is True  # no limit: everything is held
    assert rows["hf-fp32"]["ppl"] == pytest.approx(rows["hf-fp32"]["dense_ppl"], rel=1e-3)
    assert rows["m2cache"]["quality_key"].startswith("m2cache|gate-split:0.05,0.1,0.85|")  # the split store's gate-25
    assert rows["m2cache:gate:0,0,1"]["bytes_per_weight"] < rows["m2cache"]["bytes_per_weight"]
    if "llama-f16" in rows and rows["llama-f16"]["status"] != "skipped":
        assert rows["llama-f16"]["ppl"] == pytest.approx(rows["llama-f16"]["dense_ppl"], rel=0.02)
    assert part["fastest_at"] and all(line.startswith("Δppl") for line in part["fastest_at"])


def test_a_row_with_options_runs_beside_the_plain_one(tiny_synth: dict[str, Path], tmp_path: Path) -> None:
    from m2cache.bench.plan import row_options

    assert row_options("m2cache:gate:0,0,1@window=0@resident=int8") == ("m2cache:gate:0,0,1",
                                                                        {"window": "0", "resident": "int8"})
    for bad in ("m2cache@prefetch=3", "llama-f16@window=0", "m2cache@resident=fp8"):
        with pytest.raises(SystemExit, match="options are for m2cache rows"):
            row_options(bad)
    out = tmp_path / "bench.json"
    rc = main(["--store", str(tiny_synth["store"]), "--hf", str(tiny_synth["hf"]), "--tokens", "3", "--runs", "1",
               "--memory", "none", "--prompts", "Hello there", "--no-direct-io", "--no-quality",
               "--systems", "m2cache,m2cache@resident=int8@window=0", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["limits"][0]["systems"]
    assert [r["runs_ok"] for r in rows.values()] == [1, 1]
    assert rows["m2cache@resident=int8@window=0"]["m2cache_stats"]["resident_form"] == "int8"
