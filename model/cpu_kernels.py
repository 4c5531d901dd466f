"""The CPU kernels of the sparse mixed-precision FFN (``csrc/sparse_ffn.c``) and of a decode position's
attention block (``csrc/attention.c``), built on first use.

On the CPU the device pool and DRAM are the same memory, so the fastest FFN reads each kept neuron's
bundle where it sits in the pool, by slot, and widens INT8/INT4 values in registers: no gather into a
contiguous buffer and no dequantised copy per token (docs/architecture.md §1, §6). torch has no such operator
(its weight-only kernels want contiguous, specially packed weights), so m2cache ships its own kernels in C (csrc/).
A decode position's attention block is ~35 small torch operators, each dearer than its arithmetic
once the layer's weights have streamed through the caches; ``attention_decode`` is one call.

The sources are compiled once per machine (``m2cache.model.cpu_build``); where they cannot be,
``available()`` is False and callers use the torch path.
"""
from __future__ import annotations

import ctypes
import weakref

import torch

from m2cache.model.cpu_build import available, library
from m2cache.formats.int8 import scale_group
from m2cache.formats.quant import Groups, select_parts

__all__ = ["available", "library"]  # built and loaded in cpu_build; the kernels' Python side is here

ACTIVATIONS = {"silu": 0, "relu": 1, "gelu": 2, "gelu_pytorch_tanh": 3}
MAX_TOKENS = 64  # rows of h one call takes (the C side's MAX_T)


def set_threads(n: int) -> int:
    """The kernels' threads (process-wide, as torch's are): each product is shared among ``n`` threads, this
    one and ``n - 1`` of the kernels' own pool, handed work in microseconds; returns the number before."""
    lib = library()
    if lib is None:
        return 1
    before = int(lib.m2c_threads())
    lib.m2c_set_threads(max(1, int(n)))
    return before


def threads() -> int:
    """The kernels' threads now (1 without the kernels)."""
    lib = library()
    return 1 if lib is None else int(lib.m2c_threads())


def ffn_group(precision: str, pool: torch.Tensor, slots: torch.Tensor, h: torch.Tensor, out: torch.Tensor,
              dim: int, groups: Groups, act: str, gact: torch.Tensor | None = None) -> None:
    """out += the FFN of the neurons at ``slots`` of ``pool`` (one precision), for every row of h.

    pool: [S, bundle_bytes] uint8, contiguous; slots: int64 [n]; h, out: float32 [T, D], contiguous.
    ``gact``: for a split store's (up, down) bundles, the gate activations [n, T] float32, contiguous;
    None for whole (gate, up, down) bundles. The caller keeps every tensor alive for the call (it is
    synchronous).
    """
    lib = library()
    assert lib is not None, "ffn_group called without the kernels: check available() first"
    assert pool.dtype == torch.uint8 and pool.is_contiguous() and pool.device.type == "cpu"
    assert slots.dtype == torch.int64 and slots.is_contiguous()
    assert h.dtype == out.dtype == torch.float32 and h.is_contiguous() and out.is_contiguous()
    T = h.shape[0]
    assert T <= MAX_TOKENS and h.shape[1] == dim == out.shape[1], "h and out must be [T <= 64, D]"
    n = slots.numel()
    if n == 0:
        return
    code = ACTIVATIONS[act]
    args = (pool.data_ptr(), pool.shape[0], pool.shape[1], slots.data_ptr(), n, h.data_ptr(), T, dim)
    if gact is not None:
        assert gact.dtype == torch.float32 and gact.is_contiguous() and tuple(gact.shape) == (n, T)
    split = (2, gact.data_ptr()) if gact is not None else (3, None)
    if precision == "fp16":
        rc = lib.m2c_ffn_fp16(*args, code, *split, out.data_ptr())
    elif precision == "int8":
        rc = lib.m2c_ffn_int8(*args, groups.int8, code, *split, out.data_ptr())
    elif precision == "int4":
        rc = lib.m2c_ffn_int4(*args, groups.int4, code, *split, out.data_ptr())
    else:
        raise ValueError(f"unknown precision {precision!r}")
    if rc == -3:  # checked on the C side before any row is read
        raise IndexError(f"slots must lie in [0, {pool.shape[0]}) for the {precision} pool")
    if rc != 0:
        raise RuntimeError(f"m2c_ffn_{precision} failed with code {rc} (T={T}, D={dim}, {groups})")


KINDS = {"fp16": 0, "int8": 1, "int4": 2}


