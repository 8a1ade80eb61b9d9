"""A Claude model behind the Anthropic Messages API.

:class:`AnthropicProvider` implements
:class:`~serving.gateway.providers.Provider` with ``POST {base_url}/v1/messages``,
whole or streamed as server-sent events. Connections, deadlines, errors and
secrets are handled by :class:`~serving.gateway._http.HttpProvider`; its
module docstring states what holds for every HTTP provider.

What holds here:

- The API key goes in ``x-api-key``, the API version in
  ``anthropic-version``.
- System messages go to the top-level ``system`` field, joined by a blank
  line in the order they came; the other messages keep their order. A
  request of system messages alone is refused before anything is sent.
- ``max_tokens`` is required by the API: a request without one gets
  ``config.max_tokens``.
- The API takes temperatures from 0 to 1; higher ones are sent as 1.
- Grammars cannot be enforced and are dropped; the caller must check the
  answer's form.
- ``stop_reason`` ``end_turn`` and ``stop_sequence`` (and any other but the
  two below) give ``"stop"``; ``max_tokens`` and
  ``model_context_window_exceeded`` give ``"length"``.
- Prompt tokens are the input tokens, cached ones (read or written)
  included. A stream takes them from ``message_start``, the answer's tokens
  from the last ``message_delta``.
- An ``error`` event in a stream raises ``UpstreamError`` with the status
  its error type stands for (``overloaded_error`` is 529, retryable;
  ``invalid_request_error`` is 400, not retryable).
- ``count_tokens`` is an estimate (characters / ``chars_per_token``), so that
  packing a prompt never waits for the network.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field

from ingestion.errors import RequestError, UpstreamError

from ._http import HttpProvider, HttpProviderConfig
from .providers import GenerationRequest, GenerationResult, Usage

__all__ = ["ANTHROPIC_API", "AnthropicConfig", "AnthropicProvider"]

logger = logging.getLogger(__name__)

ANTHROPIC_API = "https://api.anthropic.com"

_LENGTH_REASONS = ("max_tokens", "model_context_window_exceeded")
# The HTTP status each error type of the API is sent with.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class AnthropicConfig(HttpProviderConfig):
    """A Claude model behind the Anthropic Messages API."""

    type: Literal["anthropic"] = Field(
        default="anthropic",
        description="Provider kind, telling provider settings apart in a list.",
    )
    base_url: str = Field(
        default=ANTHROPIC_API,
        description="The API's root URL, without /v1; a proxy's URL if one "
        "stands in between.",
    )
    context_window: int = Field(
        default=200_000,
        ge=256,
        description="Tokens the model takes, prompt and answer together.",
    )
    max_tokens: int = Field(
        default=1024,
        ge=1,
        description="Answer length when a request sets none; the API needs one.",
    )
    anthropic_version: str = Field(
        default="2023-06-01",
        description="The API version, sent as the anthropic-version header.",
    )


class AnthropicProvider(HttpProvider):
    """Generates through the Anthropic Messages API; see the module docstring.

    Example::

        provider = AnthropicProvider(
            AnthropicConfig(
                name="claude",
                model="claude-sonnet-4-5",
                api_key=os.environ["ANTHROPIC_API_KEY"],
            )
        )
        result = await provider.generate(request)
        await provider.close()
    """

    endpoint = "/v1/messages"
    health_endpoint = "/v1/models"
    _config: AnthropicConfig

    def __init__(self, config: AnthropicConfig) -> None:
        super().__init__(config)

    def _auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self._config.anthropic_version}
        if self._config.api_key is not None:
            headers["x-api-key"] = self._config.api_key.get_secret_value()
        return headers

    def _body(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        config = self._config
        system = [m.content for m in request.messages if m.role == "system"]
        messages = [
            {"role": m.role, "content": m.content}
            for m in request.messages
            if m.role != "system"
        ]
        if not messages:
            raise RequestError(
                "The Anthropic Messages API needs a user message besides the "
                "system prompt; add the question as a user message."
            )
        body = dict(config.extra_body)
        body.update(
            model=config.model,
            messages=messages,
            max_tokens=request.max_tokens or config.max_tokens,
            temperature=min(request.temperature, 1.0),
            stream=stream,
        )
        if system:
            body["system"] = "\n\n".join(system)
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        if request.grammar:
            logger.debug(
                "grammar dropped: target=%s request_id=%s reason=unsupported",
                self.name,
                request.metadata.get("request_id"),
            )
        return body

    def _answer(self, data: Any, request: GenerationRequest) -> GenerationResult:
        if data.get("type") == "error":
            raise self._event_error(data)
        text = "".join(
            block["text"] for block in data["content"] if block.get("type") == "text"
        )
        usage = data["usage"]
        return GenerationResult(
            text=text,
            usage=Usage(_input_tokens(usage), int(usage["output_tokens"])),
            model=str(data.get("model") or self._config.model),
            finish_reason=_finish_reason(data.get("stop_reason")),
        )

    def _stream_state(self, request: GenerationRequest) -> _MessageStream:
        return _MessageStream(self)

    def _event_error(self, event: Any) -> UpstreamError:
        error = event.get("error") or {}
        kind = error.get("type") if isinstance(error, dict) else None
        return self._reported_error(error, _ERROR_STATUS.get(str(kind)))


class _MessageStream:
    """The events of one Messages API stream, read so far."""

    def __init__(self, provider: AnthropicProvider) -> None:
        self._provider = provider
        self._parts: list[str] = []
        self._model: str | None = None
        self._input_tokens = 0
        self._output_tokens = 0
        self._stop_reason: str | None = None
        self.finished = False

    @property
    def complete(self) -> bool:
        return self._stop_reason is not None

    def feed(self, event: Any) -> str | None:
        kind = event["type"]
        if kind == "content_block_delta":
            delta = event["delta"]
            return self._keep(delta["text"]) if delta["type"] == "text_delta" else None
        if kind == "message_start":
            self._start(event["message"])
        elif kind == "content_block_start":
            block = event["content_block"]
            return self._keep(block.get("text")) if block["type"] == "text" else None
        elif kind == "message_delta":
            self._delta(event)
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            raise self._provider._event_error(event)
        return None  # ping, content_block_stop, and event types added later

    def result(self) -> GenerationResult:
        return GenerationResult(
            text="".join(self._parts),
            usage=Usage(self._input_tokens, self._output_tokens),
            model=self._model or self._provider.model,
            finish_reason=_finish_reason(self._stop_reason),
        )

    def _keep(self, text: str | None) -> str | None:
        if text:
            self._parts.append(text)
        return text or None

    def _start(self, message: Any) -> None:
        self._model = message.get("model")
        usage = message.get("usage") or {}
        self._input_tokens = _input_tokens(usage)
        self._output_tokens = int(usage.get("output_tokens", 0))

    def _delta(self, event: Any) -> None:
        self._stop_reason = event["delta"].get("stop_reason") or self._stop_reason
        usage = event.get("usage") or {}
        if usage.get("output_tokens") is not None:
            self._output_tokens = int(usage["output_tokens"])
        if usage.get("input_tokens") is not None:
            self._input_tokens = _input_tokens(usage)


def _input_tokens(usage: Any) -> int:
    """All tokens the model read: fresh input plus cache reads and writes."""
    return (
        int(usage.get("input_tokens") or 0)
        + int(usage.get("cache_creation_input_tokens") or 0)
        + int(usage.get("cache_read_input_tokens") or 0)
    )


def _finish_reason(reason: Any) -> str:
    return "length" if reason in _LENGTH_REASONS else "stop"
