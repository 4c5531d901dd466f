"""The model families beside LLaMA: Qwen2 (q/k/v biases, a sliding window on its top layers), Qwen3 (QK
norm), LLaMA with ``attention_bias``, Mistral (a sliding window) and Gemma 3 (GELU-tanh, (1 + w) norms, norms after attention and FFN,
QK norm, sliding and global layers with their own RoPE bases, scaled embeddings, one KV head).

Each is a tiny random model built with transformers' own classes and saved as a Hugging Face folder
(FP16 safetensors, the suite's byte-level BPE tokenizer), so no weights are downloaded; the windows are
shorter than the prompts, so they bite. For each: ``convert`` reads the folder, the dense FP32 model
equals transformers' (logits within 1e-4 relative, greedy tokens equal), the tiered engine under
``dense-fp16`` equals the dense model token for token, and the store survives ``export-gguf`` and
``convert`` of that GGUF. A model m2cache cannot run is refused at ``convert`` by name.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import write_tiny_tokenizer
from m2cache.engine.dense import DenseGenerator
from m2cache.engine.engine import Engine, EngineConfig
from m2cache.errors import UnsupportedArchitectureError
from m2cache.offline.convert import convert
from stress.scenarios import ffn_fp16_bytes, one_torch_thread

transformers = pytest.importorskip("transformers")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return",
           "Once upon a time, in a small village, there lived an old clockmaker who"]
NEW_TOKENS = 24
LOGITS_RTOL = 1e-4
WINDOW = 8  # keys a sliding layer sees: shorter than every prompt here

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=16,
              max_position_embeddings=512, rms_norm_eps=1e-6)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (config class, model class, config) -- the classes transformers itself uses for the family
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, use_sliding_window=True,
                                                      sliding_window=WINDOW, max_window_layers=2, rope_theta=50000.0)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # heads wider than hidden / heads, as in the released Qwen3 models (and transformers' GGUF reader takes 128)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=128, rope_theta=1e6)),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=WINDOW)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_key_value_heads=1, sliding_window=WINDOW, query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # Gemma 3 as its released sizes are laid out (and as llama.cpp's gemma3 graph assumes): five sliding
    # layers then a global one, queries scaled by head_dim ** -0.5 (the GGUF format has no key for the scale)
    "gemma3-6": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=6, num_key_value_heads=1, sliding_window=WINDOW, query_pre_attn_scalar=16,
        hidden_activation="gelu_pytorch_tanh")),
}


@dataclass
class Family:
    name: str
    hf: Path
    store: Path
    model: Any  # transformers' model on the folder's FP16 values, in FP32
    tok: Any
    m2: DenseGenerator

    def ids(self, prompt: str) -> list[int]:
        return [int(i) for i in self.tok(prompt)["input_ids"]]

    def hf_greedy(self, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
        out = self.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ref = self.model(torch.tensor([ids])).logits[0].float()
        mine = self.m2.model.forward(ids, self.m2.model.new_cache(), all_logits=True)
        return mine, ref


def randomize(model: Any, seed: int, gemma: bool) -> None:
    """Weights with std 0.1 and norms near 1 (Gemma's near 0: it scales by 1 + w), biases non-zero: the logits
    spread over a few units, so greedy comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(r * 0.1 + (0.0 if gemma else 1.0))
            else:
                p.copy_(r * (0.05 if name.endswith("bias") else 0.1))


def build(root: Path, name: str, seed: int) -> Path:
    cfg_cls, model_cls, extra = FAMILIES[name]
    hf = root / name / "hf"
    hf.mkdir(parents=True)
    vocab = write_tiny_tokenizer(hf)
    ids = json.loads((hf / "tokenizer.json").read_text())["model"]["vocab"]
    cfg = getattr(transformers, cfg_cls)(vocab_size=vocab, bos_token_id=ids["<|im_start|>"],
                                         eos_token_id=ids["<|im_end|>"], pad_token_id=0, **(COMMON | extra))
    model = getattr(transformers, model_cls)(cfg)
    randomize(model, seed, name.startswith("gemma"))
    model.half().save_pretrained(hf)
    return hf


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, name in enumerate(FAMILIES):
        hf = build(root, name, seed=100 + i)
        store = convert(hf, root / name / "store", progress=False, int4_group=32)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(hf)
        out[name] = Family(name, hf, store, model, tok, DenseGenerator(str(store), torch.float32))
    return out


@pytest.fixture(params=list(FAMILIES))
def fam(request: pytest.FixtureRequest, families: dict[str, Family]) -> Family:
    return families[request.param]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- what convert read -------------------------------------------------------------------------
def test_each_family_configures_what_it_claims(families: dict[str, Family]) -> None:
    cfg = {n: f.m2.model.cfg for n, f in families.items()}
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].o_bias and cfg["qwen2"].layer_window(3) == WINDOW
    assert cfg["qwen2"].layer_window(1) is None  # below max_window_layers: full attention
    assert cfg["qwen2-tied"].tie_word_embeddings and cfg["qwen2-tied"].sliding_window is None
    assert cfg["qwen3"].qk_norm and not cfg["qwen3"].qkv_bias and cfg["qwen3"].rope_theta == 1e6
    assert cfg["llama-bias"].qkv_bias and cfg["llama-bias"].o_bias and not cfg["llama-bias"].qk_norm
    assert cfg["mistral"].llama_block is False and all(cfg["mistral"].layer_window(i) == WINDOW for i in range(4))
    g = cfg["gemma3"]
    assert (g.hidden_act, g.norm_offset, g.sandwich_norm, g.qk_norm, g.num_kv_heads) == ("gelu_pytorch_tanh", 1.0,
                                                                                         True, True, 1)
    assert g.embed_scale == pytest.approx(8.0) and g.attn_scale == pytest.approx(24 ** -0.5)
    assert [g.layer_window(i) for i in range(4)] == [WINDOW, WINDOW, None, WINDOW]
    assert (g.layer_theta(0), g.layer_theta(2)) == (1e4, 1e6)
    assert cfg["gemma3"].tie_word_embeddings


