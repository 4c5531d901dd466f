"""The run's figures — speed, bytes per token, hit ratios, stall fraction, carbon — from its counters.

One definition, used by everything that shows a figure: ``engine.stats()``, ``m2cache generate
--stats``, the bench (over the decode part of each request: a difference of two snapshots) and the
trace summary (from the counters the engine saved with the trace). Pure: no engine, no clock.

What the figures mean:

- a *token* is a generated token, the prefill's (each request's first) included; ``decode_tokens``
  are the others, one per decode step;
- ``bytes_per_token`` is the bytes moved over an edge in the counted interval (for ``engine.stats()``:
  the whole run) over the tokens generated in it;
- ``stall_fraction`` is the time the executor waited for a layer's weights over the time its steps
  (prefill and decode) took;
- ``decode_tokens_per_s`` is decode tokens over the time decode steps took (the prefill left out);
- ``reads_per_token`` and ``bytes_per_read`` are the store's read calls (every run of blocks, whole file and
  streamed attention layer: what a disk bound by its reads a second pays for) per token, and their mean size;
- ``hit_ratio["window"]`` is the share of the neurons read one by one that DRAM's window already held.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from m2cache.carbon import CarbonModel
from m2cache.errors import ConfigError

logger = logging.getLogger(__name__)

PER_TOKEN = "per generated token (the prefill's first token included)"
EDGES = ("ssd_to_dram", "dram_to_hbm")


@dataclass(frozen=True)
class Counters:
    """What a run counted; every figure is a function of these. Snapshots subtract: ``later - earlier``
    counts what happened in between."""

    tokens: int = 0  # generated, the prefill's first token included
    decode_tokens: int = 0
    first_tokens: int = 0  # requests that got their first token (what ttft_s_sum adds over)
    prefill_s: float = 0.0  # time the executor's prefill steps took
    decode_s: float = 0.0  # time its decode steps took
    stall_s: float = 0.0  # time it waited for a layer's weights, in either
    ttft_s_sum: float = 0.0
    ssd_to_dram_bytes: int = 0  # read off the SSD
    dram_to_hbm_bytes: int = 0  # copied up into the device pool
    hbm_hits: int = 0  # (neuron, precision) lookups the device pool already held
    hbm_misses: int = 0
    dram_served: int = 0  # fetches served from a layer held in DRAM
    dram_neuron_reads: int = 0  # fetches that needed a neuron-level SSD read
    disk_reads: int = 0  # read calls the store's backend made (a run of blocks, a whole file, a layer's attention)
    disk_bytes: int = 0  # the bytes those calls read
    window_hits: int = 0  # neurons DRAM's window already held when a layer asked (``actors.dram``)
    window_misses: int = 0  # neurons it read off the store for a layer

    def __sub__(self, other: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                           for f in dataclasses.fields(self)})

    def __add__(self, other: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                           for f in dataclasses.fields(self)})

    def to_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Counters:
        """The inverse of ``to_dict``; names this version does not know are ignored."""
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        typed: dict[str, Any] = {name: (float(v) if known[name] == "float" else int(v))
                                 for name, v in values.items() if name in known}
        return cls(**typed)


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def figures(counters: Counters, *, device: str = "cpu", carbon: CarbonModel | None = None) -> dict[str, Any]:
    """The figures of ``counters`` (see the module's docstring for what each means).

    ``device`` ("cpu", "cuda", a GPU's name) and ``carbon`` (default: ``CarbonModel()``) only feed the
    carbon estimate, which is left out when no token was generated or no step time was counted.
    """
    c = counters
    moved = {"ssd_to_dram": c.ssd_to_dram_bytes, "dram_to_hbm": c.dram_to_hbm_bytes}
    busy_s = c.prefill_s + c.decode_s
    out: dict[str, Any] = {
        "tokens": c.tokens,
        "decode_tokens": c.decode_tokens,
        "decode_tokens_per_s": _ratio(c.decode_tokens, c.decode_s),
        "ttft_s": c.ttft_s_sum / c.first_tokens if c.first_tokens else None,
        "prefill_s": c.prefill_s,
        "decode_s": c.decode_s,
        "bytes": moved,
        "bytes_per_token": {edge: _ratio(n, c.tokens) for edge, n in moved.items()},
        "hit_ratio": {"hbm": _ratio(c.hbm_hits, c.hbm_hits + c.hbm_misses),
                      "dram": _ratio(c.dram_served, c.dram_served + c.dram_neuron_reads),
                      "window": _ratio(c.window_hits, c.window_hits + c.window_misses)},
        "reads_per_token": _ratio(c.disk_reads, c.tokens),
        "bytes_per_read": _ratio(c.disk_bytes, c.disk_reads),
        "stall_fraction": _ratio(c.stall_s, busy_s),
        "stall_s": c.stall_s,
    }
    if c.tokens > 0 and busy_s > 0:
        try:
            estimate = (carbon or CarbonModel()).estimate(busy_s, c.tokens, moved, device)
            out["carbon_g_per_1k_tokens"] = estimate.grams_per_1k_tokens
        except ConfigError as error:  # an unknown GPU without gpu_w: the figure is left out
            logger.warning("no carbon estimate: %s", error)
    return out


FIGURE_KEYS = ("tokens", "decode_tokens", "decode_tokens_per_s", "ttft_s", "prefill_s", "decode_s", "bytes",
               "bytes_per_token", "hit_ratio", "reads_per_token", "bytes_per_read", "stall_fraction", "stall_s", "carbon_g_per_1k_tokens")
