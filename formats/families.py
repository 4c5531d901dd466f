"""The decoder families m2cache runs, and what each one's Hugging Face ``config.json`` means for it.

Every family is the LLaMA block with some of these differences (``ModelConfig`` holds them, so the
model code asks the config, never the family's name):

| family | differences from LLaMA |
| --- | --- |
| ``llama`` | none (SmolLM2, LLaMA 2/3 with llama3 rope scaling) |
| ``mistral`` | a sliding attention window on every layer |
| ``qwen2`` | biases on the q, k and v projections; optional sliding window on the top layers |
| ``qwen3`` | RMSNorm of each head's queries and keys before RoPE (QK norm); optional biases |
| ``gemma3_text`` | GELU-tanh gate, RMSNorm scaling by (1 + w), norms after attention and after the FFN as well as
  before, QK norm, sliding-window layers beside global ones with their own RoPE base, embeddings scaled by
  sqrt(hidden), queries scaled by ``query_pre_attn_scalar``, a tied 262k-entry LM head |

Anything else (another architecture, a mixture of experts, logit soft-capping) is refused by name at
``convert`` with this list, before any weight is read.
"""
from __future__ import annotations

from typing import Any

from m2cache.errors import UnsupportedArchitectureError

FAMILIES: dict[str, str] = {
    "llama": "LlamaForCausalLM (LLaMA 2/3, SmolLM2)",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM (Qwen2, Qwen2.5)",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM (Gemma 3 text models)",
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
SUPPORTED_ACTS = ("silu", "relu", "gelu", "gelu_pytorch_tanh")
SUPPORTED_ROPE = ("default", "llama3", "linear")
SLIDING, FULL = "sliding_attention", "full_attention"
# config keys whose presence means experts (a router picking FFNs per token): no neuron bundles to tier
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def supported() -> str:
    """One line naming what m2cache runs, for every refusal."""
    return "m2cache runs " + ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())


def family_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``ModelConfig`` fields a Hugging Face config dict gives, beyond the sizes; refuses what the
    decoder cannot run, naming it and what is supported."""
    model_type = cfg.get("model_type", "?")
    archs = cfg.get("architectures") or []
    if model_type == "gemma3" and "text_config" in cfg:
        raise UnsupportedArchitectureError(
            f"model_type 'gemma3' ({', '.join(archs) or 'Gemma3ForConditionalGeneration'}) is the multimodal Gemma 3; "
            "m2cache runs its text model: convert a Gemma3ForCausalLM checkpoint (model_type gemma3_text) or its GGUF; "
            + supported())
    if model_type not in FAMILIES:
        name = f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
        raise UnsupportedArchitectureError(f"{name} is not supported; {supported()}")
    moe = [k for k in MOE_KEYS if cfg.get(k)]
    if moe:
        raise UnsupportedArchitectureError(
            f"{model_type} with {moe[0]}={cfg[moe[0]]} is a mixture of experts, which m2cache does not run "
            f"(its FFN is one set of neurons per layer); {supported()}")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in SUPPORTED_ACTS:
        raise UnsupportedArchitectureError(f"hidden_act {act!r} is not supported; supported: {', '.join(SUPPORTED_ACTS)}")
    if cfg.get("mlp_bias"):
        raise UnsupportedArchitectureError(f"{model_type} with mlp_bias is not supported: m2cache's FFN neurons "
                                           "have no biases")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key):
            raise UnsupportedArchitectureError(f"{model_type} with {key}={cfg[key]} is not supported (no soft-capping)")
    fields: dict[str, Any] = {"model_type": model_type, "hidden_act": act}
    fields |= _rope_fields(cfg)
    fields |= _window_fields(cfg, model_type)
    if model_type == "qwen2":
        fields["qkv_bias"] = True
    elif cfg.get("attention_bias") and model_type != "mistral":  # Mistral's projections never have biases
        fields["qkv_bias"] = fields["o_bias"] = True  # LLaMA, Qwen3 and Gemma 3 bias all four projections
    if model_type in ("qwen3", "gemma3_text"):
        fields["qk_norm"] = True
    if model_type == "gemma3_text":
        hidden = int(cfg["hidden_size"])
        fields |= {"sandwich_norm": True, "norm_offset": 1.0, "embed_scale": hidden ** 0.5,
                   "attn_scale": float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
                   "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))}
    return fields


def _rope_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, rope_scaling and (Gemma 3) the sliding layers' own base, from either the flat keys
    (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``) or newer transformers' ``rope_parameters``
    (one dict, or one per layer type)."""
    theta = cfg.get("rope_theta")
    local = cfg.get("rope_local_base_freq")
    scaling = cfg.get("rope_scaling") or None
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:  # per layer type (Gemma 3)
        full, slide = params.get(FULL) or {}, params.get(SLIDING) or {}
        theta = full.get("rope_theta", theta)
        local = slide.get("rope_theta", local)
        if slide.get("rope_type", "default") != "default":
            raise UnsupportedArchitectureError(f"rope type {slide['rope_type']!r} on sliding layers is not supported")
        scaling = full if full.get("rope_type", "default") != "default" else scaling
    elif isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in SUPPORTED_ROPE + (None,):
            raise UnsupportedArchitectureError(
                f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE)}")
        scaling = None if kind in ("default", None) else dict(scaling)
    out: dict[str, Any] = {"rope_theta": float(theta or 10000.0), "rope_scaling": scaling}
    if cfg.get("model_type") == "gemma3_text":
        out["rope_local_theta"] = float(local or 10000.0)
    return out


