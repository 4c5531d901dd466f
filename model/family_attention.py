"""The attention block of the families that differ from LLaMA's, in torch.

One function covers them all, each difference switched on by the layer's weights and the config:
biases on the projections (Qwen2; ``attention_bias``), RMSNorm of each head's queries and keys before
RoPE (Qwen3, Gemma 3), a query scale of its own (Gemma 3's ``query_pre_attn_scalar``), a sliding window
(Mistral, Gemma 3's local layers, Qwen2's top layers) and a norm of the attention's output before the
residual (Gemma 3). LLaMA's block keeps its own path (``m2cache.model.llama``: the C attention kernel
for a CPU decode position), which these layers never take: its kernel knows none of these differences,
and adding them to it would slow the path LLaMA takes every token. A windowed layer whose window does
not yet bite (every key in view) is LLaMA's block, and takes that path.

The KV cache keeps every position (a window only narrows which keys a query sees): a cache trimmed to
the window would save memory on long contexts but is not needed to compute the same numbers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from m2cache.formats.int8 import linear
from m2cache.model.rope import Rotary, StepRope, apply_rope, layer_rope

if TYPE_CHECKING:
    from m2cache.formats.config import ModelConfig
    from m2cache.model.llama import KVCache, LayerWeights


def takes_family_path(cfg: ModelConfig, w: LayerWeights, layer: int, pos: int, T: int) -> bool:
    """Whether this layer's chunk [pos, pos+T) needs this module's attention rather than LLaMA's."""
    if family_block(cfg, w):
        return True
    window = cfg.layer_window(layer)
    return window is not None and pos + T > window


def family_block(cfg: ModelConfig, w: LayerWeights) -> bool:
    """Whether the layer differs from LLaMA's block at every position (biases, extra norms, a query scale)."""
    return (w.qkv_bias is not None or w.o_bias is not None or w.q_norm is not None or w.post_attn_norm is not None
            or cfg.attn_scale is not None)


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension as ``llama.rms_norm`` computes it, for any leading shape."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def family_attention(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, layer: int, kv: KVCache, pos: int,
                     rope: Rotary | StepRope) -> torch.Tensor:
    """x + [post-norm] o_proj(attention(q, k, v)) for one sequence's chunk; writes its keys and values at
    [pos, pos+T). x: [T, D]."""
    T = x.shape[0]
    H, KV, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    qkv = linear(norm(x, w.attn_norm, eps), w.wqkv)  # [T, (H+2KV)*hd]
    if w.qkv_bias is not None:
        qkv = qkv + w.qkv_bias
    q, k, v = qkv.split((H * hd, KV * hd, KV * hd), dim=-1)
    q, k = q.reshape(T, H, hd), k.reshape(T, KV, hd)
    if w.q_norm is not None and w.k_norm is not None:
        q, k = norm(q, w.q_norm, eps), norm(k, w.k_norm, eps)
    cos, sin = layer_rope(rope, layer, pos, T, x.dtype)
    q = apply_rope(q.transpose(0, 1), cos, sin)  # [H, T, hd]
    k = apply_rope(k.transpose(0, 1), cos, sin)  # [KV, T, hd]
    kv.reserve(pos + T)
    cache = kv.data[layer]
    cache[0, :, pos : pos + T] = k
    cache[1, :, pos : pos + T] = v.reshape(T, KV, hd).transpose(0, 1)
    window = cfg.layer_window(layer)
    start = 0 if window is None else max(0, pos + 1 - window)  # the first key the chunk's first query sees
    keys, values = cache[0, :, start : pos + T], cache[1, :, start : pos + T]
    mask = _mask(T, pos, start, window, x.device)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=cfg.attn_scale, enable_gqa=True)
    o = linear(out.transpose(0, 1).reshape(T, H * hd), w.wo)
    if w.o_bias is not None:
        o = o + w.o_bias
    if w.post_attn_norm is not None:
        o = norm(o, w.post_attn_norm, eps)
    return x + o


def _mask(T: int, pos: int, start: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Which keys [start, pos+T) each query at pos+i sees: the causal ones, within ``window`` of it.
    None where every query sees every key (a single decode position inside its window)."""
    if T == 1 and (window is None or pos + 1 - start <= window):
        return None
    q_pos = torch.arange(pos, pos + T, device=device)[:, None]
    k_pos = torch.arange(start, pos + T, device=device)[None, :]
    seen = k_pos <= q_pos
    if window is not None:
        seen &= k_pos > q_pos - window
    return seen
