"""``m2cache synth`` and ``m2cache bench`` on a tiny random model: the plumbing, never the timings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from m2cache.bench import SYSTEMS, main
from m2cache.storage.reader import PlainBackend, Store
from m2cache.synth import synth


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


def test_bench_runs_every_system_once_and_writes_the_report(tiny_synth: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    rc = main(["--store", str(tiny_synth["store"]), "--hf", str(tiny_synth["hf"]), "--tokens", "4", "--runs", "1",
               "--prompts", "Hello there", "--hbm-budget", "100%", "--dram-budget", "100%", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"config", "systems", "ratios", "notes"}
    assert list(report["systems"]) == list(SYSTEMS)
    for name, row in report["systems"].items():
        assert row["runs_ok"] == 1, f"{name}: {row['errors']}"
        for key in ("decode_tokens_per_s", "ttft_s", "peak_rss_bytes", "disk_read_bytes_per_token",
                    "moved_bytes_per_token"):
            assert key in row
        assert row["peak_rss_bytes"] > 0
    assert set(report["ratios"]) == {"vs_hf-bf16", "vs_hf-offload"}
    assert "stall_fraction" in report["systems"]["m2cache"]["m2cache_stats"]
    assert "device_map_bytes" in report["systems"]["hf-offload"]
