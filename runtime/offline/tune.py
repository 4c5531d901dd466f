"""``m2cache tune``: the offline search for precision shares under a bytes-per-token budget.

The paper searches FP16/INT8/INT4 shares under a memory budget, minimising an uncertainty (entropy)
score on calibration text. Here the objective is the calibration *perplexity* of the predictor policy
itself (teacher-forced, every position sparse as the engine runs it): it measures directly what the
entropy score stands in for, and costs the same one batched pass per candidate.

Search: keeping more neurons never costs quality, so the best shares spend the whole budget. For each
(FP16, INT8) pair on a grid, INT4 takes what the budget leaves (down to the grid step); a coarse grid
(step 0.1) finds the region, a fine one (step 0.05) around the best point settles it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from m2cache.errors import ConfigError
from m2cache.offline.evaluate import QualityModel, perplexity
from m2cache.model.policy import Policy, Shares
from m2cache.model.predictor import PredictorPolicy
from m2cache.offline.progress import ProgressBar
from m2cache.storage.reader import Store
from m2cache.storage.writer import write_manifest
from m2cache.offline.train import split_text, token_windows

TUNE_TOKENS = 1024
COARSE, FINE = 0.1, 0.05


@dataclass
class TuneReport:
    name: str
    shares: Shares
    bytes_ratio: float
    calib_ppl: float
    dense_calib_ppl: float
    tried: list[tuple[Shares, float, float]] = field(default_factory=list)  # (shares, bytes, ppl)
    seconds: float = 0.0

    def summary(self) -> str:
        s = self.shares
        return (f"{self.name}: fp16 {s.fp16:.2f}, int8 {s.int8:.2f}, int4 {s.int4:.2f} -> "
                f"{self.bytes_ratio:.3f} of dense FP16 FFN bytes, calibration ppl {self.calib_ppl:.3f} "
                f"(dense {self.dense_calib_ppl:.3f}, {self.calib_ppl / self.dense_calib_ppl - 1:+.1%}); "
                f"{len(self.tried)} candidates in {self.seconds:.0f}s")


def fill_int4(fp16: float, int8: float, budget: float, ratio: dict[str, float], step: float) -> Shares | None:
    """The shares with INT4 taking what the budget leaves after FP16 and INT8, on the grid; None if over."""
    left = budget - fp16 * ratio["fp16"] - int8 * ratio["int8"]
    if left < -1e-9 or fp16 + int8 > 1 + 1e-9:
        return None
    int4 = min(1.0 - fp16 - int8, left / ratio["int4"])
    int4 = math.floor(int4 / step + 1e-6) * step
    if fp16 + int8 + int4 <= 0:
        return None
    return Shares(round(fp16, 4), round(int8, 4), round(max(int4, 0.0), 4))


def candidates(budget: float, ratio: dict[str, float], step: float, around: Shares | None = None) -> list[Shares]:
    if around is None:
        fp16s = [i * step for i in range(int(1 / step + 1e-6) + 1)]
        int8s = fp16s
    else:
        fp16s = [around.fp16 + d * step for d in (-1, 0, 1)]
        int8s = [around.int8 + d * step for d in (-1, 0, 1)]
    out: list[Shares] = []
    for a in fp16s:
        for b in int8s:
            if a < -1e-9 or b < -1e-9:
                continue
            s = fill_int4(max(a, 0.0), max(b, 0.0), budget, ratio, step)
            if s is not None and s not in out:
                out.append(s)
    return out


def tune(store_dir: str | Path, bytes_per_token: float, *, name: str | None = None, text: str | None = None,
         tokens: int = TUNE_TOKENS, progress: bool = True, set_default: bool = True,
         qm: QualityModel | None = None) -> TuneReport:
    """Searches shares within ``bytes_per_token`` (ratio of dense FP16 FFN bytes); saves the best as a
    named predictor policy and, with ``set_default``, as the store's default."""
    if not 0 < bytes_per_token <= 1:
        raise ConfigError(f"--bytes-per-token {bytes_per_token} must be a ratio of dense FP16 bytes in (0, 1]")
    t0 = time.monotonic()
    store = Store(store_dir)
    qm = qm or QualityModel(store)
    preds = qm.predictors()
    cfg = store.config
    calib, _ = split_text(text)
    windows = token_windows(store, calib, tokens)
    ratio = {p: b / qm.bundle_bytes["fp16"] for p, b in qm.bundle_bytes.items()}
    dense_ppl, _ = perplexity(qm, windows, Policy(cfg.num_layers, cfg.intermediate_size))

    tried: dict[Shares, float] = {}

    def run(cands: list[Shares]) -> None:
        bar = ProgressBar(f"tune {bytes_per_token:.2f}", len(cands)) if progress else None
        for i, s in enumerate(cands):
            if s not in tried:
                pol = PredictorPolicy(cfg.num_layers, cfg.intermediate_size, s, preds)
                tried[s] = perplexity(qm, windows, pol)[0]
            if bar:
                bar(i + 1)

    run(candidates(bytes_per_token, ratio, COARSE))
    if not tried:
        raise ConfigError(f"no shares fit {bytes_per_token} of dense FP16 bytes; raise --bytes-per-token")
    run(candidates(bytes_per_token, ratio, FINE, around=min(tried, key=tried.__getitem__)))
    best = min(tried, key=tried.__getitem__)
    name = name or f"tuned-{round(bytes_per_token * 100):d}"
    report = TuneReport(name, best, best.bytes_ratio(qm.bundle_bytes), tried[best], dense_ppl,
                        [(s, s.bytes_ratio(qm.bundle_bytes), p) for s, p in tried.items()])
    save_policy(store, name, best, set_default, calib_ppl=tried[best], budget=bytes_per_token)
    report.seconds = time.monotonic() - t0
    return report


def save_policy(store: Store, name: str, shares: Shares, set_default: bool, **meta: float) -> None:
    m = store.manifest
    policies = dict(m.get("policies") or {})
    policies[name] = {"shares": shares.to_dict(), "kind": "predictor", **meta}
    m["policies"] = policies
    if set_default:
        m["default_policy"] = name
    write_manifest(store.path, m)
