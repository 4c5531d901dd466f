"""One request's generation as the server sees it: token ids from the engine turned into text deltas
(one per token, possibly empty), cut at the first stop string, with its finish reason and timings
(for ``/metrics``)."""
from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from m2cache.model.tokenizer import StreamDecoder, Tokenizer


class StopText:
    """Text deltas cut at the first of ``stops``; text that may begin a stop string is held back."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else delta
        text = self.held + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


@dataclass
class Generation:
    """Runs ``engine.generate_ids`` for one request; iterate ``deltas()`` once."""

    engine: object
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    completion_tokens: int = 0
    finish_reason: str = "length"
    t_start: float = field(default_factory=time.perf_counter)
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # inter-token latencies

    async def deltas(self) -> AsyncGenerator[str, None]:
        tok: Tokenizer = self.engine.tokenizer  # type: ignore[attr-defined]
        eos = set(self.engine.store.config.eos_token_ids)  # type: ignore[attr-defined]
        dec, stop = StreamDecoder(tok), StopText(self.stops)
        last = self.t_start
        ids = self.engine.generate_ids(  # type: ignore[attr-defined]
            self.prompt_ids, self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        try:
            async for token in ids:
                now = time.perf_counter()
                if self.ttft_s is None:
                    self.ttft_s = now - self.t_start
                else:
                    self.gaps_s.append(now - last)
                last = now
                if token in eos:  # not a completion token (OpenAI's usage does not count it)
                    self.finish_reason = "stop"
                    break
                self.completion_tokens += 1
                # one delta per token, empty while a character or a possible stop string is held back:
                # a stream shows every step's progress
                yield stop.push(dec.push(token))
                if stop.stopped:
                    self.finish_reason = "stop"
                    break
        finally:
            await ids.aclose()  # a stop string or a disconnect ends the engine's request now
        tail = stop.push(dec.flush()) + stop.flush()
        if tail:
            yield tail
