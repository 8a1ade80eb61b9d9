"""A chat model behind any OpenAI-compatible chat-completions server.

:class:`OpenAICompatibleProvider` implements
:class:`~serving.gateway.providers.Provider` for vLLM, the llama.cpp servers,
Ollama and hosted APIs that speak ``POST {base_url}/chat/completions``, whole
or streamed as server-sent events ending with ``data: [DONE]``. Connections,
deadlines, errors and secrets are handled by
:class:`~serving.gateway._http.HttpProvider`; its module docstring states
what holds for every HTTP provider.

What holds here:

- Every request names ``config.model``, the upstream's own name for the
  model; ``GenerationRequest.model`` (the caller's logical model) is not
  sent. Results carry the model name the upstream answered with.
- A stream asks for usage with ``stream_options.include_usage``. A server
  that ignores it (the Python llama.cpp server does) gets its answer's usage
  counted instead: one completion token per streamed delta, which is exact
  for servers that stream token by token, and the prompt estimated by
  :meth:`count_tokens`.
- A stream that ends (closes, or sends ``[DONE]``) before any chunk gave a
  ``finish_reason`` was cut short and raises ``UpstreamError``; the Python
  llama.cpp server cuts a stream that way when another request interrupts it
  (unless started with ``--interrupt_requests False``).
- ``grammar`` is sent only when ``config.supports_grammar`` is true (llama.cpp
  servers); otherwise it is dropped and the caller must check the answer's
  form.
- ``count_tokens`` is an estimate (characters / ``chars_per_token``), so that
  packing a prompt never waits for the network.
- ``finish_reason`` ``"length"`` stays ``"length"``; every other reason the
  upstream gives is ``"stop"``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field

from ._http import HttpProvider, HttpProviderConfig
from .providers import GenerationRequest, GenerationResult, Usage

__all__ = ["OpenAICompatibleConfig", "OpenAICompatibleProvider"]

logger = logging.getLogger(__name__)


class OpenAICompatibleConfig(HttpProviderConfig):
    """A model served by an OpenAI-compatible chat-completions server."""

    type: Literal["openai"] = Field(
        default="openai",
        description="Provider kind, telling provider settings apart in a list.",
    )
    supports_grammar: bool = Field(
        default=False,
        description="The server takes a GBNF grammar in the request's 'grammar' "
        "field (llama.cpp servers); otherwise grammars are dropped.",
    )
    stream_usage: bool = Field(
        default=True,
        description="Ask for usage at the end of a stream (stream_options); turn "
        "off for servers that reject the field.",
    )


class OpenAICompatibleProvider(HttpProvider):
    """Generates through an OpenAI-compatible server; see the module docstring.

    Example::

        provider = OpenAICompatibleProvider(
            OpenAICompatibleConfig(
                name="local-vllm",
                base_url="http://127.0.0.1:8000/v1",
                model="Qwen/Qwen2.5-7B-Instruct",
                context_window=32768,
            )
        )
        result = await provider.generate(request)
        await provider.close()
    """

    endpoint = "/chat/completions"
    health_endpoint = "/models"
    _config: OpenAICompatibleConfig

    def __init__(self, config: OpenAICompatibleConfig) -> None:
        super().__init__(config)

    def _auth_headers(self) -> dict[str, str]:
        key = self._config.api_key
        return {"authorization": f"Bearer {key.get_secret_value()}"} if key else {}

    def _body(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        config = self._config
        body = dict(config.extra_body)
        body.update(
            model=config.model,
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
            max_tokens=request.max_tokens or config.max_tokens,
            temperature=request.temperature,
            stream=stream,
        )
        if request.stop:
            body["stop"] = list(request.stop)
        if stream and config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if request.grammar and config.supports_grammar:
            body["grammar"] = request.grammar
        elif request.grammar:
            logger.debug(
                "grammar dropped: target=%s request_id=%s reason=unsupported",
                self.name,
                request.metadata.get("request_id"),
            )
        return body

    def _answer(self, data: Any, request: GenerationRequest) -> GenerationResult:
        if "choices" not in data and "error" in data:
            raise self._reported_error(data["error"], _error_status(data["error"]))
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        usage = _usage(data.get("usage"))
        if usage is None:
            usage = self._estimated_usage(request, self.count_tokens(text))
        return GenerationResult(
            text=text,
            usage=usage,
            model=str(data.get("model") or self._config.model),
            finish_reason=_finish_reason(choice.get("finish_reason")),
        )

    def _stream_state(self, request: GenerationRequest) -> _ChunkStream:
        return _ChunkStream(self, request)


class _ChunkStream:
    """The chat-completion chunks of one stream, read so far."""

    finished = False  # a stream ends with "data: [DONE]", read by the base class

    def __init__(
        self, provider: OpenAICompatibleProvider, request: GenerationRequest
    ) -> None:
        self._provider = provider
        self._request = request
        self._parts: list[str] = []
        self._model: str | None = None
        self._finish_reason: str | None = None
        self._usage: Usage | None = None

    @property
    def complete(self) -> bool:
        return self._finish_reason is not None

    def feed(self, event: Any) -> str | None:
        if "error" in event and "choices" not in event:
            raise self._provider._reported_error(
                event["error"], _error_status(event["error"])
            )
        self._model = event.get("model") or self._model
        self._usage = _usage(event.get("usage")) or self._usage
        piece = None
        for choice in event.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            piece = (choice.get("delta") or {}).get("content") or None
            if choice.get("finish_reason"):
                self._finish_reason = _finish_reason(choice["finish_reason"])
        if piece:
            self._parts.append(piece)
        return piece

    def result(self) -> GenerationResult:
        usage = self._usage
        if usage is None:
            usage = self._provider._estimated_usage(self._request, len(self._parts))
            logger.debug(
                "usage counted from the stream: target=%s request_id=%s",
                self._provider.name,
                self._request.metadata.get("request_id"),
            )
        return GenerationResult(
            text="".join(self._parts),
            usage=usage,
            model=self._model or self._provider.model,
            finish_reason=self._finish_reason or "stop",
        )


def _usage(data: Any) -> Usage | None:
    if not data:
        return None
    return Usage(int(data["prompt_tokens"]), int(data["completion_tokens"]))


def _finish_reason(reason: Any) -> str:
    return "length" if reason == "length" else "stop"


def _error_status(error: Any) -> int | None:
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) and 400 <= code <= 599 else None
