"""The OpenAI-compatible provider against a real llama.cpp server and a stub.

The llama.cpp server (SmolLM2-135M-Instruct, greedy at temperature 0) shows
what a real upstream does; the stub upstream shows what one cannot be made
to do on demand: error statuses, malformed answers, silence, stalls.
"""

from __future__ import annotations

import asyncio
import gzip
import html
import ipaddress
import json
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pydantic
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ingestion.errors import ProviderError, UpstreamError
from serving.gateway._http import parse_retry_after, secret_free_excerpt
from serving.gateway.openai_compat import (
    OpenAICompatibleConfig,
    OpenAICompatibleProvider,
)
from serving.gateway.providers import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Provider,
    StreamEvent,
    TokenDelta,
)
from tests.conftest import PYTHON_MANUAL
from tests.serving.gateway.conftest import (
    LLAMA_MODEL_ALIAS,
    LlamaServer,
    Reply,
    StubUpstream,
    free_port,
    sse,
)

_T = TypeVar("_T")

API_KEY = "sk-test-0123456789abcdef"
QUESTION = "What is the capital of France? Answer in one sentence."


def ask(question: str = QUESTION, **options: Any) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", question)], **options)


def config_for(base_url: str, **overrides: Any) -> OpenAICompatibleConfig:
    settings: dict[str, Any] = {
        "name": "upstream-a",
        "base_url": base_url,
        "model": LLAMA_MODEL_ALIAS,
        "context_window": 2048,
        "max_tokens": 32,
    }
    return OpenAICompatibleConfig(**(settings | overrides))


def with_provider(
    config: OpenAICompatibleConfig,
    work: Callable[[OpenAICompatibleProvider], Awaitable[_T]],
) -> _T:
    """Runs ``work`` with a fresh provider on a fresh event loop, then closes it."""

    async def main() -> _T:
        provider = OpenAICompatibleProvider(config)
        try:
            return await work(provider)
        finally:
            await provider.close()

    return asyncio.run(main())


async def collect(
    provider: OpenAICompatibleProvider, request: GenerationRequest
) -> list[StreamEvent]:
    async with aclosing(provider.stream(request)) as stream:
        return [event async for event in stream]


def chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "model": "stub-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def completion(text: str, finish: str = "stop") -> dict[str, Any]:
    return {
        "model": "stub-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 2},
    }


def failure(provider_config: OpenAICompatibleConfig, *, stream: bool) -> UpstreamError:
    """The error a generation (or a stream) against ``provider_config`` raises."""

    async def attempt(provider: OpenAICompatibleProvider) -> None:
        if stream:
            await collect(provider, ask())
        else:
            await provider.generate(ask())

    with pytest.raises(UpstreamError) as caught:
        with_provider(provider_config, attempt)
    return caught.value


# A real llama.cpp server.


@pytest.mark.slow
def test_generate_answers_with_the_servers_usage(llama_server: LlamaServer) -> None:
    result = with_provider(
        config_for(llama_server.base_url), lambda p: p.generate(ask())
    )

    assert result.text.strip(), result
    assert result.usage.prompt_tokens > 5, result.usage
    assert 0 < result.usage.completion_tokens <= 32, result.usage
    assert result.finish_reason in ("stop", "length"), result
    assert result.model, result


@pytest.mark.slow
def test_a_stream_joins_to_the_whole_answer_and_ends_with_one_result(
    llama_server: LlamaServer,
) -> None:
    async def both(provider: OpenAICompatibleProvider) -> Any:
        return await provider.generate(ask()), await collect(provider, ask())

    whole, events = with_provider(config_for(llama_server.base_url), both)

    *deltas, result = events
    assert len(deltas) > 1, events
    assert all(isinstance(d, TokenDelta) for d in deltas), events
    assert isinstance(result, GenerationResult), events
    assert "".join(d.text for d in deltas) == result.text, events
    assert result.text == whole.text, (result.text, whole.text)
    assert result.usage.prompt_tokens > 5, result.usage
    assert result.usage.completion_tokens > 0, result.usage
    assert result.finish_reason == whole.finish_reason, (result, whole)


