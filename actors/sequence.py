"""A request as the executor runs it (``Sequence``), and the scheduling arithmetic on it: which prompt
tokens its next prefill chunk takes, which newcomers share a prefill step, how much KV cache it holds.

A sequence is the request's handle on both sides: the executor writes its tokens into ``out`` (bounded: it
steps a sequence only while its consumer keeps up) and ends it with ``finish``; the consumer reads them with
``receive`` and, giving up, sets ``cancelled`` (as a future is cancelled by whoever waits on it)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from m2cache.model.llama import KVCache, StepRope

_DONE = object()  # end of a sequence's output


@dataclass(eq=False)
class Sequence:
    """One request: its prompt, sampling, KV cache and output channel (bounded)."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    out: asyncio.Queue
    kv: KVCache | None = None
    generated: int = 0
    last: int | None = None
    cancelled: bool = False
    x: torch.Tensor | None = None  # hidden state between jobs; only the compute thread touches it
    h: torch.Tensor | None = None
    cos_sin: StepRope | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    repetition_penalty: float = 1.0
    history: list[int] = field(default_factory=list)  # prompt and generated tokens, for the penalty (else empty)

    async def receive(self) -> int | None:
        """The request's next token (the consumer's side of ``out``); None once it ended; its error raised."""
        item = await self.out.get()
        if item is _DONE:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    @property
    def prefilled(self) -> bool:
        """Every prompt token is in the KV cache (its chunks done): the sequence decodes."""
        return self.kv is not None and self.kv.length >= len(self.prompt)


PREFILL_ROWS = 2048  # prompt tokens one unchunked prefill step takes (its activations grow with them), one prompt at least


def prefill_tokens(seq: Sequence, chunk: int | None) -> list[int]:
    """The prompt tokens of ``seq``'s next prefill chunk: ``chunk`` at a time from the start of its own
    prompt (the rest of it without chunks), whatever it shares a step with."""
    done = 0 if seq.kv is None else seq.kv.length
    return seq.prompt[done:] if chunk is None else seq.prompt[done:done + chunk]


def prefill_batch(newcomers: list[Sequence], max_batch: int, chunk: int | None = None) -> list[Sequence]:
    """The newcomers one prefill step takes: in arrival order, while their next chunks fit one chunk's tokens
    (``PREFILL_ROWS`` without chunks); one at least."""
    budget = chunk or PREFILL_ROWS
    batch: list[Sequence] = []
    rows = 0
    for seq in newcomers[:max_batch]:
        n = len(prefill_tokens(seq, chunk))
        if batch and rows + n > budget:
            break
        batch.append(seq)
        rows += n
    return batch


def kv_need(seq: Sequence) -> int:
    """Tokens of KV cache a sequence holds while it runs (allocated whole at its prefill)."""
    return len(seq.prompt) + seq.max_new_tokens


def finish(seq: Sequence, error: BaseException | None) -> None:
    """Ends a sequence's output channel; its queue keeps one slot beyond the token limit for this."""
    seq.out.put_nowait(_DONE if error is None else error)
