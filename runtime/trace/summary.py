"""A trace's headline numbers: the run's figures, computed as ``engine.stats()`` computes them.

The figures come from the counters the engine saved with the trace (``Engine.save_trace`` marks its
``stats()``, whose ``"counters"`` they are) through ``m2cache.figures`` — the one definition
of every figure — so the summary of a run's trace says exactly what ``engine.stats()`` said at the
end of that run. A trace without those counters (hand-built, or from another recorder) gets only
what its spans show: their count, wall time, steps and the bytes they record per edge.

Metadata keys read (all optional): ``stats`` (``engine.stats()``: ``counters``, ``device``),
``device`` (used when ``stats`` has none), ``carbon`` (a ``CarbonModel.from_string`` spec).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from m2cache.carbon import CarbonModel
from m2cache.figures import PER_TOKEN, Counters, figures
from m2cache.errors import ConfigError
from m2cache.trace.layout import ordered, steps
from m2cache.trace.recorder import Span

logger = logging.getLogger(__name__)


def saved_counters(metadata: Mapping[str, Any]) -> Counters | None:
    """The engine's counters saved with a trace, or None if it has none."""
    stats = metadata.get("stats")
    if isinstance(stats, Mapping) and isinstance(stats.get("counters"), Mapping):
        return Counters.from_dict(stats["counters"])
    return None


def _device(metadata: Mapping[str, Any]) -> str:
    stats = metadata.get("stats")
    device = stats.get("device") if isinstance(stats, Mapping) else None
    return str(device or metadata.get("device") or "cpu")


def _carbon(metadata: Mapping[str, Any]) -> CarbonModel | None:
    spec = str(metadata.get("carbon") or "")
    try:
        return CarbonModel.from_string(spec) if spec else None
    except ConfigError as error:
        logger.warning("carbon spec %r ignored: %s", spec, error)
        return None


def span_bytes(spans: Iterable[Span]) -> dict[str, int]:
    """Bytes the spans record per edge: SSD->DRAM is every SSD span's, DRAM->HBM every HBM copy's."""
    edges = {"ssd_to_dram": 0, "dram_to_hbm": 0}
    for s in spans:
        if s.actor == "ssd":
            edges["ssd_to_dram"] += s.nbytes
        elif s.actor == "hbm" and s.kind == "copy":
            edges["dram_to_hbm"] += s.nbytes
    return edges


def summary(recorded: Iterable[Span], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of ``m2cache.figures`` (under their names there) when the trace holds the
    engine's counters, plus, always: ``figures_from`` ("engine counters" or None), ``spans``,
    ``wall_seconds``, ``steps`` and ``span_bytes`` (bytes the spans record per edge)."""
    spans = ordered(recorded)
    counters = saved_counters(metadata)
    result: dict[str, Any] = {
        "figures_from": "engine counters" if counters is not None else None,
        "spans": len(spans),
        "wall_seconds": (max(s.end_ns for s in spans) - spans[0].start_ns) / 1e9 if spans else 0.0,
        "steps": len(steps(spans)),
        "span_bytes": span_bytes(spans),
    }
    if counters is not None:
        result.update(figures(counters, device=_device(metadata), carbon=_carbon(metadata)))
    return result


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def summary_line(spans: Iterable[Span], metadata: Mapping[str, Any], dropped: int = 0) -> str:
    """One line for a terminal or a plot title."""
    s = summary(spans, metadata)
    if s["figures_from"] is None:
        edges = s["span_bytes"]
        parts = [f"{s['spans']} spans over {s['wall_seconds']:.3f} s, {s['steps']} steps",
                 "no engine counters in this trace",
                 f"bytes in spans SSD->DRAM {_mb(edges['ssd_to_dram'])}, "
                 f"DRAM->HBM {_mb(edges['dram_to_hbm'])}"]
    else:
        per_token = s["bytes_per_token"]
        parts = [f"decode {s['decode_tokens_per_s']:.2f} tok/s ({s['decode_tokens']} decode tok, "
                 f"{s['decode_s']:.2f} s)",
                 f"stall {100 * s['stall_fraction']:.1f}% of step time",
                 f"{PER_TOKEN}: SSD->DRAM {_mb(per_token['ssd_to_dram'])}, "
                 f"DRAM->HBM {_mb(per_token['dram_to_hbm'])}",
                 "hit " + " ".join(f"{tier} {100 * r:.0f}%" for tier, r in s["hit_ratio"].items())]
        if "carbon_g_per_1k_tokens" in s:
            parts.append(f"{s['carbon_g_per_1k_tokens']:.3g} gCO2/1k tok")
    if dropped:
        parts.append(f"{dropped} spans dropped")
    return " | ".join(parts)
