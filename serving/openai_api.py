"""The OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Any OpenAI client can call ragline's models through the governed core: the
same identity, policy, limits, budgets and audit as ``/ask``. ``model`` is a
virtual model of the gateway, or ``rag/<collection>``, which answers the last
user message from that collection the way ``/ask`` does and adds the
citations to the response (``citations``, beside ``choices``).

Streaming follows the OpenAI format: ``chat.completion.chunk`` events, a last
chunk with the ``finish_reason``, a usage chunk when the client asks for one
(``stream_options.include_usage``), then ``data: [DONE]``.

``POST /v1/chat/completions`` is the gateway's hot path, so the router
carries a lean route for it (:attr:`OpenAIRouter.lean_routes`): a plain
Starlette route that the app matches before any other, which validates the
body as FastAPI would and writes the answer's JSON directly, past FastAPI's
per-request dependency, validation and serialization machinery. The
documented FastAPI route of the same path stays, for the OpenAPI schema and
for apps that include the router without its lean routes; both run the same
code and answer alike, invalid bodies included (422, with each problem's
place in the body).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.routing import BaseRoute, Route

from ingestion.errors import RaglineError, RequestError

from .gateway.core import Gateway, current_record
from .gateway.identity import Identity
from .gateway.providers import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    StreamEvent,
    TokenDelta,
)
from .service import AnswerService, AskOutcome

__all__ = ["RAG_PREFIX", "ChatCompletionRequest", "OpenAIRouter", "openai_router"]

RAG_PREFIX = "rag/"

# Answers' JSON, as FastAPI's JSONResponse writes it, with the encoder made once.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    """A message of the conversation; content is text or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields ragline honours; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="A virtual model, or rag/<collection>.")
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice is written.")
    user: str | None = None


class OpenAIRouter(APIRouter):
    """The ``/v1`` routes, with the lean routes that serve the hottest of them.

    ``lean_routes`` are plain Starlette routes, with full paths, for the app
    to match before any other route (:func:`serving.app.create_app` does);
    the router's own documented routes serve the same paths wherever it is
    included without them.
    """

    lean_routes: list[BaseRoute]


def openai_router(service: AnswerService, gateway: Gateway) -> OpenAIRouter:
    """The ``/v1`` routes over the answer service and the gateway."""
    router = OpenAIRouter(prefix="/v1", tags=["OpenAI-compatible"])
    completions = _ChatCompletions(service, gateway)
    router.lean_routes = [
        Route(
            "/v1/chat/completions",
            completions.lean_endpoint,
            methods=["POST"],
            include_in_schema=False,
        )
    ]

    @router.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        """The virtual models and ``rag/<collection>`` models the caller may use."""
        identity = await gateway.identify(request.headers)
        policy = gateway.policy
        names = [
            m
            for m in gateway.router.models()
            if policy.decide_model(identity, m).allowed
        ]
        if policy.decide_model(identity, gateway.ask_model).allowed:
            names += [
                RAG_PREFIX + c
                for c in service.collections()
                if policy.decide_collection(identity, c).allowed
            ]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "ragline"}
                for n in names
            ],
        }

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """A chat completion from a virtual model, or an answer from a collection."""
        return await completions.answer(body, request)

    return router


class _ChatCompletions:
    """``POST /v1/chat/completions``, behind both of its routes."""

    def __init__(self, service: AnswerService, gateway: Gateway) -> None:
        self._service = service
        self._gateway = gateway

    async def lean_endpoint(self, request: Request) -> Response:
        """The lean route: the body parsed and the answer written without FastAPI."""
        body = _parsed_body(await request.body(), request.headers.get("content-type"))
        answer = await self.answer(body, request)
        if isinstance(answer, Response):
            return answer
        return Response(_JSON.encode(answer).encode(), media_type="application/json")

    async def answer(
        self, body: ChatCompletionRequest, request: Request
    ) -> dict[str, Any] | StreamingResponse:
        """A chat completion from a virtual model, or an answer from a collection."""
        gateway = self._gateway
        identity = await gateway.identify(request.headers)
        request_id = str(request.scope.get("state", {}).get("request_id", ""))
        completion_id = f"chatcmpl-{request_id or time.time_ns()}"
        if body.model.startswith(RAG_PREFIX):
            return await self._rag_answer(body, identity, request_id, completion_id)

        gateway.check_model(identity, body.model)
        await gateway.guard(identity, "/v1/chat/completions", _fingerprint(body))
        generation = GenerationRequest(
            messages=[_message(m) for m in body.messages],
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            stop=[body.stop] if isinstance(body.stop, str) else (body.stop or ()),
            model=body.model,
            metadata={
                "request_id": request_id,
                "user": identity.user,
                "team": identity.team,
            },
        )
        if not body.stream:
            result = await gateway.provider.generate(generation)
            return _completion(completion_id, body.model, result)
        events = gateway.provider.stream(generation)
        first = await anext(events)
        return _sse(_model_chunks(completion_id, body, first, events))

    async def _rag_answer(
        self,
        body: ChatCompletionRequest,
        identity: Identity,
        request_id: str,
        completion_id: str,
    ) -> dict[str, Any] | StreamingResponse:
        gateway, service = self._gateway, self._service
        collection = body.model[len(RAG_PREFIX) :]
        caller = gateway.caller(identity, collection)
        gateway.check_model(identity, gateway.ask_model)
        await gateway.guard(identity, "/v1/chat/completions", _fingerprint(body))
        question = _last_user_message(body)
        if not body.stream:
            outcome = await service.ask(
                question, collection, caller, request_id=request_id
            )
            _audit_outcome(outcome)
            return _completion(completion_id, body.model, outcome)
        answers = service.ask_stream(
            question, collection, caller, request_id=request_id
        )
        first_answer = await anext(answers)
        return _sse(_rag_chunks(completion_id, body, first_answer, answers))


