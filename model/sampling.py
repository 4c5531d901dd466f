"""Next-token choice: greedy, or temperature + top-p with a seeded generator; either with a repetition
penalty (Hugging Face's: a token already in the sequence has its logit divided by the penalty where
positive, multiplied where negative)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from m2cache.errors import ConfigError

# the sampling settings a store's ``generation`` entry may hold (the model's generation_config.json's)
GENERATION_KEYS = ("temperature", "top_p", "repetition_penalty")


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None, *,
           repetition_penalty: float = 1.0, history: Sequence[int] = ()) -> int:
    """logits: [V] float32 -> token id. temperature 0 is greedy (ties: lowest id, like argmax);
    ``history``: the sequence's tokens so far (prompt and generated), which ``repetition_penalty`` weighs."""
    if repetition_penalty != 1.0 and len(history):
        logits = penalise(logits, history, repetition_penalty)
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


def penalise(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """A copy of ``logits`` with each token of ``history`` made less likely by ``penalty`` (> 1)."""
    ids = torch.as_tensor(sorted(set(history)), dtype=torch.long)
    seen = logits.index_select(0, ids)
    out = logits.clone()
    out.index_copy_(0, ids, torch.where(seen > 0, seen / penalty, seen * penalty))
    return out


def check_sampling(temperature: float, top_p: float, max_new_tokens: int, repetition_penalty: float = 1.0) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty must be > 0 (1 = none), got {repetition_penalty}")
