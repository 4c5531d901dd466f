"""``--dense``: every weight resident, no tiering — the reference the tiered engine must equal."""
from __future__ import annotations

from typing import Iterator

import torch

from m2cache.engine.config import DEFAULT_PREFILL_CHUNK
from m2cache.engine.loading import load_dense, load_tokenizer
from m2cache.model.tokenizer import StreamDecoder
from m2cache.model.sampling import check_sampling, sample
from m2cache.storage.reader import Store


class DenseGenerator:
    """``prefill_chunk``: prompt tokens per forward pass, the engine's chunks (the same products, so the same
    bits); None runs the prompt in one pass."""

    def __init__(self, store_dir: str, dtype: torch.dtype = torch.float32,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> None:
        self.store = Store(store_dir)
        self.model = load_dense(self.store, dtype)
        self.tokenizer = load_tokenizer(self.store)
        self.prefill_chunk = prefill_chunk

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, repetition_penalty: float = 1.0) -> Iterator[int]:
        check_sampling(temperature, top_p, max_new_tokens, repetition_penalty)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        kv = self.model.new_cache()
        chunk = self.prefill_chunk or len(prompt_ids)
        for start in range(0, len(prompt_ids), chunk):
            logits = self.model.forward(prompt_ids[start:start + chunk], kv)
        eos = set(self.model.cfg.eos_token_ids)
        history = list(prompt_ids)
        for _ in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, gen, repetition_penalty=repetition_penalty, history=history)
            history.append(tok)
            yield tok
            if tok in eos:
                return
            logits = self.model.forward([tok], kv)

    def generate(self, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, raw: bool = False, repetition_penalty: float = 1.0) -> Iterator[str]:
        ids = self.tokenizer.encode(prompt, raw=raw)
        dec = StreamDecoder(self.tokenizer)
        for tok in self.generate_ids(ids, max_new_tokens, temperature, top_p, seed, repetition_penalty):
            if tok in self.model.cfg.eos_token_ids:
                break
            yield dec.push(tok)
        yield dec.flush()
