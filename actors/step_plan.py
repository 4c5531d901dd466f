"""A step's path through the layers, decided once: when the layers' weights are known (the executor's start, or
a streamed layer's arrival) and when the step's batch is known (its start).

From the weights: each layer's ``AttentionRoute`` (which code computes its attention: the C kernel for one
position, torch, or another family's block; whether the kernel also gives the FFN's input) and whether the LM
head runs in the kernels. From the batch: where each sequence's chunk sits, whether the sequences compute alone
or as one product, how the FFN's products are shared, what the predictor asks for and how the LM head runs. The
compute thread then runs what the plan says: nothing on the way asks the weights or the batch again (the FFN
itself knows whether its kernels take the step: ``LayerFFN.compute``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from m2cache.model.llama import AttentionRoute, LayerWeights, ResidentWeights, attention_route, head_kernel


@dataclass(frozen=True, slots=True)
class LayerStep:
    """One layer of one step: each sequence's attention path (``AttentionRoute.path``), or None: the batch's
    projections as one product (``attention_rows_torch``); ``fused``: the kernel gives the FFN's input too."""

    paths: tuple[str, ...] | None
    fused: bool


@dataclass(frozen=True, slots=True)
class StepPlan:
    prefill: bool
    chunks: tuple[tuple[int, int], ...]  # per sequence (first position, positions) of its chunk
    alone: bool  # each sequence's attention as it would run alone (one sequence, or a per-row batch)
    layers: tuple[LayerStep | None, ...]  # None: a streamed layer, planned when its weights arrive (``layer_step``)
    ffn: str  # "rows": each over its own cut (batch-invariant); "batch": one product; "each": the exact policy's
    predict: str  # "dense", "fixed" or "scores" (``Predictor.choose``)
    ahead: bool  # the predictor ranks the layer after next, from the residual before this layer's FFN
    head: str  # "each": one LM head call per sequence; "rows": one product for the batch's last rows
    head_kernel: bool


def layer_step(route: AttentionRoute, chunks: tuple[tuple[int, int], ...], alone: bool) -> LayerStep:
    paths = tuple(route.path(pos, T) for pos, T in chunks)
    if alone:
        return LayerStep(paths, route.fused_norm)
    if "family" in paths:  # a batch with another family's chunk: each alone, its norm after (``attention_rows``)
        return LayerStep(paths, False)
    return LayerStep(None, False)


class Planner:
    """The executor's: the routes of its resident layers (once), and each step's plan."""

    def __init__(self, cfg, res: ResidentWeights, *, dtype: torch.dtype, device: torch.device,
                 streamed: bool, per_row: bool, invariant: bool, exact: bool, dense_prefill: bool, needs_scores: bool, lookahead: bool) -> None:
        self.cfg = cfg
        self.row = torch.empty(1, cfg.hidden_size, dtype=dtype, device=device)  # like every step's rows
        # resident projections: routed once; streamed ones arrive each step (``route``)
        self.routes = None if streamed else [attention_route(cfg, w, L, self.row) for L, w in enumerate(res.layers)]
        self.head_kernel = head_kernel(res, self.row)
        self.per_row, self.invariant, self.exact = per_row, invariant, exact
        self.dense_prefill = dense_prefill
        self.needs_scores, self.lookahead = needs_scores, lookahead

    def route(self, L: int, w: LayerWeights) -> AttentionRoute:
        """A streamed layer's route, from the weights it arrived with."""
        return attention_route(self.cfg, w, L, self.row)

    def step(self, chunks: list[tuple[int, int]], prompts: list[int], prefill: bool) -> StepPlan:
        """The plan of a step whose sequences' chunks are ``chunks`` ((first position, positions) each), their
        prompts ``prompts`` tokens long."""
        n = len(chunks)
        alone = n == 1 or self.per_row
        spans = tuple(chunks)
        layers: tuple[LayerStep | None, ...] = (None,) * self.cfg.num_layers if self.routes is None else \
            tuple(layer_step(r, spans, alone) for r in self.routes)
        wanted = sum(pos + T >= p for (pos, T), p in zip(chunks, prompts))  # sequences whose logits this step gives
        if prefill and self.dense_prefill:
            predict = "dense"
        else:
            predict = "scores" if self.needs_scores else "fixed"
        return StepPlan(
            prefill=prefill, chunks=spans, alone=alone, layers=layers,
            ffn="rows" if self.invariant else "batch" if n == 1 or not self.exact else "each",
            predict=predict, ahead=self.lookahead and not prefill,
            head="each" if wanted == 1 or self.per_row else "rows", head_kernel=self.head_kernel)
