"""Summaries and paired comparisons of runs, and how often noise is taken for a drop."""

from __future__ import annotations

import numpy as np
import pytest

from eval.compare import bootstrap_interval, compare, comparison_to_dict, summarize
from eval.models import Cell, MetricComparison
from ingestion.errors import ConfigError

from .builders import make_run

N = 30


def scores(rng: np.random.Generator, mean: float, sd: float, n: int = N) -> list[float]:
    return np.clip(rng.normal(mean, sd, n), 0.0, 1.0).tolist()


def only(comparison_metrics: tuple[MetricComparison, ...]) -> MetricComparison:
    assert len(comparison_metrics) == 1, comparison_metrics
    return comparison_metrics[0]


# -- summaries ----------------------------------------------------------------------


def test_summaries_count_every_kind_of_cell() -> None:
    run = make_run(
        "r",
        {"faithfulness": [0.2, 0.4, None, 0.9, None]},
        extra_cells=[
            Cell("q9", "faithfulness", "not_applicable"),
            Cell("q8", "faithfulness", "error", error_type="ParseError"),
            Cell("q7", "faithfulness", "scored", score=float("nan")),
        ],
    )

    (summary,) = summarize(run)

    assert summary.metric == "faithfulness"
    assert summary.mean == pytest.approx(0.5)
    assert (summary.scored, summary.not_applicable, summary.errors) == (3, 1, 4)
    assert summary.error_types == {
        "TimeoutError": 2,
        "ParseError": 1,
        "invalid_score": 1,
    }
    assert summary.coverage == pytest.approx(3 / 7)


def test_a_metric_with_no_scores_has_no_mean() -> None:
    run = make_run("r", {"context_recall": []})
    run.cells.append(Cell("q0", "context_recall", "not_applicable"))

    (summary,) = summarize(run)

    assert summary.mean is None
    assert summary.coverage == 0.0


# -- verdicts -----------------------------------------------------------------------


def test_identical_runs_pass() -> None:
    values = scores(np.random.default_rng(1), 0.7, 0.2)
    run = make_run("run", {"faithfulness": values})
    baseline = make_run("base", {"faithfulness": values})

    result = only(compare(run, baseline).metrics)

    assert result.verdict == "pass", result.reasons
    assert result.paired == N
    assert result.mean_difference == 0.0
    assert (result.ci_low, result.ci_high) == (0.0, 0.0)
    assert result.flipped == ()


def test_a_clear_drop_on_thirty_questions_is_a_regression() -> None:
    rng = np.random.default_rng(2)
    base = scores(rng, 0.8, 0.1)
    dropped = [max(0.0, v - 0.15 + rng.normal(0, 0.05)) for v in base]

    comparison = compare(
        make_run("run", {"faithfulness": dropped}),
        make_run("base", {"faithfulness": base}),
    )
    result = only(comparison.metrics)

    assert result.verdict == "regression", result.reasons
    assert result.ci_high is not None and result.ci_high < 0
    assert result.mean_difference is not None and result.mean_difference < -0.05
    assert comparison.regressed
    assert "more than the margin" in result.reasons[-1]


@pytest.mark.parametrize("seed", range(20))
def test_noise_alone_is_never_a_regression(seed: int) -> None:
    rng = np.random.default_rng(seed)
    run = make_run("run", {"m": scores(rng, 0.7, 0.1)})
    baseline = make_run("base", {"m": scores(rng, 0.7, 0.1)})

    result = only(compare(run, baseline, seed=seed).metrics)

    assert result.verdict in ("pass", "inconclusive"), result.reasons


def test_a_small_real_drop_below_the_margin_is_not_a_regression() -> None:
    rng = np.random.default_rng(3)
    base = scores(rng, 0.7, 0.15)
    run = [v - 0.02 for v in base]

    result = only(
        compare(make_run("run", {"m": run}), make_run("base", {"m": base})).metrics
    )

    assert result.ci_high is not None and result.ci_high < 0, "the drop is real"
    assert result.verdict == "pass", result.reasons