def ffn_sources(sources: dict[str, tuple[torch.Tensor, torch.Tensor | None]], hf: torch.Tensor, dim: int, groups: Groups,
                act: str, gacts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The FFN over every precision's rows (``sources[p]``: the tensor holding them and their row ids, None
    for all), 64 rows of ``hf`` [T, D] float32 a call, every precision in one call (``m2c_ffn_groups``: the
    rows shared among the kernels' threads by bytes across the precisions, as the native decode step shares
    them). ``gacts[p]``: a split store's gate activations [n_p, T] of those rows, in their order."""
    lib = library()
    assert lib is not None, "ffn_sources called without the kernels: check available() first"
    out = torch.zeros_like(hf)
    srcs, slots, order = [], [], []
    for p in KINDS:  # the precisions with rows, in the kernels' order
        if p not in sources:
            continue
        src, rows = sources[p]
        ids = torch.arange(src.shape[0]) if rows is None else rows.contiguous()
        assert src.dtype == torch.uint8 and src.is_contiguous() and src.device.type == "cpu" and ids.dtype == torch.int64
        if ids.numel():
            srcs.append(src)
            slots.append(ids)
            order.append(p)
    k = len(order)

    def arr(ctype, values: list):
        return (ctype * max(k, 1))(*values)

    vp = ctypes.c_void_p
    kinds, pools = arr(ctypes.c_int, [KINDS[p] for p in order]), arr(vp, [s.data_ptr() for s in srcs])
    rows_n, widths = arr(ctypes.c_int64, [s.shape[0] for s in srcs]), arr(ctypes.c_int64, [s.shape[1] for s in srcs])
    slot_ptrs, counts = arr(vp, [s.data_ptr() for s in slots]), arr(ctypes.c_int64, [s.numel() for s in slots])
    parts = 2 if gacts is not None else 3
    for start in range(0, hf.shape[0], MAX_TOKENS):
        rows_h, rows_out = hf[start:start + MAX_TOKENS], out[start:start + MAX_TOKENS]
        g = [gacts[p][:, start:start + MAX_TOKENS].contiguous() for p in order] if gacts is not None else []
        for t, ids in zip(g, slots):  # g stays referenced through the call
            assert t.dtype == torch.float32 and tuple(t.shape) == (ids.numel(), rows_h.shape[0])
        gptr = arr(vp, [t.data_ptr() for t in g] if g else [None] * k)
        rc = lib.m2c_ffn_groups(k, kinds, pools, rows_n, widths, slot_ptrs, counts, gptr, rows_h.data_ptr(),
                                rows_h.shape[0], dim, groups.int8, groups.int4, ACTIVATIONS[act], parts,
                                rows_out.data_ptr())
        if rc == -3:
            raise IndexError(f"rows must lie in their tensors for {order}")
        if rc != 0:
            raise RuntimeError(f"m2c_ffn_groups failed with code {rc} (T={rows_h.shape[0]}, D={dim}, {groups})")
    return out


