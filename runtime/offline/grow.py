"""``m2cache grow STORE DST --width K``: a real model K times wider that computes the same function.

No checkpoint bigger than memory can be had here, and random weights have none of the structure m2cache
exists to exploit (hot neurons, token-to-token locality; their perplexity means nothing). A grown model
has a real model's function and activation statistics with rows K times longer:

- the hidden size is K·D: every embedding row and every matrix row along the hidden side is the
  source's row *tiled* K times (the input side of q/k/v, gate, up and the LM head; the output side of
  o_proj and down_proj), so the residual stream is the source's, tiled;
- every RMSNorm weight is tiled and divided by K: the norm of a tiled vector equals the original's, and a
  tiled row times a tiled input sums K copies of the source's product, which the 1/K in the norm's gain
  takes back. K is a power of two, so the division is exact in FP16 (the matrices are not divided at all,
  so no small weight goes subnormal);
- the tied embedding cannot serve as the LM head any more (the logits would be K times too large): the
  head is written apart, the embedding tiled, its 1/K again in the final norm;
- attention keeps its heads and head size (only the projections' hidden side widens), the FFN keeps its
  neurons: **no neuron is duplicated** (a twin would fire exactly with its original and flatter every
  cache, layout or co-activation scheme);
- the source's predictors, if any, are tiled the same way (their first layer reads the FFN input).

Why tiling rather than a random orthogonal map of the hidden space: a tiled row is quantised exactly as the
source's row is (groups of 32 and llama.cpp's blocks of 32 fall on whole copies; K-quants' super-blocks
of 256 need K·D to be a multiple of 256 and then apply), so the grown model's quantisation error is the
source's, where a rotation would smooth outliers and flatter every low-bit type. Its cost: the rows
repeat, so they would compress K-fold (nothing here compresses weights).

What it is not: a model of K·D's capacity; its proportions are the source's layer count and neurons per
layer with K-times-longer rows, so the embeddings, the LM head and attention weigh more than in a 7B.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from m2cache.errors import ConfigError
from m2cache.formats.config import ModelConfig
from m2cache.model.predictor import LowRankPredictors
from m2cache.offline.progress import ProgressBar
from m2cache.offline.synth import write_hf_folder
from m2cache.storage.reader import Store
from m2cache.storage.tensors import StoreTensors
from m2cache.storage.writer import write_manifest, write_store

log = logging.getLogger(__name__)

INPUT_SIDE = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
OUTPUT_SIDE = ("o_proj.weight", "down_proj.weight")


def grown_config(cfg: ModelConfig, width: int) -> ModelConfig:
    check_width(width, cfg.hidden_size)
    return replace(cfg, hidden_size=cfg.hidden_size * width, tie_word_embeddings=False)


def check_width(width: int, hidden: int) -> None:
    if width < 2 or width & (width - 1):
        raise ConfigError(f"--width must be a power of two >= 2 (the norms' 1/K stays exact in FP16), got {width}")
    if hidden * width % 256:
        raise ConfigError(f"--width {width} gives a hidden size of {hidden * width}, not a multiple of 256: llama.cpp's "
                          "K-quants would not apply to its rows; choose a larger power of two")


class GrownWeights:
    """``get(name)``: the grown model's tensor (FP16), made from the source store's on demand."""

    def __init__(self, source: StoreTensors, width: int) -> None:
        self.source, self.width = source, width

    def __call__(self, name: str) -> torch.Tensor:
        k = self.width
        if name == "lm_head.weight":  # tied in the source: its own tensor here
            src = self.source("lm_head.weight" if not self.source.cfg.tie_word_embeddings else "model.embed_tokens.weight")
            return src.repeat(1, k)
        t = self.source(name)
        if name.endswith("norm.weight"):
            return (t.float().repeat(k) / k).to(t.dtype)
        if name == "model.embed_tokens.weight" or name.endswith(INPUT_SIDE):
            return t.repeat(1, k)
        if name.endswith(OUTPUT_SIDE):
            return t.repeat(k, 1)
        raise ConfigError(f"grow does not know how to widen {name}")


def grow(src: str | Path, dst: str | Path, width: int = 16, *, progress: bool = True) -> dict[str, Path]:
    """Writes ``dst/store`` and ``dst/hf`` (the same FP16 values) of ``src`` grown ``width``-fold; returns both."""
    source = Store(src)
    if source.split:
        raise ConfigError(f"{source.path} is a split store (no FP16 gate rows): grow the store it was split from")
    cfg = grown_config(source.config, width)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    get = GrownWeights(StoreTensors(source), width)
    tok = source.manifest["tokenizer"]
    t0 = time.monotonic()
    bar = ProgressBar(f"grow x{width}: store", cfg.num_layers + 1) if progress else None
    store = write_store(dst / "store", cfg, get, tok, source=f"grow:x{width}:{source.path}", progress=bar)
    _grow_predictors(source, Store(store), width)
    bar = ProgressBar(f"grow x{width}: HF folder", cfg.num_layers + 1) if progress else None
    hf = write_hf_folder(dst / "hf", cfg, get, tok, progress=bar)
    (dst / "grown.json").write_text(json.dumps({"source": str(source.path), "width": width,
                                                "seconds": round(time.monotonic() - t0, 1)}, indent=1))
    log.info("grow: wrote %s and %s in %.0fs", store, hf, time.monotonic() - t0)
    return {"store": store, "hf": hf}


def grown_from(store: Store) -> Path | None:
    """The store ``store`` was grown from (``m2cache grow`` names it in the manifest's source), if it is there:
    the same function at a 16th of the width (``tools/grown_check.py``), so what only depends on the function
    (a policy's perplexity) is measured on it."""
    source = str(store.manifest.get("source", ""))
    if not source.startswith("grow:x"):
        return None
    path = Path(source.split(":", 2)[2])
    return path if (path / "manifest.msgpack").is_file() else None


def _grow_predictors(source: Store, store: Store, width: int) -> None:
    """The source's predictors with their first layer tiled (w1 reads the FFN input): the same scores."""
    meta = source.manifest.get("predictors")
    if not meta:
        return

    p = LowRankPredictors.load(source.path / meta["path"], torch.float32)
    grown = LowRankPredictors(p.w1.repeat(1, 1, width), p.b1, p.w2, p.b2)
    grown.save(store.path / meta["path"], {"rank": str(meta.get("rank", "")), "grown": str(width)})
    m = store.manifest
    m["predictors"] = dict(meta) | {"grown_from": str(source.path)}
    m["policies"] = dict(source.manifest.get("policies") or {})
    m["default_policy"] = source.manifest.get("default_policy") or "dense-fp16"
    write_manifest(store.path, m)


def proportions(cfg: ModelConfig) -> dict[str, Any]:
    """Where a model's parameters are (what makes a grown model unlike a 7B: report it beside its size)."""
    D, F_, L, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.head_dim
    attn = L * D * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    ffn = L * 3 * D * F_
    emb = cfg.vocab_size * D * (1 if cfg.tie_word_embeddings else 2)
    total = attn + ffn + emb
    return {"params": total, "fp16_bytes": 2 * total, "ffn_share": ffn / total, "attention_share": attn / total,
            "embeddings_and_head_share": emb / total, "neurons_per_layer": F_, "hidden": D, "layers": L}


def cmd_grow(args) -> int:
    t0 = time.monotonic()
    out = grow(args.store, args.dst, args.width)
    cfg = Store(out["store"]).config
    p = proportions(cfg)
    print(f"store: {out['store']}\nhf:    {out['hf']}\n{p['params'] / 1e9:.2f} G parameters, "
          f"{p['fp16_bytes'] / 1e9:.2f} GB of FP16: FFN {p['ffn_share']:.0%}, attention {p['attention_share']:.0%}, "
          f"embeddings and LM head {p['embeddings_and_head_share']:.0%} ({time.monotonic() - t0:.0f}s)")
    return 0


def add_grow_command(sub) -> None:
    p = sub.add_parser("grow", help="a store's model K times wider, computing the same function (a real model "
                                    "bigger than memory, for the bench)")
    p.add_argument("store", help="the source store (not a split one)")
    p.add_argument("dst", help="folder to create: DST/store and DST/hf")
    p.add_argument("--width", type=int, default=16, help="K, a power of two (default 16: SmolLM2-135M -> 9216 wide)")
    p.set_defaults(func=cmd_grow)