def test_a_wide_interval_around_a_material_drop_is_inconclusive() -> None:
    rng = np.random.default_rng(4)
    base = scores(rng, 0.6, 0.3, n=8)
    run = [float(np.clip(v - 0.08 + rng.normal(0, 0.35), 0, 1)) for v in base]

    result = only(
        compare(make_run("run", {"m": run}), make_run("base", {"m": base})).metrics
    )

    assert result.verdict == "inconclusive", result
    assert result.ci_low is not None and result.ci_low < -0.05
    assert result.ci_high is not None and result.ci_high > 0


def test_margins_are_per_metric() -> None:
    base = [0.8] * 15 + [0.6] * 15
    run = [v - 0.04 for v in base]
    runs = (
        make_run("run", {"strict": run, "lenient": run}),
        make_run("base", {"strict": base, "lenient": base}),
    )

    by_metric = {m.metric: m for m in compare(*runs, margins={"strict": 0.01}).metrics}

    assert by_metric["strict"].verdict == "regression"
    assert by_metric["strict"].margin == 0.01
    assert by_metric["lenient"].verdict == "pass"
    assert by_metric["lenient"].margin == 0.05


def test_a_run_below_its_floor_is_a_regression_whatever_the_baseline() -> None:
    values = [0.55, 0.6, 0.65] * 10
    same = make_run("run", {"faithfulness": values, "relevancy": values})
    baseline = make_run("base", {"faithfulness": values, "relevancy": values})

    by_metric = {
        m.metric: m
        for m in compare(same, baseline, floors={"faithfulness": 0.7}).metrics
    }

    assert by_metric["faithfulness"].verdict == "regression"
    assert by_metric["faithfulness"].floor == 0.7
    assert any("below the floor 0.7" in r for r in by_metric["faithfulness"].reasons)
    assert by_metric["relevancy"].verdict == "pass"
    assert by_metric["relevancy"].floor is None


def test_a_floor_applies_even_without_the_metric_in_the_baseline() -> None:
    run = make_run("run", {"new_metric": [0.1] * 10})
    baseline = make_run("base", {"other": [0.9] * 10})

    by_metric = {
        m.metric: m for m in compare(run, baseline, floors={"new_metric": 0.5}).metrics
    }

    assert by_metric["new_metric"].verdict == "regression"


def test_flipped_questions_are_listed_biggest_drop_first() -> None:
    base = [0.9, 0.6, 0.5, 0.4, 0.8, 0.7]
    run = [0.45, 0.55, 0.49, 0.1, 0.9, 0.2]

    result = only(
        compare(
            make_run("run", {"m": run}),
            make_run("base", {"m": base}),
            pass_threshold=0.5,
        ).metrics
    )

    assert result.flipped == ("q5", "q0", "q2")
    assert result.differences["q3"] == pytest.approx(-0.3)
    assert set(result.differences) == {f"q{i}" for i in range(6)}


def test_too_few_paired_questions_are_inconclusive() -> None:
    result = only(
        compare(
            make_run("run", {"m": [0.1, 0.1, 0.1, 0.1]}),
            make_run("base", {"m": [0.9, 0.9, 0.9, 0.9]}),
        ).metrics
    )

    assert result.verdict == "inconclusive"
    assert result.paired == 4
    assert result.mean_difference == pytest.approx(-0.8)
    assert result.ci_low is None and result.ci_high is None
    assert "only 4 question(s) were scored by both runs" in result.reasons[0]


def test_errors_and_not_applicable_cells_are_left_out_of_the_pairing() -> None:
    base = [0.8] * 10
    run: list[float | None] = [0.8] * 6 + [None] * 4
    baseline = make_run("base", {"m": base})
    current = make_run(
        "run",
        {"m": run},
        extra_cells=[Cell("q20", "m", "not_applicable")],
    )
    baseline.cells.append(Cell("q20", "m", "scored", score=0.0))

    result = only(compare(current, baseline).metrics)
    (summary,) = summarize(current)

    assert result.paired == 6
    assert "q20" not in result.differences
    assert result.verdict == "pass"
    assert any("coverage fell from 100% to 60%" in r for r in result.reasons)
    assert (summary.scored, summary.errors, summary.not_applicable) == (6, 4, 1)


