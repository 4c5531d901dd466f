"""m2cache export-gguf: the store's weights in llama.cpp's layout (Q/K permuted), and llama.cpp's greedy
tokens on the file equal transformers' on the HF folder (when llama-cpp-python is installed)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from m2cache.offline.export_gguf import export_gguf, permute_qk
from m2cache.offline.synth import synth

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return synth(tmp_path_factory.mktemp("export") / "tiny", "tiny", predictors=False, progress=False)


def hf_tensor(hf: Path, name: str) -> torch.Tensor:
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(hf / index[name]), framework="pt") as f:
        return f.get_tensor(name)


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(str(path))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in r.tensors}


def test_f16_export_holds_the_hf_weights_with_q_and_k_rows_permuted(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = export_gguf(tiny["store"], tmp_path / "m.gguf", "f16", progress=False)
    got = gguf_tensors(out)
    heads = json.loads((tiny["hf"] / "config.json").read_text())
    q = hf_tensor(tiny["hf"], "model.layers.1.self_attn.q_proj.weight")
    k = hf_tensor(tiny["hf"], "model.layers.1.self_attn.k_proj.weight")
    down = hf_tensor(tiny["hf"], "model.layers.1.mlp.down_proj.weight")
    assert np.array_equal(got["blk.1.attn_q.weight"], permute_qk(q, heads["num_attention_heads"]).float().numpy())
    assert np.array_equal(got["blk.1.attn_k.weight"], permute_qk(k, heads["num_key_value_heads"]).float().numpy())
    assert np.array_equal(got["blk.1.ffn_down.weight"], down.float().numpy())
    assert not np.array_equal(got["blk.1.attn_q.weight"], q.float().numpy())


@pytest.mark.parametrize("kind, bpw", [("q8_0", 34 / 32), ("q4_0", 18 / 32)])
def test_quantized_exports_are_close_to_the_weights_at_their_bytes_per_weight(tiny: dict[str, Path], tmp_path: Path,
                                                                              kind: str, bpw: float) -> None:
    out = export_gguf(tiny["store"], tmp_path / f"m-{kind}.gguf", kind, workers=1, progress=False)
    r = gguf.GGUFReader(str(out))
    up = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight")
    assert up.tensor_type.name == kind.upper() and up.n_bytes == int(up.n_elements * bpw)
    want = hf_tensor(tiny["hf"], "model.layers.0.mlp.up_proj.weight").float().numpy()
    err = np.abs(gguf.quants.dequantize(up.data, up.tensor_type) - want).max() / np.abs(want).max()
    assert err < (0.01 if kind == "q8_0" else 0.15)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (make peers)")
def test_llama_cpp_on_the_export_gives_transformers_greedy_tokens(tiny: dict[str, Path], tmp_path: Path) -> None:
    from llama_cpp import Llama
    from transformers import LlamaForCausalLM

    out = export_gguf(tiny["store"], tmp_path / "m.gguf", "f16", progress=False)
    ids = [1, 40, 41, 42, 43, 44, 45]
    model = LlamaForCausalLM.from_pretrained(tiny["hf"], dtype=torch.float32)
    want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    llm = Llama(model_path=str(out), n_threads=1, n_ctx=64, verbose=False)
    got = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(tok)
        if len(got) == len(want):
            break
    assert got == want
