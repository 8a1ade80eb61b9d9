"""What the HTTP providers share: settings, a pooled client, deadlines and errors.

:class:`HttpProvider` is the base of the providers that call a model server
over HTTP (:mod:`serving.gateway.openai_compat`, :mod:`serving.gateway.anthropic`).
It owns one :class:`httpx.AsyncClient` with a bounded connection pool, sends
each request, reads the answer whole or as server-sent events, and turns
every failure into :class:`~ingestion.errors.UpstreamError`. A subclass only
speaks its API: it builds the request body, reads a whole answer, and reads
the events of a stream.

What holds here:

- Three clocks bound every call. ``connect_timeout`` bounds opening a
  connection. ``first_token_timeout`` bounds, for a stream, the time from the
  start of the call to the first piece of answer text (response headers
  included). ``total_timeout`` bounds the whole call, reading the answer
  included. A whole answer (``generate``) arrives only once the upstream has
  written all of it, so its wait is bounded by ``total_timeout`` alone.
  The deadlines are applied around each read, never across a ``yield``, so
  they never cancel the caller's own work between two deltas (that work does
  count against ``total_timeout``).
- Every failure of the upstream or its transport raises ``UpstreamError``
  with ``status``, ``retry_after`` (from ``Retry-After`` or
  ``retry-after-ms``) and ``retryable`` (timeouts, connection errors, 408,
  409, 429 and 5xx; not other 4xx). A malformed answer is one too. Messages
  name the target, the endpoint and what happened, with a short excerpt of
  the upstream's error text.
- Secrets stay out of logs and messages: the API key is only ever a request
  header; excerpts have the key, bearer tokens and key-shaped strings
  masked; endpoints are shown without user info or query string; headers
  are never logged.
- Cancelling the caller's task, or leaving a stream early, closes the
  upstream response and its connection; servers that watch for a client
  going away (vLLM, the llama.cpp servers while streaming) then stop.
- A provider belongs to the event loop that first uses it: httpx pools
  connections per loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Mapping
from datetime import UTC
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator

from ingestion.config import NAME_PATTERN, StrictModel
from ingestion.errors import ProviderError, UpstreamError

from .providers import (
    GenerationRequest,
    GenerationResult,
    StreamEvent,
    TokenDelta,
    Usage,
)

__all__ = [
    "HttpProvider",
    "HttpProviderConfig",
    "StreamState",
    "identity_headers",
    "is_retryable_status",
    "parse_retry_after",
    "secret_free_excerpt",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_EXCERPT_CHARS = 240
_SECRET_MIN_CHARS = 8
_ERROR_BODY_BYTES = 8192
# Printable ASCII except "%": header values keep these as they are.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_TOKEN_SHAPES = re.compile(
    r"(?i)(bearer\s+)[^\s\"',]+"
    r"|\b(sk|pk|rk)-[A-Za-z0-9_-]{6,}"
    r"|((?:api[_-]?key|token|secret|password)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"
)
_IDENTITY_HEADERS = (
    ("user", "X-Ragline-User"),
    ("team", "X-Ragline-Team"),
    ("request_id", "X-Request-ID"),
)
_STATUS_HINTS = {
    401: " Check the api_key of this target.",
    403: " Check the api_key of this target and what it may use.",
    404: " Check base_url and model of this target.",
}


class HttpProviderConfig(StrictModel):
    """What every provider that calls a model server over HTTP needs."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Names the target in logs, metrics and audit records.",
    )
    base_url: str = Field(
        description="The API's root URL, such as http://127.0.0.1:8000/v1; "
        "endpoint paths are appended to it."
    )
    model: str = Field(
        min_length=1, description="The model's name as the upstream knows it."
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="Credential sent with every request; never logged. Unset "
        "sends none.",
    )
    context_window: int = Field(
        ge=256, description="Tokens the model takes, prompt and answer together."
    )
    max_tokens: int = Field(
        default=256, ge=1, description="Answer length when a request sets none."
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, description="Seconds to open a connection."
    )
    first_token_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds from the start of a streamed call to the first "
        "piece of answer text, response headers included.",
    )
    total_timeout: float = Field(
        default=120.0,
        gt=0,
        description="Seconds the whole call may take, reading the answer "
        "included; the only bound on a non-streamed answer, which the upstream "
        "sends only once it has written all of it.",
    )
    health_timeout: float = Field(
        default=2.0, gt=0, description="Seconds the health probe may take."
    )
    max_connections: int = Field(
        default=100, ge=1, description="Open connections to the upstream, at most."
    )
    max_keepalive_connections: int = Field(
        default=20, ge=0, description="Idle connections kept open for reuse."
    )
    keepalive_expiry: float = Field(
        default=30.0, ge=0, description="Seconds an idle connection is kept."
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Static headers sent with every request; never logged.",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields added to every request body, for sampling settings "
        "the upstream has beyond the common ones (top_k, repeat_penalty); the "
        "fields the provider sets itself take precedence.",
    )
    forward_identity: bool = Field(
        default=False,
        description="Send the request's user, team and request id as the "
        "X-Ragline-User, X-Ragline-Team and X-Request-ID headers.",
    )
    chars_per_token: float = Field(
        default=4.0,
        ge=1.0,
        le=16.0,
        description="Characters per token of the token estimate used for "
        "packing prompts; lower it for code or non-English text.",
    )
    trust_env: bool = Field(
        default=True,
        description="Take proxy and certificate settings from the environment "
        "(HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE).",
    )

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as err:
            raise ValueError(f"base_url is not a valid URL: {err}") from err
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"base_url must be an http:// or https:// URL such as "
                f"http://127.0.0.1:8000/v1, not {_display_url(value)!r}"
            )
        return value if url.query else value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if any(c in text for c in "\r\n\0"):
                raise ValueError(f"the value of header {name!r} has a line break")
        return value

    @model_validator(mode="after")
    def _check_timeouts(self) -> HttpProviderConfig:
        if self.first_token_timeout > self.total_timeout:
            raise ValueError(
                f"first_token_timeout ({self.first_token_timeout:g} s) must not "
                f"exceed total_timeout ({self.total_timeout:g} s)"
            )
        return self