def gate_rows_int4(bundles: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """The gate part of each INT4 bundle ([F, bundle_bytes] uint8): its nibbles and its (scale, min)
    pairs, [F, D/2 + 4·D/group] uint8, contiguous: the resident copy ``gate_int4`` reads."""
    return select_parts("int4", bundles, 3, dim, Groups(int4=group), 0, 1)


def gate_int4(gates: torch.Tensor, h: torch.Tensor, dim: int, group: int, act: str) -> torch.Tensor:
    """act(gate·h) [T, F] float32 for every row of ``gates`` (``gate_rows_int4``'s layout) and every
    row of h [T, D], 64 tokens a call, the INT4 values widened in registers, the rows shared among the
    kernels' threads."""
    lib = library()
    assert lib is not None, "gate_int4 called without the kernels: check available() first"
    assert gates.dtype == torch.uint8 and gates.is_contiguous() and gates.device.type == "cpu"
    if group <= 0 or dim % group or gates.shape[1] != dim // 2 + 4 * (dim // group):
        raise ValueError(f"gates [{gates.shape[0]}, {gates.shape[1]}] are not gate_rows_int4's layout for D={dim}, "
                         f"group {group}")
    hf = h.float().contiguous()
    assert hf.shape[1] == dim
    out = torch.empty(hf.shape[0], gates.shape[0], dtype=torch.float32)
    for start in range(0, hf.shape[0], MAX_TOKENS):
        rows_h, rows_out = hf[start:start + MAX_TOKENS], out[start:start + MAX_TOKENS]
        rc = lib.m2c_gate_int4(gates.data_ptr(), gates.shape[0], rows_h.data_ptr(), rows_h.shape[0], dim, group,
                               ACTIVATIONS[act], rows_out.data_ptr())
        if rc != 0:
            raise RuntimeError(f"m2c_gate_int4 failed with code {rc} (D={dim}, group {group})")
    return out


def copy_rows(pool: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor | None) -> None:
    """``pool[dst] = src[rows]`` (rows None: all of src) in one pass over the bytes.

    pool, src: [*, bundle_bytes] uint8, contiguous, same width; dst (and rows): int64 [n], contiguous.
    """
    lib = library()
    assert lib is not None, "copy_rows called without the kernels: check available() first"
    assert pool.dtype == src.dtype == torch.uint8 and pool.is_contiguous() and src.is_contiguous()
    assert pool.device.type == src.device.type == "cpu" and pool.shape[1] == src.shape[1]
    assert dst.dtype == torch.int64 and dst.is_contiguous()
    n = dst.numel()
    if rows is not None:
        assert rows.dtype == torch.int64 and rows.is_contiguous() and rows.numel() == n
    rc = lib.m2c_copy_rows(pool.data_ptr(), pool.shape[0], dst.data_ptr(), src.data_ptr(), src.shape[0],
                           None if rows is None else rows.data_ptr(), n, pool.shape[1])
    if rc == -3:
        raise IndexError(f"copy_rows: destination slots must lie in [0, {pool.shape[0]}) and source rows in "
                         f"[0, {src.shape[0]})")
    if rc != 0:
        raise RuntimeError(f"m2c_copy_rows failed with code {rc}")


def attention_decode(x: torch.Tensor, attn_norm: torch.Tensor, eps: float, wqkv, wo, cos: torch.Tensor,
                     ssin: torch.Tensor, cache: torch.Tensor, pos: int, heads: int, kv_heads: int,
                     ffn_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One position's attention block (``csrc/attention.c``), in x's dtype (float32 or bfloat16): x +
    attention(x) [1, D], its keys and values written at ``pos`` of ``cache`` (one layer's [2, KV, cap, hd],
    contiguous), and with ``ffn_norm`` the FFN's input rms_norm(x_out) * ffn_norm. ``wqkv``/``wo``: matrices
    in x's dtype or :class:`~m2cache.formats.int8.Int8Weight`; ``decode_attention_applies`` says when."""
    lib = library()
    assert lib is not None, "attention_decode called without the kernels: check available() first"
    D, hd = x.shape[1], cache.shape[3]
    rows = (heads + 2 * kv_heads) * hd
    shapes = [(tuple(x.shape), (1, D)), (tuple(cache.shape[:2]), (2, kv_heads)), (tuple(wqkv.shape), (rows, D)),
              (tuple(wo.shape), (D, heads * hd)), (attn_norm.numel(), D), (cos.numel(), hd), (ssin.numel(), hd)]
    if ffn_norm is not None:
        shapes.append((ffn_norm.numel(), D))
    if any(got != want for got, want in shapes) or not 0 <= pos < cache.shape[2]:  # the C side trusts them
        raise ValueError(f"attention_decode: shapes {[got for got, _ in shapes]} are not {[w for _, w in shapes]}, "
                         f"or position {pos} is past the cache's {cache.shape[2]}")
    if not (x.dtype == cache.dtype == cos.dtype == ssin.dtype == attn_norm.dtype in _ATTENTION_DTYPES
            and cache.is_contiguous() and cos.is_contiguous() and ssin.is_contiguous()):
        raise ValueError(f"attention_decode: x, cache, tables and norms must share a dtype of {_ATTENTION_DTYPES} "
                         "and be contiguous")
    x = x.contiguous()
    x_out = torch.empty_like(x)
    h = torch.empty_like(x) if ffn_norm is not None else None
    (qkv_w, qkv_s), (o_w, o_s) = _matrix(wqkv), _matrix(wo)  # the scales stay referenced through the call
    group = scale_group(wqkv)
    if scale_group(wo) != group:
        raise ValueError(f"attention_decode: wqkv's INT8 group {group} and wo's {scale_group(wo)} differ")
    rc = lib.m2c_attn_decode(x.data_ptr(), attn_norm.data_ptr(), eps, qkv_w.data_ptr(), _ptr(qkv_s), o_w.data_ptr(),
                             _ptr(o_s), group, D, heads, kv_heads, hd, cos.data_ptr(), ssin.data_ptr(), cache.data_ptr(),
                             cache.shape[2], pos, _ptr(ffn_norm), x_out.data_ptr(), _ptr(h),
                             int(x.dtype == torch.bfloat16))
    if rc != 0:
        raise RuntimeError(f"m2c_attn_decode failed with code {rc} (D={D}, heads {heads}/{kv_heads}, hd={hd})")
    return x_out, h


def matvec_row(x: torch.Tensor, w, norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """W · (rms_norm(x) * norm) [rows] float32 (without ``norm``: W · x) for one row x [1, D] float32 or
    bfloat16, W [rows, D] in x's dtype or :class:`~m2cache.formats.int8.Int8Weight`, sums in float32: the LM head
    of the last position, as the native decode step computes it (``decode_attention_applies(x, w)`` says when)."""
    lib = library()
    assert lib is not None, "matvec_row called without the kernels: check available() first"
    rows, cols = w.shape
    if x.shape != (1, cols) or (norm is not None and norm.numel() != cols) or x.dtype not in _ATTENTION_DTYPES:
        raise ValueError(f"matvec_row: x {tuple(x.shape)} and W {tuple(w.shape)} do not fit")
    x = x.contiguous()
    if norm is not None and (norm.dtype != x.dtype or not norm.is_contiguous()):
        raise ValueError("matvec_row: the norm must be contiguous, in x's dtype")
    mat, scale = _matrix(w)
    y = torch.empty(rows, dtype=torch.float32)
    rc = lib.m2c_matvec(x.data_ptr(), _ptr(norm), eps, mat.data_ptr(), _ptr(scale), scale_group(w), rows, cols,
                        int(x.dtype == torch.bfloat16), y.data_ptr())
    if rc != 0:
        raise RuntimeError(f"m2c_matvec failed with code {rc} ({rows} x {cols})")
    return y


def set_int8_activations(on: bool) -> bool:
    """Whether INT8 and INT4 weights meet activations quantised to INT8 in blocks of 32 (integer dot products,
    csrc/simd.h; the default) or float32 ones, process-wide (``tools/kernel_quality.py`` measures what it costs);
    returns the setting before."""
    lib = library()
    return False if lib is None else bool(lib.m2c_set_int8_activations(int(on)))


def int8_activations() -> bool:
    """Whether INT8 and INT4 weights meet INT8 activations now (``set_int8_activations``)."""
    lib = library()
    return lib is not None and bool(lib.m2c_int8_activations())


def product_input(h: torch.Tensor, precision: str, dim: int, groups: Groups) -> torch.Tensor:
    """h [T, D] as the kernels' products with ``precision`` rows meet it: for INT8 and INT4 rows its INT8 values
    (``int8_activation_values``) where they apply (on, and D and the groups multiples of 32), else h itself."""
    group = {"int8": groups.int8, "int4": groups.int4}.get(precision)
    if group is None or not int8_activations() or dim % Q8_BLOCK or group % Q8_BLOCK:
        return h
    return int8_activation_values(h).to(h.dtype)


def int8_activation_values(h: torch.Tensor) -> torch.Tensor:
    """The values INT8 activations stand for (h [T, D] float32, D a multiple of 32): each block of 32 rounded to
    the nearest multiple of its largest magnitude / 127, as the kernels quantise them. A product of INT8 or INT4
    weights with h computed by the kernels equals the dequantised weights' product with these, to float32
    rounding (what the tests check)."""
    T, D = h.shape
    blocks = h.float().reshape(T, D // Q8_BLOCK, Q8_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv) * d).reshape(T, D)


Q8_BLOCK = 32
_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)
_SCALES: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id of an INT8 matrix's scales -> (them, in float32)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _matrix(w) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A resident projection as the kernel reads it: (its rows, float32 scales for INT8 rows, else None); the
    float32 scales made once per matrix (the LM head's are 200 KB a token otherwise)."""
    if isinstance(w, torch.Tensor):
        return w, None
    key = id(w.scale)
    held = _SCALES.get(key)
    if held is None or held[0]() is not w.scale:
        def forget(_ref: weakref.ref, key: int = key, held: dict = _SCALES) -> None:  # the module may be gone
            held.pop(key, None)

        held = _SCALES[key] = (weakref.ref(w.scale, forget), w.scale.float().contiguous())
    return w.q, held[1]


def decode_attention_applies(x: torch.Tensor, *weights) -> bool:
    """Whether ``attention_decode`` takes this position: one float32 or bfloat16 row on the CPU, contiguous
    weights in its dtype (or INT8 rows), and the kernels built."""
    if x.shape[0] != 1 or x.dtype not in _ATTENTION_DTYPES or x.device.type != "cpu":
        return False
    for w in weights:
        t = w if isinstance(w, torch.Tensor) else getattr(w, "q", None)
        if t is None or not t.is_contiguous() or t.device.type != "cpu":
            return False
        if t.dtype != (x.dtype if isinstance(w, torch.Tensor) else torch.int8):
            return False
    return available()