# ---- the dense model equals transformers' ------------------------------------------------------
def test_logits_are_not_degenerate(fam: Family) -> None:
    _, ref = fam.logits(fam.ids(PROMPTS[0]))
    assert ref[-1].std() > 0.3


def test_dense_logits_match_transformers_past_the_window(fam: Family) -> None:
    for prompt in PROMPTS:
        ids = fam.ids(prompt)
        assert len(ids) > WINDOW
        mine, ref = fam.logits(ids)
        assert rel_err(mine, ref) <= LOGITS_RTOL, prompt


def test_prefill_then_decode_equals_one_prefill(fam: Family) -> None:
    model = fam.m2.model
    ids = fam.ids(PROMPTS[2])
    whole = model.forward(ids, model.new_cache(), all_logits=True)
    kv = model.new_cache()
    model.forward(ids[:5], kv)
    chunk = model.forward(ids[5:-1], kv, all_logits=True)  # a chunk after earlier tokens, across the window
    last = model.forward(ids[-1:], kv)
    assert rel_err(chunk, whole[5:-1]) <= LOGITS_RTOL
    assert rel_err(last, whole[-1]) <= LOGITS_RTOL


def test_greedy_decoding_matches_transformers(fam: Family) -> None:
    for prompt in PROMPTS:
        ids = fam.ids(prompt)
        got = list(fam.m2.generate_ids(ids, NEW_TOKENS))
        want = fam.hf_greedy(ids)
        assert got == want, prompt


# ---- the tiered engine equals the dense model --------------------------------------------------
async def test_tiered_dense_fp16_gives_the_dense_tokens(fam: Family) -> None:
    ffn = ffn_fp16_bytes(fam.store)
    cfg = EngineConfig(hbm_budget=int(0.5 * ffn), dram_budget=int(0.5 * ffn), policy="dense-fp16", preload="neuron")
    with one_torch_thread():
        async with asyncio.timeout(60):
            async with Engine.open(fam.store, cfg) as engine:
                for prompt in PROMPTS:
                    ids = fam.ids(prompt)
                    want = list(fam.m2.generate_ids(ids, NEW_TOKENS))
                    got = [t async for t in engine.generate_ids(ids, NEW_TOKENS)]
                    assert got == want, (fam.name, prompt)


