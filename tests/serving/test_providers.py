"""The provider protocol: what every provider promises, and the scripted fake.

The contract tests run against the scripted fake and the real llama.cpp
provider alike, so tests of callers that use the fake hold for the real one.
"""

from __future__ import annotations

import asyncio

import pytest

from ingestion.errors import ProviderError, RequestError
from serving.gateway.providers import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Provider,
    ScriptedProvider,
    StreamEvent,
    TokenDelta,
)


def ask(question: str, **options: object) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", question)], **options)


async def collect(provider: Provider, request: GenerationRequest) -> list[StreamEvent]:
    return [event async for event in provider.stream(request)]


@pytest.fixture(params=["scripted", "llamacpp"])
def provider(request: pytest.FixtureRequest) -> Provider:
    if request.param == "scripted":
        return ScriptedProvider(["Paris is the capital of France."])
    return request.getfixturevalue("llama_provider")


def test_every_provider_satisfies_the_protocol(provider: Provider) -> None:
    assert isinstance(provider, Provider)
    assert provider.context_window > 0


def test_a_stream_ends_with_one_result_whose_text_joins_the_deltas(
    provider: Provider,
) -> None:
    request = ask("What is the capital of France?", max_tokens=32)

    events = asyncio.run(collect(provider, request))

    *deltas, result = events
    assert isinstance(result, GenerationResult), events
    assert all(isinstance(d, TokenDelta) for d in deltas), events
    assert len(deltas) >= 2, f"expected several deltas, got {deltas}"
    assert result.text == "".join(d.text for d in deltas)
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0


def test_a_generation_reports_usage_and_why_it_stopped(provider: Provider) -> None:
    result = asyncio.run(provider.generate(ask("Name a fruit.", max_tokens=32)))

    assert result.text.strip(), result
    assert result.usage.total_tokens == (
        result.usage.prompt_tokens + result.usage.completion_tokens
    )
    assert result.finish_reason in ("stop", "length")


def test_max_tokens_cuts_the_answer_short(provider: Provider) -> None:
    request = ask("Tell me a long story about a dragon.", max_tokens=3)

    result = asyncio.run(provider.generate(request))

    assert result.finish_reason == "length", result
    assert result.usage.completion_tokens == 3, result


def test_token_counts_grow_with_the_text(provider: Provider) -> None:
    assert provider.count_tokens("") == 0
    assert (
        0 < provider.count_tokens("hello") < provider.count_tokens("hello there world")
    )


def test_malformed_requests_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(RequestError, match="at least one message"):
        GenerationRequest([])
    with pytest.raises(RequestError, match="max_tokens"):
        ask("hi", max_tokens=0)
    with pytest.raises(RequestError, match="temperature"):
        ask("hi", temperature=-1.0)
    with pytest.raises(RequestError, match="role"):
        ChatMessage("robot", "hi")


def test_one_stop_string_is_one_stop_sequence() -> None:
    assert ask("hi", stop="\n\n").stop == ("\n\n",)


def test_the_script_is_followed_in_order_and_its_last_answer_repeats() -> None:
    provider = ScriptedProvider(["one", "two"])

    async def answers() -> list[str]:
        return [(await provider.generate(ask("q"))).text for _ in range(3)]

    assert asyncio.run(answers()) == ["one", "two", "two"]
    assert len(provider.requests) == 3


def test_a_scripted_failure_is_raised_to_the_caller() -> None:
    provider = ScriptedProvider([ProviderError("upstream down"), "fine"])

    with pytest.raises(ProviderError, match="upstream down"):
        asyncio.run(provider.generate(ask("q")))
    assert asyncio.run(provider.generate(ask("q"))).text == "fine"


def test_a_callable_script_answers_from_the_request() -> None:
    provider = ScriptedProvider([lambda r: r.messages[-1].content.upper()])

    assert asyncio.run(provider.generate(ask("echo"))).text == "ECHO"


def test_a_slow_scripted_provider_can_be_timed_out() -> None:
    provider = ScriptedProvider(["late"], delay=5.0)

    async def call() -> GenerationResult:
        return await asyncio.wait_for(provider.generate(ask("q")), timeout=0.05)

    with pytest.raises(TimeoutError):
        asyncio.run(call())


def test_a_closed_scripted_provider_refuses_requests() -> None:
    provider = ScriptedProvider()
    asyncio.run(provider.close())

    with pytest.raises(ProviderError, match="closed"):
        asyncio.run(provider.generate(ask("q")))
