"""``m2cache locality STORE``: how much of a token's neuron set the tokens before it already had, how flat the
hot set is, and what reading a token's set off the store costs in reads.

What m2cache exploits is measured here on held-out text, per layer and per token, with the ranking the engine
uses (``--score gate``: |act(gate·h)|·‖up‖·‖down‖ from the resident INT4 gate rows, the default policies'; or
``oracle``: the exact |act(gate·h)·(up·h)|·‖down‖):

- ``prev`` / ``last4``: the share of a token's top-k neurons (top 10%: gate-40's FP16 set; top 30%: its FP16 and
  INT8 sets) that the previous token / any of the last 4 tokens also had in its top-k (a window of recent
  neurons in DRAM saves those reads);
- ``hot80``: the share of a layer's neurons that make 80% of all top-10% selections over the text (small:
  a hot set worth keeping; near 0.8: flat);
- ``runs`` / ``KB/run``: the reads one layer's top-10% set (FP16 bundles) and next-20% set (INT8 bundles) take
  per token at the store reader's merge gap, and their mean size (a disk serving ~10 k reads a second is bound
  by their count, not their bytes). Measured on the store's own files (format 3: the [up|down] files the
  default gate policy reads), or on another store's layout (``--layout-store``, e.g. an older version's).

Runs layer by layer (:mod:`m2cache.offline.layerwise`): memory is bounded by one layer, whatever the model.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2cache.model.policy import contributions
from m2cache.offline.layerwise import LayerwiseEval, Variant
from m2cache.offline.train import split_text, token_windows
from m2cache.storage.layout import BlockGeometry, coalesce
from m2cache.storage.reader import Store, merge_gap

TOP = (0.10, 0.30)
HISTORY = 4


def locality(store_dir: str | Path, *, layout_store: str | Path | None = None, tokens: int = 2048,
             window: int = 512, score: str = "gate", text: str | None = None) -> dict[str, Any]:
    """Per-layer and mean statistics (see the module's docstring) over ``tokens`` held-out tokens."""
    store = Store(store_dir)
    layout = Store(layout_store) if layout_store else store
    windows = token_windows(store, split_text(text)[1], tokens, window=min(window, tokens))
    ev = LayerwiseEval(store, windows)
    gate = ev.policy("gate:1,0,0") if score == "gate" else None
    act = ev.act
    F_ = store.num_neurons
    k10, k30 = (max(1, int(round(t * F_))) for t in TOP)
    per_layer: list[dict[str, float]] = []

    def on_ffn_input(layer: int, h: torch.Tensor, fp16: torch.Tensor) -> None:
        s = gate.score_all(layer, h.float()) if gate is not None else contributions(fp16, h.float(), act)  # type: ignore[attr-defined]
        order = s.argsort(dim=1, descending=True).numpy()  # [N, F]
        row: dict[str, float] = {"layer": layer}
        for k, label in ((k10, "top10"), (k30, "top30")):
            prev, last4 = _overlap(order[:, :k], len(windows), F_)
            row[f"{label}_prev"], row[f"{label}_last4"] = prev, last4
        row["hot80"] = _hot_share(order[:, :k10], F_, 0.8)
        for ids, p, label in ((order[:, :k10], "fp16", "fp16"), (order[:, k10:k30], "int8", "int8")):
            runs, run_bytes = _runs(ids, layout.geometry[p])
            row[f"runs_{label}"], row[f"kb_per_run_{label}"] = runs, run_bytes / 1024
        per_layer.append(row)

    ev.run([Variant("dense-fp16", "full", torch.float32)], on_ffn_input=on_ffn_input)
    keys = [k for k in per_layer[0] if k != "layer"]
    mean = {k: float(np.mean([r[k] for r in per_layer])) for k in keys}
    cfg = store.config
    return {"store": str(store.path), "layout": str(layout.path), "score": score, "tokens": sum(len(w) for w in windows),
            "neurons": F_, "layers": cfg.num_layers, "hidden": cfg.hidden_size, "mean": mean, "per_layer": per_layer}


def _overlap(sets: np.ndarray, num_windows: int, F_: int) -> tuple[float, float]:
    """Mean share of each position's set that the previous position's / the last HISTORY positions' sets hold
    (positions of one window only: a window starts a new text)."""
    N, k = sets.shape
    T = N // num_windows
    member = np.zeros((N, F_), dtype=bool)
    np.put_along_axis(member, sets, True, axis=1)
    prev, last = [], []
    for w in range(num_windows):
        m = member[w * T:(w + 1) * T]
        for t in range(1, T):
            prev.append(m[t][m[t - 1]].sum() / k)
            last.append(m[t][m[max(0, t - HISTORY):t].any(axis=0)].sum() / k)
    return float(np.mean(prev)), float(np.mean(last))


def _hot_share(sets: np.ndarray, F_: int, cover: float) -> float:
    counts = np.sort(np.bincount(sets.reshape(-1), minlength=F_))[::-1]
    need = np.searchsorted(np.cumsum(counts), cover * counts.sum()) + 1
    return float(need / F_)


def _runs(sets: np.ndarray, geom: BlockGeometry) -> tuple[float, float]:
    """Mean reads per position for its set, and mean bytes per read, at the reader's merge gap."""
    runs, sizes = [], []
    for ids in sets:
        blocks = np.unique(ids // geom.neurons_per_block)
        spans = coalesce(blocks, merge_gap(geom))
        runs.append(len(spans))
        sizes += [count * geom.block_bytes for _, count in spans]
    return float(np.mean(runs)), float(np.mean(sizes)) if sizes else 0.0


def format_table(results: list[tuple[str, dict[str, Any]]]) -> str:
    head = (f"{'model':<34} {'hidden':>6} {'F':>6} | {'top10 prev':>10} {'last4':>6} | {'top30 prev':>10} {'last4':>6} | "
            f"{'hot80':>6} | {'runs fp16':>9} {'KB/run':>7} | {'runs int8':>9} {'KB/run':>7}")
    lines = [head, "-" * len(head)]
    for label, r in results:
        m = r["mean"]
        lines.append(f"{label:<34} {r['hidden']:>6} {r['neurons']:>6} | {m['top10_prev']:>10.1%} {m['top10_last4']:>6.1%} | "
                     f"{m['top30_prev']:>10.1%} {m['top30_last4']:>6.1%} | {m['hot80']:>6.1%} | "
                     f"{m['runs_fp16']:>9.0f} {m['kb_per_run_fp16']:>7.1f} | {m['runs_int8']:>9.0f} "
                     f"{m['kb_per_run_int8']:>7.1f}")
    return "\n".join(lines)


def cmd_locality(args) -> int:
    results = [(args.label or Path(args.store).parent.name, locality(
        args.store, layout_store=args.layout_store, tokens=args.tokens, score=args.score,
        text=Path(args.text).read_text(encoding="utf-8") if args.text else None))]
    if args.json:
        json.dump(results[0][1], sys.stdout, indent=1)
        print()
    else:
        print(format_table(results))
    return 0


def add_locality_command(sub) -> None:
    p = sub.add_parser("locality", help="token-to-token locality, hot-set flatness and reads per token of a store's "
                                        "neurons on held-out text")
    p.add_argument("store", help="a whole store (the dense model runs on it)")
    p.add_argument("--layout-store", help="the store whose file layout the reads are counted on (default: the "
                                          "store itself; on format 3 its [up|down] files, what gate policies read)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--score", choices=("gate", "oracle"), default="gate")
    p.add_argument("--text", help="text file; its last 20%% is used (default: the pydoc prose)")
    p.add_argument("--label", help="the model's name in the table")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_locality)
