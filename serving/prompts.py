"""Versioned prompt templates, context packing and citations.

The answer pipeline turns retrieved passages into a prompt in three steps:

1. :func:`pack_context` takes passages best score first until the token budget
   is spent and numbers them ``[1]``, ``[2]``, ... in the order they are shown.
2. :func:`build_messages` fills a :class:`PromptTemplate` with the numbered
   passages and the question.
3. :func:`extract_citations` maps the ``[n]`` marks of the answer back to the
   packed passages, and :func:`verified_citations` checks them: an answer
   with no mark, or whose marks name passages that do not hold its words
   (small models do both), cites the passages that hold most of the content
   words of its claims instead (:func:`attribute_citations`).

A template is named and versioned; ``prompt_version`` (``"grounded-qa@1"``)
is part of any cache key, so changing the text of a template means giving it a
new version, never editing a published one. When no passage clears the score
threshold the caller answers :data:`NO_ANSWER_TEXT` without calling a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Protocol, Self, TypeVar

from pydantic import Field, model_validator

from index.lexical import STOPWORDS
from ingestion.config import NAME_PATTERN, StrictModel
from ingestion.errors import ConfigError

from .gateway.providers import ChatMessage

__all__ = [
    "BUILTIN_TEMPLATES",
    "DEFAULT_TEMPLATE",
    "MIN_SUPPORT",
    "NO_ANSWER_TEXT",
    "PackedContext",
    "PackedPassage",
    "Passage",
    "PassageLike",
    "PromptConfig",
    "PromptTemplate",
    "attribute_citations",
    "build_messages",
    "citation_grammar",
    "context_budget",
    "extract_citations",
    "pack_context",
    "verified_citations",
]

NO_ANSWER_TEXT = "I don't know: none of the indexed passages answers this question."

TokenCounter = Callable[[str], int]

_PLACEHOLDER = re.compile(r"\{(context|question)\}")
_CITATION = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]")
_NUMBER = re.compile(r"\d+")
_WORD_END = re.compile(r"\S(?=\s)")
_CONTENT_WORD = re.compile(r"[^\W_]{3,}")

# The share of an answer's content words a passage must hold to be cited when
# the answer carries no [n] marks.
MIN_SUPPORT = 0.5
# Passages supporting a claim nearly as well as the best one are cited beside it.
_NEAR_BEST = 0.9
_MIN_CLAIM_WORDS = 3
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """A system and a user message with ``{context}`` and ``{question}`` placeholders.

    ``cite_by_grammar`` asks the provider to hold the answer to the form of
    :func:`citation_grammar`: one claim, then a citation mark.
    """

    name: str
    version: int
    system: str
    user: str
    cite_by_grammar: bool = False

    def __post_init__(self) -> None:
        text = self.system + self.user
        missing = [p for p in ("{context}", "{question}") if p not in text]
        if missing:
            raise ConfigError(
                f"The prompt template {self.prompt_version} has no "
                f"{' or '.join(missing)} placeholder; put it in the system or "
                "the user text."
            )

    @property
    def prompt_version(self) -> str:
        return f"{self.name}@{self.version}"

    def render(self, question: str, context: str) -> tuple[str, str]:
        """The system and user text with the placeholders filled in one pass.

        One pass, so a passage that happens to contain ``{question}`` stays as
        it is.
        """
        values = {"context": context, "question": question}

        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: values[m[1]], text)

        return fill(self.system), fill(self.user)


# Laid out for small models. With SmolLM2-135M-Instruct, the passages in the
# system message and the bare question in the user message draw the most
# answers from the right passage; a closing instruction, a worked example or
# the question asked twice draw fewer.
_GROUNDED_SYSTEM = (
    "Answer using only the passages below, in one sentence. Cite the passage "
    "number in brackets, like [1]. If the passages do not contain the answer, "
    'say "I don\'t know."\n\n{context}'
)

# Version 1 leaves the answer's form to the model; a model this small rarely
# writes the [n] marks and often runs on. Version 2, the default, holds the
# answer to one claim followed by a citation mark (or "I don't know.") with a
# grammar, where the provider can enforce one (see :func:`citation_grammar`).
GROUNDED_QA_V1 = PromptTemplate(
    name="grounded-qa",
    version=1,
    system=_GROUNDED_SYSTEM,
    user="Question: {question}",
)
DEFAULT_TEMPLATE = PromptTemplate(
    name="grounded-qa",
    version=2,
    system=_GROUNDED_SYSTEM,
    user="Question: {question}",
    cite_by_grammar=True,
)

BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    t.prompt_version: t for t in (GROUNDED_QA_V1, DEFAULT_TEMPLATE)
}


class PromptConfig(StrictModel):
    """Which prompt template answers questions, and how much context it gets.

    ``template`` and ``version`` name a built-in template, or a template of
    your own whose ``system`` and ``user`` text you give here; a built-in
    version cannot be overridden, so a cache keyed by ``prompt_version`` never
    mixes two texts.
    """

    template: str = Field(default=DEFAULT_TEMPLATE.name, pattern=NAME_PATTERN)
    version: int = Field(default=DEFAULT_TEMPLATE.version, ge=1)
    system: str | None = Field(
        default=None, description="System text of your own template."
    )
    user: str | None = Field(
        default=None,
        description="User text of your own template, with {context} and {question}.",
    )
    min_score: float | None = Field(
        default=None,
        description="Passages scoring below this are not shown to the model; when "
        "none is left the answer is 'I don't know' and no model is called. "
        "Unset keeps every passage.",
    )
    max_context_tokens: int = Field(
        default=1024, ge=16, description="At most this many tokens of passages."
    )
    reserve_answer_tokens: int = Field(
        default=256,
        ge=1,
        description="Tokens of the context window kept free for the answer.",
    )

    @model_validator(mode="after")
    def _check_template(self) -> Self:
        self.prompt_template()
        return self

    @property
    def prompt_version(self) -> str:
        return f"{self.template}@{self.version}"

    def prompt_template(self) -> PromptTemplate:
        """The template these settings name, built in or given here."""
        builtin = BUILTIN_TEMPLATES.get(self.prompt_version)
        own_text = self.system is not None or self.user is not None
        if builtin is not None and own_text:
            raise ConfigError(
                f"prompt: {self.prompt_version} is a built-in template and cannot "
                "be changed; give your system and user text a template name or "
                "version of its own."
            )
        if builtin is not None:
            return builtin
        if self.system is None or self.user is None:
            known = ", ".join(sorted(BUILTIN_TEMPLATES))
            raise ConfigError(
                f"prompt: {self.prompt_version} is not a built-in template "
                f"(known: {known}); set both prompt.system and prompt.user to "
                "define it."
            )
        return PromptTemplate(self.template, self.version, self.system, self.user)


class PassageLike(Protocol):
    """What packing needs of a passage: its text and its retrieval score."""

    @property
    def text(self) -> str: ...

    @property
    def score(self) -> float: ...


P = TypeVar("P", bound=PassageLike)


@dataclass(frozen=True, slots=True)
class Passage:
    """A retrieved passage with what a citation shows."""

    chunk_id: str
    doc_id: str
    uri: str
    title: str | None
    text: str
    score: float
    as_of: datetime | None = None


@dataclass(frozen=True, slots=True)
class PackedPassage(Generic[P]):
    """A passage as shown to the model: its number, shown text and token count."""

    number: int
    passage: P
    text: str
    tokens: int
    truncated: bool = False

    @property
    def rendered(self) -> str:
        return _render(self.number, self.text)


@dataclass(frozen=True, slots=True)
class PackedContext(Generic[P]):
    """The numbered passages that fit the budget, in the order they are shown."""

    passages: tuple[PackedPassage[P], ...]
    budget_tokens: int

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.passages)

    @property
    def text(self) -> str:
        return "\n\n".join(p.rendered for p in self.passages)

    def __len__(self) -> int:
        return len(self.passages)

    def passage(self, number: int) -> PackedPassage[P] | None:
        """The passage shown as ``[number]``, or None if there is none."""
        if 1 <= number <= len(self.passages):
            return self.passages[number - 1]
        return None


def pack_context(
    passages: Sequence[P], count_tokens: TokenCounter, budget_tokens: int
) -> PackedContext[P]:
    """The best passages that fit ``budget_tokens``, numbered from 1.

    Passages are taken best score first (ties keep their given order). One
    that does not fit is skipped and a smaller later one may still fit. A
    passage is never cut, except when none fits whole: then the best one
    alone is shown, cut at a word boundary to the budget. Each passage costs
    the tokens of its numbered form, ``[n] text``.
    """
    ranked = sorted(passages, key=lambda p: p.score, reverse=True)
    packed: list[PackedPassage[P]] = []
    spent = 0
    for passage in ranked:
        number = len(packed) + 1
        tokens = count_tokens(_render(number, passage.text))
        if spent + tokens <= budget_tokens:
            packed.append(PackedPassage(number, passage, passage.text, tokens))
            spent += tokens
    if not packed and ranked and budget_tokens > 0:
        cut = _truncate(ranked[0], count_tokens, budget_tokens)
        if cut is not None:
            packed.append(cut)
    return PackedContext(tuple(packed), budget_tokens)


def context_budget(
    template: PromptTemplate,
    question: str,
    count_tokens: TokenCounter,
    context_window: int,
    config: PromptConfig,
) -> int:
    """How many tokens of passages fit beside the template, question and answer.

    The chat template of the model adds a few tokens per message that this
    does not see; ``reserve_answer_tokens`` should leave room for them.
    """
    system, user = template.render(question, "")
    fixed = count_tokens(system) + count_tokens(user)
    room = context_window - config.reserve_answer_tokens - fixed
    return max(0, min(config.max_context_tokens, room))


def build_messages(
    template: PromptTemplate, question: str, packed: PackedContext[P]
) -> list[ChatMessage]:
    """The chat messages that ask ``question`` over the packed passages."""
    system, user = template.render(question, packed.text)
    messages = [ChatMessage("system", system)] if system.strip() else []
    messages.append(ChatMessage("user", user))
    return messages


def extract_citations(
    answer_text: str, packed: PackedContext[P]
) -> list[PackedPassage[P]]:
    """The passages the answer cites as ``[n]``, ``[1, 3]`` or ``[1][2]``.

    Numbers that name no shown passage are ignored; each passage is listed
    once, in the order the answer first cites it.
    """
    cited: dict[int, PackedPassage[P]] = {}
    for mark in _CITATION.finditer(answer_text):
        for digits in _NUMBER.findall(mark[1]):
            passage = packed.passage(int(digits))
            if passage is not None:
                cited.setdefault(passage.number, passage)
    return list(cited.values())


def citation_grammar(passages: int, max_claim_chars: int = 240) -> str:
    """A GBNF grammar: one claim and the mark of a shown passage, or "I don't know."

    The claim is free text on one line without brackets, at most
    ``max_claim_chars`` characters; the mark names one of the ``passages``
    numbers, so it always maps back to a passage. A provider that enforces it
    (llama.cpp) stops when the mark is written.
    """
    if passages < 1:
        raise ValueError("a citation grammar needs at least one passage")
    numbers = " | ".join(f'"{n}"' for n in range(1, passages + 1))
    return (
        f'root ::= claim " [" number "]" | "I don\'t know."\n'
        f"claim ::= [^\\[\\]\\n]{{1,{max_claim_chars}}}\n"
        f"number ::= {numbers}\n"
    )


def verified_citations(
    answer_text: str, packed: PackedContext[P], *, min_support: float = MIN_SUPPORT
) -> list[PackedPassage[P]]:
    """The passages an answer cites, checked against what they say.

    The answer's own ``[n]`` marks stand when a marked passage supports one
    of its claims (see :func:`attribute_citations` for support). When none
    does (small models often mark the wrong passage) or the answer carries no
    marks, the passages that support its claims are cited instead; when no
    passage supports it, the marks stand as the model wrote them.
    """
    marked = extract_citations(answer_text, packed)
    if marked:
        subset = PackedContext(tuple(marked), packed.budget_tokens)
        if attribute_citations(answer_text, subset, min_support=min_support):
            return marked
    return attribute_citations(answer_text, packed, min_support=min_support) or marked


def attribute_citations(
    answer_text: str,
    packed: PackedContext[P],
    *,
    min_support: float = MIN_SUPPORT,
) -> list[PackedPassage[P]]:
    """The passages that support an answer which cites none by number.

    Each sentence of the answer is a claim. A passage's support for a claim
    is the share of the claim's content words (three letters or more, common
    English words left out) that it holds. A claim cites its best supported
    passage when that support reaches ``min_support``, with any other passage
    that comes near it. Claims of fewer than :data:`_MIN_CLAIM_WORDS` content
    words, and claims no passage supports enough (the model's own knowledge,
    or "I don't know"), cite nothing. Passages are listed once, in the order
    the answer first leans on them.
    """
    cited: dict[int, PackedPassage[P]] = {}
    passages = [(p, _content_words(p.text)) for p in packed.passages]
    for sentence in _SENTENCE_END.split(answer_text):
        claim = _content_words(sentence)
        if len(claim) < _MIN_CLAIM_WORDS or not passages:
            continue
        support = [(len(claim & words) / len(claim), p) for p, words in passages]
        best = max(share for share, _ in support)
        if best < min_support:
            continue
        for share, passage in sorted(support, key=lambda pair: -pair[0]):
            if share >= best * _NEAR_BEST:
                cited.setdefault(passage.number, passage)
    return list(cited.values())


def _content_words(text: str) -> set[str]:
    return {
        w
        for w in (m.group() for m in _CONTENT_WORD.finditer(text.lower()))
        if w not in STOPWORDS
    }


def _render(number: int, text: str) -> str:
    return f"[{number}] {text}"


def _truncate(
    passage: P, count_tokens: TokenCounter, budget_tokens: int
) -> PackedPassage[P] | None:
    """The longest head of the passage whose numbered form fits the budget.

    Heads end at a word where one fits, else at a character; the search is a
    bisection, so it asks the counter about log(n) heads, not n.
    """
    text = passage.text
    word_ends = [m.end() for m in _WORD_END.finditer(text + " ")]
    head = _longest_fitting(text, word_ends, count_tokens, budget_tokens)
    if head is None:
        head = _longest_fitting(
            text, list(range(1, len(text) + 1)), count_tokens, budget_tokens
        )
    if head is None:
        return None
    return PackedPassage(
        1, passage, head, count_tokens(_render(1, head)), truncated=True
    )


def _longest_fitting(
    text: str, cuts: list[int], count_tokens: TokenCounter, budget_tokens: int
) -> str | None:
    low, high, best = 0, len(cuts) - 1, None
    while low <= high:
        middle = (low + high) // 2
        head = text[: cuts[middle]]
        if count_tokens(_render(1, head)) <= budget_tokens:
            best, low = head, middle + 1
        else:
            high = middle - 1
    return best
