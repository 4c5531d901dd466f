"""Writes a store from a checkpoint's tensors (Hugging Face names) — the one path every converter uses."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import torch
from safetensors.torch import save_file

from m2cache.formats.config import ModelConfig
from m2cache.formats.families import layer_tensor_names, layer_tensor_shapes
from m2cache.formats.int8 import RESIDENT_GROUP, Int8Weight
from m2cache.formats.shares import DEFAULT_POLICY, GATE_PRESETS
from m2cache.formats import quant
from m2cache.storage.attention_stream import ATTENTION_INT8, Int8AttentionLayout
from m2cache.storage.layout import (
    CHECKSUM, FORMAT_NAME, FORMAT_VERSION, GATE, GATE_NORMS, MANIFEST, RESIDENT, UPDOWN, BlockGeometry,
    block_checksums, checksum_fn, ffn_file_name, file_checksum,
)
from m2cache.storage.safetensors_stream import write_streamed

TensorGetter = Callable[[str], torch.Tensor]
Progress = Callable[[int, int], None]  # (done, total)


def resident_names(cfg: ModelConfig) -> Iterator[str]:
    yield "model.embed_tokens.weight"
    yield "model.norm.weight"
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight"
    for i in range(cfg.num_layers):
        yield from layer_tensor_names(cfg, i)  # the family's: norms, projections, biases, QK norms


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, F_ = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= layer_tensor_shapes(cfg, i)  # the family's norms, projections, biases, QK norms
        shapes |= {p + "mlp.gate_proj.weight": (F_, D), p + "mlp.up_proj.weight": (F_, D),
                   p + "mlp.down_proj.weight": (D, F_)}
    return shapes


def ffn_bundles_of(get: TensorGetter, layer: int) -> torch.Tensor:
    """Gate rows, up rows and down columns of one layer stacked per neuron: [F, 3, D] (fp32)."""
    p = f"model.layers.{layer}.mlp."
    gate, up, down = get(p + "gate_proj.weight"), get(p + "up_proj.weight"), get(p + "down_proj.weight")
    return torch.stack((gate.float(), up.float(), down.float().t()), dim=1).contiguous()


def write_bundle_file(path: Path, raw: torch.Tensor, geom: BlockGeometry) -> tuple[np.ndarray, int]:
    """raw: [F, bundle_bytes] uint8 -> blocks padded to geom.block_bytes; returns block and file checksums."""
    F_, bb = raw.shape
    assert bb == geom.bundle_bytes, "bundle size disagrees with the geometry"
    nblocks = geom.num_blocks(F_)
    buf = np.zeros((nblocks, geom.block_bytes), dtype=np.uint8)
    body = np.zeros(nblocks * geom.neurons_per_block * bb, dtype=np.uint8)
    body[: F_ * bb] = raw.numpy().reshape(-1)
    buf[:, : geom.neurons_per_block * bb] = body.reshape(nblocks, -1)
    data = buf.tobytes()
    with open(path, "wb") as f:
        f.write(data)
    return block_checksums(data, geom.block_bytes), checksum_fn(CHECKSUM)(data)


def write_store(
    dst: str | Path,
    cfg: ModelConfig,
    get: TensorGetter,
    tokenizer: dict[str, Any],
    *,
    resident_dtype: torch.dtype = torch.float16,
    groups: quant.Groups = quant.Groups(),
    source: str = "",
    progress: Progress | None = None,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Writes the store to ``dst`` (atomically: a temporary folder renamed at the end). ``get`` returns a
    checkpoint tensor by its Hugging Face name; ``generation``: the model's own sampling settings
    (``m2cache.model.sampling.GENERATION_KEYS``), which ``generate`` and ``demo`` use unless told otherwise."""
    dst = Path(dst)
    groups.check(cfg.hidden_size)
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "ffn").mkdir(parents=True)
    total = cfg.num_layers + 1
    def resident(name: str) -> torch.Tensor:
        return get(name).to(resident_dtype)

    shapes = tensor_shapes(cfg)
    write_streamed(tmp / RESIDENT, {n: (shapes[n], resident_dtype) for n in resident_names(cfg)}, resident)
    attention_int8 = write_attention_int8(tmp, resident, cfg)
    if progress:
        progress(1, total)

    ffn = FFNWriter(tmp, cfg.intermediate_size, cfg.hidden_size, groups)
    for layer in range(cfg.num_layers):
        w = ffn_bundles_of(get, layer)
        ffn.add_layer(layer, {p: quant.encode(p, w, groups) for p in quant.PRECISIONS})
        if progress:
            progress(layer + 2, total)

    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "checksum": CHECKSUM,  # the block and file checksums' algorithm (the "crc32" keys hold its values)
        "source": source,
        "config": cfg.to_dict(),
        "tokenizer": tokenizer,
        "generation": dict(generation or {}),
        "resident": {"path": RESIDENT, "dtype": str(resident_dtype).removeprefix("torch."),
                     "size": os.path.getsize(tmp / RESIDENT), "crc32": file_checksum(tmp / RESIDENT)},
        "attention_int8": attention_int8,
        "ffn": ffn.finish(),
        "predictors": None,
        **default_policies(),
    }
    write_manifest(tmp, manifest)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def default_policies() -> dict[str, Any]:
    """The manifest's policies of a new store: the gate presets (no predictor to train), the best measured
    one its default (``m2cache.formats.shares.DEFAULT_POLICY``)."""
    return {"policies": {name: {"shares": s.to_dict(), "kind": "gate"} for name, s in GATE_PRESETS.items()},
            "default_policy": DEFAULT_POLICY}


