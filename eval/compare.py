"""Summaries of a run and its comparison with a baseline, metric by metric.

A metric's scores are compared *paired*: only questions both runs scored
count, and the quantity judged is the mean of the per-question differences
(run minus baseline). Pairing removes the spread between easy and hard
questions, which is usually far larger than the change being looked for.
Cells that are ``not_applicable`` or ``error`` (and scores that are not
finite numbers) are left out of the pairing; :func:`summarize` counts them.

The uncertainty of the mean difference is a percentile bootstrap confidence
interval over questions: the questions are resampled with replacement
``resamples`` times, and the interval holds the middle ``confidence`` share
of the resampled means. The resampling is vectorized with numpy and seeded,
so the same runs give the same verdict.

The decision rule, per metric, with ``margin`` the smallest drop worth
flagging (default 0.05) and ``floor`` an optional lowest acceptable mean:

- **regression** when the drop is both real and material: the interval lies
  wholly below zero (the run is worse beyond what question sampling
  explains) *and* the mean difference is below ``-margin`` (the drop is large
  enough to matter). Or when the run's mean, over all the questions it
  scored, is below the floor, whatever the baseline says.
- **pass** when the interval's lower end is above ``-margin``: no drop that
  matters is plausible.
- **inconclusive** otherwise: the interval is too wide to tell (too few
  questions or too much noise), fewer than :data:`MIN_PAIRED` questions are
  paired, or only one of the runs has the metric.

Why this rule: requiring the whole interval below ``-margin`` (proof that
the drop exceeds the margin) would almost never fire on golden sets of a few
dozen questions, so real regressions would pass unflagged; flagging any
interval below zero would fail builds on drops too small to matter. Asking
for a significant drop whose estimate is also material keeps false alarms
below the one-sided error rate of the interval (2.5% at 95% confidence) when
nothing changed, while a material drop on a set of reasonable size is
caught. Drops that are material but not yet certain are reported as
inconclusive rather than passed, so they are seen. The rule judges the
estimate, not the true drop: a real drop a little smaller than the margin is
flagged when noise makes its estimate exceed the margin, and a set whose
interval is wider than the margin cannot pass at all; more questions fix
both.

In a :class:`MetricComparison`, ``mean_run`` and ``mean_baseline`` are taken
over the paired questions, so that their difference is ``mean_difference``;
the floor is checked against the run's mean over every question it scored
(:func:`summarize`), which needs no baseline.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import numpy.typing as npt

from ingestion.errors import ConfigError

from .models import (
    Comparison,
    MetricComparison,
    MetricSummary,
    RunRecord,
    Verdict,
)

__all__ = [
    "DEFAULT_MARGIN",
    "MIN_PAIRED",
    "bootstrap_interval",
    "compare",
    "comparison_to_dict",
    "finite_scores",
    "metrics_of",
    "summarize",
]

DEFAULT_MARGIN = 0.05
MIN_PAIRED = 5
"""Fewer questions scored by both runs than this give an inconclusive verdict."""

# A fall in coverage (scored over applicable cells) worth a note in the reasons.
_COVERAGE_DROP = 0.05
# Resampled values held in memory at once (resamples x questions).
_BLOCK = 1_000_000

FloatArray = npt.NDArray[np.float64]


def metrics_of(run: RunRecord) -> list[str]:
    """The run's metrics: those it declares, then any others its cells name."""
    names = dict.fromkeys(run.info.metrics)
    names.update(dict.fromkeys(cell.metric for cell in run.cells))
    return list(names)


def finite_scores(run: RunRecord, metric: str) -> dict[str, float]:
    """Question id to score for the cells of ``metric`` scored with a finite number."""
    return {
        cell.question_id: float(cell.score)
        for cell in run.cells
        if cell.metric == metric
        and cell.status == "scored"
        and cell.score is not None
        and math.isfinite(cell.score)
    }


def summarize(run: RunRecord) -> list[MetricSummary]:
    """Per metric: the mean over scored cells and the count of each kind of cell.

    A cell marked scored whose score is missing or not a finite number counts
    as an error of type ``invalid_score``.
    """
    return [_summary(run, metric) for metric in metrics_of(run)]


