"""The command line as a new user meets it: sampling from the model's own generation config, budgets that
count together on the CPU said so, figures that say what they count, a store that is a file named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from m2cache.cli.engine_args import sampling
from m2cache.cli.main import build_parser, main
from m2cache.offline.convert import convert
from m2cache.storage.reader import Store


@pytest.fixture(scope="module")
def sampled(tiny_models, tmp_path_factory) -> Path:
    """The tiny model converted from a folder whose generation_config.json samples."""
    hf = Path(shutil.copytree(tiny_models["silu"].hf, tmp_path_factory.mktemp("gen") / "hf"))
    (hf / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.3, "eos_token_id": 2}))
    return convert(hf, hf.parent / "store", progress=False)


def args_of(*argv: str):
    return build_parser().parse_args(["generate", "STORE", "prompt", *argv])


def test_convert_keeps_the_model_s_sampling_and_generate_uses_it_unless_told(sampled, tiny_store) -> None:
    store = Store(sampled)
    assert store.manifest["generation"] | {"source": ""} == {"temperature": 0.7, "top_p": 0.8,
                                                             "repetition_penalty": 1.3, "source": ""}
    assert sampling(args_of(), store) == {"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.3}
    assert sampling(args_of("--temperature", "0"), store) == {"temperature": 0.0, "top_p": 0.8,
                                                              "repetition_penalty": 1.3}
    assert sampling(args_of("--greedy"), store) == {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}
    # a model without a generation config: greedy, as before
    assert sampling(args_of(), Store(tiny_store.store)) == {"temperature": 0.0, "top_p": 1.0,
                                                            "repetition_penalty": 1.0}


def test_a_folder_that_does_not_sample_keeps_only_its_repetition_penalty(tiny_models, tmp_path) -> None:
    hf = Path(shutil.copytree(tiny_models["silu"].hf, tmp_path / "hf"))
    (hf / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "repetition_penalty": 1.1}))
    generation = Store(convert(hf, tmp_path / "store", progress=False)).manifest["generation"]
    assert generation["repetition_penalty"] == 1.1 and "temperature" not in generation


def test_generate_says_that_on_the_cpu_the_two_budgets_count_together(tiny_store, capsys) -> None:
    assert main(["generate", str(tiny_store.store), "Hello", "--max-new-tokens", "3", "--hbm-budget", "1KB",
                 "--stats"]) == 0
    err = capsys.readouterr().err
    assert "count together" in err and "--hbm-budget 1.0KB" in err
    assert "device pool: not used on the CPU" in err  # and why the device figures are 0
    assert "FFN weights a decode token computes from" in err and "of a dense FP16 model's" in err


def test_generate_stats_on_the_device_pool_say_what_the_hit_ratio_counts(tiny_store, capsys) -> None:
    assert main(["generate", str(tiny_store.store), "Hello", "--max-new-tokens", "3", "--no-compute-from-dram",
                 "--hbm-budget", "1MB", "--dram-budget", "1MB", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "count together" not in err
    assert "were there already (device hit ratio)" in err


def test_a_store_that_is_a_file_is_named_so_on_the_command_line(tiny_store, capsys) -> None:
    assert main(["generate", str(tiny_store.store / "manifest.msgpack"), "Hello"]) == 1
    assert "is a file, not a store folder" in capsys.readouterr().err


def test_the_demo_names_the_launcher_when_m2cache_is_not_on_the_path(monkeypatch, tmp_path) -> None:
    from m2cache.cli import demo

    exe = tmp_path / ".venv" / "bin" / "m2cache"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [".venv/bin/m2cache", "demo"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert demo._command() == ".venv/bin/m2cache"
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin:/bin")
    assert demo._command() == "m2cache"
