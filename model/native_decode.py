"""A decode token of one sequence as one native call (``csrc/decode.c``), when every weight it needs is in memory.

The layer-by-layer path hands each layer between actors (rank, plan, serve, compute: a thread hop and several
event-loop turns a layer); when the DRAM tier holds every layer of every precision the gate policy uses for good,
none of that has anything to do, and a layer costs what its bytes cost. ``NativeDecoder`` holds the tables the
C side reads — per layer the resident attention weights, the gate policy's packed INT4 gate copy and its
norms, the policy's counts, and (``bind``) the DRAM tier's whole-layer tensors — and runs a token: every layer's
attention block, gate scores, choice of neurons and precisions and FFN, then the LM head, with no Python
between layers. It computes what the layer-by-layer path computes with the same kernels (see decode.c).

It takes: the CPU, float32 or bfloat16, attention weights in the compute dtype or INT8 (``resident`` full or
int8, not streamed), a gate policy scored by the C kernel, a gated FFN with a kernel activation.
"""
from __future__ import annotations

import ctypes

import torch

from m2cache.model import cpu_kernels
from m2cache.formats.int8 import Int8Weight, scale_group
from m2cache.formats.shares import PRECISION_ORDER
from m2cache.model.policy import GatePolicy

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class Layer(ctypes.Structure):
    """``m2c_layer`` (csrc/m2cache.h)."""

    _fields_ = [("attn_norm", _P), ("wqkv", _P), ("wo", _P), ("ffn_norm", _P), ("sqkv", _P), ("so", _P),
                ("wgroup", _I64), ("gates", _P), ("norms", _P), ("ffn", _P * 3), ("counts", _I64 * 3)]


class Model(ctypes.Structure):
    """``m2c_model`` (csrc/m2cache.h)."""

    _fields_ = [("D", _I64), ("H", _I64), ("KV", _I64), ("hd", _I64), ("F", _I64), ("g8", _I64), ("g4", _I64),
                ("parts", _I64), ("vocab", _I64), ("bundle_bytes", _I64 * 3), ("eps", ctypes.c_float),
                ("act", ctypes.c_int), ("is_bf16", ctypes.c_int), ("final_norm", _P), ("head", _P),
                ("head_scale", _P), ("head_group", _I64)]


STAMPS = 4  # per layer: start, attention done, neurons chosen, FFN done