def compare(
    run: RunRecord,
    baseline: RunRecord,
    *,
    margins: Mapping[str, float] | None = None,
    floors: Mapping[str, float] | None = None,
    pass_threshold: float = 0.5,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int | None = 0,
    default_margin: float = DEFAULT_MARGIN,
) -> Comparison:
    """Compare each metric of ``run`` with ``baseline``; see the module docstring.

    ``margins`` and ``floors`` are per metric; a metric without a margin gets
    ``default_margin``, one without a floor has none. ``seed`` makes the
    bootstrap repeatable (None draws a fresh one).
    """
    _check_parameters(confidence, resamples, default_margin, margins or {})
    rng = np.random.default_rng(seed)
    names = dict.fromkeys(metrics_of(run))
    names.update(dict.fromkeys(metrics_of(baseline)))
    results = tuple(
        _compare_metric(
            metric,
            run,
            baseline,
            margin=(margins or {}).get(metric, default_margin),
            floor=(floors or {}).get(metric),
            pass_threshold=pass_threshold,
            confidence=confidence,
            resamples=resamples,
            rng=rng,
        )
        for metric in names
    )
    return Comparison(
        run_id=run.info.run_id,
        baseline_id=baseline.info.run_id,
        metrics=results,
        confidence=confidence,
        resamples=resamples,
    )


