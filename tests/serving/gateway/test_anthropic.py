"""The Anthropic provider against a local server that speaks the Messages API.

The stub answers as the API documents it: a message object for a whole
answer, the named server-sent events ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta``,
``content_block_stop``, ``message_delta`` and ``message_stop`` for a stream,
and error objects (``{"type": "error", "error": {...}}``) with their statuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import pytest
from pydantic import SecretStr

from ingestion.errors import RequestError, UpstreamError
from serving.gateway.anthropic import AnthropicConfig, AnthropicProvider
from serving.gateway.providers import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Provider,
    StreamEvent,
    TokenDelta,
)
from tests.serving.gateway.conftest import Reply, StubUpstream, sse

_T = TypeVar("_T")

API_KEY = "sk-ant-test-0123456789abcdef"
MODEL = "claude-test-1"


def config_for(stub: StubUpstream, **overrides: Any) -> AnthropicConfig:
    settings: dict[str, Any] = {
        "name": "claude",
        "base_url": stub.url,
        "model": MODEL,
        "api_key": API_KEY,
    }
    return AnthropicConfig(**(settings | overrides))


def with_provider(
    config: AnthropicConfig, work: Callable[[AnthropicProvider], Awaitable[_T]]
) -> _T:
    async def main() -> _T:
        provider = AnthropicProvider(config)
        try:
            return await work(provider)
        finally:
            await provider.close()

    return asyncio.run(main())


async def collect(
    provider: AnthropicProvider, request: GenerationRequest
) -> list[StreamEvent]:
    async with aclosing(provider.stream(request)) as stream:
        return [event async for event in stream]


def conversation(**options: Any) -> GenerationRequest:
    return GenerationRequest(
        [
            ChatMessage("system", "Answer from the passages."),
            ChatMessage("user", "What is ragline?"),
            ChatMessage("assistant", "A framework."),
            ChatMessage("system", "Cite your sources."),
            ChatMessage("user", "For what?"),
        ],
        **options,
    )


def message(text: str, stop_reason: str = "end_turn", **usage: int) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-test-1-20250101",
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 7, **usage},
    }


def error(kind: str, text: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": text}}


def message_events(*pieces: str, stop_reason: str = "end_turn") -> list[str]:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_02",
            "type": "message",
            "role": "assistant",
            "model": "claude-test-1-20250101",
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 31, "output_tokens": 1},
        },
    }
    block_start = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": piece},
        }
        for piece in pieces
    ]
    end = [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": len(pieces)},
        },
        {"type": "message_stop"},
    ]
    return sse(start, block_start, {"type": "ping"}, *deltas, *end, named=True)


def failure(config: AnthropicConfig, *, stream: bool) -> UpstreamError:
    async def attempt(provider: AnthropicProvider) -> None:
        if stream:
            await collect(provider, conversation())
        else:
            await provider.generate(conversation())

    with pytest.raises(UpstreamError) as caught:
        with_provider(config, attempt)
    return caught.value


def test_a_request_carries_the_key_the_version_and_a_system_field(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(body=message("For answers.")))
    request = conversation(temperature=1.5, stop=["\n\nHuman:"], grammar="root ::= x")

    with_provider(config_for(stub_upstream), lambda p: p.generate(request))

    sent = stub_upstream.received[0]
    assert (sent.method, sent.path) == ("POST", "/v1/messages"), sent
    assert sent.headers["x-api-key"] == API_KEY, sent.headers
    assert sent.headers["anthropic-version"] == "2023-06-01", sent.headers
    assert "authorization" not in sent.headers, sent.headers
    assert sent.body == {
        "model": MODEL,
        "system": "Answer from the passages.\n\nCite your sources.",
        "messages": [
            {"role": "user", "content": "What is ragline?"},
            {"role": "assistant", "content": "A framework."},
            {"role": "user", "content": "For what?"},
        ],
        "max_tokens": 1024,
        "temperature": 1.0,
        "stop_sequences": ["\n\nHuman:"],
        "stream": False,
    }, sent.body


def test_the_requests_own_max_tokens_wins_over_the_default(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(body=message("Yes.")))

    with_provider(
        config_for(stub_upstream, max_tokens=300),
        lambda p: p.generate(conversation(max_tokens=12)),
    )

    assert stub_upstream.received[0].body["max_tokens"] == 12


def test_a_whole_answer_maps_text_usage_and_model(stub_upstream: StubUpstream) -> None:
    answer = message(
        "For answers.", cache_read_input_tokens=100, cache_creation_input_tokens=5
    )
    answer["content"].append({"type": "text", "text": " With citations."})
    stub_upstream.script(Reply(body=answer))

    result = with_provider(
        config_for(stub_upstream), lambda p: p.generate(conversation())
    )

    assert result.text == "For answers. With citations.", result
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (130, 7)
    assert result.model == "claude-test-1-20250101", result
    assert result.finish_reason == "stop", result


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length")],
)
def test_stop_reasons_map_to_finish_reasons(
    stub_upstream: StubUpstream, stop_reason: str, finish_reason: str
) -> None:
    stub_upstream.script(
        Reply(body=message("x", stop_reason)),
        Reply(chunks=message_events("x", stop_reason=stop_reason)),
    )

    async def both(provider: AnthropicProvider) -> Any:
        whole = await provider.generate(conversation())
        streamed = await collect(provider, conversation())
        return whole, streamed[-1]

    whole, streamed = with_provider(config_for(stub_upstream), both)

    assert whole.finish_reason == finish_reason, whole
    assert streamed.finish_reason == finish_reason, streamed


def test_a_stream_yields_the_text_deltas_then_one_result(
    stub_upstream: StubUpstream,
) -> None:
    events = message_events("For", " answers", ".", stop_reason="max_tokens")
    stub_upstream.script(Reply(chunks=events, content_type="text/event-stream"))

    streamed = with_provider(
        config_for(stub_upstream), lambda p: collect(p, conversation())
    )

    assert stub_upstream.received[0].body["stream"] is True
    *deltas, result = streamed
    assert deltas == [TokenDelta("For"), TokenDelta(" answers"), TokenDelta(".")]
    assert isinstance(result, GenerationResult), streamed
    assert result.text == "For answers.", result
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (31, 3)
    assert result.model == "claude-test-1-20250101", result
    assert result.finish_reason == "length", result


def test_429_is_retryable_and_says_how_long_to_wait(
    stub_upstream: StubUpstream,
) -> None:
    body = error("rate_limit_error", "Number of request tokens has exceeded your limit")
    stub_upstream.script(Reply(status=429, body=body, headers={"retry-after": "12"}))

    err = failure(config_for(stub_upstream), stream=False)

    assert (err.status, err.retry_after, err.retryable) == (429, 12.0, True), err
    assert "rate_limit_error: Number of request tokens" in str(err), err
    assert "'claude'" in str(err) and "/v1/messages" in str(err), err


def test_529_overloaded_is_retryable(stub_upstream: StubUpstream) -> None:
    stub_upstream.script(
        Reply(status=529, body=error("overloaded_error", "Overloaded"))
    )

    err = failure(config_for(stub_upstream), stream=True)

    assert (err.status, err.retryable) == (529, True), err
    assert "HTTP 529" in str(err) and "overloaded_error: Overloaded" in str(err), err


def test_400_is_not_retryable_and_hides_the_key(stub_upstream: StubUpstream) -> None:
    text = f"messages: roles must alternate (x-api-key: {API_KEY})"
    stub_upstream.script(Reply(status=400, body=error("invalid_request_error", text)))

    err = failure(config_for(stub_upstream), stream=False)

    assert (err.status, err.retryable) == (400, False), err
    assert "roles must alternate" in str(err), err
    assert API_KEY not in str(err), err


def test_an_error_event_in_a_stream_carries_the_status_of_its_type(
    stub_upstream: StubUpstream,
) -> None:
    events = message_events("For")[:4] + sse(
        error("overloaded_error", "Overloaded"), named=True
    )
    stub_upstream.script(Reply(chunks=events))
    received: list[StreamEvent] = []

    async def read(provider: AnthropicProvider) -> None:
        async with aclosing(provider.stream(conversation())) as stream:
            async for event in stream:
                received.append(event)

    with pytest.raises(UpstreamError) as caught:
        with_provider(config_for(stub_upstream), read)

    assert received == [TokenDelta("For")], received
    assert (caught.value.status, caught.value.retryable) == (529, True), caught.value
    assert "Overloaded" in str(caught.value), caught.value


def test_an_answer_of_the_wrong_shape_is_an_upstream_error(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(body={"type": "message", "content": "not a list"}))

    err = failure(config_for(stub_upstream), stream=False)

    assert "unexpected shape" in str(err), err


def test_a_stream_that_ends_without_its_stop_events_is_an_upstream_error(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(chunks=message_events("For", " answers")[:5]))

    err = failure(config_for(stub_upstream), stream=True)

    assert "before the answer was complete" in str(err), err


def test_system_messages_alone_are_refused_before_anything_is_sent(
    stub_upstream: StubUpstream,
) -> None:
    request = GenerationRequest([ChatMessage("system", "Be brief.")])

    with pytest.raises(RequestError, match="needs a user message"):
        with_provider(config_for(stub_upstream), lambda p: p.generate(request))

    assert stub_upstream.received == [], stub_upstream.received


def test_health_lists_the_models_with_the_key(stub_upstream: StubUpstream) -> None:
    stub_upstream.script(Reply(body={"data": [{"id": MODEL}]}), Reply(status=401))

    async def probe(provider: AnthropicProvider) -> list[bool]:
        return [await provider.health(), await provider.health()]

    results = with_provider(config_for(stub_upstream), probe)

    assert results == [True, False], results
    sent = stub_upstream.received[0]
    assert (sent.method, sent.path) == ("GET", "/v1/models"), sent
    assert sent.headers["x-api-key"] == API_KEY, sent.headers


def test_the_defaults_fit_the_hosted_api() -> None:
    config = AnthropicConfig(name="claude", model=MODEL, api_key=SecretStr(API_KEY))
    provider = AnthropicProvider(config)

    assert isinstance(provider, Provider)
    assert config.base_url == "https://api.anthropic.com"
    assert provider.context_window == 200_000
    assert API_KEY not in repr(config)
    asyncio.run(provider.close())