@pytest.mark.slow
def test_max_tokens_cuts_the_answer_with_finish_reason_length(
    llama_server: LlamaServer,
) -> None:
    request = ask("Write a long story about a lighthouse keeper.", max_tokens=3)

    async def both(provider: OpenAICompatibleProvider) -> Any:
        return await provider.generate(request), await collect(provider, request)

    whole, events = with_provider(config_for(llama_server.base_url), both)

    assert whole.finish_reason == "length", whole
    assert whole.usage.completion_tokens == 3, whole.usage
    assert events[-1].finish_reason == "length", events


@pytest.mark.slow
def test_a_stop_sequence_ends_the_answer_before_it(llama_server: LlamaServer) -> None:
    request = ask("Name three colours of the rainbow.", max_tokens=24)

    async def full_then_stopped(provider: OpenAICompatibleProvider) -> Any:
        full = await provider.generate(request)
        words = full.text.split()
        assert len(words) > 3, full.text
        stop = words[3]
        stopped = await provider.generate(
            ask("Name three colours of the rainbow.", max_tokens=24, stop=[stop])
        )
        return full, stop, stopped

    full, stop, stopped = with_provider(
        config_for(llama_server.base_url), full_then_stopped
    )

    assert stop not in stopped.text, (stop, stopped.text)
    assert full.text.startswith(stopped.text), (full.text, stopped.text)
    assert len(stopped.text) < len(full.text), (full.text, stopped.text)
    assert stopped.finish_reason == "stop", stopped


@pytest.mark.slow
def test_a_grammar_constrains_the_answer_on_a_server_that_supports_it(
    llama_server: LlamaServer,
) -> None:
    request = ask("Is the sky blue? Answer yes or no.", grammar='root ::= "yes" | "no"')
    config = config_for(llama_server.base_url, supports_grammar=True)

    result = with_provider(config, lambda p: p.generate(request))

    assert result.text in ("yes", "no"), result.text


@pytest.mark.slow
def test_leaving_a_stream_early_frees_the_server_for_the_next_request(
    llama_server: LlamaServer,
) -> None:
    long_request = ask("Write a long story about a lighthouse keeper.", max_tokens=400)

    async def leave_then_ask(provider: OpenAICompatibleProvider) -> Any:
        async with aclosing(provider.stream(long_request)) as stream:
            first = await anext(stream)
        return first, await provider.generate(ask(max_tokens=8))

    first, after = with_provider(config_for(llama_server.base_url), leave_then_ask)

    assert isinstance(first, TokenDelta), first
    assert after.text, after


@pytest.mark.slow
def test_a_server_killed_mid_stream_fails_retryably_and_answers_after_restart(
    llama_server_factory: Callable[..., LlamaServer],
) -> None:
    server = llama_server_factory()
    long_request = ask("Write a long story about a lighthouse keeper.", max_tokens=400)

    async def crash_and_recover(provider: OpenAICompatibleProvider) -> Any:
        received: list[StreamEvent] = []

        async def read_and_kill() -> None:
            async with aclosing(provider.stream(long_request)) as stream:
                async for event in stream:
                    received.append(event)
                    if len(received) == 1:
                        server.kill()

        with pytest.raises(UpstreamError) as mid_stream:
            await read_and_kill()
        with pytest.raises(UpstreamError) as while_down:
            await provider.generate(ask())
        down_health = await provider.health()
        await asyncio.to_thread(server.start)
        return (
            received,
            mid_stream.value,
            while_down.value,
            down_health,
            (
                await provider.health(),
                await provider.generate(ask(max_tokens=8)),
            ),
        )

    received, mid_stream, while_down, down_health, (up_health, after) = with_provider(
        config_for(server.base_url), crash_and_recover
    )

    assert isinstance(received[0], TokenDelta), received
    assert not any(isinstance(e, GenerationResult) for e in received), received
    assert (mid_stream.status, mid_stream.retryable) == (None, True), mid_stream
    assert "could not be connected" in str(while_down), while_down
    assert while_down.retryable, while_down
    assert (down_health, up_health) == (False, True)
    assert after.text, after


