"""``m2cache tune``: the offline search for precision shares under a bytes-per-token budget.

The paper searches FP16/INT8/INT4 shares under a memory budget, minimising an uncertainty (entropy)
score on calibration text. By default the objective here is the calibration *perplexity* of the policy
itself (teacher-forced, every position sparse as the engine runs it): it measures directly what the
entropy score stands in for, and costs the same one batched pass per candidate. ``objective="entropy"``
minimises the paper's score instead (the mean entropy of the next-token distribution).

Search: keeping more neurons never costs quality, so the best shares spend the whole budget. For each
(FP16, INT8) pair on a grid, INT4 takes what the budget leaves (down to the grid step); a coarse grid
(step 0.1) finds the region, a fine one (step 0.05) around the best point settles it.

Per layer (``per_layer``): layers differ, so from the best global shares each layer is tried one
exchange step cheaper (0.1 of its neurons from INT8 to INT4) and one dearer (INT4 to INT8), the others
left as they are. The layers that lose least by the cheaper step pay for the dearer step of those that
gain most, pair by pair while a pair's gain exceeds its loss: the bytes stay exactly the same. The
combination is measured; it is kept only when it beats the global shares (else half the pairs are tried).
The ranking policy is the store's predictors or (``kind="gate"``) the resident INT4 gate rows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from m2cache.errors import ConfigError
from m2cache.offline.evaluate import QualityModel, mean_entropy, perplexity
from m2cache.formats.shares import Shares
from m2cache.model.policy import Policy
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
    layers: list[Shares] | None = None  # per-layer shares, when they beat ``shares`` everywhere
    global_ppl: float = 0.0  # calibration ppl of ``shares`` in every layer
    objective: str = "ppl"  # what the search minimised (``tried`` holds its values)

    def summary(self) -> str:
        s = self.shares
        per_layer = ""
        if self.layers is not None:
            moved = sum(x != s for x in self.layers)
            per_layer = (f" per layer ({moved} of {len(self.layers)} layers moved from those shares: calibration ppl "
                         f"{self.global_ppl:.3f} -> {self.calib_ppl:.3f})")
        return (f"{self.name}: fp16 {s.fp16:.2f}, int8 {s.int8:.2f}, int4 {s.int4:.2f}{per_layer} -> "
                f"{self.bytes_ratio:.3f} of dense FP16 FFN bytes, calibration ppl {self.calib_ppl:.3f} "
                f"(dense {self.dense_calib_ppl:.3f}, {self.calib_ppl / self.dense_calib_ppl - 1:+.1%}; "
                f"searched by {self.objective}); "
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


KINDS = ("predictor", "gate")
OBJECTIVES = ("ppl", "entropy")
EXCHANGE = 0.1  # of a layer's neurons, INT8 <-> INT4, in a per-layer step


def tune(store_dir: str | Path, bytes_per_token: float, *, name: str | None = None, text: str | None = None,
         tokens: int = TUNE_TOKENS, progress: bool = True, set_default: bool = True, per_layer: bool = False,
         kind: str = "predictor", objective: str = "ppl", qm: QualityModel | None = None) -> TuneReport:
    """Searches shares within ``bytes_per_token`` (ratio of dense FP16 FFN bytes), and with ``per_layer``
    each layer's own, minimising ``objective`` on calibration text ("ppl", or "entropy": the paper's
    uncertainty score, the mean entropy of the next-token distribution, which needs no labels); saves the
    best as a named ``kind`` policy and, with ``set_default``, as the store's default."""
    if not 0 < bytes_per_token <= 1:
        raise ConfigError(f"--bytes-per-token {bytes_per_token} must be a ratio of dense FP16 bytes in (0, 1]")
    if kind not in KINDS:
        raise ConfigError(f"tune ranks by {' or '.join(KINDS)}, not {kind!r}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"tune minimises {' or '.join(OBJECTIVES)}, not {objective!r}")
    t0 = time.monotonic()
    store = Store(store_dir)
    qm = qm or QualityModel(store)
    cfg = store.config
    make = _policy_maker(qm, kind)
    calib, _ = split_text(text)
    windows = token_windows(store, calib, tokens)
    ratio = {p: b / qm.bundle_bytes["fp16"] for p, b in qm.bundle_bytes.items()}
    dense_ppl, _ = perplexity(qm, windows, Policy(cfg.num_layers, cfg.intermediate_size))

    def ppl_of(shares: Shares | list[Shares]) -> float:
        return perplexity(qm, windows, make(shares))[0]

    loss_of = ppl_of if objective == "ppl" else lambda s: mean_entropy(qm, windows, make(s))
    tried: dict[Shares, float] = {}  # shares -> objective

    def run(cands: list[Shares]) -> None:
        bar = ProgressBar(f"tune {bytes_per_token:.2f}", len(cands)) if progress else None
        for i, s in enumerate(cands):
            if s not in tried:
                tried[s] = loss_of(s)
            if bar:
                bar(i + 1)

    run(candidates(bytes_per_token, ratio, COARSE))
    if not tried:
        raise ConfigError(f"no shares fit {bytes_per_token} of dense FP16 bytes; raise --bytes-per-token")
    run(candidates(bytes_per_token, ratio, FINE, around=min(tried, key=tried.__getitem__)))
    best = min(tried, key=tried.__getitem__)
    name = name or f"tuned-{round(bytes_per_token * 100):d}"
    best_ppl = tried[best] if objective == "ppl" else ppl_of(best)
    report = TuneReport(name, best, best.bytes_ratio(qm.bundle_bytes), best_ppl, dense_ppl,
                        [(s, s.bytes_ratio(qm.bundle_bytes), v) for s, v in tried.items()], global_ppl=best_ppl,
                        objective=objective)
    if per_layer:
        layers, _ = tune_layers(cfg.num_layers, best, tried[best], loss_of, progress)
        if layers is not None:
            report.layers, report.calib_ppl = layers, ppl_of(layers)
    save_policy(store, name, report.layers or best, set_default, kind=kind, calib_ppl=report.calib_ppl,
                budget=bytes_per_token)
    report.seconds = time.monotonic() - t0
    return report


def _policy_maker(qm: QualityModel, kind: str):
    """shares (one, or one per layer) -> the policy of ``kind`` with them; the ranking's weights loaded once."""
    cfg = qm.cfg
    if kind == "predictor":
        preds = qm.predictors()
        return lambda s: PredictorPolicy(cfg.num_layers, cfg.intermediate_size, s, preds)
    return qm.gate


def step(s: Shares, cheaper: bool) -> Shares | None:
    """``s`` with EXCHANGE of the neurons moved INT8 -> INT4 (cheaper) or INT4 -> INT8; None if it cannot."""
    d = -EXCHANGE if cheaper else EXCHANGE
    int8, int4 = round(s.int8 + d, 4), round(s.int4 - d, 4)
    return None if int8 < -1e-9 or int4 < -1e-9 else Shares(s.fp16, int8, int4)


def tune_layers(num_layers: int, base: Shares, base_ppl: float, ppl_of, progress: bool = True
                ) -> tuple[list[Shares] | None, float]:
    """(per-layer shares, their ppl) that beat ``base`` everywhere at the same bytes, or (None, base_ppl)."""
    bar = ProgressBar("tune per layer", 2 * num_layers) if progress else None
    loss: dict[int, float] = {}
    gain: dict[int, float] = {}
    for i, (layer, cheaper) in enumerate((L, c) for L in range(num_layers) for c in (True, False)):
        moved = step(base, cheaper)
        if moved is not None:
            ppl = ppl_of([moved if L == layer else base for L in range(num_layers)])
            (loss if cheaper else gain)[layer] = ppl - base_ppl if cheaper else base_ppl - ppl
        if bar:
            bar(i + 1)
    downs = sorted(loss, key=loss.__getitem__)
    ups = sorted(gain, key=gain.__getitem__, reverse=True)
    pairs: list[tuple[int, int]] = []
    used: set[int] = set()
    while True:  # the cheapest loss left pays for the largest gain left, each layer in one pair at most
        down = next((d for d in downs if d not in used), None)
        up = next((u for u in ups if u not in used and u != down), None)
        if down is None or up is None or gain[up] <= loss[down]:
            break
        pairs.append((down, up))
        used |= {down, up}
    while pairs:
        layers = [base] * num_layers
        for down, up in pairs:
            layers[down], layers[up] = step(base, True), step(base, False)  # type: ignore[assignment]
        ppl = ppl_of(layers)
        if ppl < base_ppl:
            return layers, ppl
        pairs = pairs[:len(pairs) // 2]
    return None, base_ppl


def save_policy(store: Store, name: str, shares: Shares | list[Shares], set_default: bool, kind: str = "predictor",
                **meta: float) -> None:
    m = store.manifest
    policies = dict(m.get("policies") or {})
    spec = shares.to_dict() if isinstance(shares, Shares) else [s.to_dict() for s in shares]
    policies[name] = {"shares": spec, "kind": kind, **meta}
    m["policies"] = policies
    if set_default:
        m["default_policy"] = name
    write_manifest(store.path, m)