def applies(cfg, res, policy, *, device: torch.device, dtype: torch.dtype, parts: int) -> bool:
    """Whether ``NativeDecoder`` can run this engine's decode tokens (the tiers aside: see ``bind``)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not cpu_kernels.available():
        return False
    if not isinstance(policy, GatePolicy) or policy.kernel_act is None or parts not in (2, 3):
        return False
    if cfg.hidden_act not in cpu_kernels.ACTIVATIONS or not _plain_llama(cfg):
        return False
    mats = [m for w in res.layers for m in (w.wqkv, w.wo)] + [res.lm_head]
    return all(_takes(m, dtype) for m in mats) and all(g.dtype == torch.uint8 for g in policy.gates)


def _plain_llama(cfg) -> bool:
    """The call computes LLaMA's block: none of the other families' biases, extra norms, scalings or windows."""
    return not (cfg.qkv_bias or cfg.o_bias or cfg.qk_norm or cfg.sandwich_norm or cfg.norm_offset or cfg.sliding_window
                or cfg.layer_types or cfg.rope_local_theta is not None) and cfg.embed_scale == 1.0 \
        and cfg.attn_scale in (None, cfg.head_dim ** -0.5)


def _takes(m, dtype: torch.dtype) -> bool:
    t = m.q if isinstance(m, Int8Weight) else m
    want = torch.int8 if isinstance(m, Int8Weight) else dtype
    return isinstance(t, torch.Tensor) and t.dtype == want and t.is_contiguous() and t.device.type == "cpu"


class NativeDecoder:
    """The tables of one engine's model for ``m2c_decode``; the tensors they point into are kept here."""

    def __init__(self, cfg, res, policy: GatePolicy, *, parts: int, groups, bundle_bytes: dict[str, int],
                 dtype: torch.dtype) -> None:
        self.lib = cpu_kernels.library()
        assert self.lib is not None, "NativeDecoder without the kernels: check applies() first"
        self.cfg, self.res, self.policy, self.dtype = cfg, res, policy, dtype
        self.n = cfg.num_layers
        self._keep: list[torch.Tensor] = []  # every tensor a table points into
        head, head_scale = self._matrix(res.lm_head)
        self.model = Model(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, policy.num_neurons,
                           groups.int8, groups.int4, parts, cfg.vocab_size,
                           (_I64 * 3)(*(bundle_bytes[p] for p in PRECISION_ORDER)), cfg.rms_norm_eps,
                           cpu_kernels.ACTIVATIONS[cfg.hidden_act], int(dtype == torch.bfloat16),
                           self._ptr(res.final_norm), head, head_scale, scale_group(res.lm_head))
        self.layers = (Layer * self.n)()
        for L, w in enumerate(res.layers):
            (wqkv, sqkv), (wo, so) = self._matrix(w.wqkv), self._matrix(w.wo)
            assert scale_group(w.wqkv) == scale_group(w.wo), "a layer's INT8 projections share one group"
            norms = policy.norms[L].float().contiguous()
            counts = policy.counts(L)
            self.layers[L] = Layer(self._ptr(w.attn_norm), wqkv, wo, self._ptr(w.ffn_norm), sqkv, so, scale_group(w.wqkv),
                                   self._ptr(policy.gates[L]), self._ptr(norms), (_P * 3)(),
                                   (_I64 * 3)(*(counts[p] for p in PRECISION_ORDER)))
        self.used = tuple(p for p in PRECISION_ORDER if any(policy.counts(L)[p] for L in range(self.n)))
        self.bound: list[dict[str, torch.Tensor]] | None = None
        self.stamps = torch.zeros(STAMPS * self.n + 2, dtype=torch.int64)

    def _ptr(self, t: torch.Tensor) -> int:
        t = t.contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _matrix(self, m) -> tuple[int, int | None]:
        """A resident matrix as the kernels read it: (its rows, float32 scales of INT8 rows or None)."""
        if isinstance(m, Int8Weight):
            return self._ptr(m.q), self._ptr(m.scale.float())
        return self._ptr(m), None

    def bind(self, tables: list[dict[str, torch.Tensor]]) -> None:
        """The FFN's rows: per layer, each used precision's whole layer ([F, bundle_bytes] uint8, row j neuron j)."""
        if self.bound is not None and all(all(t is self.bound[L].get(p) for p, t in tab.items())
                                          for L, tab in enumerate(tables)):
            return
        F = self.policy.num_neurons
        for L, tab in enumerate(tables):
            for i, p in enumerate(PRECISION_ORDER):
                t = tab.get(p)
                if self.layers[L].counts[i] and (t is None or t.shape[0] != F or not t.is_contiguous()
                                                 or t.shape[1] != self.model.bundle_bytes[i]):
                    raise RuntimeError(f"layer {L}'s {p} rows are not a whole layer of {F} bundles")
                self.layers[L].ffn[i] = None if t is None else t.data_ptr()
        self.bound = [dict(t) for t in tables]

    def step(self, x: torch.Tensor, kv, cos: torch.Tensor, sin: torch.Tensor, *, timed: bool = False) -> torch.Tensor:
        """One token: x [1, D] its embedding (compute dtype) -> its logits [V] float32; the KV cache written at
        ``kv.length`` (the caller moves it on). ``timed``: ``self.stamps`` gets each layer's times."""
        assert self.bound is not None, "bind() the FFN's rows first"
        pos = kv.length
        kv.reserve(pos + 1)
        x = x.to(self.dtype).contiguous().clone()
        cache, cs, sn = kv.data, cos.contiguous(), sin.contiguous()
        assert cache.dtype == x.dtype == cs.dtype == sn.dtype and cache.is_contiguous()
        logits = torch.empty(self.cfg.vocab_size, dtype=torch.float32)
        rc = self.lib.m2c_decode(ctypes.addressof(self.model), ctypes.addressof(self.layers), self.n, x.data_ptr(), cache.data_ptr(),
                                 cache.shape[3], pos, cs.data_ptr(), sn.data_ptr(), logits.data_ptr(),
                                 self.stamps.data_ptr() if timed else None)
        if rc != 0:
            raise RuntimeError(f"m2c_decode failed with code {rc}")
        return logits
