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
- Connections are pooled and kept alive by :class:`Http11Transport`, which
  the client sends through, unless the environment names a proxy for the
  upstream (httpx's own transport serves that case). A whole answer goes
  straight through the transport, past the client: no cookies are kept,
  and none are sent.
- A provider belongs to the event loop that first uses it: connections are
  pooled per loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import re
import ssl
import time
import urllib.request
import zlib
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httptools
import httpx
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

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
    "Http11Transport",
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
_JSON_TYPE = "application/json"
# The JSON of request bodies, as httpx writes it for ``json=``.
_JSON_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False
)
_STATUS_HINTS = {
    401: " Check the api_key of this target.",
    403: " Check the api_key of this target and what it may use.",
    404: " Check base_url and model of this target.",
}


class HttpProviderConfig(StrictModel):
    """What every provider that calls a model server over HTTP needs."""

    # The key and header values are credentials: errors never repeat the input.
    model_config = ConfigDict(**StrictModel.model_config, hide_input_in_errors=True)

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

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and any(c in value.get_secret_value() for c in "\r\n\0"):
            raise ValueError("api_key has a line break; copy the key again without it")
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
        limits = httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_keepalive_connections,
            keepalive_expiry=config.keepalive_expiry,
        )
        headers = {"user-agent": "ragline", **config.headers, **self._auth_headers()}
        # Whole answers go straight through the transport when it is ours (see
        # _whole_answer), with these headers; streams and health probes go
        # through the client, which adds its own.
        self._transport = _transport_for(self._url, limits, trust_env=config.trust_env)
        fetch_headers = {"accept": _JSON_TYPE}
        fetch_headers.update((name.lower(), value) for name, value in headers.items())
        fetch_headers["content-type"] = _JSON_TYPE
        self._fetch_headers = _header_pairs(fetch_headers)
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(None, connect=config.connect_timeout),
            limits=limits,
            transport=self._transport,
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
            raw = await self._whole_answer(body, request, deadline)
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

    async def _whole_answer(
        self, body: dict[str, Any], request: GenerationRequest, deadline: _Deadline
    ) -> bytes:
        """The body of a successful answer, read whole; a failure status raises."""
        if self._transport is None:  # proxied, so httpx's own transport serves
            response = await self._send(body, request, deadline)
            try:
                return await self._await(response.aread(), deadline)
            finally:
                await response.aclose()
        headers = self._fetch_headers
        extra = self._request_headers(request)
        if extra:
            headers = [*headers, *_header_pairs(extra)]
        fetched = self._transport.fetch(
            "POST",
            self._url,
            headers,
            _JSON_ENCODER.encode(body).encode(),
            connect_timeout=self._config.connect_timeout,
            error_limit=_ERROR_BODY_BYTES,
        )
        try:
            answer = await self._await(fetched, deadline)
        except UpstreamError:
            raise
        except RuntimeError as err:  # the transport refuses: closed meanwhile
            self._check_open()
            raise self._error(f"could not be called: {err}.") from err
        if not 200 <= answer.status < 300:
            raise self._status_error(
                answer.status, httpx.Headers(answer.headers), answer.body
            )
        return answer.body

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
        raise self._status_error(response.status_code, response.headers, raw)

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

    def _status_error(
        self, status: int, headers: httpx.Headers, raw: bytes
    ) -> UpstreamError:
        retry_after = parse_retry_after(
            headers.get("retry-after"), headers.get("retry-after-ms")
        )
        text = secret_free_excerpt(raw.decode("utf-8", "replace"), self._secrets)
        wait = (
            f" It asked to wait {retry_after:g} s before trying again."
            if retry_after is not None
            else ""
        )
        phrase = httpx.codes.get_reason_phrase(status)
        reason = f" {phrase}" if phrase else ""
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


# -- the transport -------------------------------------------------------------------

# Answer bytes buffered unread before the socket is no longer read from.
_READ_PAUSE_BYTES = 256 * 1024

_Origin = tuple[str, str, int]
_Head = tuple[int, list[tuple[bytes, bytes]]]


