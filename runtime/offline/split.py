"""``m2cache split-gate``: a store whose FFN bundles hold up and down only, the gate rows resident.

The gate policy ranks every neuron by act(gate·h), computed from a resident packed INT4 copy of all gate
rows. With that copy at hand the kept neurons' gate activations need not be fetched again: a split
store's bundles keep each precision's up and down parts (two thirds of a bundle's bytes, moved, never
re-quantised) and one file holds every layer's INT4 gate rows and the up/down norms that weigh them,
loaded whole when an engine opens. Every
neuron's gate is then INT4 whatever its precision (measured by ``m2cache eval --policy gate-split:..``
on the source store: within 0.1% of the gate policy's perplexity on the demo model).

Only gate policies run on a split store: ``dense-fp16``, the oracle and the predictors need what the
source store has (the FP16 gate rows), and run there.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from m2cache.engine.policies import up_down_norms
from m2cache.errors import ConfigError
from m2cache.model.policy import Shares
from m2cache.offline.progress import ProgressBar
from m2cache.storage import quant
from m2cache.storage.layout import CHECKSUM, BlockGeometry, ffn_file_name, file_checksum
from m2cache.storage.reader import PlainBackend, Store
from m2cache.storage.writer import write_bundle_file, write_manifest

GATES = "gates.safetensors"
SPLIT_PARTS = 2  # up, down
PRESETS = {"gate-40": Shares(0.1, 0.2, 0.7)}  # every neuron kept: 0.29 of the FP16 FFN bytes fetched
DEFAULT = "gate-40"


def _link_or_copy(src: Path, dst: Path) -> None:
    """The resident files are the source's, byte for byte: a hard link where the filesystem allows one (a
    grown model's resident file is 2.7 GB; stores are written once and replaced whole, never edited in place)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def split_gate(src: str | Path, dst: str | Path, *, progress: bool = True) -> Path:
    """Writes the split store of ``src`` to ``dst`` (atomically: a temporary folder renamed at the end)."""
    store, dst = Store(src), Path(dst)
    if store.parts != 3:
        raise ConfigError(f"{src} is already split (its bundles hold {store.parts} parts)")
    if dst.resolve() == store.path.resolve():
        raise ConfigError("split-gate writes a new store: give a destination other than the source")
    cfg, dim, groups = store.config, store.hidden, store.groups
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "ffn").mkdir(parents=True)
    resident = store.manifest["resident"]["path"]
    _link_or_copy(store.path / resident, tmp / resident)
    if store.manifest.get("attention_int8"):
        name = store.manifest["attention_int8"]["path"]
        _link_or_copy(store.path / name, tmp / name)
    geoms = {p: BlockGeometry.choose(quant.bundle_bytes(p, SPLIT_PARTS, dim, groups)) for p in quant.PRECISIONS}
    files, gates, backend = [], {}, PlainBackend()
    bar = ProgressBar("split-gate: layers", cfg.num_layers) if progress else None
    for layer in range(cfg.num_layers):
        for p in quant.PRECISIONS:
            raw = store.read_layer(layer, p, backend)
            if p == "int4":
                gates[f"gate.{layer}"] = quant.select_parts(p, raw, 3, dim, groups, 0, 1)
            if p == "fp16":  # what the gate policy weighs each neuron's gate by: no FP16 read when it opens
                gates[f"norms.{layer}"] = up_down_norms(store, raw)
            name = ffn_file_name(layer, p)
            crcs, whole = write_bundle_file(tmp / name, quant.select_parts(p, raw, 3, dim, groups, 1, 3), geoms[p])
            files.append({"layer": layer, "precision": p, "path": name,
                          "size": int(geoms[p].file_bytes(store.num_neurons)), "crc32": crcs.tobytes(),
                          "file_crc32": whole})
        if bar:
            bar(layer + 1)
    save_file(gates, str(tmp / GATES))
    m = copy.deepcopy(store.manifest)
    m["ffn"].update(parts=SPLIT_PARTS, geometry={p: g.to_dict() for p, g in geoms.items()}, files=files,
                    gates={"path": GATES, "size": (tmp / GATES).stat().st_size, "crc32": file_checksum(tmp / GATES)})
    m["source"] = f"{m.get('source', '')} (split-gate of {store.path})"
    m["checksum"] = CHECKSUM  # what the blocks and files were written with (older stores may use crc32)
    m["resident"]["crc32"] = file_checksum(tmp / resident)
    m["predictors"] = None
    kept = {name: spec for name, spec in (store.manifest.get("policies") or {}).items() if spec.get("kind") == "gate"}
    m["policies"] = {name: {"shares": s.to_dict(), "kind": "gate"} for name, s in PRESETS.items()} | kept
    m["default_policy"] = store.manifest.get("default_policy") if store.manifest.get("default_policy") in kept \
        else DEFAULT
    write_manifest(tmp, m)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst
