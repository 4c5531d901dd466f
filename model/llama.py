"""The decoder in plain PyTorch: only the model, no I/O and no scheduling.

LLaMA's block is written here; the other families (``m2cache.formats.families``) share it but for their
attention, which ``m2cache.model.family_attention`` computes, and a few hooks here: ``embed`` (scaled
embeddings) and ``ffn_residual`` (a norm of the FFN's output), which every caller goes through.

The FFN is written over *neuron bundles*: a tensor ``W: [n, 3, D]`` whose row j holds neuron j's
gate row, up row and down column. The dense model and the tiered engine call the same
``ffn_bundles`` on the same layout, so with every neuron kept at FP16 the two compute the same
numbers in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from m2cache.errors import UnsupportedArchitectureError
from m2cache.model import cpu_kernels
from m2cache.formats.config import ModelConfig
from m2cache.model.family_attention import family_attention, family_block, takes_family_path
from m2cache.formats.int8 import Int8Weight, linear
from m2cache.model.rope import LayerRopes, Rotary, StepRope, apply_rope, layer_rope, rope_inv_freq, rope_slice

__all__ = ["LayerRopes", "Rotary", "StepRope", "apply_rope", "rope_inv_freq", "rope_slice"]


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


@dataclass(slots=True)
class LayerWeights:
    """One decoder layer's resident weights (everything but the FFN neurons). The projections are
    plain matrices in the compute dtype, or :class:`~m2cache.formats.int8.Int8Weight` (``resident="int8"``)."""

    attn_norm: torch.Tensor  # [D]
    wqkv: torch.Tensor | Int8Weight  # [(H+2KV)*hd, D]: q, k and v fused for one product per token
    wo: torch.Tensor | Int8Weight  # [D, H*hd]
    ffn_norm: torch.Tensor  # [D]: the FFN's input norm
    # the families' extras (``m2cache.model.family_attention``); None in a LLaMA block
    qkv_bias: torch.Tensor | None = None  # [(H+2KV)*hd]
    o_bias: torch.Tensor | None = None  # [D]
    q_norm: torch.Tensor | None = None  # [hd]: each head's queries, before RoPE
    k_norm: torch.Tensor | None = None  # [hd]
    post_attn_norm: torch.Tensor | None = None  # [D]: the attention's output, before the residual
    post_ffn_norm: torch.Tensor | None = None  # [D]: the FFN's output, before the residual


class Rows(Protocol):
    """Embeddings held elsewhere: ``rows[ids]`` gives the rows of ``ids`` (the store's
    ``m2cache.storage.rows.EmbeddingRows`` reads them from its file per call)."""

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor: ...


@dataclass(slots=True)
class ResidentWeights:
    embed: torch.Tensor | Rows  # [V, D]: ``embed[ids]`` gives the rows; may be read from the store
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


@dataclass(frozen=True, slots=True)
class AttentionRoute:
    """Which code computes a layer's attention, decided once from its weights, the compute dtype and the device
    (``attention_route``); ``path`` then takes a chunk's place alone. The dense reference and the tiered engine
    go by the same route, so both take the same kernel and agree to the bit."""

    family: bool  # another family's block at every position (``family_attention``)
    window: int | None  # a sliding window: a chunk reaching past it takes the family's block too
    kernel: bool  # one position runs in the C attention kernel (``cpu_kernels.attention_decode``)
    fused_norm: bool  # ... which then gives the FFN's input as well (the layer's FFN norm taken by it)

    def path(self, pos: int, T: int) -> str:
        """``family``, ``kernel`` or ``torch``, for the chunk [pos, pos+T)."""
        if self.family or (self.window is not None and pos + T > self.window):
            return "family"
        return "kernel" if self.kernel and T == 1 else "torch"


def attention_route(cfg: ModelConfig, w: LayerWeights, layer: int, row: torch.Tensor) -> AttentionRoute:
    """Layer ``layer``'s route for inputs like ``row`` ([1, D]: the compute dtype, on the compute device). The
    kernel takes one float32 or bfloat16 position on the CPU, its weights in that dtype or INT8."""
    applies = cpu_kernels.decode_attention_applies
    return AttentionRoute(family=family_block(cfg, w), window=cfg.layer_window(layer),
                          kernel=applies(row, w.wqkv, w.wo, w.attn_norm),
                          fused_norm=applies(row, w.wqkv, w.wo, w.attn_norm, w.ffn_norm))


def attend_as(path: str, cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, layer: int, kv: KVCache, pos: int,
              rope: Rotary | StepRope, fused_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x + attention(norm(x)) by ``path`` (``AttentionRoute.path``; nothing is checked again here), its keys and
    values written at [pos, pos+T); with ``fused_norm`` on the kernel's path, the FFN's input beside it (else
    None). x: [T, D]."""
    if path == "kernel":
        return _attention_kernel(cfg, w, x, layer, kv, pos, rope, w.ffn_norm if fused_norm else None)
    if path == "family":
        return family_attention(cfg, w, x, layer, kv, pos, rope), None
    return x + linear(_attend(cfg, _qkv(cfg, w, x), layer, kv, pos, rope, x.dtype), w.wo), None


def attention_block(
    cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, layer: int, kv: KVCache, pos: int,
    rope: Rotary | StepRope,
) -> torch.Tensor:
    """x + attention(norm(x)); writes this chunk's keys/values at [pos, pos+T). x: [T, D].

    ``rope``: the Rotary tables, or this step's (cos, sin) from ``rope_slice`` (computed once per step).
    The layer's route (``attention_route``) picks the code: one float32 or bfloat16 position on the CPU runs
    as one call of the attention kernel; a layer with another family's differences takes ``family_attention``."""
    route = attention_route(cfg, w, layer, x[:1])
    return attend_as(route.path(pos, x.shape[0]), cfg, w, x, layer, kv, pos, rope)[0]