def _window_fields(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """sliding_window and which layers it applies to (``layer_types``; empty: every layer)."""
    window = cfg.get("sliding_window")
    n = int(cfg["num_hidden_layers"])
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window"):
        window = None
    if not window:
        return {}
    window = int(window)
    types = cfg.get("layer_types")
    if model_type == "gemma3_text" and types is None:
        pattern = int(cfg.get("sliding_window_pattern", 6))
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    elif model_type in ("qwen2", "qwen3") and types is None:
        first = int(cfg.get("max_window_layers", n))
        types = [SLIDING if i >= first else FULL for i in range(n)]
    if types is not None:
        bad = sorted(set(types) - {SLIDING, FULL})
        if bad or len(types) != n:
            raise UnsupportedArchitectureError(f"layer_types {bad or types} are not supported (sliding or full attention)")
        if SLIDING not in types:
            return {}
    if types is None and window >= int(cfg.get("max_position_embeddings", window)):
        return {}  # a window as long as the context never bites
    return {"sliding_window": window, "layer_types": tuple(types or ())}


def layer_names(cfg: Any) -> dict[str, tuple[str, ...]]:
    """A layer's resident tensors by ``LayerWeights`` field: the Hugging Face names (under
    ``model.layers.{i}.``) whose values the field holds (several: concatenated in this order)."""
    names: dict[str, tuple[str, ...]] = {
        "attn_norm": ("input_layernorm.weight",),
        "wqkv": tuple(f"self_attn.{x}_proj.weight" for x in "qkv"),
        "wo": ("self_attn.o_proj.weight",),
        "ffn_norm": ("pre_feedforward_layernorm.weight" if cfg.sandwich_norm else "post_attention_layernorm.weight",),
    }
    if cfg.qkv_bias:
        names["qkv_bias"] = tuple(f"self_attn.{x}_proj.bias" for x in "qkv")
    if cfg.o_bias:
        names["o_bias"] = ("self_attn.o_proj.bias",)
    if cfg.qk_norm:
        names["q_norm"], names["k_norm"] = ("self_attn.q_norm.weight",), ("self_attn.k_norm.weight",)
    if cfg.sandwich_norm:
        names["post_attn_norm"] = ("post_attention_layernorm.weight",)
        names["post_ffn_norm"] = ("post_feedforward_layernorm.weight",)
    return names


NORM_FIELDS = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


def layer_tensor_names(cfg: Any, layer: int) -> list[str]:
    """Every resident tensor of one layer, full Hugging Face names."""
    return [f"model.layers.{layer}.{n}" for names in layer_names(cfg).values() for n in names]


def layer_tensor_shapes(cfg: Any, layer: int) -> dict[str, tuple[int, ...]]:
    """``layer_tensor_names`` with each tensor's shape."""
    D, hd, H, KV = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    rows = {"q": H * hd, "k": KV * hd, "v": KV * hd}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in layer_tensor_names(cfg, layer):
        part = name.split(".", 3)[3]  # after model.layers.{i}.
        if part.startswith("self_attn.o_proj"):
            shapes[name] = (D, H * hd) if part.endswith("weight") else (D,)
        elif part.startswith("self_attn.") and part[10] in rows and part[11:17] == "_proj.":
            shapes[name] = (rows[part[10]], D) if part.endswith("weight") else (rows[part[10]],)
        elif part in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            shapes[name] = (hd,)
        else:  # the layer's norms
            shapes[name] = (D,)
    return shapes