# -- requests -----------------------------------------------------------------------


def _parsed_body(raw: bytes, content_type: str | None) -> ChatCompletionRequest:
    """The request body, validated; ``RequestValidationError`` (422) as FastAPI raises.

    As FastAPI judges a body parameter: an empty body is missing; a body is
    read as JSON only when its Content-Type says JSON (a missing one does
    not, which keeps cross-site form posts out); the rest is validated as
    Python data, each problem's place starting with ``body``.
    """
    if not raw:
        problem = {"type": "missing", "loc": ("body",), "msg": "Field required"}
        raise RequestValidationError([{**problem, "input": None}], body=raw)
    data: Any = raw
    if content_type and _is_json(content_type):
        try:
            data = json.loads(raw)
        except ValueError as err:  # not JSON, or not UTF-8
            raise _not_json(raw, err) from err
    try:
        return ChatCompletionRequest.model_validate(data, from_attributes=True)
    except ValidationError as err:
        problems = [
            {**problem, "loc": ("body", *problem["loc"])}
            for problem in err.errors(include_url=False)
        ]
        raise RequestValidationError(problems, body=data) from err


def _not_json(raw: bytes, err: ValueError) -> RequestValidationError:
    """The 422 of a body that does not parse, where it stops parsing."""
    problem = {
        "type": "json_invalid",
        "loc": ("body", getattr(err, "pos", 0)),
        "msg": "JSON decode error",
        "input": {},
        "ctx": {"error": getattr(err, "msg", str(err))},
    }
    return RequestValidationError([problem], body=raw)


def _is_json(content_type: str) -> bool:
    """Whether a Content-Type names JSON (``application/json``, ``…+json``)."""
    media = content_type.partition(";")[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _message(message: ChatMessageIn) -> ChatMessage:
    role = "system" if message.role == "developer" else message.role
    return ChatMessage(role, message.text())


def _last_user_message(body: ChatCompletionRequest) -> str:
    for message in reversed(body.messages):
        if message.role == "user":
            return message.text()
    raise RequestError(
        "A rag/<collection> model answers the last user message, and the "
        "request has none; add a message with role 'user'."
    )


def _fingerprint(body: ChatCompletionRequest) -> dict[str, Any]:
    return body.model_dump(mode="json", exclude={"stream", "stream_options", "user"})


def _audit_outcome(outcome: AskOutcome) -> None:
    record = current_record()
    if record is not None:
        record.cache_hit = outcome.cached
        record.cited_chunk_ids = [c["chunk_id"] for c in outcome.citations]


# -- responses ----------------------------------------------------------------------


def _completion(
    completion_id: str, model: str, answer: GenerationResult | AskOutcome
) -> dict[str, Any]:
    if isinstance(answer, AskOutcome):
        text, finish = answer.answer, "stop"
        usage = answer.usage
        extra: dict[str, Any] = {"citations": answer.citations}
    else:
        text, finish = answer.text, answer.finish_reason
        usage = {
            "prompt_tokens": answer.usage.prompt_tokens,
            "completion_tokens": answer.usage.completion_tokens,
        }
        extra = {}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
        "usage": _usage(usage),
        **extra,
    }


def _usage(usage: dict[str, int]) -> dict[str, int]:
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chunk(
    completion_id: str,
    model: str,
    delta: dict[str, Any],
    finish: str | None = None,
    **extra: Any,
) -> str:
    payload = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return f"data: {json.dumps(payload)}\n\n"


def _usage_chunk(completion_id: str, model: str, usage: dict[str, int]) -> str:
    payload = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": _usage(usage),
    }
    return f"data: {json.dumps(payload)}\n\n"


async def _model_chunks(
    completion_id: str,
    body: ChatCompletionRequest,
    first: StreamEvent,
    rest: AsyncIterator[StreamEvent],
) -> AsyncIterator[str]:
    async def events() -> AsyncIterator[StreamEvent]:
        yield first
        async for event in rest:
            yield event

    yield _chunk(completion_id, body.model, {"role": "assistant", "content": ""})
    async for event in events():
        if isinstance(event, TokenDelta):
            yield _chunk(completion_id, body.model, {"content": event.text})
            continue
        yield _chunk(completion_id, body.model, {}, event.finish_reason)
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = {
                "prompt_tokens": event.usage.prompt_tokens,
                "completion_tokens": event.usage.completion_tokens,
            }
            yield _usage_chunk(completion_id, body.model, usage)


async def _rag_chunks(
    completion_id: str,
    body: ChatCompletionRequest,
    first: TokenDelta | AskOutcome,
    rest: AsyncIterator[TokenDelta | AskOutcome],
) -> AsyncIterator[str]:
    async def events() -> AsyncIterator[TokenDelta | AskOutcome]:
        yield first
        async for event in rest:
            yield event

    yield _chunk(completion_id, body.model, {"role": "assistant", "content": ""})
    async for event in events():
        if isinstance(event, TokenDelta):
            yield _chunk(completion_id, body.model, {"content": event.text})
            continue
        _audit_outcome(event)
        yield _chunk(completion_id, body.model, {}, "stop", citations=event.citations)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _usage_chunk(completion_id, body.model, event.usage)


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    async def framed() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except RaglineError as err:
            record = current_record()
            if record is not None:
                record.error = str(err)
            payload = {"error": {"message": str(err), "type": type(err).__name__}}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        framed(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