def attention_and_norm(
    cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, layer: int, kv: KVCache, pos: int,
    rope: Rotary | StepRope,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_block`` and the FFN's input (its output under the layer's FFN norm): the dense reference's
    decode path, by the route the tiered engine plans its steps with (``m2cache.actors.step_plan``)."""
    route = attention_route(cfg, w, layer, x[:1])
    x, h = attend_as(route.path(pos, x.shape[0]), cfg, w, x, layer, kv, pos, rope, route.fused_norm)
    return x, h if h is not None else rms_norm(x, w.ffn_norm, cfg.rms_norm_eps)


def _attention_kernel(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, layer: int, kv: KVCache, pos: int,
                      rope: Rotary | StepRope, ffn_norm: torch.Tensor | None):
    cos, sin = layer_rope(rope, layer, pos, 1, x.dtype)
    kv.reserve(pos + 1)
    return cpu_kernels.attention_decode(x, w.attn_norm, cfg.rms_norm_eps, w.wqkv, w.wo, cos.contiguous(),
                                        sin.contiguous(), kv.data[layer], pos, cfg.num_heads, cfg.num_kv_heads,
                                        ffn_norm)


def attention_rows(
    cfg: ModelConfig, w: LayerWeights, xs: list[torch.Tensor], layer: int, kvs: list[KVCache], pos: list[int],
    ropes: list[StepRope],
) -> list[torch.Tensor]:
    """``attention_block`` for a batch of sequences: the projections as one product over all their rows
    (the layer's attention weights read once), attention itself per sequence over its own cache."""
    if any(takes_family_path(cfg, w, layer, p, x.shape[0]) for x, p in zip(xs, pos)):
        return [attention_block(cfg, w, x, layer, c, p, r) for x, c, p, r in zip(xs, kvs, pos, ropes)]
    return attention_rows_torch(cfg, w, xs, layer, kvs, pos, ropes)


def attention_rows_torch(
    cfg: ModelConfig, w: LayerWeights, xs: list[torch.Tensor], layer: int, kvs: list[KVCache], pos: list[int],
    ropes: list[StepRope],
) -> list[torch.Tensor]:
    """``attention_rows`` of a LLaMA block (no family difference at any of the chunks: the caller knows)."""
    sizes = [x.shape[0] for x in xs]
    x = torch.cat(xs)  # [sum T, D]
    qkvs = _qkv(cfg, w, x).split(sizes)
    out = torch.cat([_attend(cfg, q, layer, c, p, r, x.dtype) for q, c, p, r in zip(qkvs, kvs, pos, ropes)])
    return list((x + linear(out, w.wo)).split(sizes))


def _qkv(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    return linear(rms_norm(x, w.attn_norm, cfg.rms_norm_eps), w.wqkv)


def _attend(cfg: ModelConfig, qkv: torch.Tensor, layer: int, kv: KVCache, pos: int,
            rope: Rotary | StepRope, dtype: torch.dtype) -> torch.Tensor:
    """Attention of one sequence's chunk over its cache, before the output projection. qkv: [T, (H+2KV)·hd]."""
    T = qkv.shape[0]
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = qkv.split((H * hd, KV * hd, KV * hd), dim=-1)
    cos, sin = layer_rope(rope, layer, pos, T, dtype)
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


def embed(cfg: ModelConfig, res: ResidentWeights, ids: torch.Tensor) -> torch.Tensor:
    """The input rows of ``ids`` [T] -> [T, D], scaled as the family does (Gemma: sqrt(D), in the compute
    dtype as transformers rounds it)."""
    x = res.embed[ids]
    if cfg.embed_scale != 1.0:
        x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
    return x


def ffn_residual(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + the FFN's output y, under the layer's post-FFN norm where the family has one (Gemma)."""
    if w.post_ffn_norm is not None:
        y = rms_norm(y, w.post_ffn_norm, cfg.rms_norm_eps)
    return x + y


def lm_head(cfg: ModelConfig, res: ResidentWeights, x: torch.Tensor) -> torch.Tensor:
    """Logits for the last position. x: [T, D] -> [V] (float32). One float32 or bfloat16 row on the CPU goes
    through the kernels (``cpu_kernels.matvec_row``: norm and product summed in float32, as the native decode
    step computes them), in the dense reference as in the engine."""
    return lm_head_as(head_kernel(res, x[-1:]), cfg, res, x)


def head_kernel(res: ResidentWeights, row: torch.Tensor) -> bool:
    """Whether the LM head of rows like ``row`` ([1, D]) runs in the kernels (``cpu_kernels.matvec_row``)."""
    return cpu_kernels.decode_attention_applies(row, res.lm_head, res.final_norm)


def lm_head_as(kernel: bool, cfg: ModelConfig, res: ResidentWeights, x: torch.Tensor) -> torch.Tensor:
    """``lm_head`` through the kernels or torch, as ``kernel`` says (``head_kernel``; nothing is checked again)."""
    if kernel:
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
        x = embed(self.cfg, self.res, ids)  # [T, D]
        pos = kv.length
        cos_sin = rope_slice(self.rope, pos, ids.shape[0], x.dtype)
        for layer, w in enumerate(self.res.layers):
            x, h = attention_and_norm(self.cfg, w, x, layer, kv, pos, cos_sin)
            x = ffn_residual(self.cfg, w, x, ffn_bundles(h, self.ffn[layer], self.act))
        kv.length = pos + ids.shape[0]
        if all_logits:
            hn = rms_norm(x, self.res.final_norm, self.cfg.rms_norm_eps)
            return linear(hn, self.res.lm_head).float()
        return lm_head(self.cfg, self.res, x)
