"""What a family's store becomes in llama.cpp's GGUF: the architecture, tensor names, value transforms and the
architecture's own metadata, as llama.cpp's converter (``convert_hf_to_gguf.py``) writes them.

- ``llama`` and ``mistral`` -> llama.cpp's ``llama`` graph, Q and K rows permuted (it rotates adjacent pairs).
- ``qwen2`` -> ``qwen2`` (q/k/v biases), ``qwen3`` -> ``qwen3`` (QK norms): NeoX RoPE, no permutation.
- ``gemma3_text`` -> ``gemma3``: NeoX RoPE, every norm stored as (1 + w) (llama.cpp scales by the stored
  value), the sliding window with its per-layer pattern and the sliding layers' RoPE base.

llama.cpp's ``llama`` and ``qwen2`` graphs attend to the whole context: a windowed Mistral or Qwen2 exports,
with a warning, and llama.cpp computes the same model only while the context fits the window.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

from m2cache.errors import ConvertError
from m2cache.formats.families import NORM_FIELDS, layer_names

log = logging.getLogger(__name__)

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
PERMUTED = ("llama",)  # llama.cpp archs that rotate adjacent pairs: Q and K rows are permuted
GGUF_FIELD = {  # LayerWeights field -> GGUF names under blk.N., one per Hugging Face name of the field
    "attn_norm": ("attn_norm.weight",), "wqkv": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    "wo": ("attn_output.weight",), "ffn_norm": ("ffn_norm.weight",),
    "qkv_bias": ("attn_q.bias", "attn_k.bias", "attn_v.bias"), "o_bias": ("attn_output.bias",),
    "q_norm": ("attn_q_norm.weight",), "k_norm": ("attn_k_norm.weight",),
    "post_attn_norm": ("post_attention_norm.weight",), "post_ffn_norm": ("post_ffw_norm.weight",),
}
FFN = (("ffn_gate.weight", "mlp.gate_proj.weight"), ("ffn_up.weight", "mlp.up_proj.weight"),
       ("ffn_down.weight", "mlp.down_proj.weight"))


def arch_of(cfg: Any) -> str:
    if cfg.model_type not in ARCH:
        raise ConvertError(f"export-gguf does not know llama.cpp's architecture for {cfg.model_type!r}")
    return ARCH[cfg.model_type]


def gguf_names(cfg: Any) -> Iterator[tuple[str, str, str]]:
    """(GGUF name, Hugging Face name, what to do to it: "", "norm", "permute_q", "permute_k") in file order."""
    permute = arch_of(cfg) in PERMUTED
    yield "token_embd.weight", "model.embed_tokens.weight", ""
    for i in range(cfg.num_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for key, names in layer_names(cfg).items():
            for g, hf in zip(GGUF_FIELD[key], names):
                kind = "norm" if key in NORM_FIELDS else ""
                if permute and hf.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                    kind = "permute_q" if "q_proj" in hf else "permute_k"
                yield b + g, p + hf, kind
        for g, hf in FFN:
            yield b + g, p + hf, ""
    yield "output_norm.weight", "model.norm.weight", "norm"
    if not cfg.tie_word_embeddings:
        yield "output.weight", "lm_head.weight", ""


def add_arch_metadata(w: Any, cfg: Any) -> None:
    """The architecture's own keys beyond the sizes every export writes."""
    import gguf

    arch = arch_of(cfg)
    windowed = cfg.sliding_window is not None
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    elif cfg.rope_scaling:
        log.warning("export-gguf: rope scaling %s is not written; llama.cpp computes unscaled RoPE", cfg.rope_scaling)
    if arch == "gemma3":
        if windowed:
            w.add_sliding_window(cfg.sliding_window)
            w.add_sliding_window_pattern([cfg.layer_window(i) is not None for i in range(cfg.num_layers)])
        w.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)
        if cfg.attn_scale is not None and abs(cfg.attn_scale * cfg.head_dim ** 0.5 - 1) > 1e-6:
            log.warning("export-gguf: query_pre_attn_scalar differs from head_dim; llama.cpp's gemma3 scales "
                        "queries by head_dim ** -0.5 (except its 27B), so it computes a different model")
    elif windowed:
        log.warning("export-gguf: llama.cpp's %s graph attends to the whole context: it computes this model "
                    "only while the context fits the sliding window (%d)", arch, cfg.sliding_window)
