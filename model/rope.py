"""Rotary position embeddings: the tables, a step's slice of them, and the rotation.

Most models use one RoPE base for every layer; Gemma 3's sliding layers use their own
(``ModelConfig.layer_theta``). ``Rotary`` keeps one table per distinct base, and a step's slice
(``rope_slice``) is then one (cos, sin) pair per base, picked per layer by ``layer_rope``; with one base
the slice is the plain (cos, sin) pair every caller already passes around.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from m2cache.formats.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, theta: float | None = None) -> torch.Tensor:
    """Inverse frequencies for base ``theta`` (the model's global base when None). The config's
    rope_scaling applies to the global base only (Gemma 3 scales its global layers, not its local ones)."""
    dim = cfg.head_dim
    base = cfg.rope_theta if theta is None else theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling if base == cfg.rope_theta else None
    kind = sc.get("rope_type", sc.get("type")) if sc else None
    if sc and kind == "linear":
        inv_freq = inv_freq / float(sc["factor"])
    elif sc and kind == "llama3":
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


class _Table:
    """cos/sin of one base for positions, grown on demand (in fp32, cast at use)."""

    def __init__(self, inv_freq: torch.Tensor, head_dim: int) -> None:
        self.inv_freq = inv_freq
        self.cos = torch.empty(0, head_dim, device=inv_freq.device)
        self.sin = torch.empty(0, head_dim, device=inv_freq.device)

    def table(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if end > self.cos.shape[0]:
            n = max(end, 2 * self.cos.shape[0], 256)
            t = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos, self.sin


class Rotary:
    """The model's RoPE tables: one per distinct base among its layers (``kind_of_layer`` maps a layer to its
    table)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        thetas = [cfg.layer_theta(i) for i in range(cfg.num_layers)] or [cfg.rope_theta]
        bases = list(dict.fromkeys(thetas))
        self.kind_of_layer = [bases.index(t) for t in thetas]
        self.tables = [_Table(rope_inv_freq(cfg, b).to(device), cfg.head_dim) for b in bases]
        self.inv_freq = self.tables[0].inv_freq

    def table(self, end: int, kind: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tables[kind].table(end)


@dataclass(frozen=True)
class LayerRopes:
    """A step's (cos, sin) per RoPE base, for a model whose layers use several (``layer_rope`` picks)."""

    per_kind: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    kind_of_layer: list[int]


StepRope = Union[tuple[torch.Tensor, torch.Tensor], LayerRopes]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [H, T, hd]; cos, signed_sin: [T, hd] from ``rope_slice``. The rotate-half's sign lives in
    signed_sin (its first half negated), so the rotation is one roll: same values as neg + cat."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _slice(rope: Rotary, kind: int, pos: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rope.table(pos + T, kind)
    sin = sin[pos : pos + T]
    half = sin.shape[-1] // 2
    return cos[pos : pos + T].to(dtype), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype)


def rope_slice(rope: Rotary, pos: int, T: int, dtype: torch.dtype) -> StepRope:
    """cos and signed sin (see ``apply_rope``) for positions [pos, pos+T) in the compute dtype:
    computed once per step, used by every layer (one pair per RoPE base where the layers have several)."""
    if len(rope.tables) == 1:
        return _slice(rope, 0, pos, T, dtype)
    return LayerRopes(tuple(_slice(rope, k, pos, T, dtype) for k in range(len(rope.tables))), rope.kind_of_layer)


def layer_rope(rope: Rotary | StepRope, layer: int, pos: int, T: int, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) ``layer`` rotates with: from the tables, or from a step's slice."""
    if isinstance(rope, Rotary):
        rope = rope_slice(rope, pos, T, dtype)
    if isinstance(rope, LayerRopes):
        return rope.per_kind[rope.kind_of_layer[layer]]
    return rope
