"""Precision shares: the fractions of a layer's neurons kept at FP16, INT8 and INT4, and the gate policies
every store offers.

The store records them (its manifest's ``policies`` and ``default_policy``) and the policies of
``m2cache.model.policy`` cut rankings by them, so they live here, below both. Pure: no tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

from m2cache.errors import ConfigError

PRECISION_ORDER = ("fp16", "int8", "int4")


@dataclass(frozen=True, slots=True)
class Shares:
    """Fractions of a layer's neurons kept at each precision (the rest are skipped)."""

    fp16: float = 1.0
    int8: float = 0.0
    int4: float = 0.0

    def __post_init__(self) -> None:
        for name in PRECISION_ORDER:
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"share {name}={v} must lie in [0, 1]")
        if self.fp16 + self.int8 + self.int4 > 1.0 + 1e-9:
            raise ConfigError(f"shares add up to more than 1: {self}")
        if self.fp16 + self.int8 + self.int4 <= 0:
            raise ConfigError("a policy must keep some neurons")

    def counts(self, num_neurons: int) -> dict[str, int]:
        """Neurons per precision; rounding never drops a non-zero share to nothing."""
        out, taken = {}, 0
        for name in PRECISION_ORDER:
            share = getattr(self, name)
            n = 0 if share == 0 else max(1, int(round(share * num_neurons)))
            n = min(n, num_neurons - taken)
            out[name], taken = n, taken + n
        return out

    def bytes_ratio(self, bundle_bytes: dict[str, int]) -> float:
        """FFN bytes per token relative to every neuron at FP16."""
        return sum(getattr(self, p) * bundle_bytes[p] for p in PRECISION_ORDER) / bundle_bytes["fp16"]

    def to_dict(self) -> dict[str, float]:
        return {p: getattr(self, p) for p in PRECISION_ORDER}

    def astuple(self) -> tuple[float, float, float]:
        return (self.fp16, self.int8, self.int4)


# The gate policies every store offers (no predictor to train: a resident INT4 copy of every gate row ranks
# the neurons), and the default of a store written by this version. Each keeps every neuron and fetches its up
# and down parts only. gate-40: 10% at FP16, 20% INT8, 70% INT4, 0.29 of the dense FP16 FFN bytes, against
# 0.43 for the predictor's mixed-40 at the same shares (`m2cache eval`, demo model, dense FP32 reference,
# 1024 held-out tokens each of the pydoc prose and GPL-3, docs/results/eval_gate_split_demo.txt):
# +0.9% / +0.0% perplexity, top-1 0.974 / 0.953, where mixed-40 costs +1.4% / +1.0% (top-1 0.958 / 0.915).
# gate-25 (the default): 5% FP16, 10% INT8, 85% INT4, 0.25 of the bytes. With the resident part in INT8 groups
# (the form a memory limit takes) it measured +0.7% / -0.6% perplexity against gate-40's +0.8% / +0.0% on the
# same texts, top-1 0.963 / 0.926 against 0.970 / 0.938, and on 4096 tokens of each +0.5% / +0.0% against
# +0.6% / +0.2%, where the split without FP16, gate:0,0.1,0.9, costs +1.1% / +1.5%
# (docs/results/eval_policy_under_limit_demo.txt); under a limit of 40% on the grown SmolLM2 it reads about half
# as often (3554 reads a token against 6303) and decoded 1.41x gate-40, 1.20x llama.cpp Q8_0
# (docs/results/bench_grown_40pct_default.txt).
GATE_PRESETS: dict[str, Shares] = {"gate-25": Shares(0.05, 0.1, 0.85), "gate-40": Shares(0.1, 0.2, 0.7)}
DEFAULT_POLICY = "gate-25"
