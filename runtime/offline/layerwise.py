"""Perplexity of policies on a model of any size: layer by layer over every held-out position.

``m2cache eval`` (:mod:`m2cache.offline.evaluate`) holds the whole model in FP32 and every layer dequantised
at each precision: on the grown model (5.2 GB of FP16) that is over 20 GB. Teacher-forced perplexity does
not need a model in memory at once: every position of every window goes through layer L before any goes
through L+1, so one layer's weights are read (and dequantised) once and serve every position and every
variant measured beside it. Memory is one layer's weights at the precisions in use, the hidden states of
the positions (per variant), the LM head and one window's logits.

A *variant* is a policy with the resident form it runs under ("full": attention and LM head in the compute
dtype; "int8": INT8 as ``--resident int8`` holds them, a scale per 32 values where the CPU kernels read it;
"stream": the attention's INT8 rows as the store's streamed file holds them, a scale a row or per group, the head as int8's). The reference
is the dense FP32 model on the same windows. Each variant's neurons are chosen per position as the engine
does per token (``rank_masks`` over the policy's scores, ``ffn_masked``); ``gate-split:A,B,C`` computes as a
split store does (every kept neuron's gate from the resident INT4 copy).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open

from m2cache.engine.loading import int8_group, verify_resident
from m2cache.engine.policies import gate_policy, parse_shares
from m2cache.errors import ConfigError
from m2cache.formats.int8 import Int8Weight, linear
from m2cache.model.llama import KVCache, LayerWeights, Rotary, activation, attention_block, rms_norm
from m2cache.formats.shares import Shares
from m2cache.model.policy import GatePolicy, OraclePolicy, Policy, contributions
from m2cache.model.predictor import LowRankPredictors, PredictorPolicy, predictor_path, shares_from_spec
from m2cache.model.sparse_ffn import ffn_masked
from m2cache.offline.evaluate import AHEAD, SplitGatePolicy, rank_masks, ranked_input
from m2cache.storage.reader import SPLIT, PlainBackend, Store

RESIDENT_FORMS = ("full", "int8", "stream")


@dataclass
class Variant:
    """One measured configuration and its running state (hidden states [N, D], NLL, agreement)."""

    policy_name: str
    resident: str
    dtype: torch.dtype
    policy: Policy | None = None
    x: torch.Tensor | None = None  # [N, D] every position's residual
    before: torch.Tensor | None = None  # the previous layer's residual after attention (lookahead)
    nll: float = 0.0
    count: int = 0
    same: int = 0
    window: int = 0  # > 0: FP16/INT8 only from a cache of the last ``window`` tokens' bundles (``@windowW``)
    delay: int = 1  # a token's fetched bundles serve from ``delay`` tokens later

    @property
    def key(self) -> str:
        return f"{self.policy_name}|{self.resident}|{str(self.dtype).removeprefix('torch.')}"


@dataclass
class _Layer:
    """One layer's weights as read for this pass: resident parts per form, FFN per precision (FP32)."""

    attn: dict[str, LayerWeights] = field(default_factory=dict)
    ffn: dict[str, torch.Tensor] = field(default_factory=dict)


