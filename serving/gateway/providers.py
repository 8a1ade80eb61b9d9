"""The seam between callers and the models that write answers.

A :class:`Provider` turns a :class:`GenerationRequest` into a
:class:`GenerationResult`, either at once (``generate``) or as a stream of
:class:`TokenDelta` events followed by the result (``stream``). The protocol
says nothing about transports: a model run in this process, an HTTP server and
the routing core that chooses between many of them all look the same to a
caller.

Every implementation keeps these promises:

- ``stream`` yields zero or more :class:`TokenDelta`, then exactly one
  :class:`GenerationResult`, last; the result's ``text`` is the deltas joined.
- ``usage`` holds the provider's own token counts, never an estimate made by
  the caller.
- A failure of the model or its transport raises
  :class:`~ingestion.errors.ProviderError`; a malformed request raises
  :class:`~ingestion.errors.RequestError` before anything is sent.
- Cancelling the awaiting task, or leaving a stream early, stops the work;
  neither is reported as an error.
- ``close`` releases the model or connection and may be called more than once;
  a closed provider refuses new requests.

:class:`ScriptedProvider` lives here, beside the protocol, for tests of
callers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

from ingestion.errors import ConfigError, ProviderError, RequestError

__all__ = [
    "Attempt",
    "ChatMessage",
    "GenerationRequest",
    "GenerationResult",
    "Provider",
    "Repacker",
    "Role",
    "ScriptedProvider",
    "StreamEvent",
    "TokenDelta",
    "Usage",
]

Role = Literal["system", "user", "assistant"]

Repacker: TypeAlias = Callable[[int, Callable[[str], int]], Sequence["ChatMessage"]]
"""(prompt token budget, token counter) -> messages that fit the budget."""

_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise RequestError(
                f"A chat message role must be one of {', '.join(_ROLES)}, "
                f"not {self.role!r}."
            )


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate from.

    ``max_tokens`` of ``None`` leaves the limit to the provider's default;
    ``model`` of ``None`` lets the provider (or the routing core) choose.
    ``metadata`` travels with the request for logging and accounting (request
    id, user, team, route) and never reaches the model. ``grammar`` is a GBNF
    grammar the answer should follow: a provider that can enforce one
    (llama.cpp) does; one that cannot sends the request without it, so callers
    must still check the answer's form.

    ``repack`` lets a caller that built the prompt from parts (retrieved
    passages) build it again for a smaller window: given a token budget for
    the prompt and a target's token counter, it returns messages that fit.
    A routing provider falling back to a target with a smaller context window
    calls it instead of failing the request.
    """

    messages: Sequence[ChatMessage]
    max_tokens: int | None = None
    temperature: float = 0.0
    stop: Sequence[str] = ()
    model: str | None = None
    grammar: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    repack: Repacker | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen here; one stop string
        # is one sequence, not a sequence of characters.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "messages", tuple(self.messages))
        object.__setattr__(self, "stop", stop)
        if not self.messages:
            raise RequestError("A generation request needs at least one message.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError(
                f"max_tokens must be at least 1 (or None), not {self.max_tokens}."
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(
                f"temperature must lie between 0 and 2, not {self.temperature}."
            )


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens read and written by the model for one request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of one target while serving a request, for the audit record.

    ``outcome`` is ``"ok"``, or what went wrong: ``"error"``, ``"timeout"``,
    ``"rate_limited"`` (the upstream said 429), ``"cancelled"``, or why the
    target was passed over without a call: ``"breaker_open"``,
    ``"saturated"`` (every concurrency slot busy) or ``"prompt_too_long"``
    (the prompt cannot fit its context window). ``status`` is the upstream's
    HTTP status when there was one.
    """

    target: str
    outcome: str
    latency_ms: float
    status: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The answer: its text, token usage, the model that wrote it and why it stopped.

    ``finish_reason`` is ``"stop"`` when the model ended the answer itself or
    hit a stop sequence, and ``"length"`` when ``max_tokens`` or the context
    window cut it short. ``attempts`` lists the targets a routing provider
    tried, in order, the last one being the one that answered; a provider
    with a single target leaves it empty.
    """

    text: str
    usage: Usage
    model: str
    finish_reason: str
    attempts: tuple[Attempt, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """A piece of the answer, as soon as the model has written it."""

    text: str


StreamEvent: TypeAlias = TokenDelta | GenerationResult


@runtime_checkable
class Provider(Protocol):
    """Generates chat answers; see the module docstring for the promises it keeps."""

    @property
    def name(self) -> str:
        """Names the provider target in logs and audit records."""

    @property
    def context_window(self) -> int:
        """How many tokens prompt and answer may take together."""

    def count_tokens(self, text: str) -> int:
        """How many of the model's tokens ``text`` takes, without special tokens."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole answer at once."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """The answer as it is written: deltas, then the result (an async generator)."""

    async def close(self) -> None:
        """Releases the model or connection; later requests fail."""


Script: TypeAlias = str | BaseException | Callable[[GenerationRequest], str]

_PIECES = re.compile(r"\s*\S+|\s+")


class ScriptedProvider:
    """A provider that answers from a script, for tests of callers.

    Each request takes the next item of ``script``: a string is the answer, an
    exception is raised, a callable is asked for the answer. The last item
    repeats once the script runs out. Tokens are whitespace-separated words,
    and ``delay`` seconds pass before each answer (and between the deltas of a
    stream, divided among them), so time-outs can be tested. Every request is
    kept in ``requests``.
    """

    def __init__(
        self,
        script: Iterable[Script] = ("I don't know.",),
        *,
        name: str = "scripted",
        model: str = "scripted-model",
        context_window: int = 2048,
        delay: float = 0.0,
    ) -> None:
        self._script = list(script)
        if not self._script:
            raise ConfigError("A ScriptedProvider needs at least one scripted item.")
        self._name = name
        self._model = model
        self._context_window = context_window
        self.delay = delay
        self.requests: list[GenerationRequest] = []
        self.closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def context_window(self) -> int:
        return self._context_window

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        answer = self._next_answer(request)
        await asyncio.sleep(self.delay)
        return self._result(request, answer)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        answer = self._next_answer(request)
        result = self._result(request, answer)
        pieces = _PIECES.findall(result.text) or [""]
        for piece in pieces:
            await asyncio.sleep(self.delay / len(pieces))
            if piece:
                yield TokenDelta(piece)
        yield result

    async def close(self) -> None:
        self.closed = True

    def _next_answer(self, request: GenerationRequest) -> str:
        if self.closed:
            raise ProviderError(f"The provider {self._name!r} is closed.")
        self.requests.append(request)
        item = self._script.pop(0) if len(self._script) > 1 else self._script[0]
        if isinstance(item, BaseException):
            raise item
        if callable(item):
            return item(request)
        return item

    def _result(self, request: GenerationRequest, answer: str) -> GenerationResult:
        limit = request.max_tokens
        finish_reason = "stop"
        if limit is not None and self.count_tokens(answer) > limit:
            answer = "".join(_PIECES.findall(answer)[:limit])
            finish_reason = "length"
        prompt = sum(self.count_tokens(m.content) for m in request.messages)
        return GenerationResult(
            text=answer,
            usage=Usage(prompt, self.count_tokens(answer)),
            model=request.model or self._model,
            finish_reason=finish_reason,
        )
