"""m2cache's dense FP32 model equals transformers' LlamaForCausalLM on the same weights.

Both read the same FP16 values (the HF folder holds FP16 safetensors; the store keeps resident weights
and FP16 bundles bit-identical to them), both compute in FP32, so the logits agree to rounding and
greedy decoding is token-identical. Checked on the real demo model (slow) and on the tiny random
models (SiLU untied, gated ReLU with tied head, llama3 rope scaling).

Measured (torch 2.13 CPU, transformers 5.24): demo relative error of the final logits 0.3e-6 to 2.6e-6
(max abs difference 8e-5 on logits of magnitude ~20); tiny models ~5e-7 to 7e-7.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from m2cache.engine.dense import DenseGenerator

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue in two sentences.",
    "List three prime numbers greater than 100:",
    "Once upon a time, in a small village,",
]
NEW_TOKENS = 64
LOGITS_RTOL = 1e-4


@dataclass
class Pair:
    """The same model loaded by transformers and by m2cache."""

    hf_model: Any
    hf_tok: Any
    m2: DenseGenerator

    def hf_ids(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            ids = self.hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
        else:
            ids = self.hf_tok(prompt)["input_ids"]
        return [int(i) for i in ids]

    def hf_greedy(self, ids: list[int]) -> list[int]:
        pad = self.hf_model.generation_config.eos_token_id
        pad = pad[0] if isinstance(pad, list) else pad
        # greedy, whatever the folder's generation_config.json asks for (the demo's a repetition penalty)
        out = self.hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     repetition_penalty=1.0, pad_token_id=pad if pad is not None else 0)
        return out[0, len(ids):].tolist()

    def m2_greedy(self, ids: list[int]) -> list[int]:
        return list(self.m2.generate_ids(ids, NEW_TOKENS))

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(m2cache, transformers) logits of every position: [T, V] each."""
        ref = self.hf_model(torch.tensor([ids])).logits[0].float()
        model = self.m2.model
        mine = model.forward(ids, model.new_cache(), all_logits=True)
        return mine, ref


def load_pair(hf: Path, store: Path) -> Pair:
    model = transformers.LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    return Pair(model, tok, DenseGenerator(str(store), torch.float32))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def demo(demo_store: Any) -> Pair:
    return load_pair(demo_store.hf, demo_store.store)


@pytest.fixture(scope="module")
def tiny_pairs(tiny_models: dict[str, Any]) -> dict[str, Pair]:
    return {name: load_pair(m.hf, m.store) for name, m in tiny_models.items()}


@pytest.fixture
def tiny(tiny_variant: Any, tiny_pairs: dict[str, Pair]) -> Pair:
    return tiny_pairs[tiny_variant.name]


# ---- the demo model ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_demo_tokenizer_gives_transformers_ids(demo: Pair, chat: bool) -> None:
    for prompt in PROMPTS:
        assert demo.m2.tokenizer.encode(prompt, raw=not chat) == demo.hf_ids(prompt, chat), prompt


@pytest.mark.slow
def test_demo_dense_logits_match_transformers(demo: Pair) -> None:
    for prompt in PROMPTS[:3]:
        for chat in (False, True):
            mine, ref = demo.logits(demo.hf_ids(prompt, chat))
            assert rel_err(mine[-1], ref[-1]) <= LOGITS_RTOL, (prompt, chat)
            assert rel_err(mine, ref) <= LOGITS_RTOL, (prompt, chat)


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_demo_greedy_decoding_matches_transformers(demo: Pair, prompt: str, chat: bool) -> None:
    ids = demo.hf_ids(prompt, chat)
    assert demo.m2_greedy(ids) == demo.hf_greedy(ids)


# ---- the tiny random models -------------------------------------------------------------------
def test_tiny_variants_configure_what_they_claim(tiny_pairs: dict[str, Pair]) -> None:
    silu, relu, llama3 = (tiny_pairs[n].m2.model.cfg for n in ("silu", "relu-tied", "llama3-rope"))
    assert (silu.hidden_act, silu.tie_word_embeddings, silu.rope_scaling) == ("silu", False, None)
    assert (relu.hidden_act, relu.tie_word_embeddings) == ("relu", True)
    assert llama3.rope_scaling is not None and llama3.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_tiny_tokenizer_gives_transformers_ids(tiny: Pair, chat: bool) -> None:
    for prompt in PROMPTS:
        assert tiny.m2.tokenizer.encode(prompt, raw=not chat) == tiny.hf_ids(prompt, chat), prompt


def test_tiny_logits_are_not_degenerate(tiny: Pair) -> None:
    # a near-flat distribution would make the greedy comparisons below meaningless
    _, ref = tiny.logits(tiny.hf_ids(PROMPTS[0], False))
    assert ref[-1].std() > 0.3
    top2 = ref[-1].topk(2).values
    assert float(top2[0] - top2[1]) > 1e-3


def test_tiny_dense_logits_match_transformers(tiny: Pair) -> None:
    for prompt in PROMPTS:
        for chat in (False, True):
            mine, ref = tiny.logits(tiny.hf_ids(prompt, chat))
            assert rel_err(mine[-1], ref[-1]) <= LOGITS_RTOL, (prompt, chat)
            assert rel_err(mine, ref) <= LOGITS_RTOL, (prompt, chat)


def test_tiny_logits_match_transformers_past_the_original_rope_context(tiny_pairs: dict[str, Pair]) -> None:
    # llama3 scaling only matters past original_max_position_embeddings (32): use 200 tokens
    pair = tiny_pairs["llama3-rope"]
    ids = pair.hf_ids(" ".join(PROMPTS * 3), False)[:200]
    assert len(ids) == 200
    mine, ref = pair.logits(ids)
    assert rel_err(mine, ref) <= LOGITS_RTOL


def test_tiny_prefill_then_decode_equals_one_prefill(tiny: Pair) -> None:
    # the KV cache path (chunk after earlier tokens) gives the logits a single pass gives
    model = tiny.m2.model
    ids = tiny.hf_ids(PROMPTS[1], True)
    whole = model.forward(ids, model.new_cache(), all_logits=True)
    kv = model.new_cache()
    model.forward(ids[:5], kv)
    chunk = model.forward(ids[5:-1], kv, all_logits=True)
    last = model.forward(ids[-1:], kv)
    assert rel_err(chunk, whole[5:-1]) <= LOGITS_RTOL
    assert rel_err(last, whole[-1]) <= LOGITS_RTOL


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_tiny_greedy_decoding_matches_transformers(tiny: Pair, chat: bool) -> None:
    for prompt in PROMPTS:
        ids = tiny.hf_ids(prompt, chat)
        assert tiny.m2_greedy(ids) == tiny.hf_greedy(ids), prompt
