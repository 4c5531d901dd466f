"""The LLaMA-family decoder in plain PyTorch: only the model, no I/O and no scheduling.

The FFN is written over *neuron bundles*: a tensor ``W: [n, 3, D]`` whose row j holds neuron j's
gate row, up row and down column. The dense model and the tiered engine call the same
``ffn_bundles`` on the same layout, so with every neuron kept at FP16 the two compute the same
numbers in the same order.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from m2cache.errors import UnsupportedArchitectureError
from m2cache.model import cpu_kernels
from m2cache.model.int8 import Int8Weight, linear
from m2cache.storage.rows import EmbeddingRows

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ACTS = ("silu", "relu", "gelu", "gelu_pytorch_tanh")


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

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Reads a Hugging Face ``config.json`` dict; refuses what the decoder cannot run."""
        model_type = cfg.get("model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported; m2cache runs LLaMA-family decoders "
                f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)}: LlamaForCausalLM and compatible)"
            )
        act = cfg.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTS:
            raise UnsupportedArchitectureError(
                f"hidden_act {act!r} is not supported; supported: {', '.join(SUPPORTED_ACTS)}"
            )
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise UnsupportedArchitectureError(
                "attention_bias/mlp_bias checkpoints are not supported; m2cache runs bias-free LLaMA blocks"
            )
        if cfg.get("sliding_window") and model_type == "mistral":
            window = int(cfg["sliding_window"])
            if window < int(cfg.get("max_position_embeddings", window)):
                raise UnsupportedArchitectureError("sliding-window attention is not supported")
        rope = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        params = cfg.get("rope_parameters")  # newer transformers nest rope settings here
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope = params
        if rope is not None:
            kind = rope.get("rope_type", rope.get("type"))
            if kind not in ("llama3", "default", None):
                raise UnsupportedArchitectureError(
                    f"rope_scaling type {kind!r} is not supported; supported: default, llama3"
                )
            if kind in ("default", None):
                rope = None
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=dict(rope) if rope else None,
            hidden_act=act,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            model_type=model_type,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids", ()))
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` that makes transformers build the same model (tests, bench)."""
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


def activation(name: str):
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise UnsupportedArchitectureError(f"hidden_act {name!r} is not supported")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, D]; normalised in fp32 as transformers does, scaled in the compute dtype
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused call instead of six
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    if sc and sc.get("rope_type", sc.get("type")) == "llama3":
        factor = float(sc["factor"])
        low = float(sc.get("low_freq_factor", 1.0))
        high = float(sc.get("high_freq_factor", 4.0))
        old_ctx = float(sc["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary:
    """cos/sin tables for positions, grown on demand (in fp32, cast at use)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = rope_inv_freq(cfg).to(device)
        self.cos = torch.empty(0, cfg.head_dim, device=device)
        self.sin = torch.empty(0, cfg.head_dim, device=device)

    def table(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if end > self.cos.shape[0]:
            n = max(end, 2 * self.cos.shape[0], 256)
            t = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos, self.sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [H, T, hd]; cos, signed_sin: [T, hd] from ``rope_slice``. The rotate-half's sign lives in
    signed_sin (its first half negated), so the rotation is one roll: same values as neg + cat."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclass(slots=True)
class LayerWeights:
    """One decoder layer's resident weights (everything but the FFN neurons). The projections are
    plain matrices in the compute dtype, or :class:`~m2cache.model.int8.Int8Weight` (``resident="int8"``)."""

    attn_norm: torch.Tensor  # [D]
    wqkv: torch.Tensor | Int8Weight  # [(H+2KV)*hd, D]: q, k and v fused for one product per token
    wo: torch.Tensor | Int8Weight  # [D, H*hd]
    ffn_norm: torch.Tensor  # [D]


@dataclass(slots=True)
class ResidentWeights:
    embed: torch.Tensor | EmbeddingRows  # [V, D]: ``embed[ids]`` gives the rows; may be read from the store
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [D]
    lm_head: torch.Tensor | Int8Weight  # [V, D]; the same tensor as embed when tied and resident

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.dtype


class KVCache:
    """Per-sequence key/value cache on the compute device; grows in chunks."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, capacity: int = 256):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.length = 0
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def reserve(self, end: int) -> None:
        cap = self.data.shape[3]
        if end > cap:
            new_cap = max(end, 2 * cap)
            grown = torch.zeros(*self.data.shape[:3], new_cap, self.data.shape[4], dtype=self.dtype, device=self.device)
            grown[:, :, :, :cap] = self.data
            self.data = grown


def rope_slice(rope: Rotary, pos: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (see ``apply_rope``) for positions [pos, pos+T) in the compute dtype:
    computed once per step, used by every layer."""
    cos, sin = rope.table(pos + T)
    sin = sin[pos : pos + T]
    half = sin.shape[-1] // 2
    return cos[pos : pos + T].to(dtype), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype)


def attention_block(
    cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, layer: int, kv: KVCache, pos: int,
    rope: Rotary | tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """x + attention(norm(x)); writes this chunk's keys/values at [pos, pos+T). x: [T, D].

    ``rope``: the Rotary tables, or this step's (cos, sin) from ``rope_slice`` (computed once per step).
    One float32 or bfloat16 position on the CPU, its weights in that dtype or INT8, runs as one call of the
    attention kernel (``cpu_kernels.attention_decode``)."""
    if cpu_kernels.decode_attention_applies(x, w.wqkv, w.wo, w.attn_norm):
        return _attention_kernel(cfg, w, x, layer, kv, pos, rope, None)[0]
    out = _attend(cfg, _qkv(cfg, w, x), layer, kv, pos, rope, x.dtype)
    return x + linear(out, w.wo)


def attention_and_norm(
    cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, layer: int, kv: KVCache, pos: int,
    rope: Rotary | tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_block`` and the FFN's input (its output under the layer's FFN norm): the decode path of
    the dense reference and of the tiered engine, so both take the same kernel and agree to the bit."""
    if cpu_kernels.decode_attention_applies(x, w.wqkv, w.wo, w.attn_norm, w.ffn_norm):
        x, h = _attention_kernel(cfg, w, x, layer, kv, pos, rope, w.ffn_norm)
        assert h is not None
        return x, h
    x = attention_block(cfg, w, x, layer, kv, pos, rope)
    return x, rms_norm(x, w.ffn_norm, cfg.rms_norm_eps)


def _attention_kernel(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, layer: int, kv: KVCache, pos: int,
                      rope: Rotary | tuple[torch.Tensor, torch.Tensor], ffn_norm: torch.Tensor | None):
    cos, sin = rope_slice(rope, pos, 1, x.dtype) if isinstance(rope, Rotary) else rope
    kv.reserve(pos + 1)
    return cpu_kernels.attention_decode(x, w.attn_norm, cfg.rms_norm_eps, w.wqkv, w.wo, cos.contiguous(),
                                        sin.contiguous(), kv.data[layer], pos, cfg.num_heads, cfg.num_kv_heads,
                                        ffn_norm)


def attention_rows(
    cfg: ModelConfig, w: LayerWeights, xs: list[torch.Tensor], layer: int, kvs: list[KVCache], pos: list[int],
    ropes: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[torch.Tensor]:
    """``attention_block`` for a batch of sequences: the projections as one product over all their rows
    (the layer's attention weights read once), attention itself per sequence over its own cache."""
    sizes = [x.shape[0] for x in xs]
    x = torch.cat(xs)  # [sum T, D]
    qkvs = _qkv(cfg, w, x).split(sizes)
    out = torch.cat([_attend(cfg, q, layer, c, p, r, x.dtype) for q, c, p, r in zip(qkvs, kvs, pos, ropes)])
    return list((x + linear(out, w.wo)).split(sizes))


def _qkv(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    return linear(rms_norm(x, w.attn_norm, cfg.rms_norm_eps), w.wqkv)


def _attend(cfg: ModelConfig, qkv: torch.Tensor, layer: int, kv: KVCache, pos: int,
            rope: Rotary | tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Attention of one sequence's chunk over its cache, before the output projection. qkv: [T, (H+2KV)·hd]."""
    T = qkv.shape[0]
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = qkv.split((H * hd, KV * hd, KV * hd), dim=-1)
    cos, sin = rope_slice(rope, pos, T, dtype) if isinstance(rope, Rotary) else rope
    q = apply_rope(q.view(T, H, hd).transpose(0, 1), cos, sin)  # [H, T, hd]
    k = apply_rope(k.view(T, KV, hd).transpose(0, 1), cos, sin)  # [KV, T, hd]
    v = v.view(T, KV, hd).transpose(0, 1)
    kv.reserve(pos + T)
    cache = kv.data[layer]
    cache[0, :, pos : pos + T] = k
    cache[1, :, pos : pos + T] = v
    keys, values = cache[0, :, : pos + T], cache[1, :, : pos + T]
    if T == 1 and q.device.type == "cpu":
        out = _decode_attention(q, keys, values)
    elif T == 1:
        out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    elif pos == 0:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
    else:  # a chunk after earlier tokens: causal within the chunk, full view of the past
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=qkv.device).tril(diagonal=pos)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1).reshape(T, H * hd)


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One position's attention on the CPU, q: [H, 1, hd], keys/values: [KV, L, hd] -> [H, 1, hd] in q's dtype.

    Each KV head's G = H/KV query heads as one [G, hd] x [hd, L] product, in float32. torch's
    ``scaled_dot_product_attention(enable_gqa=True)`` takes its math path here and widens keys and values to
    H heads first: on the demo shape (9/3 heads) 51 us at 16 cached positions and 435 us at 500, against 33
    and 58 for this. The same values to float32 rounding, not to the bit, so the dense reference and the
    tiered engine both call it."""
    H, _, hd = q.shape
    KV = keys.shape[0]
    qg = q.reshape(KV, H // KV, hd).float()
    scores = torch.matmul(qg, keys.float().transpose(1, 2)).mul_(hd ** -0.5)
    out = torch.matmul(torch.softmax(scores, dim=-1), values.float())
    return out.reshape(H, 1, hd).to(q.dtype)


def ffn_bundles(h: torch.Tensor, W: torch.Tensor, act) -> torch.Tensor:
    """The gated FFN restricted to the neurons in W. h: [T, D]; W: [n, 3, D] -> [T, D]."""
    gate = F.linear(h, W[:, 0])  # [T, n]
    up = F.linear(h, W[:, 1])  # [T, n]
    return (act(gate) * up) @ W[:, 2]  # [T, D]


def lm_head(cfg: ModelConfig, res: ResidentWeights, x: torch.Tensor) -> torch.Tensor:
    """Logits for the last position. x: [T, D] -> [V] (float32). One float32 or bfloat16 row on the CPU goes
    through the kernels (``cpu_kernels.matvec_row``: norm and product summed in float32, as the native decode
    step computes them), in the dense reference as in the engine."""
    if cpu_kernels.decode_attention_applies(x[-1:], res.lm_head, res.final_norm):
        return cpu_kernels.matvec_row(x[-1:], res.lm_head, res.final_norm, cfg.rms_norm_eps)
    h = rms_norm(x[-1:], res.final_norm, cfg.rms_norm_eps)
    return linear(h, res.lm_head)[0].float()


def lm_head_rows(cfg: ModelConfig, res: ResidentWeights, x: torch.Tensor) -> torch.Tensor:
    """Logits of every row, in one product (a batch's last positions). x: [B, D] -> [B, V] (float32)."""
    return linear(rms_norm(x, res.final_norm, cfg.rms_norm_eps), res.lm_head).float()


class DenseModel:
    """Every weight resident: the reference m2cache's tiered engine must reproduce (``--dense``)."""

    def __init__(self, cfg: ModelConfig, res: ResidentWeights, ffn: list[torch.Tensor], device="cpu") -> None:
        self.cfg, self.res, self.ffn = cfg, res, ffn  # ffn[L]: [F, 3, D] in the compute dtype
        self.act = activation(cfg.hidden_act)
        self.rope = Rotary(cfg, device)
        self.device = device
        self.dtype = res.dtype

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, tokens: list[int] | torch.Tensor, kv: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """Runs tokens after the cache's content; returns the last position's logits [V]
        (or every position's, [T, V], with all_logits)."""
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        x = self.res.embed[ids]  # [T, D]
        pos = kv.length
        cos_sin = rope_slice(self.rope, pos, ids.shape[0], x.dtype)
        for layer, w in enumerate(self.res.layers):
            x, h = attention_and_norm(self.cfg, w, x, layer, kv, pos, cos_sin)
            x = x + ffn_bundles(h, self.ffn[layer], self.act)
        kv.length = pos + ids.shape[0]
        if all_logits:
            hn = rms_norm(x, self.res.final_norm, self.cfg.rms_norm_eps)
            return linear(hn, self.res.lm_head).float()
        return lm_head(self.cfg, self.res, x)
