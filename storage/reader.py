"""Opens a store, validates it, and reads any set of neurons at any precision, verifying checksums.

A store of format version 3 keeps each layer's [up|down] bundles and its gate rows in files of their own,
and a :class:`Store` reads it in one of two *views*:

- ``whole`` (what ``Store(path)`` opens): bundles of gate, up and down together, what every policy but
  the gate ones computes from (the dense model, ``dense-fp16``, the predictors, the oracle, ``eval``,
  ``export-gguf``): a neuron's gate row and its [up|down] bundle are read at once and joined;
- ``split``: bundles of up and down only, what a gate policy fetches: it ranks the neurons by a resident
  INT4 copy of every gate row (:meth:`Store.read_gates`) and takes the kept ones' gate activations from it.

Stores of versions 1 and 2 hold [gate|up|down] bundles in one file per layer and precision: read as the
``whole`` view (a gate policy there fetches all three parts). One written by version 2's ``split-gate``
holds the ``split`` view only. ``m2cache upgrade`` lays either kind of older whole store out as version 3.

Reads are synchronous (the runtime calls them from its I/O threads) and go through an SSD backend
(``m2cache.storage.ssd``), so a simulated slow or faulty SSD sits under the same code as a real one.
"""
from __future__ import annotations

import copy
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from m2cache.errors import (
    ChecksumError, ConfigError, StoreError, StoreNotFoundError, StoreVersionError, TruncatedStoreError,
    UnsupportedArchitectureError,
)
from m2cache.formats.config import ModelConfig
from m2cache.formats.families import SUPPORTED_MODEL_TYPES, supported
from m2cache.formats import quant
from m2cache.storage.attention_stream import Int8AttentionLayout, verify_int8_file
from m2cache.storage.bundle_files import (  # noqa: F401  (the read helpers' home; imported from here too)
    CORRUPT_READS, FIX_HINT, MERGE_GAP_BYTES, PERSISTENT_READS, TRANSIENT_RETRIES, Backend, BundleFiles, PlainBackend, first_bad_block, merge_gap,
    read_checked, read_planned, read_with_retries,
)
from m2cache.storage.layout import FORMAT_NAME, FORMAT_VERSION, MANIFEST, READABLE_VERSIONS, file_checksum

WHOLE, SPLIT = "whole", "split"
UPGRADE_HINT = "`m2cache upgrade {store}` lays it out so that one store runs every policy"


def _unpack_manifest(path: Path) -> dict[str, Any]:
    folder = path.parent
    if folder.is_file():
        hint = ("convert it first: `m2cache convert SRC DST`" if folder.suffix in (".gguf", ".safetensors")
                else f"give the folder it is in ({folder.parent})" if folder.name == MANIFEST
                else "give the store's folder, as `m2cache fetch` or `m2cache convert` printed it")
        raise StoreNotFoundError(f"{folder} is a file, not a store folder; {hint}")
    if not folder.is_dir():
        raise StoreNotFoundError(f"no store at {folder}: the folder does not exist; "
                                 "create one with `m2cache convert SRC DST` or `m2cache fetch smollm2`")
    if not path.is_file():
        raise StoreNotFoundError(f"{path} is missing, so {folder} is not a store; {FIX_HINT}")
    try:
        manifest = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise StoreError(f"{path} is not a readable manifest ({e}); {FIX_HINT}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is not an m2cache manifest; {FIX_HINT}")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise StoreVersionError(
            f"{path} has store format version {manifest.get('version')!r}; this m2cache reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} and writes {FORMAT_VERSION}: {FIX_HINT} with this "
            "version of m2cache")
    return manifest


