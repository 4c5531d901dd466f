"""Stores as earlier versions of m2cache wrote them, made from a store of this version: the tests that older
layouts are still read (or refused with the command that converts them) need them on disk.

- :func:`write_version2`: [gate|up|down] bundles in one file per layer and precision (``ffn/L001.int8.bin``),
  no gate files, no gate norms, the default ``dense-fp16`` (or a trained store's ``mixed-40``);
- :func:`write_version2_split`: what version 2's ``m2cache split-gate`` wrote from such a store: [up|down]
  bundles under the same names, and every layer's INT4 gate rows and norms in ``gates.safetensors``.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from m2cache.formats import quant
from m2cache.storage.layout import BlockGeometry, GATE_NORMS, ffn_file_name, file_checksum
from m2cache.storage.reader import PlainBackend, Store
from m2cache.storage.writer import write_bundle_file, write_manifest


def _bundle_files(store: Store, dst: Path, parts: tuple[int, int]) -> tuple[dict, list[dict[str, Any]]]:
    """Writes parts ``parts`` of every bundle (of the whole view) under version 2's names."""
    count = parts[1] - parts[0]
    geoms = {p: BlockGeometry.choose(quant.bundle_bytes(p, count, store.hidden, store.groups)) for p in quant.PRECISIONS}
    files = []
    for layer in range(store.config.num_layers):
        for p in quant.PRECISIONS:
            raw = quant.select_parts(p, store.read_layer(layer, p, PlainBackend()), 3, store.hidden, store.groups,
                                     *parts)
            name = ffn_file_name(layer, p)
            crcs, whole = write_bundle_file(dst / name, raw, geoms[p])
            files.append({"layer": layer, "precision": p, "path": name, "size": geoms[p].file_bytes(store.num_neurons),
                          "crc32": crcs.tobytes(), "file_crc32": whole})
    return {p: g.to_dict() for p, g in geoms.items()}, files


def _copy_common(store: Store, dst: Path) -> dict[str, Any]:
    (dst / "ffn").mkdir(parents=True)
    m = copy.deepcopy(store.manifest)
    for entry in (m["resident"], m.get("attention_int8"), m.get("predictors")):
        if entry:
            shutil.copyfile(store.path / entry["path"], dst / entry["path"])
    m["version"] = 2
    for key in ("generation", "quality"):
        m.pop(key, None)
    return m


def write_version2(src: str | Path, dst: str | Path) -> Path:
    store, dst = Store(src), Path(dst)
    m = _copy_common(store, dst)
    geometry, files = _bundle_files(store, dst, (0, 3))
    m["ffn"] = {"parts": 3, "num_neurons": store.num_neurons, "hidden": store.hidden,
                "int8_group": store.groups.int8, "int4_group": store.groups.int4, "geometry": geometry, "files": files}
    kept = {n: s for n, s in (m.get("policies") or {}).items() if s.get("kind") == "predictor"}
    m["policies"] = kept
    m["default_policy"] = "mixed-40" if "mixed-40" in kept else "dense-fp16"
    write_manifest(dst, m)
    return dst


def write_version2_split(src_v2: str | Path, dst: str | Path) -> Path:
    store, dst = Store(src_v2), Path(dst)
    assert store.version == 2 and store.parts == 3, "split-gate wrote split stores from whole version 2 ones"
    m = _copy_common(store, dst)
    geometry, files = _bundle_files(store, dst, (1, 3))
    gates, norms = store.read_gates()
    tensors = {f"gate.{L}": g for L, g in enumerate(gates)} | {f"norms.{L}": n for L, n in enumerate(norms)}
    save_file(tensors, str(dst / "gates.safetensors"))
    m["ffn"] = {"parts": 2, "num_neurons": store.num_neurons, "hidden": store.hidden,
                "int8_group": store.groups.int8, "int4_group": store.groups.int4, "geometry": geometry, "files": files,
                "gates": {"path": "gates.safetensors", "size": (dst / "gates.safetensors").stat().st_size,
                          "crc32": file_checksum(dst / "gates.safetensors", store.checksum_name)}}
    m["source"] = f"{m.get('source', '')} (split-gate of {store.path})"
    m["predictors"] = None
    m["policies"] = {"gate-40": {"shares": {"fp16": 0.1, "int8": 0.2, "int4": 0.7}, "kind": "gate"}}
    m["default_policy"] = "gate-40"
    write_manifest(dst, m)
    assert not (dst / GATE_NORMS).exists()
    return dst
