"""Deja Vu-style neuron predictors and the policy that ranks neurons with them.

One predictor per FFN layer: a low-rank two-layer MLP from the layer's input (the post-norm hidden
state h) to a score per neuron, ``score = W2 · relu(W1 · h + b1) + b2`` (d -> r -> F). It is trained
offline (``m2cache.offline.train``) on the dense model's own neuron contributions, |activation| x
||down column||; at decode time it costs two small matrix-vector products per layer, on the compute
thread.

``predictors.safetensors`` holds, for L layers, rank r, hidden D and F neurons:
``w1 [L, r, D]``, ``b1 [L, r]``, ``w2 [L, F, r]``, ``b2 [L, F]`` (FP16 on disk).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from m2cache.errors import PredictorMissingError, StoreError
from m2cache.formats.shares import Shares
from m2cache.model.policy import Policy

PREDICTOR_TENSORS = ("w1", "b1", "w2", "b2")


class LowRankPredictors:
    """Every layer's predictor weights, stacked (one tensor per kind, indexed by layer)."""

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
        L, r, D = w1.shape
        if b1.shape != (L, r) or w2.shape[0] != L or w2.shape[2] != r or b2.shape != w2.shape[:2]:
            raise StoreError(f"predictor tensors disagree in shape: w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, "
                             f"w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}; re-run `m2cache train-predictor`")
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2
        self.num_layers, self.rank, self.hidden = L, r, D
        self.num_neurons = w2.shape[1]

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> "LowRankPredictors":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise PredictorMissingError(f"{path} is missing; train predictors with `m2cache train-predictor STORE`")
        t = load_file(str(path))
        missing = [k for k in PREDICTOR_TENSORS if k not in t]
        if missing:
            raise StoreError(f"{path} lacks {missing}; re-run `m2cache train-predictor`")
        return cls(*(t[k].to(device=device, dtype=dtype).contiguous() for k in PREDICTOR_TENSORS))

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {k: getattr(self, k).to(torch.float16).contiguous() for k in PREDICTOR_TENSORS}
        save_file(tensors, str(path), metadata=metadata or {})

    def score_last(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Scores of the last position of h ([T, D]) -> [F]: two matrix-vector products."""
        x = h[-1].to(self.w1.dtype)
        z = torch.addmv(self.b1[layer], self.w1[layer], x).relu_()  # [r]
        return torch.addmv(self.b2[layer], self.w2[layer], z)  # [F]

    def score_all(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Scores of every position (evaluation, training): h [T, D] -> [T, F]."""
        z = F.linear(h.to(self.w1.dtype), self.w1[layer], self.b1[layer]).relu_()
        return F.linear(z, self.w2[layer], self.b2[layer])


def predictor_path(store: Any) -> Path:
    meta = store.manifest.get("predictors")
    if not meta:
        raise PredictorMissingError(
            f"{store.path} has no trained predictors; run `m2cache train-predictor {store.path}` first"
        )
    return Path(store.path) / meta["path"]


def shares_from_spec(spec: dict[str, Any], num_layers: int) -> Shares | list[Shares]:
    """A stored policy's ``shares``: one {fp16,int8,int4} dict, or a list of them, one per layer."""
    shares = spec.get("shares")
    if isinstance(shares, list):
        return [Shares(**s) for s in shares]
    if isinstance(shares, dict):
        return Shares(**shares)
    raise StoreError(f"policy spec {spec!r} has no shares; expected {{'fp16': .., 'int8': .., 'int4': ..}}")


class PredictorPolicy(Policy):
    """Ranks a layer's neurons by its trained predictor's scores, then cuts by the policy's shares."""

    name = "predictor"
    needs_scores = True

    def __init__(self, num_layers: int, num_neurons: int, shares: Shares | list[Shares],
                 predictors: LowRankPredictors, name: str = "predictor") -> None:
        super().__init__(num_layers, num_neurons, shares)
        if predictors.num_layers != num_layers or predictors.num_neurons != num_neurons:
            raise StoreError(
                f"predictors cover {predictors.num_layers} layers x {predictors.num_neurons} neurons, the model has "
                f"{num_layers} x {num_neurons}; re-run `m2cache train-predictor`"
            )
        self.predictors = predictors
        self.name = name

    def score(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.predictors.score_last(layer, h)

    def score_batch(self, layer: int, hs: list[torch.Tensor]) -> torch.Tensor:
        if len(hs) == 1:
            return self.predictors.score_last(layer, hs[0])
        return self.predictors.score_all(layer, torch.cat([h[-1:] for h in hs])).amax(0)  # one product

    @classmethod
    def from_store(cls, store: Any, name: str, spec: dict[str, Any], dtype: torch.dtype,
                   device: str | torch.device = "cpu",
                   predictors: LowRankPredictors | None = None) -> "PredictorPolicy":
        cfg = store.config
        if predictors is None:
            predictors = LowRankPredictors.load(predictor_path(store), dtype, device)
        return cls(cfg.num_layers, cfg.intermediate_size, shares_from_spec(spec, cfg.num_layers), predictors, name)
