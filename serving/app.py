"""The HTTP API: ``/ask``, ``/search``, health, readiness, metrics and freshness.

Routes:

* ``POST /ask``: a grounded answer with numbered citations; with
  ``"stream": true``, server-sent events: ``token`` events as the model
  writes, then one ``done`` event holding the whole answer (citations,
  usage, timings), or an ``error`` event if the model fails part way.
* ``POST /search``: the ranked passages alone.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (model loaded,
  indexes open), ``GET /metrics`` (Prometheus), ``GET /freshness`` (per
  source: last sync, staleness, documents).

Every governed route (``/ask``, ``/search`` and the routers mounted beside
them: ``/v1/*``, ``/admin/*``) runs through the
:class:`~serving.gateway.core.Gateway`: identity, policy, loop guard and rate
limits before the work, budgets around the model call, one audit record
after it.

Errors are JSON ``{"error": message, "request_id": id}``: 400 for a
malformed request, 401 without a valid credential, 403 for a collection or
model the caller may not use, 404 for an unknown collection or model, 413
for a body over ``serve.max_request_bytes``, 422 for a body that does not
fit the schema, 429 (with ``Retry-After``) when a budget, rate limit or the
loop guard refuses, 502 when the model fails, 503 (with ``Retry-After``)
when every model target is down or a collection has no live generation yet.
Every request gets an id (the caller's ``X-Request-ID`` when it sends one),
returned in the ``X-Request-ID`` header, and one INFO log line.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingestion.errors import (
    AccessDenied,
    BudgetExceeded,
    CatalogError,
    GenerationError,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    RaglineError,
    RequestError,
    StreamBacklogged,
    Throttled,
    Unauthenticated,
)
from retrieval.config import SearchMode
from retrieval.filters import SearchFilters

from .gateway.core import Gateway, current_record
from .gateway.providers import TokenDelta
from .observability import Observer
from .service import AnswerService, AskOutcome

__all__ = ["AskRequest", "Readiness", "SearchRequest", "create_app"]

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# -- request and response bodies ---------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AskRequest(_Body):
    question: str = Field(description="The question, in plain words.")
    collection: str = Field(description="The collection to answer from.")
    top_k: int = Field(default=5, description="Passages to retrieve.")
    filters: SearchFilters | None = None
    mode: SearchMode | None = Field(
        default=None, description="dense, lexical or hybrid; unset uses the setting."
    )
    stream: bool = Field(default=False, description="Answer as server-sent events.")


class SearchRequest(_Body):
    query: str
    collection: str
    top_k: int = 5
    filters: SearchFilters | None = None
    mode: SearchMode | None = Field(
        default=None, description="dense, lexical or hybrid; unset uses the setting."
    )


class Citation(BaseModel):
    n: int
    doc_id: str
    chunk_id: str
    uri: str
    title: str | None
    score: float
    as_of: str | None = Field(description="When the cited source was read (ISO 8601).")


class TokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Timings(BaseModel):
    retrieve_ms: float
    generate_ms: float
    total_ms: float


class AskResponse(BaseModel):
    answer: str
    citations: list[Citation]
    usage: TokenUsage
    model: str
    request_id: str
    cached: bool
    timings: Timings


class SearchResult(BaseModel):
    uri: str
    doc_id: str
    chunk_id: str
    score: float
    text: str


class SearchResponse(BaseModel):
    results: list[SearchResult]


class Readiness:
    """Whether the service can answer now, with details for ``/readyz``."""

    def check(self) -> tuple[bool, dict[str, Any]]:
        return True, {}


# -- the app ------------------------------------------------------------------------


def create_app(
    service: AnswerService,
    *,
    observer: Observer,
    gateway: Gateway,
    readiness: Readiness | None = None,
    freshness: Callable[[], list[dict[str, Any]]] | None = None,
    max_request_bytes: int = 64 * 1024,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The FastAPI app over ``service``; ``routers`` of upper packages are mounted too.

    A router's ``lean_routes`` (plain Starlette routes serving its hottest
    paths, as :class:`~serving.openai_api.OpenAIRouter` has) are matched
    before every other route.
    """
    probe = readiness or Readiness()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if gateway.is_open:
            logger.warning(
                "the service runs open: no 'gateway.identity' (or 'serve.auth') "
                "section in the settings, so every caller is anonymous and sees "
                "public documents only"
            )
        if on_startup is not None:
            await on_startup()
        _freeze_startup_heap()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(
        title="ragline",
        summary="Grounded answers and search over your own documents.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(
        _RequestMiddleware, observer=observer, gateway=gateway, limit=max_request_bytes
    )
    _add_error_handlers(app)

    @app.post("/ask", response_model=AskResponse, responses={200: _SSE_RESPONSE})
    async def ask(body: AskRequest, request: Request) -> Any:
        """Answer a question from the passages the caller may see, with citations."""
        identity = await gateway.identify(request.headers)
        caller = gateway.caller(identity, body.collection)
        gateway.check_model(identity, gateway.ask_model)
        await gateway.guard(identity, "/ask", body.model_dump(mode="json"))
        request_id = _request_id(request)
        arguments: dict[str, Any] = {
            "top_k": body.top_k,
            "mode": body.mode,
            "filters": body.filters,
            "request_id": request_id,
        }
        _log_fields(request, user=caller.user, collection=body.collection)
        if not body.stream:
            outcome = await service.ask(
                body.question, body.collection, caller, **arguments
            )
            _log_outcome(request, outcome)
            _audit_outcome(outcome)
            return outcome.to_json()
        events = service.ask_stream(body.question, body.collection, caller, **arguments)
        # Pull the first event before answering, so that a bad request is a
        # 4xx and not an error event inside a 200.
        first = await anext(events)
        return StreamingResponse(
            _sse(request, first, events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/search", response_model=SearchResponse)
    async def search(body: SearchRequest, request: Request) -> Any:
        """The passages best matching a query, best first, without an answer."""
        identity = await gateway.identify(request.headers)
        caller = gateway.caller(identity, body.collection)
        await gateway.guard(identity, "/search", body.model_dump(mode="json"))
        _log_fields(request, user=caller.user, collection=body.collection)
        hits = await service.search(
            body.query,
            body.collection,
            caller,
            top_k=body.top_k,
            mode=body.mode,
            filters=body.filters,
        )
        _log_fields(request, results=len(hits))
        return {
            "results": [
                {
                    "uri": h.uri,
                    "doc_id": h.doc_id,
                    "chunk_id": h.chunk_id,
                    "score": h.score,
                    "text": h.text,
                }
                for h in hits
            ]
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up and answering."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Ready when the model is loaded and every live index is open."""
        ready, details = probe.check()
        return JSONResponse(
            {"ready": ready, **details}, status_code=200 if ready else 503
        )

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics: stage latencies, tokens, cache lookups, index size."""
        probe.check()
        return Response(observer.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/freshness")
    def freshness_route() -> dict[str, Any]:
        """Per source: the last successful sync, staleness in seconds, documents."""
        return {"sources": freshness() if freshness is not None else []}

    for router in routers:
        app.include_router(router)
    # Lean routes of hot paths are matched first, with one pattern each.
    app.router.routes[:0] = [
        route for router in routers for route in getattr(router, "lean_routes", ())
    ]
    return app


def _freeze_startup_heap() -> None:
    """Keeps what is alive once the service has started out of garbage collections.

    The libraries, models and indexes loaded by then live about as long as
    the process: half a million objects with the embedding model loaded,
    which every full collection would walk again, for a pause of hundreds of
    milliseconds every few thousand requests. Frozen, after one last
    collection so that no garbage is kept, they are never walked again;
    those that drop out of use later are still freed, unless caught in a
    reference cycle. Nothing is done when something is frozen already (an
    earlier app in the same process, or a server that froze before forking).
    """
    if gc.get_freeze_count():
        return
    gc.collect()
    gc.freeze()


_SSE_RESPONSE: dict[str, Any] = {
    "description": "With stream=true: server-sent events `token` ({text}), then "
    "`done` (the whole answer) or `error` ({error}).",
    "content": {"text/event-stream": {}},
}


async def _sse(
    request: Request,
    first: TokenDelta | AskOutcome,
    rest: AsyncIterator[TokenDelta | AskOutcome],
) -> AsyncIterator[str]:
    try:
        yield _event(request, first)
        async for event in rest:
            yield _event(request, event)
    except RaglineError as err:
        logger.warning(
            "stream failed: request_id=%s error=%s", _request_id(request), err
        )
        record = current_record()
        if record is not None:
            record.error = str(err)
        payload = {"error": str(err), "request_id": _request_id(request)}
        yield f"event: error\ndata: {json.dumps(payload)}\n\n"


def _audit_outcome(outcome: AskOutcome) -> None:
    """Add what only the answer knows to the request's audit record."""
    record = current_record()
    if record is None:
        return
    record.cache_hit = outcome.cached
    record.cited_chunk_ids = [c["chunk_id"] for c in outcome.citations]
    record.stages.update({k: v for k, v in outcome.timings.items() if k != "total_ms"})
    if outcome.cached:
        record.model = record.model or outcome.model


def _event(request: Request, event: TokenDelta | AskOutcome) -> str:
    if isinstance(event, TokenDelta):
        return f"event: token\ndata: {json.dumps({'text': event.text})}\n\n"
    _log_outcome(request, event)
    _audit_outcome(event)
    return f"event: done\ndata: {json.dumps(event.to_json())}\n\n"


def _log_fields(request: Request, **fields: Any) -> None:
    request.scope.setdefault("state", {}).setdefault("log", {}).update(fields)


def _log_outcome(request: Request, outcome: AskOutcome) -> None:
    _log_fields(
        request,
        cached=outcome.cache_kind or False,
        cited=len(outcome.citations),
        prompt_tokens=outcome.usage["prompt_tokens"],
        completion_tokens=outcome.usage["completion_tokens"],
    )


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


# -- errors -------------------------------------------------------------------------

_STATUS: tuple[tuple[type[RaglineError], int], ...] = (
    (Unauthenticated, 401),
    (AccessDenied, 403),
    (NotFound, 404),
    (RequestError, 400),
    (StreamBacklogged, 503),
    (Throttled, 429),
    (GenerationError, 503),
    (ProviderUnavailable, 503),
    (CatalogError, 503),
    (ProviderError, 502),
)


def _add_error_handlers(app: FastAPI) -> None:
    async def ragline_error(request: Request, exc: Exception) -> JSONResponse:
        status = next((s for t, s in _STATUS if isinstance(exc, t)), 500)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None and status in (429, 503):
            headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
        record = current_record()
        if record is not None and record.error is None:
            record.error = str(exc)
        if isinstance(exc, BudgetExceeded):
            return _error(
                request,
                status,
                str(exc),
                headers=headers,
                extra={
                    "budget": exc.budget,
                    "limit": exc.limit,
                    "spent": exc.spent,
                    "resets_at": _iso(exc.resets_at),
                },
            )
        if status >= 500:
            logger.warning(
                "request failed: request_id=%s status=%d error=%s",
                _request_id(request),
                status,
                exc,
            )
        return _error(request, status, str(exc), headers=headers)

    async def invalid_body(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [_describe(e) for e in exc.errors()]
        message = "The request body is not valid: " + "; ".join(problems) + "."
        return _error(request, 422, message, detail=problems)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers) if exc.headers else None
        return _error(request, exc.status_code, str(exc.detail), headers=headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error(
            "unexpected error: request_id=%s error=%s: %s",
            _request_id(request),
            exc.__class__.__name__,
            exc,
            exc_info=exc,
        )
        return _error(
            request,
            500,
            "The service failed unexpectedly; the log has the details under this "
            "request id.",
        )

    app.add_exception_handler(RaglineError, ragline_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    return f"{where or 'body'}: {error.get('msg', 'invalid')}"


def _error(
    request: Request,
    status: int,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    detail: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "request_id": _request_id(request)}
    if detail is not None:
        body["detail"] = detail
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


# -- middleware ---------------------------------------------------------------------


class _TooLarge(HTTPException):
    """A body over the limit, found while reading it (no Content-Length was sent)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large_message(limit))


def _too_large_message(limit: int) -> str:
    return (
        f"The request body is larger than {limit} bytes (serve.max_request_bytes); "
        "send a shorter one."
    )


class _RequestMiddleware:
    """Per request: its id, the body size limit, the audit record, metrics, a log line.

    One middleware does it all, since each ASGI layer costs a call and a
    wrapped ``send`` per request. The audit record of a governed route is
    open while the route runs (see :meth:`Gateway.open_record`) and written
    once the response has been sent, a stream's last event included, with
    the status the client got; an oversized body's 413 is audited too.
    """

    def __init__(
        self, app: ASGIApp, *, observer: Observer, gateway: Gateway, limit: int
    ) -> None:
        self._app = app
        self._observer = observer
        self._gateway = gateway
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming, length = _id_and_length(scope["headers"])
        request_id = incoming or _request_ids.new()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        path = scope["path"]
        opened = None
        if self._gateway.governs(path):
            opened = self._gateway.open_record(request_id, f"{scope['method']} {path}")
        status = 500
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), id_header]
                message = {**message, "headers": headers}
            await send(message)

        try:
            if length is not None and length > self._limit:
                await self._too_large(request_id, send_with_id)
            elif length is not None:  # the server reads no more than was declared
                await self._app(scope, receive, send_with_id)
            else:
                await self._app(scope, self._limited(receive), send_with_id)
        finally:
            if opened is not None:
                await self._gateway.close_record(*opened, status)
            self._finished(scope, request_id, status, time.perf_counter() - started)

    def _finished(
        self, scope: Scope, request_id: str, status: int, seconds: float
    ) -> None:
        route = scope["path"]
        self._observer.request_finished(route, status, seconds)
        if not logger.isEnabledFor(logging.INFO):
            return
        fields = scope["state"].get("log", {})
        logger.info(
            "request: request_id=%s method=%s route=%s status=%d ms=%.1f%s",
            request_id,
            scope.get("method", ""),
            route,
            status,
            1000 * seconds,
            "".join(f" {k}={v}" for k, v in fields.items()),
            extra={"request_id": request_id, "route": route, "status": status},
        )

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self._limit:
                    raise _TooLarge(self._limit)
            return message

        return limited

    async def _too_large(self, request_id: str, send: Send) -> None:
        record = current_record()
        if record is not None:
            record.error = _too_large_message(self._limit)
        body = json.dumps(
            {"error": _too_large_message(self._limit), "request_id": request_id}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _RequestIds:
    """New request ids: 32 hex digits, a random prefix per process and a counter.

    As unique as random ids across processes and restarts (64 random bits
    per process), without asking the system for randomness on every request:
    ``uuid4`` does, and the call lets other threads take the GIL. A forked
    child draws a prefix of its own.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"

    def _reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()


_request_ids = _RequestIds()


def _id_and_length(
    headers: Sequence[tuple[bytes, bytes]],
) -> tuple[str | None, int | None]:
    """The caller's valid ``X-Request-ID``, if any, and the declared body length."""
    request_id: str | None = None
    length: int | None = None
    seen_id = seen_length = False
    for name, value in headers:
        if name == b"content-length" and not seen_length:
            seen_length = True
            try:
                length = int(value)
            except ValueError:
                length = None
        elif name == b"x-request-id" and not seen_id:
            seen_id = True
            text = value.decode("latin-1")
            request_id = text if _REQUEST_ID.match(text) else None
    return request_id, length