def test_a_metric_in_only_one_run_is_inconclusive() -> None:
    run = make_run("run", {"shared": [0.5] * 10, "new": [0.5] * 10})
    baseline = make_run("base", {"shared": [0.5] * 10, "old": [0.5] * 10})

    by_metric = {m.metric: m for m in compare(run, baseline).metrics}

    assert list(by_metric) == ["shared", "new", "old"]
    assert by_metric["shared"].verdict == "pass"
    assert by_metric["new"].verdict == "inconclusive"
    assert by_metric["new"].reasons == ("the baseline base did not measure new",)
    assert by_metric["old"].verdict == "inconclusive"
    assert by_metric["old"].reasons == ("the run run did not measure old",)


def test_the_same_seed_gives_the_same_interval() -> None:
    rng = np.random.default_rng(5)
    runs = (
        make_run("run", {"m": scores(rng, 0.6, 0.2)}),
        make_run("base", {"m": scores(rng, 0.6, 0.2)}),
    )

    first = only(compare(*runs, seed=11).metrics)
    second = only(compare(*runs, seed=11).metrics)

    assert (first.ci_low, first.ci_high) == (second.ci_low, second.ci_high)


def test_the_interval_covers_the_mean_and_narrows_with_more_questions() -> None:
    rng = np.random.default_rng(6)
    small = rng.normal(-0.05, 0.2, 20)
    large = rng.normal(-0.05, 0.2, 2000)

    low_s, high_s = bootstrap_interval(
        small, confidence=0.95, resamples=2000, rng=np.random.default_rng(0)
    )
    low_l, high_l = bootstrap_interval(
        large, confidence=0.95, resamples=2000, rng=np.random.default_rng(0)
    )

    assert low_s < small.mean() < high_s
    assert low_l < large.mean() < high_l
    assert high_l - low_l < (high_s - low_s) / 5
    # Roughly the normal interval 1.96 * sd / sqrt(n).
    assert high_l - low_l == pytest.approx(
        2 * 1.96 * large.std() / np.sqrt(2000), rel=0.1
    )


def test_bad_parameters_are_refused() -> None:
    runs = (make_run("run", {"m": [0.5] * 5}), make_run("base", {"m": [0.5] * 5}))

    with pytest.raises(ConfigError, match="confidence level"):
        compare(*runs, confidence=1.5)
    with pytest.raises(ConfigError, match="resamples"):
        compare(*runs, resamples=10)
    with pytest.raises(ConfigError, match="margin of m"):
        compare(*runs, margins={"m": -0.1})


def test_comparisons_convert_to_json_ready_mappings() -> None:
    runs = (make_run("run", {"m": [0.5] * 6}), make_run("base", {"m": [0.9] * 6}))

    data = comparison_to_dict(compare(*runs))

    assert data["regressed"] is True
    assert data["metrics"][0]["verdict"] == "regression"
    assert data["metrics"][0]["differences"]["q0"] == pytest.approx(-0.4)


# -- the rate of false alarms ----------------------------------------------------------


@pytest.mark.parametrize("margin", [0.05, 0.0])
def test_same_distribution_runs_are_rarely_called_regressions(margin: float) -> None:
    """Over 200 pairs of runs that differ only by noise, at most 5% regress.

    With no margin at all the verdict rests on the interval alone, so this
    also checks that the interval misses on the low side no more often than
    its confidence level allows.
    """
    rng = np.random.default_rng(2026)
    pairs = 200
    regressions = 0
    for i in range(pairs):
        # Each question has its own difficulty; both runs score it with noise.
        difficulty = rng.uniform(0.3, 0.9, N)
        base = np.clip(difficulty + rng.normal(0, 0.1, N), 0, 1)
        run = np.clip(difficulty + rng.normal(0, 0.1, N), 0, 1)
        comparison = compare(
            make_run("run", {"m": run.tolist()}),
            make_run("base", {"m": base.tolist()}),
            default_margin=margin,
            resamples=1000,
            seed=i,
        )
        regressions += only(comparison.metrics).verdict == "regression"

    assert regressions / pairs <= 0.05, f"{regressions} false regressions of {pairs}"
