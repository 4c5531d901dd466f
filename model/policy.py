"""Precision policies: which neurons of a layer run, and at which precision, for one token.

A policy ranks a layer's neurons (by a predictor's score, or exactly for the oracle) and cuts the
ranking into shares: the top share in FP16, the next in INT8, the next in INT4, the rest skipped.
Scoring is tensor work and runs on the compute thread; cutting a ranking is cheap and runs there too
(``m2cache.actors.predictor``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from m2cache.errors import ConfigError
from m2cache.formats import quant
from m2cache.formats.shares import PRECISION_ORDER, Shares
from m2cache.model import cpu_kernels


class Policy:
    """Base: every neuron at FP16 (``dense-fp16``): tiering alone, the dense model's exact tokens."""

    name = "dense-fp16"
    needs_scores = False
    lookahead = False  # ranked from the previous layer's residual (EngineConfig.lookahead)

    def __init__(self, num_layers: int, num_neurons: int, shares: Shares | list[Shares] | None = None) -> None:
        self.num_layers, self.num_neurons = num_layers, num_neurons
        per_layer = shares if isinstance(shares, list) else [shares or Shares()] * num_layers
        if len(per_layer) != num_layers:
            raise ConfigError(f"a per-layer policy needs {num_layers} shares, got {len(per_layer)}")
        self.shares = per_layer
        self._counts = [s.counts(num_neurons) for s in per_layer]
        self._all = np.arange(num_neurons, dtype=np.int64)

    @property
    def exact(self) -> bool:
        """Every neuron at FP16 (``dense-fp16``): its tokens must be the dense model's, bit for bit, so
        it keeps torch's dense code and computes a batch's sequences one by one."""
        return self.name == "dense-fp16"

    def counts(self, layer: int) -> dict[str, int]:
        return self._counts[layer]

    def max_counts(self) -> dict[str, int]:
        return {p: max(c[p] for c in self._counts) for p in PRECISION_ORDER}

    def score(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        """Scores of every neuron for the last position of h ([T, D]); None when not input-dependent."""
        return None

    def score_batch(self, layer: int, hs: list[torch.Tensor]) -> torch.Tensor | None:
        """One score per neuron for a batch of sequences (each h [T, D], its last position scored): the
        largest any of them gives, so the batch's shared plan keeps what any sequence needs most."""
        if len(hs) == 1:
            return self.score(layer, hs[0])
        scores = [self.score(layer, h) for h in hs]
        return None if scores[0] is None else torch.stack(scores).amax(0)  # type: ignore[arg-type]

    def score_rows(self, layer: int, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One score per neuron for each sequence alone (``hs[i]``: [T, D], every position scored, the largest
        kept): the very calls each would make alone, so a sequence's ranking does not depend on its batch."""
        return [self.score_batch(layer, list(h.split(1))) for h in hs]  # type: ignore[misc]

    def rank(self, layer: int, scores: torch.Tensor) -> np.ndarray:
        """Neuron ids ordered so that ``split`` cuts exactly the top shares: each precision group's
        members are right, their order inside a group is not (``split`` sorts them anyway). A
        partition around the cut points costs O(F) where a full argsort costs O(F log F) (~5x on
        the demo's 1536 neurons)."""
        s = scores.float().cpu().numpy()
        cuts, total = [], 0
        for p in PRECISION_ORDER:
            total += self._counts[layer][p]
            if 0 < total < self.num_neurons:
                cuts.append(total - 1)
        if not cuts:
            return np.arange(self.num_neurons, dtype=np.int64)
        return np.argpartition(-s, cuts).astype(np.int64, copy=False)

    def split(self, layer: int, order: np.ndarray | None) -> dict[str, np.ndarray]:
        """Ranked neuron ids (best first) -> ids per precision, each sorted ascending."""
        counts = self._counts[layer]
        if order is None:
            if counts["fp16"] == self.num_neurons:
                return {"fp16": self._all}
            raise RuntimeError(f"policy {self.name} needs scores to choose neurons")
        out, start = {}, 0
        for p in PRECISION_ORDER:
            n = counts[p]
            if n:
                out[p] = np.sort(order[start : start + n])
            start += n
        return out


def contributions(w: torch.Tensor, h: torch.Tensor, act, down_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Each neuron's exact contribution to the FFN output, |act(gate·h)·(up·h)|·||down||: neuron j adds
    a_j·down_j, so this is the norm of what skipping it (or rounding it) puts at stake.
    w: [F, 3, D]; h: [T, D] -> [T, F]. Ranking by the activation alone ignores the down column's size:
    on the demo, keeping 80% of the neurons ranked so costs +0.7% perplexity on held-out text of
    another kind, against +1.9% at 70% ranked by |a| alone (top-1 agreement 0.97 against 0.92)."""
    a = act(F.linear(h, w[:, 0])) * F.linear(h, w[:, 1])
    return a.abs() * (w[:, 2].norm(dim=1) if down_norm is None else down_norm)


class OraclePolicy(Policy):
    """Exact contributions |act(gate·h)·(up·h)|·||down|| from the layer's FP16 weights.

    A measuring tool (tests, eval): it reads every layer's weights once into memory, outside the
    tier budgets, to know the truth a predictor approximates.
    """

    name = "oracle"
    needs_scores = True

    def __init__(self, num_layers: int, num_neurons: int, shares: Shares | list[Shares],
                 weights: list[torch.Tensor], act) -> None:
        super().__init__(num_layers, num_neurons, shares)
        self.weights, self.act = weights, act  # weights[L]: [F, 3, D] in the compute dtype
        self.down_norms = [w[:, 2].norm(dim=1) for w in weights]

    def score(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return contributions(self.weights[layer], h[-1:], self.act, self.down_norms[layer])[0]


# The C kernel scores the packed gate rows one row of h at a time (demo layer: 1.0 ms a row); more rows than
# this (a prefill, a batch) dequantise the layer's copy once and take one product: 30 rows 2.3 ms, not 42
GATE_KERNEL_MAX_ROWS = 2


class GatePolicy(Policy):
    """Ranks neurons by |act(gate·h)|·||up||·||down||, the gate product computed for every neuron from a
    resident low-bit copy of the gate rows (the CATS idea): the true gate activation, with the up product
    replaced by its row's norm.

    ``gates[L]``: the copy of layer L's gate rows, either packed INT4 ([F, D/2 + 4·D/group] uint8, the
    layout of ``cpu_kernels.gate_rows_int4``; scored by the C kernel with ``kernel_act``, or without one
    (CUDA) dequantised to ``dtype`` a layer at a time where it lies) or [F, D] in the compute dtype (the
    CPU without the kernels). ``resident_bytes``: what the packed copy costs, reported beside the tiers
    (like the predictors', it sits outside their budgets). One full-width gate product per layer and token
    (two on a split store with lookahead: the ranking's, from the layer before, and the FFN's own; on CUDA
    each dequantises the layer's copy into a [F, D] transient).
    """

    name = "gate"
    needs_scores = True

    def __init__(self, num_layers: int, num_neurons: int, shares: Shares | list[Shares], gates: list[torch.Tensor],
                 norms: list[torch.Tensor], act, resident_bytes: int, kernel_act: str | None = None,
                 group: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(num_layers, num_neurons, shares)
        self.gates, self.norms, self.act = gates, norms, act  # norms[L]: ||up_j||·||down_j|| [F] float32
        self.resident_bytes = resident_bytes
        self.kernel_act, self.group, self.dtype = kernel_act, group, dtype

    def score(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.score_all(layer, h[-1:])[0]

    def score_batch(self, layer: int, hs: list[torch.Tensor]) -> torch.Tensor:
        if len(hs) == 1:
            return self.score(layer, hs[0])
        return self.score_all(layer, torch.cat([h[-1:] for h in hs])).amax(0)  # one pass over the copy

    def score_rows(self, layer: int, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.rows_invariant:
            return super().score_rows(layer, hs)
        # each sequence's rows alone: the kernel scores a row or two, one product more (GATE_KERNEL_MAX_ROWS),
        # so a sequence gets the call it would get alone whatever it is batched with
        return [self.score_all(layer, h).amax(0) for h in hs]

    @property
    def rows_invariant(self) -> bool:
        """The C kernel scores the copy: each row's activations are the same bits whatever rows it is given
        with (torch's batched products are not)."""
        return self.gates[0].dtype == torch.uint8 and self.kernel_act is not None

    def score_all(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.scores_of(layer, self.gate_acts(layer, h))

    def scores_of(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        """The scores [T, F] float32 of gate activations [T, F] (``gate_acts``'s): in float32 whatever the compute
        dtype, as the native decode step (csrc/decode.c) computes them, and with fewer ties than bfloat16 has."""
        return acts.float().abs() * self.norms[layer].float()

    def gate_acts(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """act(gate·h) [T, F] of every neuron, from the copy: the score's first half, and a split store's
        gate activations."""
        gates = self.gates[layer]
        if gates.dtype == torch.uint8 and self.kernel_act is not None and h.shape[0] <= GATE_KERNEL_MAX_ROWS:
            return cpu_kernels.gate_int4(gates, h, h.shape[-1], self.group, self.kernel_act)
        if gates.dtype == torch.uint8:  # packed, no kernel (CUDA) or many rows: the layer's rows dequantised
            dim = h.shape[-1]
            gates = quant.decode("int4", gates, 1, dim, self.dtype, quant.Groups(int4=self.group))[:, 0]
        return self.act(F.linear(h.to(gates.dtype), gates))
