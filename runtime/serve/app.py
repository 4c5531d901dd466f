"""The ASGI app of ``m2cache serve``: OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models``, plus ``/health`` and ``/metrics``, over one open engine.

What bad input and bad luck get: a body that is not JSON, or a field of the wrong type -> 400 with
OpenAI's error body; a prompt plus ``max_tokens`` beyond the model's context -> 400 naming the limit;
more than ``max_requests`` admitted -> 429 with ``Retry-After``; a request that waited ``admit_timeout``
for room in the KV cache -> 503 with ``Retry-After``; an SSD error -> 500 (or, mid-stream, an error
event) naming the cause; the server draining -> 503 (mid-stream, an error event). A streamed request's
response starts with its first token, so each of those is still a status code until then. A client
that disconnects mid-stream cancels its request at the engine's next step.

With an API key (``--api-key``, or ``M2CACHE_API_KEY``), every ``/v1`` route answers 401 with OpenAI's
error body unless the request carries ``Authorization: Bearer KEY``; ``/health`` and ``/metrics`` too
unless they are named public. The key is compared in constant time and never logged or echoed.
"""
from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask

from m2cache.errors import ConfigError, EngineClosedError, M2CacheError, OverloadedError
from m2cache.serve import protocol as P
from m2cache.serve.generation import Generation
from m2cache.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: P.ErrorType = "invalid_request_error", *,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.headers = status, type_, param, headers

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(str(self), self.type, param=self.param), self.status, headers=self.headers)


PUBLIC_ROUTES = ("health", "metrics")  # what stays open with an API key unless told otherwise (as vLLM's)
RETRY_AFTER_S = "1"


class Server:
    """The app's state: the engine, admission, draining, metrics, the key."""

    def __init__(self, engine: Any, *, model_name: str, max_requests: int = 64, api_key: str | None = None,
                 public: tuple[str, ...] = PUBLIC_ROUTES) -> None:
        self.engine, self.model_name, self.max_requests = engine, model_name, max_requests
        self._key = api_key.encode() if api_key else None
        self.public = public
        self.context = int(engine.store.config.max_position_embeddings)
        self.metrics = ServeMetrics(engine)
        self.in_flight = 0
        self.draining = False

    def ticket(self, endpoint: str) -> "_Ticket":
        self.admit(endpoint)
        return _Ticket(self)

    # ---- admission -------------------------------------------------------------------------------
    def admit(self, endpoint: str) -> None:
        if self.draining:
            raise HTTPError(503, "the server is shutting down", "server_shutdown")
        if self.in_flight >= self.max_requests:
            self.metrics.requests.labels(endpoint, "rejected").inc()
            raise HTTPError(429, f"{self.in_flight} requests are already running or waiting (max_requests "
                                 f"{self.max_requests}); retry shortly", "rate_limit_error",
                            headers={"Retry-After": RETRY_AFTER_S})
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    def authorized(self, request: Request) -> bool:
        """No key, a public route, or ``Authorization: Bearer KEY`` (compared in constant time)."""
        if self._key is None:
            return True
        route = request.url.path.strip("/").split("/")[0]
        if route in self.public:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._key)

    def generation(self, req: P._Sampling, prompt_ids: list[int], max_tokens: int | None) -> Generation:
        if not prompt_ids:
            raise HTTPError(400, "the prompt is empty", param="prompt")
        room = self.context - len(prompt_ids)
        if room < 1:
            raise HTTPError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is {self.context} "
                                 "tokens", "invalid_request_error", param="messages")
        limit = max_tokens if max_tokens is not None else room
        if len(prompt_ids) + limit > self.context:
            raise HTTPError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({limit}) exceeds this "
                                 f"model's context of {self.context} tokens; ask for at most {room}",
                            param="max_tokens")
        return Generation(self.engine, prompt_ids, limit, req.temperature, req.top_p, req.seed, req.stops())


class _Ticket:
    """One admitted request's place; released exactly once, however the request ends (a stream whose
    client left before its first byte never runs its generator's ``finally``)."""

    def __init__(self, srv: Server) -> None:
        self.srv, self.held = srv, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.srv.release()


