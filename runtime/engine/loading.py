"""Loads a store's resident weights and, for ``--dense``, every FFN weight into memory."""
from __future__ import annotations

import torch
from safetensors import safe_open

from m2cache.errors import ChecksumError
from m2cache.model.llama import DenseModel, LayerWeights, ResidentWeights
from m2cache.model.tokenizer import Tokenizer
from m2cache.storage.layout import file_checksum
from m2cache.storage.reader import FIX_HINT, PlainBackend, Store


def verify_resident(store: Store) -> None:
    meta = store.manifest["resident"]
    path = store.path / meta["path"]
    if file_checksum(path, store.checksum_name) != meta["crc32"]:
        raise ChecksumError(f"{path} fails its checksum: the file is corrupt; {FIX_HINT}")


def load_resident(store: Store, dtype: torch.dtype, device: str | torch.device = "cpu") -> ResidentWeights:
    """Embeddings, attention, norms and LM head in the compute dtype, on the compute device."""
    verify_resident(store)
    cfg = store.config
    path = str(store.path / store.manifest["resident"]["path"])
    with safe_open(path, framework="pt") as f:
        def get(name: str) -> torch.Tensor:
            return f.get_tensor(name).to(device=device, dtype=dtype).contiguous()

        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            w = LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                wq=get(p + "self_attn.q_proj.weight"),
                wk=get(p + "self_attn.k_proj.weight"),
                wv=get(p + "self_attn.v_proj.weight"),
                wo=get(p + "self_attn.o_proj.weight"),
                ffn_norm=get(p + "post_attention_layernorm.weight"),
            )
            # one fused matrix for one matmul per token; q/k/v become views of it (no second copy)
            w.wqkv = torch.cat((w.wq, w.wk, w.wv), dim=0).contiguous()
            w.wq, w.wk, w.wv = w.wqkv.split((w.wq.shape[0], w.wk.shape[0], w.wv.shape[0]), dim=0)
            layers.append(w)
        embed = get("model.embed_tokens.weight")
        head = embed if cfg.tie_word_embeddings else get("lm_head.weight")
        return ResidentWeights(embed=embed, layers=layers, final_norm=get("model.norm.weight"), lm_head=head)


def load_dense(store: Store, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DenseModel:
    """Every weight resident; the FFN from the FP16 bundles, in the layout the tiered engine uses."""
    res = load_resident(store, dtype, device)
    backend = PlainBackend()
    ffn = [
        store.decode("fp16", store.read_layer(layer, "fp16", backend), dtype).to(device).contiguous()
        for layer in range(store.config.num_layers)
    ]
    return DenseModel(store.config, res, ffn, device)


def load_tokenizer(store: Store) -> Tokenizer:
    return Tokenizer(store.manifest["tokenizer"])
