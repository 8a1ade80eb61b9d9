"""Promotion gates: the judgement a new generation must pass before it goes live.

A gate is any callable ``gate(context: GateContext) -> GateResult``, named in
the settings by its import path (``flows.reindex.gate``). It sees the
candidate generation, the live one (or none), a ``search(query, k)`` over
the candidate and the configured questions. It must not change anything:
the reindex flow promotes or keeps the old generation from its verdict.

This module does not import Prefect, so gates can be tested and reused
without an orchestrator.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from index.catalog import ChunkRecord, Generation
from ingestion.errors import ConfigError
from retrieval.retriever import SearchHit

from .config import GateQuestion

__all__ = [
    "Gate",
    "GateContext",
    "GateResult",
    "derived_questions",
    "load_gate",
    "retrieval_self_check",
]

logger = logging.getLogger(__name__)

DERIVED_QUESTIONS = 8
"""How many documents of the candidate the self-check asks about when no questions are set."""


@dataclass(frozen=True)
class GateResult:
    """A gate's verdict: pass or not, why, and the figures behind it."""

    passed: bool
    reasons: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GateContext:
    """What a gate may look at."""

    collection: str
    candidate: Generation
    live: Generation | None
    search: Callable[[str, int], list[SearchHit]]
    """Search the candidate generation: ``search(query, k)``, best first."""
    questions: Sequence[GateQuestion]
    k: int = 5
    min_hit_rate: float = 1.0
    live_chunks: int = 0
    """Live chunks of the candidate."""
    sample: Callable[[int], list[ChunkRecord]] = lambda _n: []
    """The first passage of up to ``n`` documents of the candidate."""


Gate = Callable[[GateContext], GateResult]


def load_gate(path: str) -> Gate:
    """The gate callable named by ``package.module:callable``."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        gate = getattr(module, attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"flows.reindex.gate: cannot load {path!r} ({err}); name an importable "
            "callable as package.module:callable."
        ) from err
    if not callable(gate):
        raise ConfigError(f"flows.reindex.gate: {path!r} is not callable.")
    return gate


def retrieval_self_check(context: GateContext) -> GateResult:
    """Pass when every question still finds its expected document in the top ``k``.

    Without configured questions, the questions come from the candidate
    itself: the title (or first sentence) of a few of its documents must
    find that document. A candidate with no live chunks always fails.
    """
    if context.live_chunks == 0:
        return GateResult(
            False,
            [f"generation {context.candidate.id} holds no live chunks"],
            {"live_chunks": 0},
        )
    questions = list(context.questions) or derived_questions(
        context.sample(DERIVED_QUESTIONS)
    )
    if not questions:
        return GateResult(
            False,
            ["no gate questions are configured and none could be derived"],
            {"live_chunks": context.live_chunks},
        )
    misses = [q for q in questions if not _found(context, q)]
    hit_rate = 1 - len(misses) / len(questions)
    metrics = {
        "questions": len(questions),
        "hits": len(questions) - len(misses),
        "hit_rate": round(hit_rate, 4),
        "k": context.k,
        "live_chunks": context.live_chunks,
        "derived": not context.questions,
    }
    reasons = [f"hit rate {hit_rate:.2f} over {len(questions)} question(s)"]
    reasons += [f"missed {q.expect!r} for {q.query!r}" for q in misses[:5]]
    passed = hit_rate >= context.min_hit_rate
    reasons[0] += (
        f" {'meets' if passed else 'is below'} the minimum {context.min_hit_rate:.2f}"
    )
    return GateResult(passed, reasons, metrics)


def derived_questions(passages: Sequence[ChunkRecord]) -> list[GateQuestion]:
    """One question per document: its title, or the first sentence of its text."""
    questions = []
    for passage in passages:
        query = (passage.title or "").strip() or _first_sentence(passage.text)
        if query:
            questions.append(GateQuestion(query=query, expect=passage.uri))
    return questions


def _found(context: GateContext, question: GateQuestion) -> bool:
    hits = context.search(question.query, context.k)
    return any(
        question.expect in hit.uri or question.expect in hit.doc_id for hit in hits
    )


_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _first_sentence(text: str, limit: int = 200) -> str:
    first = _SENTENCE_END.split(text.strip(), maxsplit=1)[0]
    return " ".join(first.split())[:limit]
