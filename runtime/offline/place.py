"""``m2cache place STORE DST``: the same model with each layer's neurons laid out by how often they are chosen.

A decode token reads its FP16 and INT8 neurons one by one; on a disk bound by its reads a second the count of
reads, not their bytes, sets the time. Neurons that the policy chooses often (the hot ones: on SmolLM2 80% of
the top-10% choices fall on 32% of a layer's neurons, ``m2cache locality``) are scattered over the file in
the checkpoint's order, so a token's set is many short runs. Laid out hottest first, the sets crowd into the
front of each file, where neighbours merge into longer, fewer reads (the reader merges runs closer than
``MERGE_GAP_BYTES``).

How often: every position of calibration text (the training part of the text, never the held-out part that
quality is measured on) ranks each layer's neurons as the default gate policies do (``gate:1,0,0``'s scores
from the INT4 gate rows); a neuron counts 3 for each time it is in a position's top 10% (gate-40's FP16
set) and 1 for each time it is in the next 20% (its INT8 set). Each layer's neurons are then ordered by count,
the checkpoint's order breaking ties.

An FFN is a sum over its neurons, so the permutation (gate and up rows, down columns, and a predictor's
outputs, all alike) leaves the model's function as it was: only the order of the sum's terms changes. The
store keeps its source's record (``grown_from`` still finds a grown model's source, so its perplexity is
measured there) and says how it was placed under ``placement``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2cache.errors import ConfigError
from m2cache.model.predictor import LowRankPredictors
from m2cache.offline.layerwise import LayerwiseEval, Variant
from m2cache.offline.progress import ProgressBar
from m2cache.offline.train import split_text, token_windows
from m2cache.storage.reader import Store
from m2cache.storage.tensors import StoreTensors
from m2cache.storage.writer import write_manifest, write_store

log = logging.getLogger(__name__)

WEIGHT = {"fp16": 3, "int8": 1}  # a choice in the top 10% / the next 20% (gate-40's FP16 / INT8 sets)
TOP = (0.10, 0.30)


def neuron_counts(store: Store, tokens: int = 512, text: str | None = None) -> np.ndarray:
    """[layers, F] how often each neuron is chosen over ``tokens`` positions of calibration text (see the
    module's docstring); runs layer by layer (``offline.layerwise``): memory bounded by one layer."""
    windows = token_windows(store, split_text(text)[0], tokens, window=min(256, tokens))
    ev = LayerwiseEval(store, windows)
    gate = ev.policy("gate:1,0,0")
    F_ = store.num_neurons
    k10, k30 = (max(1, int(round(t * F_))) for t in TOP)
    counts = np.zeros((store.config.num_layers, F_), dtype=np.int64)

    def on_ffn_input(layer: int, h: torch.Tensor, _fp16: torch.Tensor) -> None:
        order = gate.score_all(layer, h.float()).argsort(dim=1, descending=True).numpy()
        counts[layer] += WEIGHT["fp16"] * np.bincount(order[:, :k10].reshape(-1), minlength=F_)
        counts[layer] += WEIGHT["int8"] * np.bincount(order[:, k10:k30].reshape(-1), minlength=F_)

    ev.run([Variant("dense-fp16", "full", torch.float32)], on_ffn_input=on_ffn_input)
    return counts


def orders_from(counts: np.ndarray) -> np.ndarray:
    """[layers, F]: row ``i`` of the placed layer holds the source's neuron ``order[i]`` (most chosen first; the
    source's order breaks ties, so a layer nothing tells apart stays as it was)."""
    return np.stack([np.argsort(-c, kind="stable") for c in counts])


class PlacedWeights:
    """``get(name)``: the source store's tensor, each FFN matrix's neurons in the layer's order."""

    def __init__(self, source: StoreTensors, orders: np.ndarray) -> None:
        self.source, self.orders = source, torch.from_numpy(orders)

    def __call__(self, name: str) -> torch.Tensor:
        t = self.source(name)
        if ".mlp." not in name:
            return t
        order = self.orders[int(name.split(".")[2])]
        return t[:, order] if "down_proj" in name else t[order]


def place(src: str | Path, dst: str | Path, *, tokens: int = 512, text: str | None = None,
          progress: bool = True) -> Path:
    """Writes the placed store to ``dst``; returns it."""
    source = Store(src)
    if source.split:
        raise ConfigError(f"{source.path} is a split store (no FP16 gate rows): place the store it was split from")
    dst = Path(dst)
    if dst.resolve() == source.path.resolve():
        raise ConfigError("place writes a new store: give DST other than STORE")
    t0 = time.monotonic()
    counts = neuron_counts(source, tokens, text)
    orders = orders_from(counts)
    bar = ProgressBar("place: store", source.config.num_layers + 1) if progress else None
    out = write_store(dst, source.config, PlacedWeights(StoreTensors(source), orders), source.manifest["tokenizer"],
                      source=str(source.manifest.get("source", "")), progress=bar,
                      generation=source.manifest.get("generation"))
    m = Store(out).manifest
    _place_predictors(source, out, orders, m)
    for key in ("policies", "default_policy"):
        if key in source.manifest:
            m[key] = source.manifest[key]
    m["placement"] = {"from": str(source.path), "by": "gate:1,0,0 top-10% x3 + next-20% x1", "tokens": int(tokens),
                      "text": "calibration (training) part", "seconds": round(time.monotonic() - t0, 1)}
    write_manifest(out, m)
    log.info("place: wrote %s in %.0fs", out, time.monotonic() - t0)
    return out


def _place_predictors(source: Store, dst: Path, orders: np.ndarray, manifest: dict[str, Any]) -> None:
    """The source's predictors with their outputs (one per neuron) in the placed order: the same scores."""
    meta = source.manifest.get("predictors")
    if not meta:
        return
    p = LowRankPredictors.load(source.path / meta["path"], torch.float32)
    idx = torch.from_numpy(orders)
    w2 = torch.stack([p.w2[layer][idx[layer]] for layer in range(p.num_layers)])
    b2 = torch.stack([p.b2[layer][idx[layer]] for layer in range(p.num_layers)])
    LowRankPredictors(p.w1, p.b1, w2, b2).save(dst / meta["path"], {"rank": str(meta.get("rank", "")), "placed": "1"})
    manifest["predictors"] = dict(meta)


def cmd_place(args) -> int:
    out = place(args.store, args.dst, tokens=args.tokens,
                text=Path(args.text).read_text(encoding="utf-8") if args.text else None)
    print(f"store: {out}")
    return 0


def add_place_command(sub) -> None:
    p = sub.add_parser("place", help="the same model with each layer's neurons laid out most chosen first (fewer, "
                                     "longer reads of a token's neurons)")
    p.add_argument("store", help="the source store (not a split one)")
    p.add_argument("dst", help="the store to write")
    p.add_argument("--tokens", type=int, default=512, help="calibration positions that count the choices (default 512)")
    p.add_argument("--text", help="text file whose training part calibrates (default: the pydoc prose)")
    p.set_defaults(func=cmd_place)
