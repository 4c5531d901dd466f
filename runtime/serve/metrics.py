"""``/metrics`` in Prometheus text format: the server's own counters and latency histograms, the
engine's figures (read from ``engine.stats()`` at scrape time) and the event loop's lag."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineFigures(Collector):
    """The engine's figures, computed when Prometheus scrapes (one definition: ``engine.stats()``)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        st = self.engine.stats()
        yield GaugeMetricFamily("m2cache_decode_tokens_per_second",
                                "decode tokens per second of decode time, all requests", st["decode_tokens_per_s"])
        yield GaugeMetricFamily("m2cache_stall_fraction", "share of step time the executor waited for weights",
                                st["stall_fraction"])
        hit = GaugeMetricFamily("m2cache_hit_ratio", "neuron requests served by the tier", labels=["tier"])
        for tier, value in st["hit_ratio"].items():
            hit.add_metric([tier], value)
        yield hit
        edge = GaugeMetricFamily("m2cache_bytes_per_token", "bytes moved per generated token, by edge",
                                 labels=["edge"])
        for name, value in st["bytes_per_token"].items():
            edge.add_metric([name], value)
        yield edge
        held = GaugeMetricFamily("m2cache_tier_bytes_held", "bytes held by the tier now", labels=["tier"])
        for tier, value in st["held_bytes"].items():
            held.add_metric([tier], value)
        yield held
        req = GaugeMetricFamily("m2cache_engine_requests", "requests the engine ended, by how", labels=["how"])
        for how, n in st["requests"].items():
            req.add_metric([how], n)
        yield req
        ex = self.engine.executor
        yield GaugeMetricFamily("m2cache_queue_depth", "requests waiting for their prefill", len(ex.pending))
        yield GaugeMetricFamily("m2cache_running_requests", "requests past their prefill, decoding", len(ex.active))


class ServeMetrics:
    """Everything ``/metrics`` shows, on its own registry (several servers may share one process in tests)."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("m2cache_requests", "requests by endpoint and outcome", ["endpoint", "outcome"],
                                registry=r)
        self.tokens = Counter("m2cache_generated_tokens", "tokens generated for clients", registry=r)
        self.ttft = Histogram("m2cache_time_to_first_token_seconds", "from request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("m2cache_inter_token_latency_seconds", "between two tokens of one stream",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("m2cache_requests_in_flight", "requests admitted and not finished", registry=r)
        self.loop_lag = Gauge("m2cache_event_loop_lag_seconds", "worst event-loop lag over the last 10 s",
                              registry=r)
        self.tasks = Gauge("m2cache_asyncio_tasks", "asyncio tasks alive in the server's event loop", registry=r)
        r.register(_EngineFigures(engine))
        self._lags: list[tuple[float, float]] = []

    def observe(self, gen: Any) -> None:
        self.tokens.inc(gen.completion_tokens)
        if gen.ttft_s is not None:
            self.ttft.observe(gen.ttft_s)
        for gap in gen.gaps_s:
            self.itl.observe(gap)

    async def watch_loop(self, period: float = 0.1, window: float = 10.0) -> None:
        """Samples how late the event loop wakes a sleeper; the gauge is the worst over ``window``."""
        while True:
            t = time.perf_counter()
            await asyncio.sleep(period)
            now = time.perf_counter()
            self._lags.append((now, max(0.0, now - t - period)))
            self._lags = [(ts, lag) for ts, lag in self._lags if now - ts <= window]
            self.loop_lag.set(max(lag for _, lag in self._lags))
            self.tasks.set(len(asyncio.all_tasks()))