class Http11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over pooled keep-alive connections, on asyncio protocols and httptools.

    The httpx client of every HTTP provider sends through this transport,
    unless the environment routes the upstream through a proxy (httpx's own
    transport serves that case). httpx's default transport cost about as
    much per request as all the rest of the gateway: its pool polls every
    connection with a system call before each request and runs each step
    through anyio. This one keeps the state of each connection in an asyncio
    protocol, which the event loop tells at once when the server closes it,
    and parses answers with httptools (the parser uvicorn uses). What holds:

    - At most ``limits.max_connections`` connections are open at once; a
      request over the limit waits for one, within its ``pool`` timeout. Up
      to ``max_keepalive_connections`` idle ones are kept for reuse, each
      for ``keepalive_expiry`` seconds; the most recently used goes first.
    - A connection the server closed while idle is never reused. A request
      whose reused connection closes before any byte of the answer arrives
      is sent once more on a new connection: the server closed it without
      taking the request (the race every keep-alive client has).
    - The request's ``connect`` and ``read`` timeouts (httpx's ``timeout=``)
      bound connecting and each wait for answer bytes; unset, the caller's
      own deadline is the only bound.
    - An answer not read to its end (its reader cancelled, or closed early)
      closes its connection, so the server sees the client leave.
    - Failures raise httpx's exceptions, as its own transport does:
      ``ConnectError``, ``ConnectTimeout``, ``PoolTimeout``, ``ReadTimeout``,
      ``ReadError``, ``RemoteProtocolError``, ``LocalProtocolError``.
    - Request bodies are read whole before sending (the providers send JSON
      documents), and written without waiting for the socket to drain.
    - Connections belong to the event loop that opened them; used from
      another loop, the transport drops the old loop's connections.
    """

    def __init__(
        self,
        *,
        limits: httpx.Limits | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        limits = limits or httpx.Limits()
        self._max_open = limits.max_connections
        self._max_idle = limits.max_keepalive_connections
        self._expiry = limits.keepalive_expiry
        self._ssl_context = ssl_context
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        url = request.url
        payload = _request_bytes(
            request.method, url.raw_path, request.headers.raw, await request.aread()
        )
        connection, status, headers = await self._exchange(
            _origin(url), payload, request.method == "HEAD", timeouts, request
        )
        return httpx.Response(
            status,
            headers=headers,
            stream=_ResponseStream(connection, request, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def fetch(
        self,
        method: str,
        url: httpx.URL,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        *,
        connect_timeout: float | None = None,
        error_limit: int | None = None,
    ) -> Answer:
        """Sends one request and reads its answer whole, past httpx's models.

        The path of the providers' whole answers, where httpx's request and
        response objects would cost more than the exchange itself. ``headers``
        go as given, after ``Host`` and before ``Content-Length``; ask for no
        compression, since only gzip and deflate answers are decoded. An
        answer with a failure status (400 and up) is read up to
        ``error_limit`` bytes, and its connection closed when more follows.
        Failures raise the same httpx exceptions as :meth:`handle_async_request`.
        """
        head = [(b"host", url.netloc), *headers, (b"content-length", b"%d" % len(body))]
        payload = _request_bytes(method, url.raw_path, head, body)
        timeouts = {"connect": connect_timeout}
        connection, status, answer_headers = await self._exchange(
            _origin(url), payload, method == "HEAD", timeouts, None
        )
        limit = error_limit if status >= 400 else None
        try:
            content = await _read_whole(connection, limit)
        finally:
            connection.release()
        return Answer(status, answer_headers, _decoded(answer_headers, content))

    async def aclose(self) -> None:
        """Closes the idle connections; those in use close when their answer ends."""
        self._closed = True
        for connections in list(self._idle.values()):
            for connection in list(connections):
                connection.close()

    async def _exchange(
        self,
        origin: _Origin,
        payload: bytes,
        head_only: bool,
        timeouts: Mapping[str, float | None],
        request: httpx.Request | None,
    ) -> tuple[_Connection, int, list[tuple[bytes, bytes]]]:
        """Sends the request on a pooled connection; the connection and the head."""
        if self._closed:
            raise RuntimeError("The transport is closed; it sends no more requests.")
        connection = await self._acquire(origin, request, timeouts)
        try:
            status, headers = await connection.exchange(
                payload, head_only, timeouts.get("read"), request
            )
        except _StaleConnection:
            connection = await self._acquire(origin, request, timeouts, reuse=False)
            status, headers = await connection.exchange(
                payload, head_only, timeouts.get("read"), request
            )
        return connection, status, headers

    # -- the pool ----------------------------------------------------------------

    async def _acquire(
        self,
        origin: _Origin,
        request: httpx.Request | None,
        timeouts: Mapping[str, float | None],
        *,
        reuse: bool = True,
    ) -> _Connection:
        """An idle connection to ``origin``, or a new one once the limit allows."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._adopt(loop)
        while True:
            connection = self._take_idle(origin, loop.time()) if reuse else None
            if connection is not None:
                return connection
            if self._max_open is None or self._open < self._max_open:
                return await self._connect(origin, request, timeouts.get("connect"))
            if not self._close_an_idle_one():
                await self._wait_for_room(request, timeouts.get("pool"))

    def _take_idle(self, origin: _Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if self._expiry is not None and now - connection.idle_since > self._expiry:
                connection.close()
                continue
            return connection
        return None

    async def _connect(
        self, origin: _Origin, request: httpx.Request | None, timeout: float | None
    ) -> _Connection:
        self._open += 1
        try:
            return await self._open_connection(origin, request, timeout)
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    async def _open_connection(
        self, origin: _Origin, request: httpx.Request | None, timeout: float | None
    ) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = None
        if scheme == "https":
            tls = self._ssl_context = self._ssl_context or httpx.create_ssl_context()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, origin, loop),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
        except TimeoutError as err:
            raise httpx.ConnectTimeout(
                f"{host}:{port} accepted no connection within {timeout} s.",
                request=request,
            ) from err
        except OSError as err:  # refused, unreachable, a failed TLS handshake
            raise httpx.ConnectError(
                str(err) or type(err).__name__, request=request
            ) from err
        return connection

    async def _wait_for_room(
        self, request: httpx.Request | None, timeout: float | None
    ) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as err:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, but leaving: pass the turn on
            waiter.cancel()
            if isinstance(err, TimeoutError):
                raise httpx.PoolTimeout(
                    f"No connection came free within the pool timeout of {timeout} s.",
                    request=request,
                ) from err
            raise

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_an_idle_one(self) -> bool:
        """Makes room under the limit by closing an idle connection to any origin."""
        for idle in self._idle.values():
            if idle:
                idle[0].close()
                return True
        return False

    def _release(self, connection: _Connection) -> None:
        """Takes back a connection whose answer was read: kept idle, or closed."""
        room = self._max_idle is None or self._idle_count < self._max_idle
        keep = room and self._expiry != 0 and not self._closed
        if not (keep and connection.reusable and connection.loop is self._loop):
            connection.close()
            return
        connection.idle_since = connection.loop.time()
        self._idle.setdefault(connection.origin, []).append(connection)
        self._idle_count += 1
        self._wake_one()

    def _discard(self, connection: _Connection) -> None:
        """Forgets a connection that closed, making room; called once for each."""
        if connection.loop is not self._loop:
            return
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
            self._idle_count -= 1
        self._open -= 1
        self._wake_one()

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts afresh on another event loop, dropping the old loop's connections."""
        for connections in self._idle.values():
            for connection in connections:
                connection.abandon()
        self._idle.clear()
        self._idle_count = 0
        self._open = 0
        self._waiters.clear()
        self._loop = loop


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer, as :meth:`Http11Transport.fetch` read it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _StaleConnection(Exception):
    """A reused connection closed before any byte of the answer arrived."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: writes requests, reads answers with httptools.

    Its life: idle, then one exchange at a time (the request written, the
    answer's head awaited, its body read), then idle again or closed.
    httptools calls the ``on_*`` methods while :meth:`data_received` feeds it.
    """

    def __init__(
        self, pool: Http11Transport, origin: _Origin, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.origin = origin
        self.loop = loop
        self.idle_since = 0.0
        self.closed = False
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._used = False  # has carried an exchange before, so it may be stale
        # The exchange in progress.
        self._busy = False  # from the request's write to the end of its answer
        self._head: asyncio.Future[_Head] | None = None
        self._head_only = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._informational = False
        self._received = False  # any byte of the answer
        self._framed = False  # the answer's end is known without a close
        self._in_body = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._keep_alive = False
        self._error: Exception | None = None

    @property
    def reusable(self) -> bool:
        """Whether the last answer was read whole and the connection may carry more."""
        return (
            not self.closed
            and self._complete
            and self._keep_alive
            and self._error is None
            and not self._chunks
        )

    # -- one exchange --------------------------------------------------------------

    async def exchange(
        self,
        payload: bytes,
        head_only: bool,
        read_timeout: float | None,
        request: httpx.Request | None,
    ) -> _Head:
        """Sends the request; the status and headers of its answer.

        Raises ``_StaleConnection`` when a reused connection closed before
        answering; any other failure closes the connection.
        """
        stale = self._used
        self._start(head_only=head_only)
        try:
            if self.closed or self._transport is None:
                raise _StaleConnection
            self._transport.write(payload)
            assert self._head is not None
            return await _within(self._head, read_timeout, request)
        except _StaleConnection:
            self.close()
            if stale:
                raise
            raise httpx.RemoteProtocolError(
                "The server closed the connection without answering.", request=request
            ) from None
        except BaseException:
            self.close()
            raise
        finally:
            self._head = None

    async def receive(
        self, request: httpx.Request | None, read_timeout: float | None
    ) -> bytes:
        """The answer bytes that arrived since the last call; ``b""`` at its end."""
        while not self._chunks:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            if self.closed:
                raise httpx.RemoteProtocolError(
                    "The connection closed before the answer ended.", request=request
                )
            self._waiter = self.loop.create_future()
            try:
                await _within(self._waiter, read_timeout, request)
            finally:
                self._waiter = None
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    def release(self) -> None:
        """Gives the connection back once its answer was read, or closes it."""
        self._pool._release(self)

    def close(self) -> None:
        """Closes the connection and gives its place in the pool back."""
        if self.closed:
            return
        self.closed = True
        if self._transport is not None:
            self._transport.close()
        self._pool._discard(self)

    def abandon(self) -> None:
        """Drops a connection of an event loop no longer in use, pool and all."""
        self.closed = True
        if self._transport is not None:
            with contextlib.suppress(RuntimeError):  # its loop may be closed
                self._transport.abort()

    def _start(self, *, head_only: bool) -> None:
        self._used = True
        self._busy = True
        self._head = self.loop.create_future()
        self._head_only = head_only
        self._headers = []
        self._received = False
        self._framed = head_only
        self._in_body = False
        self._chunks.clear()
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._error = None

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._fail(
                httpx.RemoteProtocolError(f"The server's answer is malformed: {err}.")
            )
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._busy and self._in_body and not self._framed:
            self._finish(keep_alive=False)  # an answer without a length ends so
        elif self._busy:
            self._fail(self._loss(exc))
        if not self.closed:
            self.closed = True
            self._pool._discard(self)

    def _loss(self, exc: Exception | None) -> Exception:
        """What a close in the middle of an exchange means."""
        if not self._received:
            return _StaleConnection()
        if exc is not None:
            return httpx.ReadError(f"The connection broke: {exc}.")
        return httpx.RemoteProtocolError(
            "The server closed the connection before the answer ended."
        )

    # -- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self._busy:  # an answer nobody asked for: the connection is spoilt
            self._error = httpx.RemoteProtocolError(
                "The server sent an unasked answer."
            )
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._framed = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue and the like are skipped
            self._headers = []
            return
        if status in (204, 304):
            self._framed = True
        self._in_body = True
        head = self._head
        if head is not None and not head.done():
            head.set_result((status, self._headers))
        if self._head_only:
            self._finish(keep_alive=False)  # no body follows, whatever the headers say

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _READ_PAUSE_BYTES and not self._paused:
            self._paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._finish(keep_alive=self._parser.should_keep_alive())

    # -- signalling ----------------------------------------------------------------

    def _finish(self, *, keep_alive: bool) -> None:
        self._complete = True
        self._busy = False
        self._in_body = False
        self._keep_alive = keep_alive and not self._head_only
        self._wake()

    def _fail(self, error: Exception) -> None:
        self._busy = False
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
            return
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _ResponseStream(httpx.AsyncByteStream):
    """The body of one answer as it arrives; gives the connection back at its end."""

    def __init__(
        self,
        connection: _Connection,
        request: httpx.Request | None,
        read_timeout: float | None,
    ) -> None:
        self._connection = connection
        self._request = request
        self._read_timeout = read_timeout
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        receive = self._connection.receive
        try:
            while chunk := await receive(self._request, self._read_timeout):
                yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._connection.release()


async def _within(
    future: asyncio.Future[_T], timeout: float | None, request: httpx.Request | None
) -> _T:
    """Awaits ``future``, raising ``ReadTimeout`` after ``timeout`` seconds."""
    if timeout is None:
        return await future
    try:
        async with asyncio.timeout(timeout):
            return await future
    except TimeoutError as err:
        raise httpx.ReadTimeout(
            f"No answer bytes arrived within the read timeout of {timeout} s.",
            request=request,
        ) from err


def _request_bytes(
    method: str,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
) -> bytes:
    """The request as it goes on the wire: request line, headers, body."""
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    chunked = False
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
            raise httpx.LocalProtocolError(
                f"The header {name.decode('latin-1')!r} holds a line break, so it "
                "cannot be sent."
            )
        if name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    if not chunked:
        parts.append(body)
    elif body:
        parts += (b"%x\r\n" % len(body), body, b"\r\n0\r\n\r\n")
    else:
        parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def _origin(url: httpx.URL) -> _Origin:
    port = url.port
    if port is None:
        port = 443 if url.scheme == "https" else 80
    return url.scheme, url.host, port


async def _read_whole(connection: _Connection, limit: int | None) -> bytes:
    """The rest of an answer's body, or its first ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await connection.receive(None, None):
        chunks.append(chunk)
        size += len(chunk)
        if limit is not None and size >= limit:
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return body if limit is None else body[:limit]


def _decoded(headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes:
    """``body`` without its gzip or deflate content coding, if it has one."""
    for name, value in headers:
        if name.lower() != b"content-encoding":
            continue
        coding = value.strip().lower().decode("latin-1")
        if coding in ("gzip", "x-gzip", "deflate"):
            try:
                return zlib.decompress(body, 32 + zlib.MAX_WBITS)  # either header
            except zlib.error as err:
                raise httpx.DecodingError(
                    f"The {coding} answer is corrupt: {err}."
                ) from err
        if coding != "identity":
            raise httpx.DecodingError(f"The answer's coding {coding!r} is unsupported.")
    return body


def _header_pairs(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as the transport sends them; names lower-cased, values as UTF-8."""
    return [(k.lower().encode("ascii"), v.encode()) for k, v in headers.items()]


def _transport_for(
    url: httpx.URL, limits: httpx.Limits, *, trust_env: bool
) -> Http11Transport | None:
    """:class:`Http11Transport` for ``url``; None (httpx's own) when proxied."""
    if trust_env and _proxy_applies(url):
        return None
    context = None
    if url.scheme == "https":
        context = httpx.create_ssl_context(trust_env=trust_env)
    return Http11Transport(limits=limits, ssl_context=context)


def _proxy_applies(url: httpx.URL) -> bool:
    """Whether the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY) proxies ``url``."""
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(url.host)