@pytest.mark.slow
def test_a_running_server_is_healthy(llama_server: LlamaServer) -> None:
    healthy = with_provider(config_for(llama_server.base_url), lambda p: p.health())

    assert healthy is True


@pytest.mark.slow
@pytest.mark.parametrize(
    "page",
    [
        "tutorial/introduction.html",
        "library/json.html",
        "library/functools.html",
        "library/asyncio-task.html",
    ],
)
def test_the_token_estimate_is_near_the_models_own_count_on_the_python_manual(
    llama_server: LlamaServer, page: str
) -> None:
    path = PYTHON_MANUAL / page
    if not path.is_file():
        pytest.skip(f"the Python manual (Debian package python3.11-doc) lacks {path}")
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", path.read_text())).split())
    text = text[:8000]
    count_url = llama_server.base_url.removesuffix("/v1") + "/extras/tokenize/count"
    true_count = httpx.post(count_url, json={"input": text}).json()["count"]
    provider = OpenAICompatibleProvider(config_for(llama_server.base_url))

    estimate = provider.count_tokens(text)

    assert abs(estimate - true_count) <= 0.25 * true_count, (estimate, true_count)


# A stub upstream.


def test_the_request_names_the_upstream_model_and_carries_the_settings(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(body=completion("Paris.")))
    config = config_for(
        stub_upstream.url + "/v1",
        model="upstream-model-7b",
        extra_body={"top_k": 20, "max_tokens": 999},
    )
    request = ask(temperature=0.5, stop=["\n\n"], model="logical-model")

    result = with_provider(config, lambda p: p.generate(request))

    sent = stub_upstream.received[0]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions"), sent
    assert sent.body == {
        "model": "upstream-model-7b",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 32,
        "temperature": 0.5,
        "stop": ["\n\n"],
        "stream": False,
        "top_k": 20,
    }, sent.body
    assert result.text == "Paris.", result
    assert result.model == "stub-model", result
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (11, 2)


def test_a_query_string_of_the_base_url_is_kept_and_never_shown(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(body=completion("Paris.")), Reply(status=404))
    config = config_for(stub_upstream.url + "/v1/?api-version=2024-06-01&key=s3cr3t")

    with_provider(config, lambda p: p.generate(ask()))
    err = failure(config, stream=False)

    paths = [r.path for r in stub_upstream.received]
    assert paths == ["/v1/chat/completions?api-version=2024-06-01&key=s3cr3t"] * 2
    assert "s3cr3t" not in str(err) and "Check base_url and model" in str(err), err


def test_a_stream_asks_for_usage_and_reports_it(stub_upstream: StubUpstream) -> None:
    usage = {
        "model": "stub-model",
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2},
    }
    events = sse(chunk("Par"), chunk("is."), chunk(finish="stop"), usage, "[DONE]")
    stub_upstream.script(Reply(chunks=events, content_type="text/event-stream"))

    streamed = with_provider(config_for(stub_upstream.url), lambda p: collect(p, ask()))

    assert stub_upstream.received[0].body["stream_options"] == {"include_usage": True}
    assert streamed[:-1] == [TokenDelta("Par"), TokenDelta("is.")], streamed
    result = streamed[-1]
    assert isinstance(result, GenerationResult), streamed
    assert result.text == "Paris.", result
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (9, 2)


def test_a_stream_without_usage_counts_its_deltas(stub_upstream: StubUpstream) -> None:
    events = sse(chunk("A"), chunk(" b"), chunk(" c", finish="length"), "[DONE]")
    stub_upstream.script(Reply(chunks=events))
    config = config_for(stub_upstream.url)

    async def stream_and_estimate(provider: OpenAICompatibleProvider) -> Any:
        return await collect(provider, ask()), provider.count_tokens(QUESTION)

    streamed, prompt_estimate = with_provider(config, stream_and_estimate)

    result = streamed[-1]
    assert result.usage.completion_tokens == 3, result.usage
    assert result.usage.prompt_tokens == prompt_estimate, result.usage
    assert result.finish_reason == "length", result


