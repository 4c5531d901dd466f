"""The model's config: one frozen dataclass that the network, the store and the tools all read.

A leaf module (it imports only the errors and the family table), so the storage layer can read a
store's config without importing the network. Every field has a default that means "LLaMA", so a
store written before a field existed reads as the LLaMA model it is.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from m2cache.formats.families import SLIDING, family_fields


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    model_type: str = "llama"
    # the families' differences from the LLaMA block (``m2cache.formats.families``)
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    o_bias: bool = False  # a bias on the output projection (attention_bias=True)
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # norms after attention and after the FFN too (Gemma 3)
    norm_offset: float = 0.0  # every RMSNorm scales by (norm_offset + w): Gemma's (1 + w)
    embed_scale: float = 1.0  # embeddings multiplied by this (Gemma: sqrt(hidden))
    attn_scale: float | None = None  # query scaling; None: head_dim ** -0.5
    sliding_window: int | None = None  # keys a sliding layer's query sees, itself included
    layer_types: tuple[str, ...] = ()  # per layer sliding_attention / full_attention; empty: all sliding if windowed
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: rope_theta

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Reads a Hugging Face ``config.json`` dict; refuses what the decoder cannot run."""
        fam = family_fields(cfg)
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        fam.setdefault("tie_word_embeddings", bool(cfg.get("tie_word_embeddings", False)))
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **fam,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids", ()))
        kw["layer_types"] = tuple(kw.get("layer_types", ()))
        return cls(**kw)

    # ---- what each layer does ------------------------------------------------------------------
    @property
    def llama_block(self) -> bool:
        """Whether every layer is the plain LLaMA attention block (the C attention kernel's)."""
        return not (self.qkv_bias or self.o_bias or self.qk_norm or self.sandwich_norm
                    or self.attn_scale is not None or self.sliding_window is not None)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: it attends to every earlier position)."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != SLIDING):
            return None
        return self.sliding_window

    def layer_theta(self, layer: int) -> float:
        """The RoPE base of ``layer``: Gemma 3's sliding layers have their own."""
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return self.rope_local_theta
        return self.rope_theta

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` that makes transformers build the same LLaMA model (tests, bench, synth)."""
        assert self.model_type == "llama" and self.llama_block, "to_hf writes LLaMA configs only"
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "hidden_act": self.hidden_act, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "attention_bias": False,
            "mlp_bias": False, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        return cfg
