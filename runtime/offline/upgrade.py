"""``m2cache upgrade``: a store of format version 1 or 2 laid out as version 3, in place or into a new folder.

Version 3 keeps each layer's gate rows apart from its [up|down] bundles, so one store runs every policy:
the gate policies fetch up and down only (0.29 of the dense FP16 FFN bytes for the default gate-40, where
a version 2 store's bundles brought the gate too: 0.43), the others read a neuron's gate row beside them.
Every bundle's bytes are moved, never quantised again: the upgraded store computes exactly what the old
one did (the gate policies excepted, whose gates now come from the resident INT4 copy). Predictors and tuned
policies are kept; the INT8 attention file too, written again in groups of 32 where it has one scale a row
(``regroup_attention``: a store of version 3 gets that and the presets below alone); the default becomes this
version's (``DEFAULT_POLICY``, ``gate-25``) unless the store's own was tuned (``m2cache tune``) or chosen.

A split store (``split-gate`` of version 2) has no FP16 gate rows left: upgrade the store it came from.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from m2cache.errors import ConfigError
from m2cache.formats.shares import DEFAULT_POLICY, GATE_PRESETS
from m2cache.offline.progress import ProgressBar
from m2cache.formats import quant
from m2cache.storage.layout import CHECKSUM, FORMAT_VERSION, file_checksum
from m2cache.storage.reader import WHOLE, PlainBackend, Store
from m2cache.storage.tensors import StoreTensors
from m2cache.storage.writer import FFNWriter, write_attention_int8, write_manifest

# defaults earlier versions set by themselves (none chosen by a user): replaced by the best measured one
AUTOMATIC_DEFAULTS = (None, "dense-fp16", "mixed-40", "gate-40")


def upgrade(src: str | Path, dst: str | Path | None = None, *, progress: bool = True) -> Path:
    """Writes ``src`` as a version 3 store at ``dst`` (default: in place); returns where it is. A store
    already of version 3 is left as it is (copied to ``dst`` when one is given)."""
    store, src = Store(src), Path(src)
    dst = Path(dst) if dst is not None else src
    if store.version >= 3:
        if dst.resolve() != src.resolve():
            _copy_store(src, dst)
        regroup_attention(dst)
        m = Store(dst).manifest
        if _with_presets(m):
            write_manifest(dst, m)
        return dst
    if WHOLE not in store.views:
        store.with_view(WHOLE, what="`m2cache upgrade`")  # raises, naming the store it came from
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "ffn").mkdir(parents=True)
    for entry in (store.manifest["resident"], store.manifest.get("attention_int8"), store.manifest.get("predictors")):
        if entry:  # what version 3 keeps as it was
            _link_or_copy(store.path / entry["path"], tmp / entry["path"])
    cfg = store.config
    ffn, backend = FFNWriter(tmp, store.num_neurons, store.hidden, store.groups), PlainBackend()
    bar = ProgressBar("upgrade: layers", cfg.num_layers) if progress else None
    for layer in range(cfg.num_layers):
        ffn.add_layer(layer, {p: store.read_layer(layer, p, backend) for p in quant.PRECISIONS})
        if bar:
            bar(layer + 1)
    m = copy.deepcopy(store.manifest)
    m["version"] = FORMAT_VERSION
    m["checksum"] = CHECKSUM  # what the new files were written with (older stores may use crc32)
    m["resident"]["crc32"] = file_checksum(tmp / m["resident"]["path"], CHECKSUM)
    m["ffn"] = ffn.finish()
    m.setdefault("generation", {})
    _with_presets(m)
    write_manifest(tmp, m)
    _replace(tmp, dst)
    regroup_attention(dst)
    return dst


def _with_presets(m: dict) -> bool:
    """The manifest ``m`` offering this version's gate presets, its default this version's where an earlier
    version set it by itself; True when that changed anything."""
    before = (m.get("policies"), m.get("default_policy"))
    m["policies"] = dict(m.get("policies") or {}) | {name: {"shares": s.to_dict(), "kind": "gate"}
                                                       for name, s in GATE_PRESETS.items()}
    if m.get("default_policy") in AUTOMATIC_DEFAULTS:
        m["default_policy"] = DEFAULT_POLICY
    return (m["policies"], m["default_policy"]) != before


def regroup_attention(path: str | Path) -> bool:
    """The store's INT8 attention file with one scale a row written again in groups of RESIDENT_GROUP (what
    stores written now hold: +0.59% perplexity against +1.15% on the grown SmolLM2 at 40%, where the attention
    streams from it), from the resident file's weights; True when it did. The new file replaces the old one
    (a link to it elsewhere keeps the old bytes), then the manifest says so."""
    store = Store(path)
    entry = store.manifest.get("attention_int8")
    if not entry or entry.get("group"):
        return False
    tmp = store.path / "attention-int8.regroup"
    tmp.mkdir(exist_ok=True)
    try:
        new = write_attention_int8(tmp, StoreTensors(store), store.config)
        if not new["group"]:  # rows that groups of RESIDENT_GROUP do not divide: as it was
            return False
        os.replace(tmp / new["path"], store.path / entry["path"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = store.manifest
    m["attention_int8"] = dict(new, path=entry["path"])
    write_manifest(store.path, m)
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (the files are never written again), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _copy_store(src: Path, dst: Path) -> None:
    if dst.exists():
        raise ConfigError(f"{dst} exists; give a new folder, or none to upgrade {src} in place")
    shutil.copytree(src, dst)


def _replace(tmp: Path, dst: Path) -> None:
    """``tmp`` becomes ``dst``: the old store's folder renamed away first, removed once the new one is in
    place, so a crash leaves one whole store (old or new) at ``dst`` or beside it."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