def test_a_grammar_is_dropped_for_a_server_without_grammar_support(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(body=completion("yes")), Reply(body=completion("yes")))
    request = ask(grammar='root ::= "yes" | "no"')

    with_provider(config_for(stub_upstream.url), lambda p: p.generate(request))
    with_provider(
        config_for(stub_upstream.url, supports_grammar=True),
        lambda p: p.generate(request),
    )

    without, with_grammar = (r.body for r in stub_upstream.received)
    assert "grammar" not in without, without
    assert with_grammar["grammar"] == 'root ::= "yes" | "no"', with_grammar


def test_identity_and_credentials_travel_as_headers(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(body=completion("ok")), Reply(body=completion("ok")))
    metadata = {"user": "José", "team": "search", "request_id": "req-42"}
    request = ask(metadata=metadata)
    settings = {"api_key": API_KEY, "headers": {"X-Tenant": "acme"}}

    with_provider(
        config_for(stub_upstream.url, forward_identity=True, **settings),
        lambda p: p.generate(request),
    )
    with_provider(
        config_for(stub_upstream.url, **settings), lambda p: p.generate(request)
    )

    forwarded, plain = (r.headers for r in stub_upstream.received)
    assert forwarded["authorization"] == f"Bearer {API_KEY}", forwarded
    assert forwarded["x-tenant"] == "acme", forwarded
    assert forwarded["x-ragline-user"] == "Jos%C3%A9", forwarded
    assert forwarded["x-ragline-team"] == "search", forwarded
    assert forwarded["x-request-id"] == "req-42", forwarded
    assert "x-ragline-user" not in plain and "x-request-id" not in plain, plain
    assert plain["authorization"] == f"Bearer {API_KEY}", plain


def test_429_is_retryable_and_says_how_long_to_wait(
    stub_upstream: StubUpstream,
) -> None:
    body = {"error": {"message": "Rate limit reached for requests", "type": "rate"}}
    stub_upstream.script(Reply(status=429, body=body, headers={"Retry-After": "7"}))

    err = failure(config_for(stub_upstream.url), stream=False)

    assert (err.status, err.retry_after, err.retryable) == (429, 7.0, True), err
    assert "'upstream-a'" in str(err) and "/chat/completions" in str(err), err
    assert "Rate limit reached for requests" in str(err), err
    assert "wait 7 s" in str(err), err


def test_a_server_error_is_retryable_and_quoted(stub_upstream: StubUpstream) -> None:
    stub_upstream.script(
        Reply(status=500, body={"error": {"message": "CUDA out of memory"}})
    )

    err = failure(config_for(stub_upstream.url), stream=True)

    assert (err.status, err.retryable, err.retry_after) == (500, True, None), err
    assert "HTTP 500" in str(err) and "CUDA out of memory" in str(err), err


def test_a_rejected_request_is_not_retryable_and_its_excerpt_hides_the_key(
    stub_upstream: StubUpstream,
) -> None:
    echo = (
        f"Invalid request from key {API_KEY}: headers Authorization: Bearer {API_KEY}"
    )
    stub_upstream.script(Reply(status=400, body={"error": {"message": echo}}))

    err = failure(config_for(stub_upstream.url, api_key=API_KEY), stream=False)

    assert (err.status, err.retryable) == (400, False), err
    assert "Invalid request from key" in str(err), err
    assert API_KEY not in str(err) and "0123456789abcdef" not in str(err), err