class StreamState(Protocol):
    """What a provider knows of one stream so far; it reads the stream's events.

    ``feed`` takes one decoded event and returns the answer text it carries,
    if any; it raises :class:`UpstreamError` for an error event and
    ``KeyError``, ``TypeError`` or ``ValueError`` for a malformed one.
    ``finished`` turns true at the event that ends the stream (for APIs that
    have one); ``complete`` turns true once the upstream has said why the
    answer ended. A stream that closes, or sends ``data: [DONE]``, before
    either is refused as cut short.
    """

    @property
    def finished(self) -> bool: ...

    @property
    def complete(self) -> bool: ...

    def feed(self, event: Any) -> str | None: ...

    def result(self) -> GenerationResult: ...


class HttpProvider:
    """Calls a model server over HTTP; see the module docstring.

    Subclasses set ``endpoint`` and ``health_endpoint`` (paths below
    ``base_url``) and implement :meth:`_auth_headers`, :meth:`_body`,
    :meth:`_answer` and :meth:`_stream_state`.
    """

    endpoint = ""
    health_endpoint = ""

    def __init__(self, config: HttpProviderConfig) -> None:
        self._config = config
        self._url = _endpoint_url(config.base_url, self.endpoint)
        self._where = f"POST {_display_url(self._url)}"
        key = config.api_key.get_secret_value() if config.api_key else ""
        # Header values may be credentials too; short ones would mask too much.
        values = (key, *config.headers.values())
        self._secrets = tuple(v for v in values if len(v) >= _SECRET_MIN_CHARS)
        self._client = httpx.AsyncClient(
            headers={"user-agent": "ragline", **config.headers, **self._auth_headers()},
            timeout=httpx.Timeout(None, connect=config.connect_timeout),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_keepalive_connections,
                keepalive_expiry=config.keepalive_expiry,
            ),
            trust_env=config.trust_env,
        )
        self._closed = False

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def model(self) -> str:
        """The model's name as the upstream knows it."""
        return self._config.model

    @property
    def context_window(self) -> int:
        return self._config.context_window

    @property
    def closed(self) -> bool:
        return self._closed

    def count_tokens(self, text: str) -> int:
        """An estimate: characters divided by ``chars_per_token``, rounded up.

        It costs nothing and never waits for the network. Measured with
        SmolLM2's tokenizer (49k tokens), pages of the Python manual take 3.7
        to 4.5 characters per token and plain English prose about 5, so the
        default of 4 lands within about 25 % of the true count, above it for
        prose and up to about 10 % below it for text full of code. Leave that
        margin when packing a prompt to the brim; lower ``chars_per_token``
        for code or non-Latin scripts, which take more tokens per character.
        """
        return math.ceil(len(text) / self._config.chars_per_token)

    async def health(self) -> bool:
        """Whether the upstream answers a cheap request (GET of its model list).

        Never raises for an upstream failure; a closed provider is unhealthy.
        """
        if self._closed:
            return False
        url = _endpoint_url(self._config.base_url, self.health_endpoint)
        try:
            response = await self._client.get(
                url, timeout=httpx.Timeout(self._config.health_timeout)
            )
        except (httpx.HTTPError, RuntimeError) as err:  # RuntimeError: closed
            logger.debug(
                "health probe failed: target=%s error=%s", self.name, type(err).__name__
            )
            return False
        if not response.is_success:
            logger.debug(
                "health probe failed: target=%s status=%d",
                self.name,
                response.status_code,
            )
        return response.is_success

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self._check_open()
        body = self._body(request, stream=False)
        started = time.perf_counter()
        deadline = _Deadline(self._config, streamed=False)
        try:
            response = await self._send(body, request, deadline)
            try:
                raw = await self._await(response.aread(), deadline)
            finally:
                await response.aclose()
            result = self._read_answer(raw, request)
        except UpstreamError as err:
            self._log_failed(request, err, started, streamed=False)
            raise
        self._log_done(request, result, started, streamed=False)
        return result

    async def stream(
        self, request: GenerationRequest
    ) -> AsyncGenerator[StreamEvent, None]:
        self._check_open()
        body = self._body(request, stream=True)
        state = self._stream_state(request)
        started = time.perf_counter()
        deadline = _Deadline(self._config, streamed=True)
        try:
            response = await self._send(body, request, deadline)
            events = _EventReader(self, response, state, deadline)
            try:
                while (piece := await events.next_piece()) is not None:
                    yield TokenDelta(piece)
            finally:
                await events.aclose()
            result = state.result()
        except UpstreamError as err:
            self._log_failed(request, err, started, streamed=True)
            raise
        self._log_done(request, result, started, streamed=True)
        yield result

    async def close(self) -> None:
        """Closes the connection pool; later requests raise ``ProviderError``."""
        self._closed = True
        await self._client.aclose()

    # What a subclass provides.

    def _auth_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _body(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _answer(self, data: Any, request: GenerationRequest) -> GenerationResult:
        raise NotImplementedError

    def _stream_state(self, request: GenerationRequest) -> StreamState:
        raise NotImplementedError

    # Helpers for subclasses.

    def _estimated_usage(
        self, request: GenerationRequest, completion_tokens: int
    ) -> Usage:
        """Usage for an upstream that reported none: the prompt estimated."""
        prompt = sum(self.count_tokens(m.content) for m in request.messages)
        return Usage(prompt, completion_tokens)

    def _error(
        self,
        what: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        retryable: bool = True,
    ) -> UpstreamError:
        """An ``UpstreamError`` whose message names this target and its endpoint."""
        return UpstreamError(
            f"The upstream {self.name!r} ({self._where}) {what}",
            status=status,
            retry_after=retry_after,
            retryable=retryable,
        )

    def _reported_error(self, error: Any, status: int | None) -> UpstreamError:
        """The error an upstream reported inside an answer or a stream."""
        text = secret_free_excerpt(json.dumps({"error": error}), self._secrets)
        retryable = True if status is None else is_retryable_status(status)
        return self._error(
            f"reported an error: {text}.", status=status, retryable=retryable
        )

    # The machinery.

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError(
                f"The provider {self.name!r} is closed; create a new one to send "
                "requests."
            )

    def _request_headers(self, request: GenerationRequest) -> dict[str, str] | None:
        if not self._config.forward_identity:
            return None
        return identity_headers(request.metadata)

    async def _send(
        self, body: dict[str, Any], request: GenerationRequest, deadline: _Deadline
    ) -> httpx.Response:
        """Sends the request; the response once its headers said success."""
        outgoing = self._client.build_request(
            "POST", self._url, json=body, headers=self._request_headers(request)
        )
        try:
            response = await self._await(
                self._client.send(outgoing, stream=True), deadline
            )
        except UpstreamError:
            raise
        except RuntimeError as err:  # httpx refuses: the client was closed meanwhile
            self._check_open()
            raise self._error(f"could not be called: {err}.") from err
        if response.is_success:
            return response
        try:
            raw = await self._await(_read_capped(response), deadline)
        finally:
            await response.aclose()
        raise self._status_error(response, raw)

    async def _await(self, awaitable: Awaitable[_T], deadline: _Deadline) -> _T:
        """Awaits one step of the call within its deadline, mapping httpx failures."""
        at, clock = deadline.current()
        try:
            async with asyncio.timeout_at(at):
                return await awaitable
        except TimeoutError as err:
            raise self._timed_out(clock) from err
        except httpx.ConnectTimeout as err:
            raise self._error(
                f"did not accept a connection within connect_timeout="
                f"{self._config.connect_timeout:g} s. Check that the server runs "
                "and that base_url is right."
            ) from err
        except httpx.ConnectError as err:
            raise self._error(
                f"could not be connected to ({_describe(err)}). Check that the "
                "server runs and that base_url is right."
            ) from err
        except httpx.TransportError as err:
            raise self._error(f"broke the connection ({_describe(err)}).") from err
        except httpx.HTTPError as err:  # an undecodable body, a misused stream
            raise self._error(f"could not be read ({_describe(err)}).") from err

    def _timed_out(self, clock: str) -> UpstreamError:
        if clock == "first_token":
            limit = self._config.first_token_timeout
            return self._error(
                f"sent no answer text within first_token_timeout={limit:g} s."
            )
        limit = self._config.total_timeout
        return self._error(f"did not finish within total_timeout={limit:g} s.")

    def _status_error(self, response: httpx.Response, raw: bytes) -> UpstreamError:
        status = response.status_code
        retry_after = parse_retry_after(
            response.headers.get("retry-after"), response.headers.get("retry-after-ms")
        )
        text = secret_free_excerpt(raw.decode("utf-8", "replace"), self._secrets)
        wait = (
            f" It asked to wait {retry_after:g} s before trying again."
            if retry_after is not None
            else ""
        )
        reason = f" {response.reason_phrase}" if response.reason_phrase else ""
        return self._error(
            f"answered HTTP {status}{reason}: {text or '(no body)'}."
            f"{wait}{_STATUS_HINTS.get(status, '')}",
            status=status,
            retry_after=retry_after,
            retryable=is_retryable_status(status),
        )

    def _read_answer(self, raw: bytes, request: GenerationRequest) -> GenerationResult:
        data = self._decode(raw.decode("utf-8", "replace"))
        try:
            return self._answer(data, request)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise self._malformed(raw.decode("utf-8", "replace"), err) from err

    def _feed(self, state: StreamState, payload: str) -> str | None:
        event = self._decode(payload)
        try:
            return state.feed(event)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise self._malformed(payload, err) from err

    def _decode(self, text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError as err:
            excerpt = secret_free_excerpt(text, self._secrets)
            raise self._error(
                f"answered with something that is not JSON: {excerpt or '(empty)'}."
            ) from err

    def _malformed(self, text: str, err: Exception) -> UpstreamError:
        excerpt = secret_free_excerpt(text, self._secrets)
        return self._error(
            f"answered with JSON of an unexpected shape ({type(err).__name__}: "
            f"{err}): {excerpt}."
        )

    def _log_done(
        self,
        request: GenerationRequest,
        result: GenerationResult,
        started: float,
        *,
        streamed: bool,
    ) -> None:
        logger.info(
            "upstream call done: target=%s model=%s request_id=%s streamed=%s "
            "prompt_tokens=%d completion_tokens=%d finish_reason=%s seconds=%.3f",
            self.name,
            result.model,
            request.metadata.get("request_id"),
            streamed,
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            result.finish_reason,
            time.perf_counter() - started,
        )

    def _log_failed(
        self,
        request: GenerationRequest,
        err: UpstreamError,
        started: float,
        *,
        streamed: bool,
    ) -> None:
        logger.warning(
            "upstream call failed: target=%s request_id=%s streamed=%s status=%s "
            "retryable=%s seconds=%.3f error=%s",
            self.name,
            request.metadata.get("request_id"),
            streamed,
            err.status,
            err.retryable,
            time.perf_counter() - started,
            err,
        )


class _Deadline:
    """The first-token and total deadlines of one call, on the loop's clock."""

    def __init__(self, config: HttpProviderConfig, *, streamed: bool) -> None:
        now = asyncio.get_running_loop().time()
        self._total = now + config.total_timeout
        self._first: float | None = (
            now + config.first_token_timeout if streamed else None
        )

    def token_arrived(self) -> None:
        self._first = None

    def current(self) -> tuple[float, str]:
        """The deadline that ends first, and which clock it belongs to."""
        if self._first is not None and self._first < self._total:
            return self._first, "first_token"
        return self._total, "total"


class _EventReader:
    """Reads a stream's events and hands out the answer text, piece by piece."""

    def __init__(
        self,
        provider: HttpProvider,
        response: httpx.Response,
        state: StreamState,
        deadline: _Deadline,
    ) -> None:
        self._provider = provider
        self._response = response
        self._lines = response.aiter_lines()
        self._decoder = _EventDecoder()
        self._state = state
        self._deadline = deadline
        self._ended = False

    async def next_piece(self) -> str | None:
        """The next piece of answer text; None once the stream has ended."""
        while not self._ended:
            line = await self._provider._await(anext(self._lines, None), self._deadline)
            payload = (
                self._decoder.flush() if line is None else self._decoder.feed(line)
            )
            piece = None
            if payload == "[DONE]":
                self._ended = True
                self._check_complete()
            elif payload is not None:
                piece = self._provider._feed(self._state, payload)
                self._ended = self._state.finished
            if line is None and not self._ended:
                self._ended = True
                self._check_complete()
            if piece:
                self._deadline.token_arrived()
                return piece
        return None

    def _check_complete(self) -> None:
        """Refuses a stream that closed before saying why the answer ended."""
        if not (self._state.finished or self._state.complete):
            raise self._provider._error(
                "ended its stream before the answer was complete."
            )

    async def aclose(self) -> None:
        """Stops reading: closes the response and with it the connection."""
        await self._lines.aclose()  # type: ignore[attr-defined]
        await self._response.aclose()


class _EventDecoder:
    """Joins the ``data:`` lines of server-sent events into one payload per event.

    Other fields (``event:``, ``id:``, ``retry:``) and comments are ignored:
    both APIs repeat the event type inside the JSON payload.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """The payload of an event that ``line`` completes, if it completes one."""
        if not line:
            return self.flush()
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        payload = "\n".join(self._data)
        self._data.clear()
        return payload


def is_retryable_status(status: int) -> bool:
    """Whether another try, here or elsewhere, may succeed after this HTTP status."""
    return status in (408, 409, 429) or status >= 500


def parse_retry_after(
    value: str | None, value_ms: str | None = None, *, now: float | None = None
) -> float | None:
    """Seconds to wait, from a ``Retry-After`` (or ``retry-after-ms``) header.

    ``Retry-After`` holds seconds or an HTTP date (RFC 9110, section 10.2.3);
    a date is measured from ``now`` (a Unix time, the current time by
    default). A date in the past gives 0; a value that is neither gives None.
    """
    if value_ms is not None:
        millis = _non_negative(value_ms)
        if millis is not None:
            return millis / 1000
    if value is None:
        return None
    seconds = _non_negative(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def secret_free_excerpt(text: str, secrets: tuple[str, ...] = ()) -> str:
    """A short, one-line excerpt of an upstream's error text, secrets masked.

    A JSON error object gives its type and message; anything else gives the
    text itself. The given secrets, bearer tokens, ``sk-``-style keys and
    ``api_key=...`` pairs are replaced by ``***``.
    """
    excerpt = " ".join(_error_text(text).split())
    for secret in secrets:
        excerpt = excerpt.replace(secret, "***")
    excerpt = _TOKEN_SHAPES.sub(_mask_token, excerpt)
    if len(excerpt) > _EXCERPT_CHARS:
        excerpt = excerpt[: _EXCERPT_CHARS - 1] + "…"
    return excerpt


def identity_headers(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The caller's user, team and request id as headers for the upstream.

    Values are percent-encoded where they are not printable ASCII, so any
    name can travel in a header.
    """
    headers: dict[str, str] = {}
    for key, header in _IDENTITY_HEADERS:
        value = metadata.get(key)
        if value is not None and str(value).strip():
            headers[header] = quote(str(value).strip()[:256], safe=_HEADER_SAFE)
    return headers


async def _read_capped(response: httpx.Response) -> bytes:
    """The start of an error body: enough for an excerpt, never a huge download."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= _ERROR_BODY_BYTES:
            break
    return bytes(body[:_ERROR_BODY_BYTES])


def _error_text(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail")
        kind = error.get("type")
        if isinstance(message, str):
            return f"{kind}: {message}" if isinstance(kind, str) else message
    if isinstance(error, str):
        return error
    return text


def _mask_token(match: re.Match[str]) -> str:
    if match.group(1):
        return f"{match.group(1)}***"
    if match.group(2):
        return f"{match.group(2)}-***"
    return f"{match.group(3)}***"


def _non_negative(value: str) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _endpoint_url(base_url: str, path: str) -> httpx.URL:
    """``path`` below ``base_url``, keeping a query string (``?api-version=``)."""
    base = httpx.URL(base_url)
    return base.copy_with(path=base.path.rstrip("/") + path)


def _display_url(url: str | httpx.URL) -> str:
    """``url`` without user info, query string or fragment, for messages."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except httpx.InvalidURL:
        return "(an invalid URL)"
    return str(parsed.copy_with(userinfo=b"", query=None, fragment=None))


def _describe(err: Exception) -> str:
    detail = str(err) or "no detail"
    return f"{type(err).__name__}: {detail}"
