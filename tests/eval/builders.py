"""Runs made up for the tests of summaries, comparisons, the store and the CLI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from eval.models import AnswerRecord, Cell, RunInfo, RunRecord


def make_run(
    run_id: str,
    scores: Mapping[str, Sequence[float | None]],
    *,
    dataset: str = "golden",
    collection: str = "docs",
    created_at: datetime | None = None,
    extra_cells: Sequence[Cell] = (),
) -> RunRecord:
    """A run scoring questions ``q0``, ``q1``, … with the given scores per metric.

    A None score makes that cell an error of type ``TimeoutError``.
    """
    questions = max((len(values) for values in scores.values()), default=0)
    cells = [
        _cell(f"q{i}", metric, value)
        for metric, values in scores.items()
        for i, value in enumerate(values)
    ]
    answers = [
        AnswerRecord(
            question_id=f"q{i}",
            question=f"Question {i}?",
            answer=f"Answer {i}.",
            contexts=(f"passage {i}",),
            context_uris=(f"doc{i}.md",),
            context_chunk_ids=(f"c{i}",),
        )
        for i in range(questions)
    ]
    info = RunInfo(
        run_id=run_id,
        created_at=created_at or datetime(2026, 1, 1, tzinfo=UTC),
        dataset=dataset,
        dataset_hash="0" * 64,
        collection=collection,
        metrics=tuple(scores),
    )
    return RunRecord(info=info, answers=answers, cells=[*cells, *extra_cells])


def _cell(question_id: str, metric: str, value: float | None) -> Cell:
    if value is None:
        return Cell(
            question_id,
            metric,
            "error",
            error_type="TimeoutError",
            error="The judge did not answer in time.",
        )
    return Cell(question_id, metric, "scored", score=value)
