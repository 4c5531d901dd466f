"""``m2cache eval``: what a precision policy costs in quality, against the same model run dense in FP32.

Per policy:
- ``ppl``: perplexity on held-out text, teacher-forced, every position computed with the policy's own
  sparse mixed-precision FFN (its kept set and precisions chosen from that position's FFN input, as the
  engine does per decode token). Batched: each precision's dequantised weights run over all positions
  and a per-position mask keeps exactly the neurons the policy picked (``ffn_masked``).
- ``dense_ppl``: the dense FP32 model on the same windows.
- ``top1``: fraction of held-out positions where the policy's argmax equals the dense model's.
- ``agreement``: greedy decoding of fixed prompts, dense prefill then sparse decode steps (like the
  engine); the fraction of the generated positions (64 per prompt unless ``greedy_tokens`` says) equal to
  the dense FP32 model's tokens (both run as many tokens, without stopping at EOS, and are compared
  position by position).
- ``greedy_median``: over the same prompts, the median number of tokens generated before the first
  one that differs from the dense model's (all of them where none does).
- ``selector_bytes_ratio``: what the policy's selection keeps resident beside the tiers (predictor
  weights; a gate policy's INT4 gate rows), relative to all FFN layers' FP16 bytes.
- ``ffn_bytes_ratio``: FFN bytes fetched per token relative to dense FP16 (the store's bundle sizes).
- ``recall``: for predictor and gate policies, the share of the true top-k kept set (by exact contribution, on
  the policy's own hidden states) that the predictor kept, averaged over layers and positions.

A gate policy is measured as the engine runs it: on a store that keeps its gate rows apart (format
version 3) the resident INT4 gate rows also give the kept neurons' gate activations, and only their up and
down parts are fetched (``SplitGatePolicy``); on an older store each kept neuron's gate comes with its
bundle, at its precision. ``gate-split:A,B,C`` measures the first on either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from m2cache.errors import ConfigError
from m2cache.engine.loading import load_dense, load_resident, load_tokenizer
from m2cache.formats.int8 import linear
from m2cache.model.llama import (DenseModel, attention_and_norm, attention_block, embed, ffn_bundles, ffn_residual,
                                 rms_norm)
from m2cache.formats.shares import PRECISION_ORDER, Shares
from m2cache.model.policy import GatePolicy, OraclePolicy, Policy, contributions
from m2cache.model.predictor import LowRankPredictors, PredictorPolicy, predictor_path, shares_from_spec
from m2cache.model.sparse_ffn import ffn_masked
from m2cache.engine.policies import gate_policy, parse_oracle, parse_shares
from m2cache.storage.reader import SPLIT, PlainBackend, Store
from m2cache.storage.rows import EmbeddingRows
from m2cache.offline.train import split_text, token_windows

EVAL_TOKENS = 2048
GREEDY_TOKENS = 64
PROMPTS = (
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What is the capital of France, and what is it known for?",
    "Explain what a Python list comprehension is.",
    "Give three tips for staying focused while studying.",
    "How does a refrigerator keep food cold?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What are the main differences between cats and dogs as pets?",
)

Scorer = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, h [T, D]) -> scores [T, F]
AHEAD = "@ahead"  # a policy name's suffix: ranked one layer ahead, as EngineConfig(lookahead=True) runs it


class SplitGatePolicy(GatePolicy):
    """The gate policy as a store of format version 3 runs it (``gate-split:A,B,C`` on any store): the
    resident INT4 gate copy also gives every kept neuron's gate activation and only its up row and down
    column are fetched, at the precision it was ranked into: two thirds of the bytes."""

    name = "gate-split"


class QualityModel:
    """The dense FP32 model plus every layer's weights dequantised at each precision (a measuring tool:
    everything in memory, outside the tier budgets)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dense: DenseModel = load_dense(store, torch.float32)
        self.cfg = store.config
        backend = PlainBackend()
        self.weights: dict[str, list[torch.Tensor]] = {"fp16": self.dense.ffn}
        for p in ("int8", "int4"):
            self.weights[p] = [store.decode(p, store.read_layer(L, p, backend), torch.float32).contiguous()
                               for L in range(self.cfg.num_layers)]
        self.down_norms = [w[:, 2].norm(dim=1) for w in self.dense.ffn]
        self._predictors: LowRankPredictors | None = None
        self._split_weights: dict[str, list[torch.Tensor]] | None = None
        self._gate: GatePolicy | None = None
        self.bundle_bytes = {p: store.bundle_bytes(p) for p in PRECISION_ORDER}

    def predictors(self) -> LowRankPredictors:
        if self._predictors is None:
            self._predictors = LowRankPredictors.load(predictor_path(self.store), torch.float32)
        return self._predictors

    def oracle_scores(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return contributions(self.dense.ffn[layer], h, self.dense.act, self.down_norms[layer])

    # ---- policies ------------------------------------------------------------------------------
    def policy(self, name: str) -> Policy:
        L, Fn = self.cfg.num_layers, self.cfg.intermediate_size
        if name.endswith(AHEAD):  # the engine's lookahead=True: layer L ranked from layer L-1's residual
            pol = self.policy(name[: -len(AHEAD)])
            if not pol.needs_scores:
                raise ConfigError(f"{name!r}: only a policy that scores neurons can look ahead")
            pol.lookahead = True
            return pol
        if name == "dense-fp16":
            return Policy(L, Fn)
        if name.startswith("oracle"):
            return OraclePolicy(L, Fn, parse_oracle(name), self.dense.ffn, self.dense.act)
        if name.startswith("predictor:"):
            shares = parse_shares(name)
            return PredictorPolicy(L, Fn, shares, self.predictors(), name)
        # what the engine runs: on a store that keeps its gate rows apart (format version 3) every gate
        # policy fetches up and down only, its gates from the resident copy
        if name == "gate" or name.startswith("gate:"):
            return self.gate(parse_shares(name))
        if name.startswith("gate-split:"):
            return self.gate(parse_shares(name), SplitGatePolicy)
        stored = self.store.manifest.get("policies") or {}
        if name in stored and stored[name].get("kind") == "gate":
            return self.gate(shares_from_spec(stored[name], L))
        if name in stored:
            return PredictorPolicy.from_store(self.store, name, stored[name], torch.float32, "cpu",
                                              predictors=self.predictors())
        known = ", ".join(["dense-fp16", "oracle:A,B,C", "predictor:A,B,C", "gate:A,B,C", "gate-split:A,B,C"]
                          + sorted(stored))
        raise ConfigError(f"unknown policy {name!r}; this store has: {known}")

    def gate(self, shares: Shares | list[Shares], cls: type[GatePolicy] | None = None) -> GatePolicy:
        """A gate policy with ``shares`` as the engine runs it on this store (or as ``cls``), over one copy of
        the gate rows read for them all."""
        cls = cls or (SplitGatePolicy if SPLIT in self.store.views else GatePolicy)
        if self._gate is None:
            self._gate = gate_policy(self.store, Shares(), torch.float32)
        g = self._gate
        return cls(g.num_layers, g.num_neurons, shares, g.gates, g.norms, g.act, g.resident_bytes, g.kernel_act,
                   g.group, g.dtype)

    def scorer(self, policy: Policy) -> Scorer | None:
        if isinstance(policy, OraclePolicy):
            return self.oracle_scores
        if isinstance(policy, PredictorPolicy):
            return policy.predictors.score_all
        if isinstance(policy, GatePolicy):
            return policy.score_all
        return None

    def selector_bytes(self, policy: Policy) -> int:
        """Bytes the policy's selection keeps resident beside the tiers (0 where it needs none; the
        oracle's FP16 copy of every layer counts: it is the bound, not a candidate)."""
        if isinstance(policy, PredictorPolicy):
            p = policy.predictors
            return 2 * sum(getattr(p, k).numel() for k in ("w1", "b1", "w2", "b2"))  # FP16, as stored
        if isinstance(policy, GatePolicy):
            return policy.resident_bytes
        if isinstance(policy, OraclePolicy):
            return self.bundle_bytes["fp16"] * self.cfg.intermediate_size * self.cfg.num_layers
        return 0

    def bytes_ratio(self, policy: Policy) -> float:
        ratio = sum(s.bytes_ratio(self.bundle_bytes) for s in policy.shares) / len(policy.shares)
        # a split layout fetches two parts of three (each precision's parts are the same size)
        return ratio * 2 / 3 if isinstance(policy, SplitGatePolicy) else ratio

    def weights_for(self, policy: Policy) -> dict[str, list[torch.Tensor]]:
        """Each precision's dequantised bundles as the policy computes with them: for a split gate policy
        the gate part of every precision is the resident INT4 copy's (built on first use)."""
        if not isinstance(policy, SplitGatePolicy):
            return self.weights
        if self._split_weights is None:
            split: dict[str, list[torch.Tensor]] = {}
            int4 = self.weights["int4"]
            for p, layers in self.weights.items():
                split[p] = layers if p == "int4" else []  # INT4's own gate rows are the copy already
                for L, W in enumerate(layers if p != "int4" else []):
                    W = W.clone()
                    W[:, 0] = int4[L][:, 0]
                    split[p].append(W)
            self._split_weights = split
        return self._split_weights

    # ---- teacher-forced pass ---------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, window: list[int], policy: Policy, recall: list[float] | None = None) -> torch.Tensor:
        """Every position's logits [T, V], each position's FFN sparse as the policy picks for it."""
        m, cfg = self.dense, self.cfg
        scorer = self.scorer(policy)
        kv = m.new_cache()
        x = embed(cfg, m.res, torch.tensor(window))
        before: torch.Tensor | None = None  # the previous layer's residual after its attention
        for layer, w in enumerate(m.res.layers):
            x = attention_block(cfg, w, x, layer, kv, 0, m.rope)
            h = rms_norm(x, w.ffn_norm, cfg.rms_norm_eps)
            if scorer is None:  # every neuron at FP16: the dense model's own code
                x = ffn_residual(cfg, w, x, ffn_bundles(h, m.ffn[layer], m.act))
                continue
            scores = scorer(layer, ranked_input(policy, h, before, w.ffn_norm, cfg.rms_norm_eps))
            before = x
            masks = rank_masks(scores, policy.counts(layer))
            if recall is not None:
                recall.append(kept_recall(masks, self.oracle_scores(layer, h)))
            weights = self.weights_for(policy)
            x = ffn_residual(cfg, w, x, ffn_masked(h, {p: weights[p][layer] for p in masks}, masks, m.act))
        hn = rms_norm(x, m.res.final_norm, cfg.rms_norm_eps)
        return linear(hn, m.res.lm_head).float()

    # ---- greedy decoding ----------------------------------------------------------------------------
    @torch.inference_mode()
    def greedy(self, prompt: list[int], policy: Policy | None, steps: int = GREEDY_TOKENS) -> list[int]:
        """Dense prefill, then ``steps`` greedy tokens, each decode step sparse under ``policy``."""
        m = self.dense
        kv = m.new_cache()
        out = [int(m.forward(prompt, kv).argmax())]
        while len(out) < steps:
            logits = m.forward([out[-1]], kv) if policy is None else self.sparse_step(out[-1], kv, policy)
            out.append(int(logits.argmax()))
        return out

    def sparse_step(self, token: int, kv, policy: Policy) -> torch.Tensor:
        """One decode token as the engine computes it: score, split, gather each precision's rows."""
        m, cfg = self.dense, self.cfg
        scorer = self.scorer(policy)
        pos = kv.length
        x = embed(cfg, m.res, torch.tensor([token]))
        before: torch.Tensor | None = None
        for layer, w in enumerate(m.res.layers):
            x, h = attention_and_norm(cfg, w, x, layer, kv, pos, m.rope)  # as the dense reference and the engine
            order = None
            if scorer is not None:
                scores = scorer(layer, ranked_input(policy, h, before, w.ffn_norm, cfg.rms_norm_eps))
                order = torch.argsort(scores[-1], descending=True).numpy()
            before = x
            ids = policy.split(layer, order)
            y = None
            for p, idx in ids.items():
                W = self.weights_for(policy)[p][layer]
                Wp = W if len(idx) == W.shape[0] else W[torch.from_numpy(idx)]
                part = ffn_bundles(h, Wp, m.act)
                y = part if y is None else y + part
            assert y is not None, "a policy keeps at least one neuron"
            x = ffn_residual(cfg, w, x, y)
        kv.length = pos + 1
        return linear(rms_norm(x, m.res.final_norm, cfg.rms_norm_eps), m.res.lm_head)[-1].float()


def ranked_input(policy: Policy, h: torch.Tensor, before: torch.Tensor | None, norm: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """What a layer's neurons are ranked from: its FFN input h, or, looking ahead, the residual the
    previous layer had after its attention (``before``) under this layer's FFN norm: the engine scores
    layer L+1 while layer L's FFN still runs. The first layer has nothing before it and is ranked from h."""
    if not policy.lookahead or before is None:
        return h
    return rms_norm(before, norm, eps)


def rank_masks(scores: torch.Tensor, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """scores [T, F] -> per precision a [T, F] 0/1 mask of the neurons ranked into its share."""
    order = scores.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    masks, start = {}, 0
    for p in PRECISION_ORDER:
        n = counts[p]
        if n:
            masks[p] = ((rank >= start) & (rank < start + n)).to(scores.dtype)
        start += n
    return masks


def kept_recall(masks: dict[str, torch.Tensor], true_scores: torch.Tensor) -> float:
    kept = torch.stack(list(masks.values())).sum(0)
    k = int(kept[0].sum())
    top = true_scores.topk(k, dim=1).indices
    return float(kept.gather(1, top).sum(1).mean() / k)


def perplexity(qm: QualityModel, windows: list[list[int]], policy: Policy,
               recall: list[float] | None = None, dense_logits: list[torch.Tensor] | None = None
               ) -> tuple[float, float]:
    """(perplexity, top-1 agreement with dense_logits when given) over the windows."""
    nll, count, same = 0.0, 0, 0
    for i, win in enumerate(windows):
        logits = qm.logits(win, policy, recall)[:-1]
        target = torch.tensor(win[1:])
        nll += float(F.cross_entropy(logits, target, reduction="sum"))
        count += target.numel()
        if dense_logits is not None:
            same += int((logits.argmax(1) == dense_logits[i].argmax(1)).sum())
    return math.exp(nll / count), same / count


def mean_entropy(qm: QualityModel, windows: list[list[int]], policy: Policy) -> float:
    """The mean entropy (nats) of the policy's next-token distribution over the windows' positions: the
    paper's uncertainty score, which needs no labels."""
    total, count = 0.0, 0
    for win in windows:
        logp = torch.log_softmax(qm.logits(win, policy)[:-1], dim=-1)
        total += float(-(logp.exp() * logp).sum())
        count += logp.shape[0]
    return total / count


@dataclass
class EvalData:
    windows: list[list[int]]
    prompts: list[list[int]]


def eval_data(store: Store, text: str | None, prompts: list[str] | None, tokens: int = EVAL_TOKENS) -> EvalData:
    _, held_out = split_text(text)
    tok = load_tokenizer(store)
    return EvalData(token_windows(store, held_out, tokens),
                    [tok.encode(p, raw=False) for p in (prompts or list(PROMPTS))])


def evaluate(store_dir: str | Path, policies: list[str], text: str | None = None,
             prompts: list[str] | None = None, *, tokens: int = EVAL_TOKENS, greedy_tokens: int = GREEDY_TOKENS,
             qm: QualityModel | None = None, resident: str = "full", progress=None) -> list[dict]:
    """One dict per policy: policy, ppl, dense_ppl, top1, agreement, ffn_bytes_ratio (+ recall).

    ``resident``: the form of the attention, embeddings and head the policies run with ("int8": what
    ``EngineConfig.resident="int8"`` holds); the reference stays dense FP32, so the rows carry its cost."""
    store = Store(store_dir)
    qm = qm or QualityModel(store)
    for name in policies:  # an unknown name is refused before the minutes of work below
        qm.policy(name)
    full = qm.dense.res
    held = full if resident == "full" else load_resident(store, torch.float32, "cpu", resident)
    data = eval_data(store, text, prompts, tokens)
    dense = Policy(qm.cfg.num_layers, qm.cfg.intermediate_size)
    dense_logits = [qm.logits(w, dense)[:-1] for w in data.windows]
    nll = sum(float(F.cross_entropy(lg, torch.tensor(w[1:]), reduction="sum")) for lg, w in zip(dense_logits, data.windows))
    dense_ppl = math.exp(nll / sum(len(w) - 1 for w in data.windows))
    dense_tokens = [qm.greedy(p, None, greedy_tokens) for p in data.prompts]
    rows = []
    try:
        qm.dense.res = held
        for name in policies:
            rows.append(_policy_row(qm, data, name, dense_logits, dense_tokens, dense_ppl, greedy_tokens)
                        | {"resident": resident})
            if progress:
                progress(len(rows))
    finally:
        qm.dense.res = full
        if held is not full and isinstance(held.embed, EmbeddingRows):
            held.embed.close()
    return rows


def _policy_row(qm: QualityModel, data: EvalData, name: str, dense_logits: list[torch.Tensor],
                dense_tokens: list[list[int]], dense_ppl: float, greedy_tokens: int) -> dict:
    pol = qm.policy(name)
    recall: list[float] | None = [] if isinstance(pol, (PredictorPolicy, GatePolicy)) else None
    ppl, top1 = perplexity(qm, data.windows, pol, recall, dense_logits)
    same, first = 0, []
    for p, ref in zip(data.prompts, dense_tokens):
        got = qm.greedy(p, pol, greedy_tokens)
        same += sum(a == b for a, b in zip(got, ref))
        first.append(next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref)))
    ffn_fp16 = qm.bundle_bytes["fp16"] * qm.cfg.intermediate_size * qm.cfg.num_layers
    row = {"policy": name, "ppl": ppl, "dense_ppl": dense_ppl, "ppl_delta": ppl / dense_ppl - 1,
           "top1": top1, "agreement": same / (greedy_tokens * len(data.prompts)) if greedy_tokens else None,
           "greedy_median": float(np.median(first)) if greedy_tokens else None,
           "ffn_bytes_ratio": qm.bytes_ratio(pol), "kept": _kept(pol),
           "selector_bytes_ratio": qm.selector_bytes(pol) / ffn_fp16}
    if recall:
        row["recall"] = float(np.mean(recall))
    return row


def _kept(policy: Policy) -> float:
    return sum(sum(s.to_dict().values()) for s in policy.shares) / len(policy.shares)


def evaluate_texts(store_dir: str | Path, policies: list[str], texts: dict[str, str | None], *,
                   tokens: int = EVAL_TOKENS, greedy_tokens: int = GREEDY_TOKENS, resident: str = "full",
                   progress=None) -> list[dict]:
    """``evaluate`` on each named held-out text (None: the pydoc prose), one QualityModel for all; every
    row carries its text's name."""
    qm = QualityModel(Store(store_dir))
    rows: list[dict] = []
    total = len(policies) * len(texts)
    for label, text in texts.items():
        done = len(rows)
        step = (lambda i: progress(done + i, total)) if progress else None
        rows += [r | {"text": label} for r in evaluate(store_dir, policies, text, tokens=tokens, qm=qm,
                                                       greedy_tokens=greedy_tokens, resident=resident, progress=step)]
    return rows