class FFNWriter:
    """Writes a version 3 store's FFN: per layer and precision a file of [up|down] bundles and a file of
    gate rows (each a bundle file of its own geometry), and every layer's ||up_j||·||down_j||, which the
    gate policies weigh each gate activation by (computed from the FP16 bundles, as they were before
    version 3 at every open)."""

    def __init__(self, root: Path, num_neurons: int, dim: int, groups: quant.Groups) -> None:
        self.root, self.num_neurons, self.dim, self.groups = root, num_neurons, dim, groups
        self.geoms = {kind: {p: BlockGeometry.choose(quant.bundle_bytes(p, parts, dim, groups)) for p in quant.PRECISIONS}
                      for kind, parts in ((UPDOWN, 2), (GATE, 1))}
        self.files: dict[str, list[dict[str, Any]]] = {UPDOWN: [], GATE: []}
        self.norms: dict[str, torch.Tensor] = {}

    def add_layer(self, layer: int, bundles: dict[str, torch.Tensor]) -> None:
        """``bundles``: the layer's [gate|up|down] bundles per precision ([F, bundle_bytes] uint8), split
        into the two files by moving bytes (nothing is quantised again)."""
        for p, raw in bundles.items():
            for kind, (first, stop) in ((UPDOWN, (1, 3)), (GATE, (0, 1))):
                name, geom = ffn_file_name(layer, p, kind), self.geoms[kind][p]
                part = quant.select_parts(p, raw, 3, self.dim, self.groups, first, stop)
                crcs, whole = write_bundle_file(self.root / name, part, geom)
                self.files[kind].append({"layer": layer, "precision": p, "path": name,
                                         "size": int(geom.file_bytes(self.num_neurons)), "crc32": crcs.tobytes(),
                                         "file_crc32": whole})
            if p == "fp16":
                self.norms[f"norms.{layer}"] = quant.up_down_norms(raw, 3, self.dim)

    def finish(self) -> dict[str, Any]:
        """Writes the norms file; returns the manifest's ``ffn`` entry."""
        save_file(self.norms, str(self.root / GATE_NORMS))
        geometry = {kind: {p: g.to_dict() for p, g in geoms.items()} for kind, geoms in self.geoms.items()}
        return {"parts": 2, "num_neurons": self.num_neurons, "hidden": self.dim,
                "int8_group": self.groups.int8, "int4_group": self.groups.int4,
                "geometry": geometry[UPDOWN], "files": self.files[UPDOWN],
                "gate_geometry": geometry[GATE], "gate_files": self.files[GATE],
                "gate_norms": {"path": GATE_NORMS, "size": (self.root / GATE_NORMS).stat().st_size,
                               "crc32": file_checksum(self.root / GATE_NORMS)}}


def write_attention_int8(store: Path, get: TensorGetter, cfg: ModelConfig, group: int | None = None) -> dict[str, Any]:
    """Writes ``attention-int8.bin`` (every layer's attention projections in INT8, quantised from the
    resident file's values: ``get`` reads them) and returns its manifest entry, one checksum a layer. ``group``:
    values a scale covers (default RESIDENT_GROUP where it divides the rows, else one scale a row)."""
    if group is None:
        group = RESIDENT_GROUP if not (cfg.hidden_size % RESIDENT_GROUP or (cfg.num_heads * cfg.head_dim) % RESIDENT_GROUP) else 0
    layout, fn, crcs = Int8AttentionLayout.of(cfg, group), checksum_fn(CHECKSUM), []
    with open(store / ATTENTION_INT8, "wb") as f:
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}.self_attn."
            wqkv = Int8Weight.quantize(torch.cat([get(p + f"{x}_proj.weight") for x in "qkv"]), torch.float32, group)
            wo = Int8Weight.quantize(get(p + "o_proj.weight"), torch.float32, group)
            data = layout.pack(wqkv, wo)
            crcs.append(fn(data))
            f.write(data)
    return {"path": ATTENTION_INT8, "layer_bytes": layout.stride, "size": layout.stride * cfg.num_layers,
            "checksum": CHECKSUM, "crc32": np.array(crcs, dtype=np.uint32).tobytes(), "group": group}


def write_manifest(store: Path, manifest: dict[str, Any]) -> None:
    """Rewrites the manifest atomically (train-predictor and tune update it in place)."""
    tmp = store / (MANIFEST + ".tmp")
    with open(tmp, "wb") as f:
        f.write(msgpack.packb(manifest, use_bin_type=True))
    os.replace(tmp, store / MANIFEST)
