"""Prompt templates, context packing and citations, with a word-count tokenizer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from ingestion.errors import ConfigError
from serving.gateway.providers import ChatMessage, GenerationRequest, ScriptedProvider
from serving.prompts import (
    DEFAULT_TEMPLATE,
    NO_ANSWER_TEXT,
    Passage,
    PromptConfig,
    PromptTemplate,
    attribute_citations,
    build_messages,
    citation_grammar,
    context_budget,
    extract_citations,
    pack_context,
    verified_citations,
)


def words(text: str) -> int:
    return len(text.split())


def passage(chunk_id: str, text: str, score: float) -> Passage:
    return Passage(
        chunk_id=chunk_id,
        doc_id=f"doc-{chunk_id}",
        uri=f"file:///{chunk_id}.md",
        title=chunk_id.title(),
        text=text,
        score=score,
    )


@dataclass(frozen=True)
class Hit:
    """Any object with text and score can be packed."""

    chunk_id: str
    text: str
    score: float


def test_passages_are_packed_best_score_first_and_numbered_as_shown() -> None:
    packed = pack_context(
        [passage("low", "b b", 0.1), passage("high", "a a", 0.9)], words, 100
    )

    assert [p.passage.chunk_id for p in packed.passages] == ["high", "low"]
    assert [p.number for p in packed.passages] == [1, 2]
    assert packed.text == "[1] a a\n\n[2] b b"


def test_each_passage_costs_the_tokens_of_its_numbered_form() -> None:
    packed = pack_context([passage("a", "one two three", 0.5)], words, 100)

    assert packed.passages[0].tokens == 4, "'[1] one two three' is four words"
    assert packed.tokens == 4


def test_a_passage_that_does_not_fit_is_skipped_and_a_smaller_later_one_fits() -> None:
    packed = pack_context(
        [
            passage("first", "w " * 5, 0.9),
            passage("large", "w " * 50, 0.8),
            passage("small", "w " * 3, 0.7),
        ],
        words,
        12,
    )

    assert [p.passage.chunk_id for p in packed.passages] == ["first", "small"]
    assert [p.number for p in packed.passages] == [1, 2]
    assert packed.tokens <= 12
    assert not any(p.truncated for p in packed.passages)


def test_a_passage_is_cut_only_when_nothing_fits_whole() -> None:
    text = " ".join(f"w{i}" for i in range(40))

    packed = pack_context(
        [passage("big", text, 0.9), passage("big2", text, 0.1)], words, 10
    )

    assert len(packed) == 1, "only the best passage is shown, cut"
    shown = packed.passages[0]
    assert shown.truncated and shown.passage.chunk_id == "big"
    assert shown.text == " ".join(f"w{i}" for i in range(9)), "cut at a word"
    assert shown.tokens == 10


def test_a_single_word_larger_than_the_budget_is_cut_by_characters() -> None:
    def chars(text: str) -> int:
        return len(text)

    packed = pack_context([passage("a", "abcdefghij", 0.5)], chars, 8)

    assert packed.passages[0].text == "abcd", "'[1] abcd' is eight characters"


def test_a_budget_of_zero_packs_nothing() -> None:
    assert len(pack_context([passage("a", "text", 0.5)], words, 0)) == 0
    assert len(pack_context([], words, 100)) == 0


def test_anything_with_text_and_score_can_be_packed() -> None:
    packed = pack_context([Hit("x", "some text", 0.3)], words, 100)

    assert packed.passages[0].passage.chunk_id == "x"


def test_citations_are_mapped_in_first_mention_order_without_repeats() -> None:
    packed = pack_context(
        [passage(c, c, s) for c, s in [("a", 0.9), ("b", 0.8), ("c", 0.7)]],
        words,
        100,
    )

    cited = extract_citations("See [3] and [1, 2], also [2][1] and [ 3 ].", packed)

    assert [p.number for p in cited] == [3, 1, 2]
    assert [p.passage.chunk_id for p in cited] == ["c", "a", "b"]


def test_citation_numbers_that_name_no_passage_are_ignored() -> None:
    packed = pack_context([passage("a", "a", 0.9)], words, 100)

    cited = extract_citations("Per [0], [2] and [1, 7] and [x].", packed)

    assert [p.number for p in cited] == [1]


HANDBOOK = [
    (
        "pay",
        "On-call time is paid: 40 EUR per weekday and 80 EUR per weekend day.",
        0.9,
    ),
    ("leave", "Annual leave is 28 days; public holidays are paid days off.", 0.8),
    ("lab", "Wear safety glasses in the lab when soldering test equipment.", 0.7),
]


def handbook() -> object:
    return pack_context([passage(c, t, s) for c, t, s in HANDBOOK], words, 100)


def test_an_answer_without_marks_cites_the_passage_that_holds_its_words() -> None:
    cited = attribute_citations("You get 80 EUR per weekend day on call.", handbook())

    assert [p.passage.chunk_id for p in cited] == ["pay"]


def test_an_answer_no_passage_supports_cites_nothing() -> None:
    answer = "Penguins migrate across Antarctica every winter season."

    assert attribute_citations(answer, handbook()) == []
    assert verified_citations(answer, handbook()) == []


def test_a_mark_on_a_passage_that_does_not_hold_the_claim_is_corrected() -> None:
    cited = verified_citations("Weekend on-call days pay 80 EUR each [3].", handbook())

    assert [p.passage.chunk_id for p in cited] == ["pay"]


def test_a_mark_on_a_supporting_passage_stands() -> None:
    answer = "Annual leave is 28 days [2]. On-call weekend days pay 80 EUR [1]."

    cited = verified_citations(answer, handbook())

    assert [p.number for p in cited] == [2, 1]


def test_the_citation_grammar_names_only_shown_passages() -> None:
    grammar = citation_grammar(3)

    assert 'number ::= "1" | "2" | "3"' in grammar
    assert "I don't know." in grammar
    with pytest.raises(ValueError, match="at least one passage"):
        citation_grammar(0)


def test_messages_hold_the_instructions_the_passages_and_the_question() -> None:
    packed = pack_context(
        [passage("a", "The rotation lasts nine days.", 0.9)], words, 100
    )

    system, user = build_messages(DEFAULT_TEMPLATE, "How long is it?", packed)

    assert system.role == "system" and "passage number" in system.content
    assert "[1] The rotation lasts nine days." in system.content
    assert user == ChatMessage("user", "Question: How long is it?")


def test_placeholders_inside_passages_are_left_as_they_are() -> None:
    packed = pack_context([passage("a", "literal {question} and {x}", 0.9)], words, 100)

    system, _ = build_messages(DEFAULT_TEMPLATE, "Q?", packed)

    assert "literal {question} and {x}" in system.content


def test_a_template_without_a_system_text_sends_only_the_user_message() -> None:
    template = PromptTemplate("bare", 1, "", "{context}\n{question}")

    messages = build_messages(template, "Q?", pack_context([], words, 10))

    assert [m.role for m in messages] == ["user"]


def test_a_template_without_a_context_placeholder_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"mine@2 has no \{context\}"):
        PromptTemplate("mine", 2, "Be brief.", "{question}")


def test_the_default_prompt_is_grounded_qa_version_two_with_a_grammar() -> None:
    config = PromptConfig()

    assert config.prompt_version == "grounded-qa@2"
    assert config.prompt_template() is DEFAULT_TEMPLATE
    assert DEFAULT_TEMPLATE.cite_by_grammar
    assert not PromptConfig(version=1).prompt_template().cite_by_grammar


def test_a_template_of_your_own_is_named_and_versioned_by_the_settings() -> None:
    config = PromptConfig(
        template="terse", version=3, system="Cite [n].", user="{context}\n\n{question}"
    )

    template = config.prompt_template()

    assert template.prompt_version == "terse@3"
    assert template.system == "Cite [n]."


def test_a_built_in_template_cannot_be_changed_in_place() -> None:
    with pytest.raises(ValidationError, match="built-in template"):
        PromptConfig(system="Other text {context} {question}")


def test_an_unknown_template_without_its_text_is_rejected() -> None:
    with pytest.raises(ValidationError, match="not a built-in template"):
        PromptConfig(template="grounded-qa", version=9)


def test_the_context_budget_leaves_room_for_the_prompt_and_the_answer() -> None:
    config = PromptConfig(max_context_tokens=1000, reserve_answer_tokens=50)
    fixed = sum(words(t) for t in DEFAULT_TEMPLATE.render("a b c", ""))

    budget = context_budget(DEFAULT_TEMPLATE, "a b c", words, 200, config)

    assert budget == 200 - 50 - fixed
    assert context_budget(DEFAULT_TEMPLATE, "a b c", words, 10_000, config) == 1000
    assert context_budget(DEFAULT_TEMPLATE, "a b c", words, 10, config) == 0


def test_the_canned_answer_says_it_does_not_know() -> None:
    assert NO_ANSWER_TEXT.startswith("I don't know")


def test_an_answer_from_a_provider_is_traced_back_to_the_passages_it_cites() -> None:
    packed = pack_context(
        [
            passage("expenses", "Expenses are due on the fifth.", 0.9),
            passage("oncall", "The on-call rotation lasts nine days.", 0.8),
        ],
        words,
        100,
    )
    provider = ScriptedProvider(["It lasts nine days [2]."])
    messages = build_messages(DEFAULT_TEMPLATE, "How long is on-call?", packed)

    result = asyncio.run(provider.generate(GenerationRequest(messages)))

    cited = extract_citations(result.text, packed)
    assert [p.passage.chunk_id for p in cited] == ["oncall"]
    assert provider.requests[0].messages == tuple(messages)