def bootstrap_interval(
    values: FloatArray,
    *,
    confidence: float,
    resamples: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values``."""
    n = len(values)
    means = np.empty(resamples, dtype=np.float64)
    block = max(1, _BLOCK // n)
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        picks = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def comparison_to_dict(comparison: Comparison) -> dict[str, Any]:
    """A JSON-ready mapping of a comparison, with ``regressed`` overall."""
    data = asdict(comparison)
    data["regressed"] = comparison.regressed
    return data


# -- one metric -------------------------------------------------------------------


def _summary(run: RunRecord, metric: str) -> MetricSummary:
    scores: list[float] = []
    not_applicable = 0
    error_types: Counter[str] = Counter()
    for cell in run.cells:
        if cell.metric != metric:
            continue
        if cell.status == "not_applicable":
            not_applicable += 1
        elif cell.status == "error":
            error_types[cell.error_type or "unknown"] += 1
        elif cell.score is None or not math.isfinite(cell.score):
            error_types["invalid_score"] += 1
        else:
            scores.append(float(cell.score))
    return MetricSummary(
        metric=metric,
        mean=float(np.mean(scores)) if scores else None,
        scored=len(scores),
        not_applicable=not_applicable,
        errors=sum(error_types.values()),
        error_types=dict(error_types.most_common()),
    )


def _compare_metric(
    metric: str,
    run: RunRecord,
    baseline: RunRecord,
    *,
    margin: float,
    floor: float | None,
    pass_threshold: float,
    confidence: float,
    resamples: int,
    rng: np.random.Generator,
) -> MetricComparison:
    run_scores = finite_scores(run, metric)
    base_scores = finite_scores(baseline, metric)
    paired = sorted(run_scores.keys() & base_scores.keys())
    ran = np.array([run_scores[q] for q in paired], dtype=np.float64)
    based = np.array([base_scores[q] for q in paired], dtype=np.float64)
    diffs = ran - based

    reasons: list[str] = []
    floor_broken = _floor_broken(metric, run_scores, floor, reasons)
    coverage = _coverage_reason(metric, run, baseline)
    if coverage is not None:
        reasons.append(coverage)
    unpaired = _unpaired_reason(metric, run, baseline, len(paired))
    ci: tuple[float, float] | None = None
    if unpaired is not None:
        reasons.append(unpaired)
    else:
        ci = bootstrap_interval(
            diffs, confidence=confidence, resamples=resamples, rng=rng
        )

    mean_difference = float(diffs.mean()) if len(paired) else None
    verdict = _verdict(floor_broken, ci, mean_difference, margin, confidence, reasons)
    return MetricComparison(
        metric=metric,
        paired=len(paired),
        mean_run=float(ran.mean()) if len(paired) else None,
        mean_baseline=float(based.mean()) if len(paired) else None,
        mean_difference=mean_difference,
        ci_low=None if ci is None else ci[0],
        ci_high=None if ci is None else ci[1],
        margin=margin,
        floor=floor,
        verdict=verdict,
        reasons=tuple(reasons),
        flipped=_flipped(paired, run_scores, base_scores, pass_threshold),
        differences=dict(zip(paired, diffs.tolist(), strict=True)),
    )


def _verdict(
    floor_broken: bool,
    ci: tuple[float, float] | None,
    mean_difference: float | None,
    margin: float,
    confidence: float,
    reasons: list[str],
) -> Verdict:
    level = f"{confidence:.0%}"
    verdict: Verdict = "inconclusive"
    if ci is not None and mean_difference is not None:
        low, high = ci
        if high < 0 and mean_difference < -margin:
            reasons.append(
                f"the mean fell by {-mean_difference:.3f}, more than the margin "
                f"{margin:g}, and the {level} interval [{low:.3f}, {high:.3f}] lies "
                "below zero"
            )
            verdict = "regression"
        elif low > -margin:
            reasons.append(
                f"the {level} interval [{low:.3f}, {high:.3f}] rules out a drop "
                f"larger than the margin {margin:g}"
            )
            verdict = "pass"
        else:
            reasons.append(
                f"the {level} interval [{low:.3f}, {high:.3f}] allows a drop larger "
                f"than the margin {margin:g} but does not show one; more questions "
                "would tell"
            )
    return "regression" if floor_broken else verdict


def _floor_broken(
    metric: str,
    run_scores: Mapping[str, float],
    floor: float | None,
    reasons: list[str],
) -> bool:
    if floor is None or not run_scores:
        return False
    mean = float(np.mean(list(run_scores.values())))
    if mean >= floor:
        return False
    reasons.append(
        f"the run's mean {mean:.3f} over its {len(run_scores)} scored question(s) "
        f"is below the floor {floor:g} of {metric}"
    )
    return True


def _unpaired_reason(
    metric: str, run: RunRecord, baseline: RunRecord, paired: int
) -> str | None:
    """Why the runs cannot be compared on this metric, or None when they can."""
    in_run = metric in metrics_of(run)
    in_baseline = metric in metrics_of(baseline)
    if in_run and not in_baseline:
        return f"the baseline {baseline.info.run_id} did not measure {metric}"
    if in_baseline and not in_run:
        return f"the run {run.info.run_id} did not measure {metric}"
    if paired < MIN_PAIRED:
        return (
            f"only {paired} question(s) were scored by both runs; at least "
            f"{MIN_PAIRED} are needed to judge a difference"
        )
    return None


def _coverage_reason(metric: str, run: RunRecord, baseline: RunRecord) -> str | None:
    """A note when the run scored a clearly smaller share of cells than the baseline."""
    now, before = _summary(run, metric), _summary(baseline, metric)
    if now.scored + now.errors == 0 or before.scored + before.errors == 0:
        return None
    if now.coverage >= before.coverage - _COVERAGE_DROP:
        return None
    return (
        f"coverage fell from {before.coverage:.0%} to {now.coverage:.0%} "
        f"({now.errors} error(s), left out of the pairing)"
    )


def _flipped(
    paired: Iterable[str],
    run_scores: Mapping[str, float],
    base_scores: Mapping[str, float],
    pass_threshold: float,
) -> tuple[str, ...]:
    """Questions that passed in the baseline and fail in the run, biggest drop first."""
    flipped = [
        q
        for q in paired
        if base_scores[q] >= pass_threshold and run_scores[q] < pass_threshold
    ]
    flipped.sort(key=lambda q: (run_scores[q] - base_scores[q], q))
    return tuple(flipped)


def _check_parameters(
    confidence: float,
    resamples: int,
    default_margin: float,
    margins: Mapping[str, float],
) -> None:
    if not 0.5 < confidence < 1:
        raise ConfigError(
            f"The confidence level {confidence} is out of range; give a number "
            "between 0.5 and 1, such as 0.95."
        )
    if resamples < 100:
        raise ConfigError(
            f"{resamples} bootstrap resamples are too few for an interval; give "
            "at least 100 (2000 is the default)."
        )
    for metric, margin in {"default": default_margin, **margins}.items():
        if not math.isfinite(margin) or margin < 0:
            raise ConfigError(
                f"The margin of {metric} is {margin}; give a number of 0 or more."
            )
