"""The records of evaluation: golden questions, scored cells, runs and comparisons.

A *run* answers every question of a golden set with the real ``/ask``
pipeline and scores each (question, metric) *cell*. A cell holds a score, or
says the metric does not apply to the question (``not_applicable``: a
reference-based metric on a question without a reference), or records the
error that kept it from being scored, with the error's type. Errors are
never averaged away: coverage per metric counts them.

A *comparison* pairs a run with a baseline on the questions both scored and
gives each metric a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

__all__ = [
    "AnswerRecord",
    "Cell",
    "CellStatus",
    "Comparison",
    "GoldenItem",
    "MetricComparison",
    "MetricSummary",
    "RunInfo",
    "RunRecord",
    "Verdict",
]

CellStatus = Literal["scored", "not_applicable", "error"]
Verdict = Literal["regression", "inconclusive", "pass"]


@dataclass(frozen=True, slots=True)
class GoldenItem:
    """One question of a golden set, with what a good answer rests on."""

    id: str
    question: str
    reference: str | None = None
    """A reference answer, for the metrics that compare against one."""
    reference_uris: tuple[str, ...] = ()
    """Document uris (or suffixes of them) that hold the answer."""
    reference_chunk_ids: tuple[str, ...] = ()
    collection: str | None = None
    """The collection to ask; unset uses the run's collection."""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AnswerRecord:
    """What the pipeline answered one question with."""

    question_id: str
    question: str
    answer: str
    contexts: tuple[str, ...]
    """The passages the model was shown, best first."""
    context_uris: tuple[str, ...]
    context_chunk_ids: tuple[str, ...]
    cited_chunk_ids: tuple[str, ...] = ()
    latency_ms: float | None = None
    error: str | None = None
    """Set when the pipeline itself failed for this question; its cells are errors."""


@dataclass(frozen=True, slots=True)
class Cell:
    """One metric of one question."""

    question_id: str
    metric: str
    status: CellStatus
    score: float | None = None
    error_type: str | None = None
    error: str | None = None
    reason: str | None = None
    """The judge's reasoning, where the metric gives one."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What a run ran on, so two runs can be told apart and reproduced."""

    run_id: str
    created_at: datetime
    dataset: str
    dataset_hash: str
    collection: str
    metrics: tuple[str, ...]
    git_commit: str | None = None
    index_generation: int | None = None
    judge_model: str | None = None
    judge_model_hash: str | None = None
    prompt_version: str | None = None
    ragas_version: str | None = None
    target: str = "in-process"
    """``in-process`` or the URL of the service that answered."""
    label: str | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRecord:
    """A whole run: how it was made, the answers and every cell."""

    info: RunInfo
    answers: list[AnswerRecord]
    cells: list[Cell]

    def scores(self, metric: str) -> dict[str, float]:
        """Question id to score for the scored cells of one metric."""
        return {
            c.question_id: c.score
            for c in self.cells
            if c.metric == metric and c.status == "scored" and c.score is not None
        }


@dataclass(frozen=True, slots=True)
class MetricSummary:
    """A metric over one run: its mean and how many cells it covers."""

    metric: str
    mean: float | None
    scored: int
    not_applicable: int
    errors: int
    error_types: dict[str, int]

    @property
    def coverage(self) -> float:
        """Scored cells over the cells the metric applies to (errors count against)."""
        applicable = self.scored + self.errors
        return self.scored / applicable if applicable else 0.0


@dataclass(frozen=True, slots=True)
class MetricComparison:
    """A metric of a run against the same metric of its baseline."""

    metric: str
    paired: int
    """Questions both runs scored."""
    mean_run: float | None
    mean_baseline: float | None
    mean_difference: float | None
    """Run minus baseline, over the paired questions."""
    ci_low: float | None
    ci_high: float | None
    margin: float
    """Drops smaller than this are not worth flagging."""
    floor: float | None
    verdict: Verdict
    reasons: tuple[str, ...]
    flipped: tuple[str, ...]
    """Questions that passed in the baseline and fail in the run."""
    differences: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Comparison:
    """A run against a baseline: a verdict per metric and one overall."""

    run_id: str
    baseline_id: str
    metrics: tuple[MetricComparison, ...]
    confidence: float
    resamples: int

    @property
    def regressed(self) -> bool:
        return any(m.verdict == "regression" for m in self.metrics)