def create_app(engine: Any, *, model_name: str, max_requests: int = 64, api_key: str | None = None,
               public: tuple[str, ...] = PUBLIC_ROUTES) -> FastAPI:
    app = FastAPI(title="m2cache", docs_url=None, redoc_url=None, openapi_url=None)
    srv = Server(engine, model_name=model_name, max_requests=max_requests, api_key=api_key, public=public)
    app.state.m2cache = srv

    @app.middleware("http")
    async def _key(request: Request, call_next: Any) -> Response:
        if not srv.authorized(request):
            srv.metrics.requests.labels("any", "unauthorized").inc()
            return JSONResponse(P.error_body("a valid API key is needed: send the header 'Authorization: Bearer "
                                             "KEY' with the key the server was started with",
                                             code="invalid_api_key"), 401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        else:
            msg = f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(P.error_body(msg, param=where or None), 400)

    @app.exception_handler(HTTPError)
    async def _http(_: Request, exc: HTTPError) -> JSONResponse:
        return exc.response()

    @app.get("/health")
    async def health() -> JSONResponse:
        closed = srv.engine._closed or srv.draining
        body = {"status": "draining" if srv.draining else "closed" if closed else "ok",
                "in_flight": srv.in_flight}
        return JSONResponse(body, 503 if closed else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": srv.model_name, "object": "model", "created": 0, "owned_by": "m2cache"}]})

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest) -> Response:
        tok = srv.engine.tokenizer
        prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
        ids = list(prompt) if isinstance(prompt, list) else tok.encode(prompt, raw=True)
        if any(not isinstance(i, int) or not 0 <= i < tok.vocab_size for i in ids):
            raise HTTPError(400, f"token ids must be in [0, {tok.vocab_size})", param="prompt")
        return await _respond(srv, "completions", req, ids, req.limit(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatRequest) -> Response:
        tok = srv.engine.tokenizer
        text = tok.render_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        ids = tok.tok.encode(text, add_special_tokens=False).ids
        return await _respond(srv, "chat", req, ids, req.limit(), chat=True)

    return app


async def _respond(srv: Server, endpoint: str, req: P._Sampling, ids: list[int], max_tokens: int | None, *,
                   chat: bool) -> Response:
    gen = srv.generation(req, ids, max_tokens)
    ticket = srv.ticket(endpoint)
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    if req.stream:
        # the response starts with the first token: until then a failure (no room in time, an SSD error) is
        # still a status code a client and a load balancer understand, not an event in a 200 stream
        deltas = gen.deltas()
        try:
            first = await anext(deltas, None)
        except M2CacheError as e:
            ticket.release()
            srv.metrics.observe(gen)
            raise _failure(srv, endpoint, e) from e
        except BaseException:
            ticket.release()
            await deltas.aclose()
            raise
        return StreamingResponse(_stream(srv, endpoint, gen, deltas, first, rid, chat, ticket),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(ticket.release))
    try:
        text = "".join([d async for d in gen.deltas()])
    except M2CacheError as e:
        raise _failure(srv, endpoint, e) from e
    finally:
        ticket.release()
        srv.metrics.observe(gen)
    srv.metrics.requests.labels(endpoint, "ok").inc()
    use = P.usage(len(ids), gen.completion_tokens)
    body = (P.chat(rid, srv.model_name, text, gen.finish_reason, chunk=False, use=use) if chat
            else P.completion(rid, srv.model_name, text, gen.finish_reason, use=use))
    return JSONResponse(body)


def _failure(srv: Server, endpoint: str, e: M2CacheError) -> HTTPError:
    if isinstance(e, OverloadedError):
        srv.metrics.requests.labels(endpoint, "overloaded").inc()
        return HTTPError(503, f"the server is busy: {e}", "overloaded_error", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(e, EngineClosedError):
        srv.metrics.requests.labels(endpoint, "shutdown").inc()
        if srv.draining:  # the engine's own words name its actors: for the log, not the client
            log.info("request ended by the drain: %s", e)
            return HTTPError(503, "the server is shutting down; send the request again (to another server)",
                             "server_shutdown")
        return HTTPError(503, f"the server is shutting down ({e})", "server_shutdown")
    if isinstance(e, ConfigError):
        srv.metrics.requests.labels(endpoint, "invalid").inc()
        return HTTPError(400, str(e))
    srv.metrics.requests.labels(endpoint, "error").inc()
    log.error("request failed: %s", e)
    return HTTPError(500, f"{type(e).__name__}: {e}", "server_error")


def _sse(body: dict[str, Any] | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body, separators=(',', ':'))}\n\n".encode()


async def _stream(srv: Server, endpoint: str, gen: Generation, deltas: AsyncGenerator[str, None],
                  first: str | None, rid: str, chat: bool, ticket: _Ticket) -> AsyncIterator[bytes]:
    """The SSE events of a stream whose first delta (None: it had none) was already taken from ``deltas``."""
    name, outcome = srv.model_name, "disconnected"

    async def all_deltas() -> AsyncIterator[str]:
        if first is not None:
            yield first
            async for delta in deltas:
                yield delta

    try:
        if chat:
            yield _sse(P.chat(rid, name, "", None, chunk=True, first=True))
        try:
            async for delta in all_deltas():
                yield _sse(P.chat(rid, name, delta, None, chunk=True) if chat else P.completion(rid, name, delta, None))
        except M2CacheError as e:
            err = _failure(srv, endpoint, e)
            outcome = "failed"
            yield _sse(P.error_body(str(err), err.type))
            yield _sse("[DONE]")
            return
        use = P.usage(len(gen.prompt_ids), gen.completion_tokens)
        last = (P.chat(rid, name, "", gen.finish_reason, chunk=True, use=use) if chat
                else P.completion(rid, name, "", gen.finish_reason, use=use))
        yield _sse(last)
        yield _sse("[DONE]")
        outcome = "ok"
    finally:  # also when the client went away (the engine's request is then already cancelled)
        await deltas.aclose()  # a stream never iterated (the client left before its first byte) ends here
        ticket.release()
        srv.metrics.observe(gen)
        if outcome != "failed":
            srv.metrics.requests.labels(endpoint, outcome).inc()
