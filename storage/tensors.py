"""A store's weights by their Hugging Face names, as the store holds them (FP16): what export-gguf and
grow read back. The resident file is opened once; one FFN layer's FP16 bundles are decoded at a time."""
from __future__ import annotations

import torch
from safetensors import safe_open

from m2cache.storage.reader import PlainBackend, Store


class StoreTensors:
    """``get(name)``: the named tensor (HF name) in FP16 on the CPU; FFN matrices come out of the layer's
    bundles (gate row, up row, down column per neuron). A split store has no FP16 gate rows: refused by
    the callers before they get here."""

    def __init__(self, store: Store) -> None:
        self.store, self.cfg = store, store.config
        self._res = safe_open(str(store.path / store.manifest["resident"]["path"]), framework="pt")
        self._layer: tuple[int, torch.Tensor] | None = None

    def __call__(self, name: str) -> torch.Tensor:
        if ".mlp." not in name:
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                name = "model.embed_tokens.weight"
            return self._res.get_tensor(name)
        layer = int(name.split(".")[2])
        if self._layer is None or self._layer[0] != layer:
            raw = self.store.read_layer(layer, "fp16", PlainBackend())
            self._layer = (layer, self.store.decode("fp16", raw, torch.float16))  # [F, 3, D]
        w = self._layer[1]
        return w[:, 0] if "gate_proj" in name else w[:, 1] if "up_proj" in name else w[:, 2].t()
