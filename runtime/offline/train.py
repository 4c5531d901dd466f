"""``m2cache train-predictor``: fits one low-rank neuron predictor per FFN layer on the dense model's
own activations, saves ``predictors.safetensors`` and registers predictor policies in the manifest.

Calibration text is CPython's ``pydoc_data.topics`` prose (every machine has it) unless a file is given.
The text is split once, at a fixed point: the first 80% calibrates (training, tuning), the last 20% is
held out for ``m2cache eval``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from m2cache.engine.loading import load_dense, load_tokenizer
from m2cache.errors import ConfigError
from m2cache.model.llama import DenseModel, attention_block, embed, ffn_residual, rms_norm
from m2cache.formats.shares import GATE_PRESETS, Shares
from m2cache.model.predictor import LowRankPredictors
from m2cache.offline.progress import ProgressBar
from m2cache.storage.layout import PREDICTORS
from m2cache.storage.reader import Store
from m2cache.storage.writer import write_manifest

log = logging.getLogger(__name__)

CALIBRATION_FRACTION = 0.8
WINDOW = 512  # tokens per sequence, each starting at position 0
DEFAULT_RANK = 128
DEFAULT_TOKENS = 8192
VAL_WINDOWS = 2  # the last calibration windows measure recall, never train
# predictor policies every trained store gets (FP16, INT8, INT4 shares); tune adds its own.
# The default keeps every neuron and lets the predictor choose only each neuron's precision: on the
# demo model skipping neurons by the predictor's ranking costs far more than INT4 does. Measured by
# `m2cache eval --frontier` (demo, format 2 store, docs/results/eval_frontier_demo.txt): mixed-40 fetches
# 0.431 of dense FP16 FFN bytes for +1.4% perplexity on the pydoc tail and +1.0% on GPL-3 (top-1 0.958 /
# 0.915); at 0.37 of the bytes (0.1/0.2/0.5) the predictor costs +14% / +89%. The sparse presets stay for
# models that allow them.
PRESET_POLICIES: dict[str, Shares] = {
    "sparse-50": Shares(0.5, 0.0, 0.0),
    "mixed-25": Shares(0.1, 0.2, 0.2),
    "mixed-40": Shares(0.1, 0.2, 0.7),
}
# gate policies (no predictor: a resident packed INT4 copy of every gate row ranks the neurons), registered
# here too for stores of format 2 and before, where convert wrote none. gate-40 is more exact than mixed-40
# at the same shares (+0.9% / -0.0%, top-1 0.975 / 0.949) and, on a store that keeps its gate rows apart
# (format 3), fetches 0.29 of the FP16 FFN bytes to mixed-40's 0.43: such a store's default, which training
# predictors leaves as it is (``m2cache.formats.shares.DEFAULT_POLICY``). mixed-40 becomes the default only
# of an older store that had none.
PRESET_GATE_POLICIES: dict[str, Shares] = dict(GATE_PRESETS)
PRESET_DEFAULT = "mixed-40"


# ---- corpus ---------------------------------------------------------------------------------
def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def split_text(text: str | None) -> tuple[str, str]:
    """(calibration, held-out): a fixed cut at 80% of the text, moved to the next paragraph break."""
    text = default_text() if text is None else text
    cut = int(len(text) * CALIBRATION_FRACTION)
    brk = text.find("\n\n", cut)
    cut = brk if 0 <= brk < len(text) - 1000 else cut
    return text[:cut], text[cut:]


def token_windows(store: Store, text: str, num_tokens: int, window: int = WINDOW) -> list[list[int]]:
    """Consecutive windows of ``text``'s tokens, each prefixed with BOS when the model has one."""
    tok = load_tokenizer(store)
    bos = store.config.bos_token_id
    body = window - (1 if bos is not None else 0)
    need = num_tokens // window
    if not need:
        raise ConfigError(f"{num_tokens} tokens make no window of {window}: ask for at least {window} tokens")
    ids: list[int] = []
    # encode in pieces: enough text for the windows wanted, without tokenising a whole book
    for start in range(0, len(text), 200_000):
        ids += tok.tok.encode(text[start:start + 200_000], add_special_tokens=False).ids
        if len(ids) >= need * body:
            break
    windows = [ids[i * body:(i + 1) * body] for i in range(min(need, len(ids) // body))]
    if not windows:
        raise ConfigError(f"the text holds fewer than {window} tokens; give a longer text")
    return [([bos] if bos is not None else []) + w for w in windows]


# ---- activations ----------------------------------------------------------------------------
@torch.inference_mode()
def collect(model: DenseModel, windows: list[list[int]], bar: ProgressBar | None = None
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each FFN layer's inputs h [N, D] (fp32) and neuron contributions |act(gate·h)·(up·h)|·||down|| [N, F]
    (fp16): what the predictors learn to rank (``m2cache.model.policy.contributions``)."""
    cfg = model.cfg
    down_norms = [W[:, 2].norm(dim=1) for W in model.ffn]
    xs: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_layers)]
    ys: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_layers)]
    for i, win in enumerate(windows):
        kv = model.new_cache()
        x = embed(cfg, model.res, torch.tensor(win))
        for layer, w in enumerate(model.res.layers):
            x = attention_block(cfg, w, x, layer, kv, 0, model.rope)
            h = rms_norm(x, w.ffn_norm, cfg.rms_norm_eps)
            W = model.ffn[layer]
            a = model.act(F.linear(h, W[:, 0])) * F.linear(h, W[:, 1])  # [T, F]
            xs[layer].append(h.clone())
            ys[layer].append((a.abs() * down_norms[layer]).half())
            x = ffn_residual(cfg, w, x, a @ W[:, 2])
        if bar:
            bar(i + 1)
    return [torch.cat(v) for v in xs], [torch.cat(v) for v in ys]


# ---- one layer's predictor --------------------------------------------------------------------
def init_predictor(X: torch.Tensor, T: torch.Tensor, rank: int, ridge: float = 1e-2) -> list[torch.Tensor]:
    """Closed-form start: reduced-rank ridge regression of the targets on h, written as the MLP.

    With W1 = [P; -P] and W2 = [V, -V], relu(P·(h-mu)) - relu(-P·(h-mu)) = P·(h-mu), so the network
    starts as the best rank-r/2 linear map (V·P), which gradient steps then refine.
    """
    Xf, Tf = X.float(), T.float()
    mu_x, mu_t = Xf.mean(0), Tf.mean(0)
    Xc = Xf - mu_x
    cov = Xc.T @ Xc  # [D, D]
    cov.diagonal().add_(ridge * cov.diagonal().mean())
    B = torch.linalg.solve(cov, Xc.T @ (Tf - mu_t))  # [D, F]
    # principal directions of the fitted targets: eigenvectors of B^T cov B
    _, vecs = torch.linalg.eigh(B.T @ (cov @ B))
    half = rank // 2
    V = vecs[:, -half:].flip(1).contiguous()  # [F, half]
    P = (B @ V).T.contiguous()  # [half, D]
    w1 = torch.cat((P, -P))
    b1 = torch.cat((-(P @ mu_x), P @ mu_x))
    w2 = torch.cat((V, -V), dim=1).contiguous()
    return [w1, b1, w2, mu_t.clone()]


def targets(y: torch.Tensor, keep: int, loss: str) -> torch.Tensor:
    if loss == "bce":  # membership of the true top-`keep` set
        top = y.float().topk(keep, dim=1).indices
        return torch.zeros_like(y, dtype=torch.float32).scatter_(1, top, 1.0)
    # "mse": log-magnitude standardised per token (the order is what matters, not the scale)
    ly = torch.log(y.float() + 1e-6)
    return (ly - ly.mean(1, keepdim=True)) / (ly.std(1, keepdim=True) + 1e-6)


def train_layer(X: torch.Tensor, Y: torch.Tensor, *, rank: int, keep: int, loss: str = "mse",
                epochs: int = 2, batch: int = 256, lr: float = 1e-3, seed: int = 0) -> list[torch.Tensor]:
    """Fits one predictor to (X [N, D], magnitudes Y [N, F]): closed-form start, then Adam epochs."""
    T = targets(Y, keep, loss)
    params = [p.requires_grad_() for p in init_predictor(X, targets(Y, keep, "mse"), rank)]
    if epochs <= 0:
        return [p.detach() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * ((X.shape[0] + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        for idx in torch.randperm(X.shape[0], generator=g).split(batch):
            w1, b1, w2, b2 = params
            s = F.linear(F.linear(X[idx], w1, b1).relu(), w2, b2)
            if loss == "bce":
                err = F.binary_cross_entropy_with_logits(s, T[idx])
            else:
                err = F.mse_loss(s, T[idx])
            opt.zero_grad(set_to_none=True)
            err.backward()
            opt.step()
            sched.step()
    return [p.detach() for p in params]


def recall_at(scores: torch.Tensor, y: torch.Tensor, keep: int) -> float:
    """Mean over positions of |predicted top-keep ∩ true top-keep| / keep."""
    pred = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(keep, dim=1).indices, True)
    true = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, y.float().topk(keep, dim=1).indices, True)
    return float((pred & true).sum(1).float().mean() / keep)


# ---- the command --------------------------------------------------------------------------------
@dataclass
class TrainReport:
    path: Path
    rank: int
    tokens: int
    loss: str
    keep_share: float
    recall: list[float] = field(default_factory=list)  # per layer, at the default policy's kept share
    recall_fp16: list[float] = field(default_factory=list)  # per layer, at its FP16 share
    seconds: float = 0.0

    def summary(self) -> str:
        avg = sum(self.recall) / len(self.recall)
        avg16 = sum(self.recall_fp16) / len(self.recall_fp16)
        lines = [f"layer  recall@{self.keep_share:.0%}  recall@fp16"]
        lines += [f"{i:5d}  {r:10.3f}  {r16:11.3f}" for i, (r, r16) in enumerate(zip(self.recall, self.recall_fp16))]
        lines.append(f"  avg  {avg:10.3f}  {avg16:11.3f}   (rank {self.rank}, {self.tokens} tokens, "
                     f"loss {self.loss}, {self.seconds:.0f}s) -> {self.path}")
        return "\n".join(lines)


def train_predictors(store_dir: str | Path, text: str | None = None, rank: int = DEFAULT_RANK,
                     tokens: int = DEFAULT_TOKENS, progress: bool = True, *, loss: str = "mse",
                     epochs: int = 2, register: bool = True) -> TrainReport:
    """Trains, saves and registers one predictor per layer; returns per-layer recall on held-back windows."""
    t0 = time.monotonic()
    store = Store(store_dir)
    cfg = store.config
    torch.manual_seed(0)
    model = load_dense(store, torch.float32)
    calib, _ = split_text(text)
    windows = token_windows(store, calib, tokens)
    bar = ProgressBar("train-predictor: activations", len(windows)) if progress else None
    X, Y = collect(model, windows, bar)
    n_val = min(VAL_WINDOWS, max(1, len(windows) // 4)) * len(windows[0])
    default = PRESET_POLICIES[PRESET_DEFAULT]
    keep = sum(default.counts(cfg.intermediate_size).values())
    keep16 = default.counts(cfg.intermediate_size)["fp16"]
    report = TrainReport(store.path / PREDICTORS, rank, len(windows) * len(windows[0]), loss,
                         keep / cfg.intermediate_size)
    weights: list[list[torch.Tensor]] = []
    bar = ProgressBar("train-predictor: layers", cfg.num_layers) if progress else None
    for layer in range(cfg.num_layers):
        xt, yt, xv, yv = X[layer][:-n_val], Y[layer][:-n_val], X[layer][-n_val:], Y[layer][-n_val:]
        p = train_layer(xt, yt, rank=rank, keep=keep, loss=loss, epochs=epochs, seed=layer)
        weights.append(p)
        with torch.no_grad():
            s = F.linear(F.linear(xv, p[0], p[1]).relu(), p[2], p[3])
        report.recall.append(recall_at(s, yv, keep))
        report.recall_fp16.append(recall_at(s, yv, keep16))
        X[layer] = Y[layer] = torch.empty(0)  # free as we go
        if bar:
            bar(layer + 1)
    preds = LowRankPredictors(*(torch.stack([w[i] for w in weights]) for i in range(4)))
    if register:
        preds.save(report.path, {"rank": str(rank), "loss": loss})
        register_predictors(store, rank=rank, tokens=report.tokens, loss=loss, recall=report.recall)
    report.seconds = time.monotonic() - t0
    return report


def register_predictors(store: Store, **meta: Any) -> None:
    """Records the predictors and the preset predictor policies in the manifest."""
    m = store.manifest
    m["predictors"] = {"path": PREDICTORS, **meta}
    policies = dict(m.get("policies") or {})
    for name, shares in PRESET_POLICIES.items():
        policies[name] = {"shares": shares.to_dict(), "kind": "predictor"}
    for name, shares in PRESET_GATE_POLICIES.items():
        policies[name] = {"shares": shares.to_dict(), "kind": "gate"}
    m["policies"] = policies
    if m.get("default_policy") in (None, "dense-fp16") or m["default_policy"] not in policies:
        m["default_policy"] = PRESET_DEFAULT
    write_manifest(store.path, m)