class LayerwiseEval:
    """Reads a store layer by layer and runs every variant's positions through each layer."""

    def __init__(self, store: Store, windows: list[list[int]]) -> None:
        if store.split:
            raise ConfigError(f"{store.path} is a split store: measure on the store it was split from "
                              "(gate-split:A,B,C computes what the split store does)")
        if len({len(w) for w in windows}) != 1:
            raise ValueError("layerwise evaluation needs windows of one length")
        self.store, self.cfg, self.windows = store, store.config, windows
        verify_resident(store)
        self.res = safe_open(str(store.path / store.manifest["resident"]["path"]), framework="pt")
        self.act = activation(self.cfg.hidden_act)
        self._gate: GatePolicy | None = None
        self._predictors: LowRankPredictors | None = None
        self._one_layer = replace(self.cfg, num_layers=1)  # a window's cache holds the layer being run only
        self.reference_argmax: list[int] = []  # the first variant's argmax at every scored position (after run)

    # ---- policies ------------------------------------------------------------------------------
    def policy(self, name: str) -> Policy:
        cfg = self.cfg
        L, Fn = cfg.num_layers, cfg.intermediate_size
        if name.endswith(AHEAD):
            pol = self.policy(name[: -len(AHEAD)])
            if not pol.needs_scores:
                raise ConfigError(f"{name!r}: only a policy that scores neurons can look ahead")
            pol.lookahead = True
            return pol
        if name == "dense-fp16":
            return Policy(L, Fn)
        if name.startswith("oracle"):
            return OraclePolicy(L, Fn, parse_shares(name), [], self.act)  # scored from the layer being read
        stored = self.store.manifest.get("policies") or {}
        # as the engine runs them: on a store that keeps its gate rows apart (format 3) a gate policy fetches up
        # and down only and takes its gate activations from the resident INT4 copy (eval's rule too)
        engine_gate = SplitGatePolicy if SPLIT in self.store.views else GatePolicy
        if name == "gate" or name.startswith("gate:"):
            return self._gate_policy(parse_shares(name), engine_gate)
        if name.startswith("gate-split:"):
            return self._gate_policy(parse_shares(name), SplitGatePolicy)
        if name in stored and stored[name].get("kind") == "gate":
            return self._gate_policy(shares_from_spec(stored[name], L), engine_gate)
        if name.startswith("predictor:"):
            return PredictorPolicy(L, Fn, parse_shares(name), self.predictors(), name)
        if name in stored:
            return PredictorPolicy.from_store(self.store, name, stored[name], torch.float32, "cpu",
                                              predictors=self.predictors())
        raise ConfigError(f"unknown policy {name!r}; known: dense-fp16, oracle:A,B,C, predictor:A,B,C, gate:A,B,C, "
                          f"gate-split:A,B,C{', ' if stored else ''}{', '.join(sorted(stored))}")

    def _gate_policy(self, shares: Shares | list[Shares], cls: type[GatePolicy]) -> GatePolicy:
        if self._gate is None:
            self._gate = gate_policy(self.store, Shares(), torch.float32)
        g = self._gate
        return cls(g.num_layers, g.num_neurons, shares, g.gates, g.norms, g.act, g.resident_bytes, g.kernel_act,
                   g.group, g.dtype)

    def predictors(self) -> LowRankPredictors:
        if self._predictors is None:
            self._predictors = LowRankPredictors.load(predictor_path(self.store), torch.float32)
        return self._predictors

    # ---- weights ---------------------------------------------------------------------------------
    def _tensor(self, name: str) -> torch.Tensor:
        return self.res.get_tensor(name)

    def _matrix(self, names: list[str], form: str, dtype: torch.dtype, head: bool = False) -> torch.Tensor | Int8Weight:
        t = torch.cat([self._tensor(n) for n in names]) if len(names) > 1 else self._tensor(names[0])
        if form == "full":
            return t.to(dtype).contiguous()
        # stream: the attention as the store's INT8 file holds it (a scale a row, or its groups); the head as the
        # int8 form's
        stream = int((self.store.manifest.get("attention_int8") or {}).get("group", 0))
        return Int8Weight.quantize(t, dtype, int8_group("cpu") if form == "int8" or head else stream)

    def _layer(self, layer: int, variants: list[Variant]) -> _Layer:
        p = f"model.layers.{layer}."
        out = _Layer()
        for form, dtype in {(v.resident, v.dtype) for v in variants}:
            out.attn[f"{form}|{dtype}"] = LayerWeights(
                attn_norm=self._tensor(p + "input_layernorm.weight").to(dtype),
                wqkv=self._matrix([p + f"self_attn.{x}_proj.weight" for x in "qkv"], form, dtype),
                wo=self._matrix([p + "self_attn.o_proj.weight"], form, dtype),
                ffn_norm=self._tensor(p + "post_attention_layernorm.weight").to(dtype))
        need = {"fp16"}
        for v in variants:
            assert v.policy is not None
            need |= {q for q, n in v.policy.counts(layer).items() if n}
            if isinstance(v.policy, SplitGatePolicy):
                need.add("int4")  # every kept neuron's gate comes from the INT4 copy
        backend = PlainBackend()
        for q in sorted(need):
            out.ffn[q] = self.store.decode(q, self.store.read_layer(layer, q, backend), torch.float32)
        return out

    # ---- the pass --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, variants: list[Variant], progress: Callable[[int, int], None] | None = None,
            on_ffn_input: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """Runs every variant (and the dense FP32 reference, the first variant) through the model.
        ``on_ffn_input(layer, h, fp16)``: called with the first variant's FFN input h [N, D] at every layer and the
        layer's FP16 bundles [F, 3, D] (float32), for statistics of what its neurons do."""
        cfg = self.cfg
        ids = torch.tensor(self.windows)  # [W, T]
        W, T = ids.shape
        rows = self._tensor("model.embed_tokens.weight")[ids.reshape(-1)]
        for v in variants:
            v.policy = v.policy or self.policy(v.policy_name)
            v.x = rows.to(v.dtype)
        del rows
        rope = Rotary(cfg)
        for layer in range(cfg.num_layers):
            lw = self._layer(layer, variants)
            for k, v in enumerate(variants):
                self._layer_step(v, layer, lw, W, T, rope, on_ffn_input if k == 0 else None)
            if progress:
                progress(layer + 1, cfg.num_layers + 1)
            del lw
        self._logits(variants, ids)
        if progress:
            progress(cfg.num_layers + 1, cfg.num_layers + 1)

    def _layer_step(self, v: Variant, layer: int, lw: _Layer, W: int, T: int, rope: Rotary,
                    on_ffn_input: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> None:
        cfg = self.cfg
        assert v.x is not None and v.policy is not None
        w = lw.attn[f"{v.resident}|{v.dtype}"]
        xs = []
        for i in range(W):  # attention is per window (its own causal context)
            kv = KVCache(self._one_layer, v.dtype, "cpu", capacity=T)
            xs.append(attention_block(cfg, w, v.x[i * T:(i + 1) * T], 0, kv, 0, rope))
        x = torch.cat(xs)
        h = rms_norm(x, w.ffn_norm, cfg.rms_norm_eps)
        weights = lw.ffn
        if on_ffn_input is not None:
            on_ffn_input(layer, h, weights["fp16"])
        if not v.policy.needs_scores:
            masks = {"fp16": torch.ones(1, dtype=v.dtype)}
        else:
            scores = self._scores(v.policy, layer, ranked_input(v.policy, h, v.before, w.ffn_norm, cfg.rms_norm_eps),
                                  weights["fp16"])
            ranked = rank_masks(scores.float(), v.policy.counts(layer))
            if v.window:
                ranked = cached_only(ranked, T, v.window, v.delay)
            masks = {q: m.to(v.dtype) for q, m in ranked.items()}
            if isinstance(v.policy, SplitGatePolicy):
                weights = _with_int4_gates(weights)
        v.before = x
        ws = {q: weights[q].to(v.dtype) for q in masks}
        v.x = x + ffn_masked(h, ws, masks, self.act)

    def _scores(self, policy: Policy, layer: int, h: torch.Tensor, fp16: torch.Tensor) -> torch.Tensor:
        if isinstance(policy, OraclePolicy):
            return contributions(fp16, h.float(), self.act)
        if isinstance(policy, PredictorPolicy):
            return policy.predictors.score_all(layer, h.float())
        assert isinstance(policy, GatePolicy), f"no scorer for {type(policy).__name__}"
        return policy.score_all(layer, h.float())

    def _logits(self, variants: list[Variant], ids: torch.Tensor) -> None:
        """NLL of every variant, and its argmax agreement with the first variant's (the reference)."""
        cfg = self.cfg
        head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        final = self._tensor("model.norm.weight")
        heads: dict[str, torch.Tensor | Int8Weight] = {}
        W, T = ids.shape
        ref_argmax: list[torch.Tensor] = []
        for k, v in enumerate(variants):
            key = f"{v.resident}|{v.dtype}"
            if key not in heads:
                heads[key] = self._matrix([head_name], v.resident, v.dtype, head=True)
            assert v.x is not None
            for i in range(W):
                hn = rms_norm(v.x[i * T:(i + 1) * T - 1], final.to(v.dtype), cfg.rms_norm_eps)
                logits = linear(hn, heads[key]).float()
                target = ids[i, 1:]
                v.nll += float(F.cross_entropy(logits, target, reduction="sum"))
                v.count += target.numel()
                top = logits.argmax(1)
                if k == 0:
                    ref_argmax.append(top)
                v.same += int((top == ref_argmax[i]).sum())
            v.x = v.before = None
        self.reference_argmax = torch.cat(ref_argmax).tolist() if ref_argmax else []


def cached_only(masks: dict[str, torch.Tensor], T: int, window: int, delay: int = 1) -> dict[str, torch.Tensor]:
    """The precisions a neuron gets when a decode step never waits for the disk: a neuron ranked into FP16 or
    INT8 runs at that precision only if a recent token fetched it at one (FP16 where that was FP16, else INT8),
    and at INT4 from the resident copy otherwise; the bundles a token was ranked into are fetched while it
    computes and serve tokens ``delay`` to ``delay + window - 1`` after it. masks[p]: [N, F] 0/1, positions in
    windows of T (a window starts a new text: nothing cached)."""
    N, F_ = next(iter(masks.values())).shape
    zero = torch.zeros(N, F_)
    ranked16, ranked8, ranked4 = (masks.get(p, zero).bool() for p in ("fp16", "int8", "int4"))
    cache16, cache8 = _recent(ranked16, T, window, delay), _recent(ranked8, T, window, delay)
    want = ranked16 | ranked8
    fp16 = want & cache16
    int8 = want & ~cache16 & cache8
    int4 = ranked4 | (want & ~cache16 & ~cache8)
    return {p: m.float() for p, m in (("fp16", fp16), ("int8", int8), ("int4", int4)) if m.any()}


def _recent(used: torch.Tensor, T: int, window: int, delay: int) -> torch.Tensor:
    """[N, F] bool: whether the neuron was used by one of positions t-delay-window+1 .. t-delay of its window."""
    N, F_ = used.shape
    u = used.view(N // T, T, F_).to(torch.int32)
    c = torch.nn.functional.pad(u.cumsum(1), (0, 0, 1, 0))  # c[:, t] = uses before position t
    t = torch.arange(T)
    hi = (t - delay + 1).clamp(min=0)  # uses up to position t - delay
    lo = (t - delay - window + 1).clamp(min=0)
    return (c[:, hi] - c[:, lo] > 0).view(N, F_)


def _with_int4_gates(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each precision's bundles with the INT4 copy's gate rows: what a split store computes with."""
    out = dict(weights)
    g = weights["int4"][:, 0] if "int4" in weights else None
    for q, Wq in weights.items():
        if q != "int4" and g is not None:
            Wq = Wq.clone()
            Wq[:, 0] = g
            out[q] = Wq
    return out


WINDOW = "@window"  # a policy name's suffix: "gate-split:0.1,0.2,0.7@window4" (or "@window4d2": delay 2)


def variant(name: str, resident: str, dtype: torch.dtype) -> Variant:
    """A Variant of a policy name, with its cache simulation parsed off (``cached_only``)."""
    if WINDOW not in name:
        return Variant(name, resident, dtype)
    base, spec = name.split(WINDOW, 1)
    window, _, delay = spec.partition("d")
    return Variant(base, resident, dtype, window=int(window), delay=int(delay or 1))


def layerwise_perplexity(store_dir: str | Path, variants: list[tuple[str, str, torch.dtype]],
                         windows: list[list[int]], *, progress: Callable[[int, int], None] | None = None
                         ) -> list[dict]:
    """Rows (policy, resident, dtype, ppl, dense_ppl, ppl_delta, top1) for each (policy, resident, dtype), beside
    the dense FP32 reference on the same windows."""
    store = Store(store_dir)
    ev = LayerwiseEval(store, windows)
    for _, form, _ in variants:
        if form not in RESIDENT_FORMS:
            raise ConfigError(f"resident form {form!r}: one of {', '.join(RESIDENT_FORMS)}")
    ref = Variant("dense-fp16", "full", torch.float32)
    runs = [ref] + [variant(n, f, d) for n, f, d in variants]
    t0 = time.monotonic()
    ev.run(runs, progress)
    dense_ppl = math.exp(ref.nll / ref.count)
    rows = []
    for v in runs[1:]:
        ppl = math.exp(v.nll / v.count)
        rows.append({"policy": v.policy_name, "resident": v.resident, "dtype": str(v.dtype).removeprefix("torch."),
                     "ppl": ppl, "dense_ppl": dense_ppl, "ppl_delta": ppl / dense_ppl - 1, "top1": v.same / v.count,
                     "tokens": v.count, "seconds": round(time.monotonic() - t0, 1)})
    return rows
