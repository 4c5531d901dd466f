"""``m2cache export-gguf STORE OUT --type f16|q8_0|q4_0``: a store's weights as a llama.cpp GGUF file.

So that llama.cpp runs the very same weights as m2cache and the Hugging Face baselines. Resident
tensors come from the store's ``resident.safetensors``, the FFN from its FP16 bundles (gate row, up
row, down column per neuron). Written streaming through the ``gguf`` package's writer (tensor infos
first, then each tensor as it is made), with its quantizers for Q8_0 and Q4_0; norms stay F32.

Q and K rows are permuted the way llama.cpp's own converter does: Hugging Face checkpoints rotate the
two halves of each head (``rotate_half``) while llama.cpp's LLaMA graph rotates adjacent pairs, so
without the permutation llama.cpp would compute a different model. The check is that llama.cpp's
greedy tokens on the file equal transformers' on the HF folder (the bench reports that agreement).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2cache.errors import ConvertError, require_extra
from m2cache.offline.gguf_arch import add_arch_metadata, arch_of, gguf_names
from m2cache.offline.progress import ProgressBar
from m2cache.storage.reader import Store
from m2cache.storage.tensors import StoreTensors

log = logging.getLogger(__name__)

TYPES = ("f16", "q8_0", "q4_0")  # written here (the gguf package's quantizers)
# made by llama.cpp's own quantizer (llama-cpp-python) from the F16 export: what its users run
LLAMA_TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
ALL_TYPES = ("f16", *LLAMA_TYPES)
BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # GGML block sizes: 32 values per block
_CHUNK_ROWS = 1024  # rows quantized per task: bounds memory, spreads a matrix over the workers


def _gguf():
    require_extra("convert", "gguf", what="export-gguf")
    import gguf

    return gguf


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``permute``: each head's rows from [first half, second half] to interleaved pairs."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


class _StoreTensors(StoreTensors):
    """A store's FP16 tensors as the GGUF holds them (``kind``, from ``gguf_arch.gguf_names``): "norm" adds the
    family's norm offset (Gemma stores 1 + w), "permute_q"/"permute_k" reorders Q and K rows for llama.cpp's
    pairwise RoPE (``permute_qk``)."""

    def shape(self, name: str) -> tuple[int, ...]:
        if ".mlp." not in name:
            return tuple(self._res.get_slice(name).get_shape())
        D, F_ = self.cfg.hidden_size, self.cfg.intermediate_size
        return (D, F_) if "down_proj" in name else (F_, D)

    def __call__(self, name: str, kind: str = "") -> torch.Tensor:  # type: ignore[override]
        t = super().__call__(name)
        if kind == "norm" and self.cfg.norm_offset:
            t = t.float() + self.cfg.norm_offset
        elif kind == "permute_q":
            t = permute_qk(t, self.cfg.num_heads)
        elif kind == "permute_k":
            t = permute_qk(t, self.cfg.num_kv_heads)
        return t.contiguous()


def _quantize_rows(args: tuple[np.ndarray, int]) -> np.ndarray:
    rows, qtype = args
    gguf = _gguf()
    return gguf.quants.quantize(rows, gguf.GGMLQuantizationType(qtype))


def _encode(t: torch.Tensor, kind: str, pool: ProcessPoolExecutor | None) -> tuple[np.ndarray, Any]:
    """(array to write, raw GGML type or None): norms F32, matrices in the export type."""
    gguf = _gguf()
    if t.dim() == 1:
        return t.float().numpy(), None
    if kind == "f16":
        return t.to(torch.float16).numpy(), None
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    a = t.float().numpy()
    chunks = [(a[i:i + _CHUNK_ROWS], int(qtype)) for i in range(0, a.shape[0], _CHUNK_ROWS)]
    parts = list(pool.map(_quantize_rows, chunks)) if pool else [_quantize_rows(c) for c in chunks]
    return np.concatenate(parts), qtype


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    n = int(np.prod(shape))
    if len(shape) == 1:
        return 4 * n
    return int(n * BYTES_PER_WEIGHT[kind])


def _add_metadata(w, cfg, store, kind: str) -> None:
    gguf = _gguf()
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]
    w.add_name(f"{Path(store.path).parent.name or 'store'} ({cfg.model_type}, m2cache export)")
    w.add_file_type(file_type)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size or arch_of(cfg) == "gemma3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    add_arch_metadata(w, cfg)
    _add_tokenizer(w, cfg, store.manifest["tokenizer"])


def _add_tokenizer(w, cfg, spec: dict[str, Any]) -> None:
    """The store's BPE tokenizer, padded to the model's vocab size: as llama.cpp's "gpt2" vocabulary (byte-level
    BPE), or its "llama" one (SentencePiece-style BPE over "▁" with byte fallback, as Gemma's)."""
    gguf = _gguf()
    tj = json.loads(spec["json"])
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ConvertError(f"export-gguf writes BPE tokenizers; this store's is {model.get('type')!r}")
    spm = bool(model.get("byte_fallback"))
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]
    types = [gguf.TokenType.UNUSED] * cfg.vocab_size
    scores = [0.0] * cfg.vocab_size
    for text, i in model["vocab"].items():
        if i < cfg.vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
            scores[i] = -float(i)  # SentencePiece merges by score: the vocabulary is in merge order
            if spm and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
                types[i], scores[i] = gguf.TokenType.BYTE, 0.0
    for added in tj.get("added_tokens", []):
        if added["id"] < cfg.vocab_size:
            tokens[added["id"]], scores[added["id"]] = added["content"], 0.0
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if spm:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(False)  # "▁" replaces spaces; nothing is prepended
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges or [f"{tokens[3]} {tokens[4]}"])  # llama.cpp requires the key; byte vocabs have none
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
        w.add_add_bos_token(False)  # the caller passes ids with BOS already in place
    if cfg.eos_token_ids:
        w.add_eos_token_id(cfg.eos_token_ids[0])
    if spec.get("chat_template"):
        w.add_chat_template(spec["chat_template"])


