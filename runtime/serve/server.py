"""``m2cache serve``: one engine behind uvicorn, on the caller's event loop (uvloop from the CLI).

Shutdown (SIGTERM or SIGINT) drains: the engine closes, so every running stream ends with an error event at
its next step; the server goes on answering for ``drain_s`` more (new requests get 503, ``/health`` says
"draining", so a client or a load balancer learns why), and uvicorn then closes the connections. A second
signal stops at once. Nothing waits on a stream that will not end.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from m2cache.engine.engine import Engine
from m2cache.serve.app import PUBLIC_ROUTES, create_app

log = logging.getLogger(__name__)


async def serve(store_dir: str | Path, config: Any, *, host: str = "127.0.0.1", port: int = 8000,
                max_requests: int = 64, model_name: str | None = None, graceful_s: int = 10,
                on_ready: Callable[[str, int], None] | None = None, api_key: str | None = None,
                public: tuple[str, ...] | None = None, drain_s: float = 2.0) -> None:
    """Serves until a signal; ``on_ready(host, port)`` once it accepts (``port`` 0 picks a free one).
    ``api_key``: every ``/v1`` route (and ``/health``, ``/metrics`` unless in ``public``) needs it."""
    async with Engine.open(store_dir, config) as engine:
        name = model_name or Path(store_dir).resolve().parent.name
        app = create_app(engine, model_name=name, max_requests=max_requests, api_key=api_key,
                         public=PUBLIC_ROUTES if public is None else public)
        state = app.state.m2cache
        # everything built so far (torch, the engine, the app) lives as long as the server: frozen out of
        # the collector, a full collection no longer walks it (measured: 30-70 ms gen-2 pauses on the loop)
        gc.collect()
        gc.freeze()
        uv = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=graceful_s, access_log=False)
        server = DrainingServer(uv, state, drain_s)
        watch = asyncio.create_task(state.metrics.watch_loop(), name="m2cache-serve-loop-lag")
        announce = asyncio.create_task(_announce(server, host, on_ready), name="m2cache-serve-announce")
        # uvicorn re-raises a captured signal once it has shut down; after a drain SIGTERM has done its
        # job, so that re-raise meets a handler that does nothing and the process exits normally
        main = threading.current_thread() is threading.main_thread()  # only there can handlers be set
        before = signal.signal(signal.SIGTERM, _drained) if main else None
        try:
            await server.serve()
        finally:
            if main:
                signal.signal(signal.SIGTERM, before)
            for task in (watch, announce):
                task.cancel()
            await asyncio.gather(watch, announce, return_exceptions=True)
            if server.closing is not None:
                await server.closing


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining before its own shutdown: uvicorn calls ``handle_exit`` from its signal
    handler; the first signal schedules the drain on the loop, which hands the exit to uvicorn once the
    engine is closed and ``drain_s`` have passed; a second one exits at once."""

    def __init__(self, config: uvicorn.Config, state: Any, drain_s: float = 2.0) -> None:
        super().__init__(config)
        self.state, self.drain_s = state, drain_s
        self.closing: asyncio.Task | None = None
        self.loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.state.draining:
            super().handle_exit(sig, frame)
            return
        self.state.draining = True  # from here every new request gets 503 (set here: no request slips in)
        self.loop.call_soon_threadsafe(self._drain, sig, frame)

    def _drain(self, sig: int, frame: Any) -> None:
        log.warning("m2cache serve: draining (signal %s): running streams end with an error event, new requests "
                    "get 503 for %.1f s", sig, self.drain_s)
        self.closing = asyncio.get_running_loop().create_task(self._close_then_exit(sig, frame),
                                                              name="m2cache-serve-drain")

    async def _close_then_exit(self, sig: int, frame: Any) -> None:
        try:
            await self.state.engine.close()
            await asyncio.sleep(self.drain_s)
        finally:
            uvicorn.Server.handle_exit(self, sig, frame)


def _drained(sig: int, frame: Any) -> None:
    log.info("signal %s: drained", sig)


async def _announce(server: uvicorn.Server, host: str, on_ready: Callable[[str, int], None] | None) -> None:
    while not server.started:
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    log.info("listening on http://%s:%d", host, port)
    if on_ready is not None:
        on_ready(host, port)