def test_an_answer_that_is_not_json_is_an_upstream_error(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(
        Reply(body="<html>Bad gateway</html>", content_type="text/html")
    )

    err = failure(config_for(stub_upstream.url), stream=False)

    assert "not JSON" in str(err) and "Bad gateway" in str(err), err
    assert err.retryable, err


def test_an_answer_without_choices_is_an_upstream_error(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(body={"id": "chatcmpl-1", "object": "chat.completion"}))

    err = failure(config_for(stub_upstream.url), stream=False)

    assert "unexpected shape" in str(err) and "choices" in str(err), err


def test_an_error_event_in_a_stream_is_an_upstream_error(
    stub_upstream: StubUpstream,
) -> None:
    events = sse(chunk("Par"), {"error": {"message": "slot crashed", "code": 503}})
    stub_upstream.script(Reply(chunks=events))

    err = failure(config_for(stub_upstream.url), stream=True)

    assert (err.status, err.retryable) == (503, True), err
    assert "slot crashed" in str(err), err


def test_a_stream_cut_before_its_end_is_an_upstream_error(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(chunks=sse(chunk("Par"))))

    err = failure(config_for(stub_upstream.url), stream=True)

    assert "before the answer was complete" in str(err), err
    assert err.retryable, err


def test_a_silent_server_hits_the_first_token_timeout_of_a_stream(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(hang="before_headers"))
    config = config_for(stub_upstream.url, first_token_timeout=0.2, total_timeout=30)

    err = failure(config, stream=True)

    assert str(err).startswith("The upstream 'upstream-a' (POST http://127.0.0.1:"), err
    assert str(err).endswith("sent no answer text within first_token_timeout=0.2 s.")
    assert (err.status, err.retryable) == (None, True), err
    assert stub_upstream.client_left.wait(10), "the connection was left open"


def test_a_silent_server_hits_the_total_timeout_of_a_whole_answer(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(hang="before_headers"))
    config = config_for(stub_upstream.url, first_token_timeout=0.1, total_timeout=0.3)

    err = failure(config, stream=False)

    assert "total_timeout=0.3 s" in str(err), err
    assert err.retryable, err


def test_a_stream_that_stalls_after_its_first_token_hits_the_total_timeout(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(chunks=sse(chunk("Par")), hang="after_chunks"))
    config = config_for(stub_upstream.url, first_token_timeout=0.3, total_timeout=0.6)
    received: list[StreamEvent] = []

    async def read(provider: OpenAICompatibleProvider) -> None:
        async with aclosing(provider.stream(ask())) as stream:
            async for event in stream:
                received.append(event)

    with pytest.raises(UpstreamError) as caught:
        with_provider(config, read)

    assert received == [TokenDelta("Par")], received
    assert "total_timeout=0.6 s" in str(caught.value), caught.value
    assert stub_upstream.client_left.wait(10), "the connection was left open"


def test_a_refused_connection_is_a_retryable_connect_error() -> None:
    config = config_for(f"http://127.0.0.1:{free_port()}/v1")

    err = failure(config, stream=False)

    assert "could not be connected" in str(err), err
    assert (err.status, err.retryable) == (None, True), err


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose listener never accepts: its backlog is full, so SYNs go unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_a_connection_never_accepted_hits_the_connect_timeout(
    unanswered_port: int,
) -> None:
    config = config_for(f"http://127.0.0.1:{unanswered_port}/v1", connect_timeout=0.3)

    err = failure(config, stream=True)

    assert "connect_timeout=0.3 s" in str(err), err
    assert err.retryable, err


def test_cancelling_a_generation_closes_the_upstream_connection(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(hang="before_headers"))

    async def cancel(provider: OpenAICompatibleProvider) -> None:
        task = asyncio.create_task(provider.generate(ask()))
        while not stub_upstream.received:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with_provider(config_for(stub_upstream.url), cancel)

    assert stub_upstream.client_left.wait(10), "the connection was left open"


def test_leaving_a_stream_early_closes_the_upstream_connection(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(chunks=sse(chunk("Par")), hang="after_chunks"))

    async def leave(provider: OpenAICompatibleProvider) -> StreamEvent:
        async with aclosing(provider.stream(ask())) as stream:
            return await anext(stream)

    first = with_provider(config_for(stub_upstream.url), leave)

    assert first == TokenDelta("Par"), first
    assert stub_upstream.client_left.wait(10), "the connection was left open"


def test_a_closed_provider_refuses_requests_and_is_unhealthy(
    stub_upstream: StubUpstream,
) -> None:
    async def use_after_close(provider: OpenAICompatibleProvider) -> bool:
        await provider.close()
        await provider.close()
        with pytest.raises(ProviderError, match="closed") as generating:
            await provider.generate(ask())
        with pytest.raises(ProviderError, match="closed"):
            await collect(provider, ask())
        assert not isinstance(generating.value, UpstreamError), generating.value
        return await provider.health()

    healthy = with_provider(config_for(stub_upstream.url), use_after_close)

    assert healthy is False
    assert stub_upstream.received == [], stub_upstream.received


def test_health_asks_for_the_model_list_and_fails_quietly(
    stub_upstream: StubUpstream,
) -> None:
    stub_upstream.script(Reply(body={"data": []}), Reply(status=503))

    async def probe(provider: OpenAICompatibleProvider) -> list[bool]:
        return [await provider.health(), await provider.health()]

    results = with_provider(config_for(stub_upstream.url + "/v1"), probe)
    refused = with_provider(
        config_for(f"http://127.0.0.1:{free_port()}"), lambda p: p.health()
    )

    assert results == [True, False], results
    assert refused is False
    assert [(r.method, r.path) for r in stub_upstream.received] == [
        ("GET", "/v1/models"),
        ("GET", "/v1/models"),
    ]


def test_the_provider_keeps_the_provider_protocol() -> None:
    provider = OpenAICompatibleProvider(config_for("http://127.0.0.1:1/v1"))

    assert isinstance(provider, Provider)
    assert (provider.name, provider.model, provider.context_window) == (
        "upstream-a",
        LLAMA_MODEL_ALIAS,
        2048,
    )
    assert provider.count_tokens("") == 0
    assert provider.count_tokens("four") == 1
    assert provider.count_tokens("five!") == 2
    asyncio.run(provider.close())


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC

    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", now=now) == 30.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("7", "250") == 0.25
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    assert parse_retry_after(None) is None


def test_excerpts_mask_keys_and_stay_short() -> None:
    text = (
        '{"error": {"type": "auth", "message": "bad key sk-live-abcdef123456 '
        "and token=hunter2hunter2, Bearer eyJhbGciOi.x.y; " + "x" * 500 + '"}}'
    )

    excerpt = secret_free_excerpt(text, ("hunter2hunter2",))

    assert excerpt.startswith("auth: bad key sk-***"), excerpt
    assert "abcdef123456" not in excerpt and "hunter2" not in excerpt, excerpt
    assert "eyJhbGciOi" not in excerpt, excerpt
    assert len(excerpt) <= 240, len(excerpt)


def test_settings_are_checked() -> None:
    with pytest.raises(pydantic.ValidationError, match="base_url must be an http"):
        config_for("ftp://models.example/v1")
    with pytest.raises(pydantic.ValidationError, match="must not exceed total"):
        config_for("http://127.0.0.1:1/v1", first_token_timeout=60, total_timeout=10)
    with pytest.raises(pydantic.ValidationError, match="not a valid HTTP header"):
        config_for("http://127.0.0.1:1/v1", headers={"bad header": "x"})

    config = config_for("http://127.0.0.1:1/v1/", api_key=API_KEY)

    assert config.base_url == "http://127.0.0.1:1/v1", config.base_url
    assert API_KEY not in repr(config) and API_KEY not in str(config.model_dump())


# The transport: pooled keep-alive connections (a scripted HTTP/1.1 server).

Answerer = Callable[["KeepAliveServer", int, bytes], Awaitable[bytes | None]]


class KeepAliveServer:
    """An HTTP/1.1 server on asyncio streams that keeps its connections open.

    ``answer`` gets the server, the request's number (from 0) and its body,
    and returns the raw answer to write, or None to close the connection
    without one; an answer saying ``connection: close`` closes it after. The
    server counts the connections it accepted and the most open at once.
    """

    def __init__(self, answer: Answerer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{port}/v1"

    async def __aenter__(self) -> KeepAliveServer:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=self.tls
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                body = await reader.readexactly(int(length[1]) if length else 0)
                number, self.requests = self.requests, self.requests + 1
                answer = await self.answer(self, number, body)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.partition(b"\r\n\r\n")[0]:
                    return
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.close()


def http_answer(
    payload: Any, *, status: str = "200 OK", headers: str = "", chunked: bool = False
) -> bytes:
    """A raw HTTP/1.1 answer: JSON (or bytes) with its length, or in chunks."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{headers}"
    if not chunked:
        return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body
    half = len(body) // 2
    parts = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]))
    return f"{head}transfer-encoding: chunked\r\n\r\n".encode() + parts + b"0\r\n\r\n"


def serve_and_run(
    answer: Answerer,
    work: Callable[[OpenAICompatibleProvider], Awaitable[_T]],
    **overrides: Any,
) -> tuple[KeepAliveServer, _T]:
    """Runs ``work`` with a provider of a :class:`KeepAliveServer` answering so."""

    async def main() -> tuple[KeepAliveServer, _T]:
        async with KeepAliveServer(answer) as server:
            provider = OpenAICompatibleProvider(config_for(server.url, **overrides))
            try:
                return server, await work(provider)
            finally:
                await provider.close()

    return asyncio.run(main())


async def answer_hi(server: KeepAliveServer, number: int, body: bytes) -> bytes:
    return http_answer(completion(f"hi {number}"))


def test_successive_requests_share_one_keep_alive_connection() -> None:
    async def five(provider: OpenAICompatibleProvider) -> list[str]:
        return [(await provider.generate(ask())).text for _ in range(5)]

    server, texts = serve_and_run(answer_hi, five)

    assert texts == [f"hi {n}" for n in range(5)], texts
    assert server.connections == 1, f"{server.connections} connections for 5 calls"


def test_a_reused_connection_closed_unanswered_is_replaced_by_a_new_one() -> None:
    async def answer_once_per_connection(
        server: KeepAliveServer, number: int, body: bytes
    ) -> bytes | None:
        return None if number == 1 else http_answer(completion(f"hi {number}"))

    async def two(provider: OpenAICompatibleProvider) -> list[str]:
        return [(await provider.generate(ask())).text for _ in range(2)]

    server, texts = serve_and_run(answer_once_per_connection, two)

    assert texts == ["hi 0", "hi 2"], texts
    assert server.connections == 2, server.connections


def test_a_fresh_connection_closed_unanswered_is_a_retryable_error() -> None:
    async def hang_up(server: KeepAliveServer, number: int, body: bytes) -> None:
        return None

    async def attempt(provider: OpenAICompatibleProvider) -> UpstreamError:
        with pytest.raises(UpstreamError) as caught:
            await provider.generate(ask())
        return caught.value

    server, err = serve_and_run(hang_up, attempt)

    assert err.retryable and "closed the connection" in str(err), err
    assert server.requests == 1, "a request on a fresh connection was sent twice"


def test_requests_beyond_max_connections_wait_for_a_free_one() -> None:
    async def slow(server: KeepAliveServer, number: int, body: bytes) -> bytes:
        await asyncio.sleep(0.05)
        return http_answer(completion("hi"))

    async def eight_at_once(provider: OpenAICompatibleProvider) -> list[str]:
        results = await asyncio.gather(*(provider.generate(ask()) for _ in range(8)))
        return [r.text for r in results]

    server, texts = serve_and_run(slow, eight_at_once, max_connections=2)

    assert texts == ["hi"] * 8, texts
    assert server.most_open <= 2, f"{server.most_open} connections open at once"


def test_no_idle_connection_is_kept_when_keep_alive_is_off() -> None:
    async def three(provider: OpenAICompatibleProvider) -> None:
        for _ in range(3):
            await provider.generate(ask())

    server, _ = serve_and_run(answer_hi, three, max_keepalive_connections=0)

    assert server.connections == 3, server.connections


def test_answers_in_chunks_gzipped_or_closed_at_their_end_are_read_whole() -> None:
    payload = completion("hi")
    gzipped = gzip.compress(json.dumps(payload).encode())
    answers = [
        http_answer(payload, chunked=True),
        http_answer(gzipped, headers="content-encoding: gzip\r\n"),
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + json.dumps(payload).encode(),
        http_answer(payload),
    ]

    async def scripted(server: KeepAliveServer, number: int, body: bytes) -> bytes:
        return answers[number]

    async def four(provider: OpenAICompatibleProvider) -> list[str]:
        return [(await provider.generate(ask())).text for _ in range(4)]

    server, texts = serve_and_run(scripted, four)

    assert texts == ["hi"] * 4, texts
    assert server.connections == 2, "a connection closed by its answer was reused"


def test_a_huge_error_answer_is_read_only_as_far_as_its_excerpt() -> None:
    async def huge(server: KeepAliveServer, number: int, body: bytes) -> bytes:
        text = "overloaded " + "x" * 4_000_000
        return http_answer({"error": {"message": text}}, status="503 Unavailable")

    async def attempt(provider: OpenAICompatibleProvider) -> UpstreamError:
        with pytest.raises(UpstreamError) as caught:
            await provider.generate(ask())
        return caught.value

    _, err = serve_and_run(huge, attempt)

    assert (err.status, err.retryable) == (503, True), err
    assert "overloaded" in str(err) and len(str(err)) < 600, str(err)[:600]


def test_a_proxy_named_by_the_environment_carries_the_requests(
    stub_upstream: StubUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "models.internal")
    monkeypatch.setenv("HTTP_PROXY", stub_upstream.url)
    stub_upstream.script(Reply(body=completion("via proxy")))

    result = with_provider(
        config_for("http://models.example:8000/v1"), lambda p: p.generate(ask())
    )
    bypassed = config_for("http://models.internal:1/v1")
    unproxied = config_for("http://models.example:8000/v1", trust_env=False)

    assert result.text == "via proxy", result
    (received,) = stub_upstream.received
    assert received.path == "http://models.example:8000/v1/chat/completions", received
    assert "could not be connected" in str(failure(bypassed, stream=False))
    assert failure(unproxied, stream=False).status is None
    assert len(stub_upstream.received) == 1, "NO_PROXY or trust_env was ignored"


def test_an_api_key_with_a_line_break_is_refused_without_echoing_it() -> None:
    with pytest.raises(pydantic.ValidationError, match="line break") as caught:
        config_for("http://127.0.0.1:1/v1", api_key="sk-secret-1234\nX-Evil: 1")

    assert "sk-secret-1234" not in str(caught.value), caught.value


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_an_https_upstream_is_called_over_tls_with_the_environments_trust(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert_file, key_file = tls_files
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)

    async def main() -> tuple[list[str], str, int]:
        async with KeepAliveServer(answer_hi, server_context) as server:
            trusted = OpenAICompatibleProvider(config_for(server.url))
            untrusted = OpenAICompatibleProvider(
                config_for(server.url, trust_env=False)
            )
            try:
                texts = [(await trusted.generate(ask())).text for _ in range(2)]
                with pytest.raises(UpstreamError) as refused:
                    await untrusted.generate(ask())
                return texts, str(refused.value), server.connections
            finally:
                await trusted.close()
                await untrusted.close()

    texts, refused, connections = asyncio.run(main())

    assert texts == ["hi 0", "hi 1"], texts
    assert "could not be connected" in refused and "CERTIFICATE" in refused, refused
    assert connections == 1, "the trusted calls did not share one connection"