def have_llama_quantizer() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def export_gguf(store_dir: str | Path, out: str | Path, kind: str = "f16", *, workers: int | None = None,
                progress: bool = True, f16: str | Path | None = None) -> Path:
    """Writes ``out`` (atomically); returns it. A type of :data:`LLAMA_TYPES` is made by llama.cpp's own
    quantizer from the F16 export (``f16``, or one written beside ``out`` and removed) when llama-cpp-python
    is installed; without it Q8_0 and Q4_0 are written by the gguf package's quantizers (same formats,
    every matrix in the type: llama.cpp keeps some tensors at a higher type) and the K-quants are refused."""
    if kind not in ALL_TYPES:
        raise ConvertError(f"--type must be one of {', '.join(ALL_TYPES)}, got {kind!r}")
    if kind != "f16" and have_llama_quantizer():
        out = Path(out)
        src = Path(f16) if f16 else _export(store_dir, out.with_name(out.name + ".f16.partial"), "f16", workers, progress)
        try:
            return quantize_gguf(src, out, kind)
        finally:
            if not f16:
                src.unlink(missing_ok=True)
    if kind not in TYPES:
        raise ConvertError(f"--type {kind} is made by llama.cpp's quantizer: install llama-cpp-python "
                           "(`make peers`, or pip install 'm2cache[peers]')")
    return _export(store_dir, out, kind, workers, progress)


def quantize_gguf(src: str | Path, out: str | Path, kind: str, threads: int | None = None) -> Path:
    """``out`` = llama.cpp's ``llama_model_quantize`` of the F16 GGUF ``src`` to ``kind`` (its defaults: the
    output tensor and embeddings at the types llama.cpp picks for that file type)."""
    import ctypes

    require_extra("peers", "llama_cpp", what=f"quantizing a GGUF to {kind}")
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count() or 1
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    t0 = time.monotonic()
    with suppress_stdout_stderr(disable=False):  # llama.cpp prints a line per tensor
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise ConvertError(f"llama.cpp could not quantize {src} to {kind} (code {rc})")
    os.replace(tmp, out)
    log.info("quantize: wrote %s (%s, %.2f GB) in %.0fs", out, kind, out.stat().st_size / 1e9, time.monotonic() - t0)
    return out


def _export(store_dir: str | Path, out: str | Path, kind: str, workers: int | None, progress: bool) -> Path:
    store = Store(store_dir)
    if store.split:
        raise ConvertError(f"{store.path} is a split store (its FFN has no FP16 gate rows): export the store it "
                           "was split from")
    gguf = _gguf()
    cfg, get = store.config, _StoreTensors(store)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    names = list(gguf_names(cfg))
    w = gguf.GGUFWriter(str(tmp), arch_of(cfg))
    _add_metadata(w, cfg, store, kind)
    qtypes = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    for g, hf, _ in names:
        shape = get.shape(hf)
        if len(shape) == 1:
            w.add_tensor_info(g, shape, np.dtype(np.float32), _nbytes(shape, kind))
        elif kind == "f16":
            w.add_tensor_info(g, shape, np.dtype(np.float16), _nbytes(shape, kind))
        else:  # quantized: the writer takes the byte shape of a uint8 array
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtypes[kind])
            w.add_tensor_info(g, byte_shape, np.dtype(np.uint8), _nbytes(shape, kind), raw_dtype=qtypes[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.monotonic()
    bar = ProgressBar(f"export-gguf {kind}", len(names)) if progress else None
    nworkers = workers if workers is not None else min(2, os.cpu_count() or 1)
    pool = ProcessPoolExecutor(nworkers) if kind != "f16" and nworkers > 1 else None
    try:
        for k, (_, hf, how) in enumerate(names):
            arr, _ = _encode(get(hf, how), kind, pool)
            w.write_tensor_data(arr)
            if bar:
                bar(k + 1, len(names))
    finally:
        if pool:
            pool.shutdown()
        w.close()
    os.replace(tmp, out)
    log.info("export-gguf: wrote %s (%s, %.1f GB) in %.0fs", out, kind, out.stat().st_size / 1e9,
             time.monotonic() - t0)
    return out


def cmd_export_gguf(args) -> int:
    t0 = time.monotonic()
    out = export_gguf(args.store, args.out, args.type)
    print(f"{out} ({out.stat().st_size / 1e9:.2f} GB, {time.monotonic() - t0:.0f}s)")
    return 0


def add_export_command(sub) -> None:
    p = sub.add_parser("export-gguf", help="write a store's weights as a llama.cpp GGUF file "
                                           "(f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0)")
    p.add_argument("store")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="f16", choices=ALL_TYPES,
                   help="weight type of the matrices (norms stay F32); all but f16 by llama.cpp's quantizer when "
                        "llama-cpp-python is installed (q8_0 and q4_0 written here without it)")
    p.set_defaults(func=cmd_export_gguf)
