"""Loads a store's resident weights and, for ``--dense``, every FFN weight into memory."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from safetensors import safe_open

from m2cache.errors import ChecksumError, ConfigError
from m2cache.formats.families import NORM_FIELDS, layer_names
from m2cache.formats.int8 import RESIDENT_GROUP, Int8Weight
from m2cache.model import cpu_kernels
from m2cache.model.llama import DenseModel, LayerWeights, ResidentWeights
from m2cache.model.tokenizer import Tokenizer
from m2cache.storage.layout import file_checksum
from m2cache.storage.reader import FIX_HINT, WHOLE, PlainBackend, Store
from m2cache.storage.rows import EmbeddingRows


def verify_resident(store: Store) -> None:
    meta = store.manifest["resident"]
    path = store.path / meta["path"]
    if file_checksum(path, store.checksum_name) != meta["crc32"]:
        raise ChecksumError(f"{path} fails its checksum: the file is corrupt; {FIX_HINT}")


RESIDENT_FORMS = ("full", "int8", "stream")


def int8_group(device: str | torch.device) -> int:
    """Values per scale of the resident INT8 form: groups of 32 on the CPU with its kernels (as good as the
    compute dtype's weights on held-out text, ``formats/int8.py``), else one scale a row (torch's INT8 kernel
    takes no groups)."""
    return RESIDENT_GROUP if torch.device(device).type == "cpu" and cpu_kernels.available() else 0


def auto_form(exact: bool, device: str | torch.device) -> str:
    """The resident form ``auto`` takes without a memory limit: int8 where it comes in groups (half the bytes of
    full at its quality), else full; full for an exact policy (``dense-fp16``: the dense model token for token)."""
    return "int8" if int8_group(device) and not exact else "full"


def load_resident(store: Store, dtype: torch.dtype, device: str | torch.device = "cpu",
                  form: str = "full") -> ResidentWeights:
    """Embeddings, attention, norms and LM head on the compute device.

    ``form="full"``: every matrix in the compute dtype (what the dense reference holds). ``"int8"``:
    the attention projections and the LM head as INT8 rows with one scale each (half the bytes of BF16),
    the embeddings read per token from the store's file (:class:`EmbeddingRows`), norms as they are.
    ``"stream"``: as ``int8`` but the attention projections are not loaded: the engine reads them per
    layer (:class:`~m2cache.storage.attention_stream.AttentionStream`); their fields hold empty tensors."""
    if form not in RESIDENT_FORMS:
        raise ConfigError(f"resident must be one of {', '.join(RESIDENT_FORMS)}, got {form!r}")
    verify_resident(store)
    cfg = store.config
    path = store.path / store.manifest["resident"]["path"]
    with safe_open(str(path), framework="pt") as f:
        def get(name: str) -> torch.Tensor:
            return f.get_tensor(name).to(device=device, dtype=dtype).contiguous()

        def norm(name: str) -> torch.Tensor:  # the family's (offset + w), added in float32 (Gemma: 1 + w)
            w = f.get_tensor(name)
            return (w.float() + cfg.norm_offset if cfg.norm_offset else w).to(device=device, dtype=dtype).contiguous()

        def matrix(*names: str, streamed: bool = False) -> torch.Tensor | Int8Weight:
            if streamed and form == "stream":
                return torch.empty(0, dtype=dtype, device=device)
            if form == "full":  # one fused matrix for one product per token
                return torch.cat([get(n) for n in names]).contiguous() if len(names) > 1 else get(names[0])
            parts = [f.get_tensor(n).to(device) for n in names]  # the file's dtype: no float copy of all
            return Int8Weight.quantize(torch.cat(parts) if len(parts) > 1 else parts[0], dtype, int8_group(device))

        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            parts: dict[str, Any] = {}
            for key, names in layer_names(cfg).items():
                if key in ("wqkv", "wo"):
                    parts[key] = matrix(*(p + n for n in names), streamed=True)
                elif key in NORM_FIELDS:
                    parts[key] = norm(p + names[0])
                else:  # biases: kept in the compute dtype in every form
                    parts[key] = torch.cat([get(p + n) for n in names]).contiguous()
            layers.append(LayerWeights(**parts))
        head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        if form == "full":
            embed = get("model.embed_tokens.weight")
            head = embed if cfg.tie_word_embeddings else get(head_name)
            return ResidentWeights(embed=embed, layers=layers, final_norm=norm("model.norm.weight"), lm_head=head)
        rows = EmbeddingRows(path, "model.embed_tokens.weight", dtype, device)
        try:
            return ResidentWeights(embed=rows, layers=layers, final_norm=norm("model.norm.weight"),
                                   lm_head=matrix(head_name))
        except BaseException:
            rows.close()
            raise


def resident_bytes(res: ResidentWeights) -> int:
    """Bytes the resident weights hold (a tensor shared by two fields counted once)."""
    seen: dict[int, int] = {}
    for t in [res.embed, res.final_norm, res.lm_head] + [
        getattr(w, f.name) for w in res.layers for f in fields(w)
    ]:
        if isinstance(t, torch.Tensor):
            seen[id(t)] = t.numel() * t.element_size()
        elif isinstance(t, Int8Weight):
            seen[id(t)] = t.nbytes
    return sum(seen.values())


def load_dense(store: Store, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               resident: str = "full") -> DenseModel:
    """Every weight resident; the FFN from the FP16 bundles, in the layout the tiered engine uses."""
    store = store.with_view(WHOLE, what="the dense model")  # its FFN: every bundle of gate, up and down
    res = load_resident(store, dtype, device, resident)
    backend = PlainBackend()
    ffn = [
        store.decode("fp16", store.read_layer(layer, "fp16", backend), dtype).to(device).contiguous()
        for layer in range(store.config.num_layers)
    ]
    return DenseModel(store.config, res, ffn, device)


def load_tokenizer(store: Store) -> Tokenizer:
    return Tokenizer(store.manifest["tokenizer"])