# ---- refused at convert ------------------------------------------------------------------------
@pytest.mark.parametrize("config, named", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "'gpt2' (GPT2LMHeadModel)"),
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 8}, "'mixtral'"),
    ({"model_type": "qwen3", "num_experts": 64}, "mixture of experts"),
    ({"model_type": "gemma3", "text_config": {}, "architectures": ["Gemma3ForConditionalGeneration"]}, "multimodal"),
])
def test_a_model_m2cache_cannot_run_is_refused_at_convert_by_name(tmp_path: Path, config: dict, named: str) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    sizes = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    (src / "config.json").write_text(json.dumps(sizes | config))
    with pytest.raises(UnsupportedArchitectureError) as e:
        convert(src, tmp_path / "store", progress=False)
    assert named in str(e.value) and "gemma3_text" in str(e.value) and "qwen2" in str(e.value)
    assert str(src / "config.json") in str(e.value)
    assert not (tmp_path / "store").exists()


# ---- export-gguf, and convert of a GGUF ---------------------------------------------------------
def test_convert_of_the_exported_gguf_gives_the_same_model(fam: Family, tmp_path: Path) -> None:
    from m2cache.offline.export_gguf import export_gguf

    pytest.importorskip("gguf")
    if fam.name == "gemma3":
        pytest.skip("a GGUF has no key for Gemma's query_pre_attn_scalar (24 here): its readers take head_dim")
    out = export_gguf(fam.store, tmp_path / "m.gguf", "f16", progress=False)
    again = DenseGenerator(str(convert(out, tmp_path / "store", progress=False, int4_group=32)), torch.float32)
    # llama.cpp's llama and qwen2 graphs have no window: neither has the file, so compare inside it there
    windowed = fam.m2.model.cfg.sliding_window is not None and not fam.name.startswith("gemma3")
    kept = dataclasses.replace(again.model.cfg, rms_norm_eps=fam.m2.model.cfg.rms_norm_eps)  # float32 in GGUF
    if windowed:  # (and Mistral is llama.cpp's llama)
        kept = dataclasses.replace(kept, sliding_window=WINDOW, layer_types=fam.m2.model.cfg.layer_types,
                                   model_type=fam.m2.model.cfg.model_type)
    assert kept == fam.m2.model.cfg
    ids = fam.ids(PROMPTS[2])[:WINDOW if windowed else None]
    mine = fam.m2.model.forward(ids, fam.m2.model.new_cache(), all_logits=True)
    back = again.model.forward(ids, again.model.new_cache(), all_logits=True)
    assert rel_err(back, mine) <= LOGITS_RTOL


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (make peers)")
def test_llama_cpp_on_the_export_gives_the_dense_greedy_tokens(fam: Family, tmp_path: Path) -> None:
    from llama_cpp import Llama

    from m2cache.offline.export_gguf import export_gguf

    if fam.name == "gemma3":
        pytest.skip("llama.cpp's gemma3 graph scales queries by head_dim ** -0.5, not query_pre_attn_scalar (24 here)")
    out = export_gguf(fam.store, tmp_path / "m.gguf", "f16", progress=False)
    # windowed llama and qwen2 graphs attend to everything in llama.cpp: stay inside the window there
    windowed = fam.m2.model.cfg.sliding_window is not None and not fam.name.startswith("gemma3")
    ids = fam.ids(PROMPTS[2])[:4 if windowed else 20]
    n = WINDOW - len(ids) if windowed else NEW_TOKENS
    want = fam.hf_greedy(ids, n)
    llm = Llama(model_path=str(out), n_threads=1, n_ctx=128, verbose=False)
    got: list[int] = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(tok)
        if len(got) == len(want) or tok in fam.m2.model.cfg.eos_token_ids:
            break
    assert got == want