class Store:
    """A validated store folder, in one view (``whole`` unless given). Cheap to open: reads the manifest
    and stats the files; :meth:`with_view` gives the other view of the same store."""

    def __init__(self, path: str | Path, view: str | None = None) -> None:
        self.path = Path(path)
        self.manifest = _unpack_manifest(self.path / MANIFEST)
        cfg = self.manifest["config"]
        if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"{self.path / MANIFEST} describes a {cfg.get('model_type')!r} model; {supported()}"
            )
        self.config = ModelConfig.from_dict(cfg)
        self.version: int = self.manifest["version"]
        self.checksum_name: str = self.manifest.get("checksum", "crc32")
        ffn = self.manifest["ffn"]
        self.num_neurons: int = ffn["num_neurons"]
        self.hidden: int = ffn["hidden"]
        # version 1 stores have one INT8 scale per row: a group as wide as the row
        self.groups = quant.Groups(int8=ffn.get("int8_group", self.hidden), int4=ffn["int4_group"])
        try:
            # [up|down] bundles (version 3, or a version 2 split store) or [gate|up|down] ones
            self.bundles = BundleFiles(self.path, ffn["files"], ffn["geometry"], self.num_neurons,
                                       self.checksum_name, " (up/down)" if "gate_files" in ffn else "")
            self.gate_rows = None if "gate_files" not in ffn else BundleFiles(
                self.path, ffn["gate_files"], ffn["gate_geometry"], self.num_neurons, self.checksum_name,
                " (gate rows)")
        except ValueError as e:  # an unknown checksum algorithm
            raise StoreVersionError(f"{self.path / MANIFEST}: {e}; {FIX_HINT}") from e
        self.checksum = self.bundles.checksum
        self._file_parts: int = ffn["parts"]
        self.views: tuple[str, ...] = ((WHOLE, SPLIT) if self.gate_rows is not None
                                       else (SPLIT,) if "gates" in ffn else (WHOLE,))
        self.view = self.views[0]
        self._check_files()
        if view is not None and view != self.view:
            self.view = self.with_view(view).view

    def with_view(self, view: str, what: str = "") -> "Store":
        """This store in ``view`` (``whole`` or ``split``); ``what`` names what needs it, for the refusal."""
        if view == self.view:
            return self
        if view not in self.views:
            if view == WHOLE:
                source = self.manifest.get("source", "")
                raise ConfigError(
                    f"{self.path} is a split store (`m2cache split-gate` of format version 2: up/down fetched, "
                    f"INT4 gate rows resident): only gate policies run on it, and {what or 'this'} needs the FP16 "
                    f"gate rows of the store it was split from ({source}); "
                    + UPGRADE_HINT.format(store="SOURCE_STORE"))
            raise ConfigError(f"unknown store view {view!r}; {self.path} has {', '.join(self.views)}")
        other = copy.copy(self)
        other.view = view
        return other

    def _check_files(self) -> None:
        self.bundles.check()
        if self.gate_rows is not None:
            self.gate_rows.check()
        for key, what in (("gates", "the split store's gate rows"), ("gate_norms", "the gate policies' norms")):
            entry = self.manifest["ffn"].get(key)
            if entry is not None:
                self._check_file(self.path / entry["path"], entry["size"], what)
        attention = self.manifest.get("attention_int8")
        if attention:  # optional: stores written before it stream BF16/FP16 attention instead
            self._check_file(self.path / attention["path"], attention["size"], "the INT8 attention weights")
            n = self.config.num_layers
            if (attention["layer_bytes"] != Int8AttentionLayout.of_entry(self.config, attention).stride
                    or len(attention["crc32"]) != 4 * n or attention["size"] != n * attention["layer_bytes"]):
                raise StoreVersionError(f"{self.path / MANIFEST}: the INT8 attention file's layout is not the one this "
                                        f"m2cache reads; {FIX_HINT}")
        res = self.path / self.manifest["resident"]["path"]
        self._check_file(res, self.manifest["resident"]["size"], "")

    @staticmethod
    def _check_file(path: Path, size: int, what: str) -> None:
        named = f"{path} ({what})" if what else str(path)
        if not path.is_file():
            raise StoreNotFoundError(f"{named} is missing; {FIX_HINT}")
        if path.stat().st_size < size:
            raise TruncatedStoreError(f"{named} is truncated; {FIX_HINT}")

    # ---- the view ------------------------------------------------------------------------------
    @property
    def split(self) -> bool:
        """The view a gate policy fetches: bundles of (up, down), the gate rows resident."""
        return self.view == SPLIT

    @property
    def parts(self) -> int:
        """Parts of a bundle as this view reads it: 3 (gate, up, down) or 2 (up, down)."""
        return 2 if self.split else 3

    @property
    def _joined(self) -> bool:
        """Whole bundles joined from a version 3 store's gate rows and [up|down] bundles."""
        return self.gate_rows is not None and not self.split

    @property
    def geometry(self):
        """Block geometry per precision of the store's bundle files ([up|down] ones in version 3)."""
        return self.bundles.geometry

    def bundle_bytes(self, precision: str) -> int:
        """Bytes of one neuron's bundle as this view reads it (what a tier holds for it)."""
        gate = self.gate_rows.bundle_bytes(precision) if self._joined else 0  # type: ignore[union-attr]
        return self.bundles.bundle_bytes(precision) + gate

    def layer_bytes(self, precision: str) -> int:
        """Bytes of one layer's bundles at a precision (no padding): what a tier holds for it."""
        return self.num_neurons * self.bundle_bytes(precision)

    def file_bytes(self, precision: str) -> int:
        """Bytes of the files this view reads a layer at ``precision`` from (padding included)."""
        gate = self.gate_rows.file_bytes(precision) if self._joined else 0  # type: ignore[union-attr]
        return self.bundles.file_bytes(precision) + gate

    def file_path(self, layer: int, precision: str) -> Path:
        return self.bundles.file_path(layer, precision)

    def all_files(self) -> list[Path]:
        """Every file of the store (its manifest last)."""
        files = self.bundles.files() + (self.gate_rows.files() if self.gate_rows is not None else [])
        ffn = self.manifest["ffn"]
        extra = [ffn[k]["path"] for k in ("gates", "gate_norms") if ffn.get(k)]
        extra += [m["path"] for m in (self.manifest.get("attention_int8"), self.manifest["resident"]) if m]
        if self.manifest.get("predictors"):
            extra.append(self.manifest["predictors"]["path"])
        return files + [self.path / e for e in extra] + [self.path / MANIFEST]

    # ---- reads -------------------------------------------------------------------------------
    def read_layer(self, layer: int, precision: str, backend: Backend) -> torch.Tensor:
        """Every neuron of a layer at a precision: [F, bundle_bytes] uint8, verified (one read of each file
        the view needs, checked against the file's checksum in one pass)."""
        ud = self.bundles.read_layer(layer, precision, backend)
        if not self._joined:
            return ud
        gate = self.gate_rows.read_layer(layer, precision, backend)  # type: ignore[union-attr]
        return quant.join_parts(precision, gate, 1, ud, 2, self.hidden, self.groups)

    def read_neurons(self, layer: int, precision: str, ids: np.ndarray, backend: Backend,
                     pool: Executor | None = None) -> torch.Tensor:
        """Bundles of ``ids`` (any order, unique) at a precision: [n, bundle_bytes] uint8, aligned with ids.

        Reads the blocks that hold them, one read per run of blocks (runs closer than MERGE_GAP_BYTES
        merged), or the whole file where they fill half its blocks; every block used is verified. With a
        ``pool`` the runs, of the gate file and the [up|down] one alike, are read by its threads at once."""
        if not self._joined:
            return self.bundles.read_neurons(layer, precision, ids, backend, pool)
        gate, ud = read_planned([self.gate_rows.plan(layer, precision, ids),  # type: ignore[union-attr]
                                 self.bundles.plan(layer, precision, ids)], backend, pool)
        return quant.join_parts(precision, gate, 1, ud, 2, self.hidden, self.groups)

    def run_bytes(self, precision: str, ids: np.ndarray) -> int:
        """Bytes read_neurons reads for ids (read amplification and merged gaps included)."""
        gate = self.gate_rows.run_bytes(precision, ids) if self._joined else 0  # type: ignore[union-attr]
        return self.bundles.run_bytes(precision, ids) + gate

    def read_gates(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What a gate policy keeps resident: every layer's gate rows as packed one-part INT4 bundles
        ([F, D/2 + 4·D/group] uint8) and ||up_j||·||down_j|| ([F] float32), each file checked first.

        From a version 3 store's INT4 gate files and its norms file; a version 2 split store's gate file;
        or, on an older whole store, every INT4 and FP16 layer read."""
        ffn, layers, backend = self.manifest["ffn"], range(self.config.num_layers), PlainBackend()
        if self.gate_rows is not None:
            norms = self._load_checked(ffn["gate_norms"], "the gate policies' norms")
            return [self.gate_rows.read_layer(L, "int4", backend) for L in layers], [norms.pop(f"norms.{L}") for L in layers]
        if "gates" in ffn:
            tensors = self._load_checked(ffn["gates"], "the split store's gate rows")
            return [tensors.pop(f"gate.{L}") for L in layers], [tensors.pop(f"norms.{L}") for L in layers]
        gates = [quant.select_parts("int4", self.read_layer(L, "int4", backend), 3, self.hidden, self.groups, 0, 1)
                 for L in layers]
        return gates, [quant.up_down_norms(self.read_layer(L, "fp16", backend), 3, self.hidden) for L in layers]

    def _load_checked(self, entry: dict[str, Any], what: str) -> dict[str, torch.Tensor]:
        path = self.path / entry["path"]
        if file_checksum(path, self.checksum_name) != entry["crc32"]:
            raise ChecksumError(f"{path} ({what}) does not match its checksum; {FIX_HINT}")
        from safetensors.torch import load_file

        # load_file maps the file: its pages would come in when first used, as page cache the process's
        # resident set at open does not show and a memory limit then evicts and faults back in 4 KiB at a
        # time (on the 7B shape 193 MB a token). Copied, they are the process's own memory, counted at open.
        return {name: t.clone() for name, t in load_file(str(path)).items()}

    def verify(self) -> None:
        """Reads every file of the store and checks it against its checksums: a ``ChecksumError`` names the
        first damaged one (``m2cache fetch`` runs this on a store it already has)."""
        backend = PlainBackend()
        self.bundles.verify(backend)
        if self.gate_rows is not None:
            self.gate_rows.verify(backend)
        ffn = self.manifest["ffn"]
        for key, what in (("gates", "the split store's gate rows"), ("gate_norms", "the gate policies' norms"),
                          ("resident", "the resident weights")):
            entry = ffn.get(key) or (self.manifest["resident"] if key == "resident" else None)
            if entry is not None and file_checksum(self.path / entry["path"], self.checksum_name) != entry["crc32"]:
                raise ChecksumError(f"{self.path / entry['path']} ({what}) does not match its checksum; {FIX_HINT}")
        attention = self.manifest.get("attention_int8")
        if attention:
            verify_int8_file(self.path, attention, self.config.num_layers)

    def decode(self, precision: str, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return quant.decode(precision, raw, self.parts, self.hidden, dtype, self.groups)
