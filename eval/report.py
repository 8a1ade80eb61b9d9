"""Evaluation reports: one page per run and per comparison, as HTML, Markdown and JSON.

The HTML page is meant to be understood in a minute: the verdict comes first,
then what ran, then the metrics, the plots and every question. It is one
self-contained file: inline CSS, charts drawn as inline SVG (see
:mod:`eval.plots`), no script and nothing fetched, so it opens the same from a
CI artifact, an e-mail attachment or the ``/eval`` routes. A content security
policy in the page forbids scripts and remote loads as a second line of
defence; the first is that every piece of text (questions, answers, passages,
judge reasons, error messages) is escaped, since all of it is untrusted.

Errors are never hidden: the metrics table counts them per metric and type,
the page's banner names them, and each failed cell shows its error type, with
the message on hover and in a ``<details>``.

Stable hooks for tests and tooling: ``<table id="metrics">``,
``<table id="questions">`` (one ``<tr class="question">`` per question),
``<svg class="plot trend">``, ``<svg class="plot forest">`` and
``<svg class="plot differences">`` (each with ``data-metric``), and
``<div id="verdict">``.

The Markdown and JSON forms carry the same facts for pull-request comments and
for machines.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .models import (
    AnswerRecord,
    Cell,
    Comparison,
    MetricComparison,
    MetricSummary,
    RunInfo,
    RunRecord,
)
from .plots import Interval, TrendPoint, difference_dots, forest_plot, trend_chart

__all__ = [
    "History",
    "render_comparison_html",
    "render_comparison_json",
    "render_comparison_markdown",
    "render_run_html",
    "render_run_json",
    "render_run_list_html",
    "render_run_markdown",
    "write_reports",
]

logger = logging.getLogger(__name__)

History = list[tuple[RunInfo, dict[str, float]]]
"""Earlier runs (this one may be among them) with each metric's mean."""

_ANSWER_PREVIEW = 240
"""Characters of an answer shown before the rest folds into a ``<details>``."""


# -- run report ---------------------------------------------------------------------


def render_run_html(
    run: RunRecord, summaries: list[MetricSummary], history: History
) -> str:
    """The HTML report of one run: verdict, facts, metrics, trend and questions."""
    info = run.info
    metrics = _metric_names(run)
    body = [
        '<header><p class="kicker">ragline evaluation run</p>',
        f"<h1>Run {_e(info.run_id)}{_label(info)}</h1>",
        _run_verdict(run, summaries),
        _facts(info, len(run.answers)),
        "</header>",
        _nav(
            ("metrics-section", "Metrics"),
            ("trend", "Trend"),
            ("questions-section", "Questions"),
        ),
        '<section id="metrics-section"><h2>Metrics</h2>',
        _metrics_table(summaries),
        "</section>",
        '<section id="trend"><h2>Trend across runs</h2>',
        _trend_figures(info, summaries, history, metrics),
        "</section>",
        f'<section id="questions-section"><h2>Questions ({len(run.answers)})</h2>',
        _questions_table(run, metrics),
        "</section>",
    ]
    return _page(f"ragline eval: run {info.run_id}", body)


def render_run_markdown(
    run: RunRecord, summaries: list[MetricSummary], history: History
) -> str:
    """The run report as Markdown, for a pull-request comment or a terminal."""
    info = run.info
    lines = [
        f"# ragline evaluation: run {_md(info.run_id)}{_md_label(info)}",
        "",
        f"**{_md(_run_headline(run, summaries))}**",
        "",
        *_md_facts(info, len(run.answers)),
        "",
        "## Metrics",
        "",
        "| metric | mean | coverage | scored | not applicable | errors |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in summaries:
        lines.append(
            f"| {_md(s.metric)} | {_num(s.mean)} | {s.coverage:.0%} | {s.scored} | "
            f"{s.not_applicable} | {_md(_error_count(s))} |"
        )
    lines += ["", "## Trend", "", *_md_history(info, summaries, history)]
    lines += ["", "## Questions", "", *_md_questions(run, _metric_names(run))]
    lines += _md_errors(run)
    return "\n".join(lines) + "\n"


def render_run_json(
    run: RunRecord, summaries: list[MetricSummary], history: History
) -> str:
    """The run report as JSON: its facts, summaries, history, answers and cells."""
    document = {
        "kind": "run",
        "run": _plain(run.info),
        "summaries": [_summary_dict(s) for s in summaries],
        "history": [{"run": _plain(i), "means": means} for i, means in history],
        "answers": [_plain(a) for a in run.answers],
        "cells": [_plain(c) for c in run.cells],
    }
    return _dumps(document)


# -- comparison report --------------------------------------------------------------


def render_comparison_html(
    comparison: Comparison, run: RunRecord, baseline: RunRecord
) -> str:
    """The HTML report of a run against its baseline, verdict first."""
    body = [
        '<header><p class="kicker">ragline evaluation comparison</p>',
        f"<h1>Run {_e(run.info.run_id)}{_label(run.info)} against baseline "
        f"{_e(baseline.info.run_id)}{_label(baseline.info)}</h1>",
        _comparison_verdict(comparison),
        _runs_side_by_side(run.info, baseline.info),
        "</header>",
        _nav(
            ("metrics-section", "Metrics"),
            ("intervals", "Intervals"),
            ("differences", "Differences"),
            ("questions-section", "Questions"),
        ),
        '<section id="metrics-section"><h2>Metrics</h2>',
        _comparison_table(comparison, _summaries(run), _summaries(baseline)),
        "</section>",
        '<section id="intervals"><h2>Mean paired difference against the margin</h2>',
        _forest_figure(comparison),
        "</section>",
        '<section id="differences"><h2>Per-question differences</h2>',
        _difference_figures(comparison),
        "</section>",
        '<section id="questions-section"><h2>Questions, largest drop first</h2>',
        _comparison_questions(comparison, run, baseline),
        "</section>",
    ]
    title = f"ragline eval: {run.info.run_id} vs {baseline.info.run_id}"
    return _page(title, body)


def render_comparison_markdown(
    comparison: Comparison, run: RunRecord, baseline: RunRecord
) -> str:
    """The comparison as Markdown, for a pull-request comment."""
    headline, detail = _comparison_headline(comparison)
    lines = [
        f"# ragline evaluation: {_md(run.info.run_id)} against "
        f"baseline {_md(baseline.info.run_id)}",
        "",
        f"**{_md(headline)}**" + (f" {_md(detail)}" if detail else ""),
        "",
        f"Intervals: {comparison.confidence:.0%} confidence, "
        f"{comparison.resamples} resamples of the paired questions.",
        "",
        "| metric | verdict | baseline | run | difference | interval | margin "
        "| paired | flipped | reasons |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for m in comparison.metrics:
        lines.append(
            f"| {_md(m.metric)} | {m.verdict} | {_num(m.mean_baseline)} | "
            f"{_num(m.mean_run)} | {_signed(m.mean_difference)} | {_interval(m)} | "
            f"{m.margin:g} | {m.paired} | {len(m.flipped)} | "
            f"{_md('; '.join(m.reasons))} |"
        )
    flipped = [(m.metric, q) for m in comparison.metrics for q in m.flipped]
    if flipped:
        lines += ["", "## Questions that passed before and fail now", ""]
        lines += [f"- {_md(q)} ({_md(metric)})" for metric, q in flipped]
    lines += ["", "## What ran", "", "| | baseline | run |", "| --- | --- | --- |"]
    for name, base_value, run_value in _fact_pairs(run.info, baseline.info):
        mark = " ⚠" if base_value != run_value and name in _MUST_MATCH else ""
        lines.append(f"| {name}{mark} | {_md(base_value)} | {_md(run_value)} |")
    return "\n".join(lines) + "\n"


def render_comparison_json(
    comparison: Comparison, run: RunRecord, baseline: RunRecord
) -> str:
    """The comparison as JSON: the verdicts, both runs' facts and summaries."""
    document = {
        "kind": "comparison",
        "regressed": comparison.regressed,
        "comparison": _plain(comparison),
        "run": _plain(run.info),
        "baseline": _plain(baseline.info),
        "summaries": {
            "run": [_summary_dict(s) for s in _summaries(run)],
            "baseline": [_summary_dict(s) for s in _summaries(baseline)],
        },
    }
    return _dumps(document)


# -- list of runs -------------------------------------------------------------------


def render_run_list_html(
    runs: Sequence[RunInfo],
    run_href: Callable[[str], str],
    compare_href: Callable[[str, str], str],
) -> str:
    """A page listing runs, newest first, each linked to its report.

    Each run also links to a comparison with the run before it on the same
    dataset and collection, the usual baseline.
    """
    ordered = sorted(runs, key=lambda i: _aware(i.created_at), reverse=True)
    rows = []
    for index, info in enumerate(ordered):
        previous = next(
            (
                o
                for o in ordered[index + 1 :]
                if (o.dataset, o.collection) == (info.dataset, info.collection)
            ),
            None,
        )
        compare = (
            f'<a href="{_e(compare_href(info.run_id, previous.run_id))}">'
            f"against {_e(previous.run_id)}</a>"
            if previous
            else "—"
        )
        rows.append(
            f'<tr><th scope="row"><a href="{_e(run_href(info.run_id))}">'
            f"{_e(info.run_id)}</a>{_label(info)}</th>"
            f"<td>{_e(_when(info.created_at))}</td><td>{_e(info.dataset)}</td>"
            f"<td>{_e(info.collection)}</td><td>{_e(_opt(info.index_generation))}</td>"
            f"<td>{_e(info.judge_model or '—')}</td>"
            f'<td class="num">{_e(_duration(info.seconds))}</td><td>{compare}</td></tr>'
        )
    table = (
        '<table id="runs"><thead><tr><th scope="col">Run</th><th scope="col">When</th>'
        '<th scope="col">Dataset</th><th scope="col">Collection</th>'
        '<th scope="col">Generation</th><th scope="col">Judge</th>'
        '<th scope="col">Took</th><th scope="col">Compare</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    empty = "" if rows else '<p class="note">No evaluation runs yet.</p>'
    return _page(
        "ragline eval: runs",
        [
            '<header><p class="kicker">ragline evaluation</p>',
            f"<h1>Runs ({len(ordered)})</h1></header>",
            table,
            empty,
        ],
    )


# -- files --------------------------------------------------------------------------


def write_reports(
    folder: str | Path,
    run: RunRecord,
    summaries: list[MetricSummary],
    history: History,
    comparison: Comparison | None = None,
    baseline: RunRecord | None = None,
) -> list[Path]:
    """Write ``run-<id>.html/.md/.json`` (and ``compare-<id>-vs-<baseline>.*``).

    Each file is written whole or not at all (a temporary file renamed into
    place), so a reader never sees half a report. Returns the paths written.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    stem = f"run-{_file_safe(run.info.run_id)}"
    written = [
        _write(target / f"{stem}.html", render_run_html(run, summaries, history)),
        _write(target / f"{stem}.md", render_run_markdown(run, summaries, history)),
        _write(target / f"{stem}.json", render_run_json(run, summaries, history)),
    ]
    if comparison is not None and baseline is not None:
        stem = (
            f"compare-{_file_safe(run.info.run_id)}-vs-"
            f"{_file_safe(baseline.info.run_id)}"
        )
        written += [
            _write(
                target / f"{stem}.html",
                render_comparison_html(comparison, run, baseline),
            ),
            _write(
                target / f"{stem}.md",
                render_comparison_markdown(comparison, run, baseline),
            ),
            _write(
                target / f"{stem}.json",
                render_comparison_json(comparison, run, baseline),
            ),
        ]
    logger.info(
        "eval reports written: run_id=%s folder=%s files=%d",
        run.info.run_id,
        target,
        len(written),
    )
    return written


def _write(path: Path, text: str) -> Path:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _file_safe(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id) or "_"


# -- page frame ---------------------------------------------------------------------

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

_CSS = """
:root { color-scheme: light; --ok: #1a7f37; --bad: #b42318; --warn: #8a5a00;
  --muted: #57606a; --line: #d0d7de; --link: #0550ae; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  margin: 0; color: #1f2328; background: #fff; }
main { max-width: 1280px; margin: 0 auto; padding: 20px 24px 48px; }
a { color: var(--link); }
h1 { font-size: 1.5rem; margin: .1rem 0 .8rem; }
h2 { font-size: 1.2rem; margin: 1.6rem 0 .4rem; }
.kicker { color: var(--muted); text-transform: uppercase; letter-spacing: .05em;
  font-size: .78rem; margin: 0; }
.label { color: var(--muted); font-weight: normal; }
#verdict { border-radius: 6px; padding: 12px 16px; margin: 0 0 16px;
  border-left: 8px solid; }
#verdict strong { font-size: 1.3rem; display: block; }
#verdict p { margin: .3rem 0 0; }
#verdict.pass { background: #dafbe1; border-color: var(--ok); }
#verdict.regression { background: #ffebe9; border-color: var(--bad); }
#verdict.warn, #verdict.inconclusive { background: #fff8c5; border-color: var(--warn); }
dl.facts { display: grid; grid-template-columns: repeat(4, max-content 1fr);
  gap: 3px 14px; margin: 0; font-size: .9rem; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
nav { margin: 16px 0 0; font-size: .9rem; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 12px; font-size: .9rem; }
th, td { border-bottom: 1px solid var(--line); padding: 6px 8px; text-align: left;
  vertical-align: top; }
thead th { background: #f6f8fa; position: sticky; top: 0; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.score.high { background: #dafbe1; }
td.score.mid { background: #fff8c5; }
td.score.low { background: #ffebe9; }
td.na, .note { color: var(--muted); }
td.error, td.errors.flagged, tr.differs td { background: #ffebe9; }
.flag { font-weight: 700; color: var(--bad); white-space: nowrap; }
.badge { font-size: .75rem; border: 1px solid currentColor; border-radius: 3px;
  padding: 0 3px; color: var(--muted); }
.verdict-pass { color: var(--ok); font-weight: 700; }
.verdict-regression { color: var(--bad); font-weight: 700; }
.verdict-inconclusive { color: var(--warn); font-weight: 700; }
.answer, .full, .passages p, .reasons dd, .message { white-space: pre-wrap;
  overflow-wrap: anywhere; margin: 0; }
.passages { padding-left: 1.2rem; margin: 4px 0; }
.passages li { margin-bottom: 6px; }
.passages .uri { color: var(--muted); font-size: .8rem; }
.reasons dl { margin: 4px 0; }
.reasons dt { font-weight: 600; }
.reasons dd { margin: 0 0 4px; }
summary { cursor: pointer; color: var(--link); }
#questions th[scope=row] { min-width: 14rem; font-weight: normal; }
#questions th[scope=row] code { display: block; color: var(--muted); }
#questions td:nth-child(2) { min-width: 18rem; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; }
figcaption { font-size: .85rem; color: var(--muted); max-width: 560px; }
svg { background: #fff; }
svg .grid { stroke: #eaeef2; }
svg .zero { stroke: #57606a; stroke-width: 1.5; }
svg .line { stroke: var(--link); stroke-width: 2; }
svg .point { fill: var(--link); }
svg .point.current { fill: #fff; stroke: var(--link); stroke-width: 2.5; }
svg .margin { stroke: var(--bad); stroke-dasharray: 3 2; stroke-width: 2; }
svg .ci { stroke-width: 3; }
svg .ci.pass { stroke: var(--ok); } svg .estimate.pass { fill: var(--ok); }
svg .ci.regression { stroke: var(--bad); } svg .estimate.regression { fill: var(--bad); }
svg .ci.inconclusive { stroke: var(--warn); }
svg .estimate.inconclusive { fill: var(--warn); }
svg rect.worse { fill: #fff1ef; }
svg .dot, svg .bar { fill: var(--link); }
svg .dot.worse, svg .bar.worse { fill: var(--bad); }
svg .note { fill: var(--muted); }
.scroll { overflow-x: auto; }
ul.reasons { margin: 0; padding-left: 1rem; min-width: 14rem; }
footer { margin-top: 32px; color: var(--muted); font-size: .8rem; }
"""


def _page(title: str, body: Iterable[str]) -> str:
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}"
        f"<footer>Generated by ragline at {generated}.</footer></main></body></html>\n"
    )


def _nav(*links: tuple[str, str]) -> str:
    anchors = "".join(f'<a href="#{anchor}">{_e(text)}</a>' for anchor, text in links)
    return f'<nav aria-label="Sections">{anchors}</nav>'


def _label(info: RunInfo) -> str:
    return f' <span class="label">({_e(info.label)})</span>' if info.label else ""


# -- header -------------------------------------------------------------------------


def _run_headline(run: RunRecord, summaries: Sequence[MetricSummary]) -> str:
    errors = sum(s.errors for s in summaries)
    failed = sum(1 for a in run.answers if a.error)
    if not errors and not failed:
        return (
            f"All applicable cells scored: {len(summaries)} metrics over "
            f"{len(run.answers)} questions."
        )
    types = Counter[str]()
    for s in summaries:
        types.update(s.error_types)
    problems = []
    if errors:
        listed = ", ".join(f"{t} ×{n}" for t, n in types.most_common())
        problems.append(f"{_count(errors, 'cell')} could not be scored ({listed})")
    if failed:
        problems.append(f"{_count(failed, 'question')} failed in the pipeline")
    return "; ".join(problems) + ". Means cover only the scored cells."


def _run_verdict(run: RunRecord, summaries: Sequence[MetricSummary]) -> str:
    headline = _run_headline(run, summaries)
    clean = not any(s.errors for s in summaries) and not any(
        a.error for a in run.answers
    )
    css, role = ("pass", "status") if clean else ("warn", "alert")
    means = " · ".join(f"{s.metric} {_num(s.mean)}" for s in summaries)
    return (
        f'<div id="verdict" class="{css}" role="{role}"><strong>{_e(headline)}</strong>'
        f"<p>{_e(means)}</p></div>"
    )


def _comparison_headline(comparison: Comparison) -> tuple[str, str]:
    regressed = [m.metric for m in comparison.metrics if m.verdict == "regression"]
    unsure = [m.metric for m in comparison.metrics if m.verdict == "inconclusive"]
    if regressed:
        detail = f"Inconclusive: {', '.join(unsure)}." if unsure else ""
        return f"Regression in {', '.join(regressed)}", detail
    if unsure:
        return "No regression", f"Inconclusive: {', '.join(unsure)}."
    return "No regression", "Every metric passed."


def _comparison_verdict(comparison: Comparison) -> str:
    headline, detail = _comparison_headline(comparison)
    if comparison.regressed:
        css, role = "regression", "alert"
    elif any(m.verdict == "inconclusive" for m in comparison.metrics):
        css, role = "inconclusive", "status"
    else:
        css, role = "pass", "status"
    reasons = [
        f"{m.metric}: {reason}"
        for m in comparison.metrics
        if m.verdict != "pass"
        for reason in m.reasons
    ]
    listed = "".join(f"<p>{_e(r)}</p>" for r in reasons)
    return (
        f'<div id="verdict" class="{css}" role="{role}"><strong>{_e(headline)}</strong>'
        f"<p>{_e(detail)}</p>{listed}<p>Intervals: {comparison.confidence:.0%} "
        f"confidence from {comparison.resamples} resamples of the paired "
        "questions.</p></div>"
    )


def _fact_list(info: RunInfo, questions: int) -> list[tuple[str, str, str]]:
    """(name, shown value, full value for the hover title) of what a run ran on."""
    judge = info.judge_model or "—"
    if info.judge_model_hash:
        judge += f" ({_short(info.judge_model_hash)})"
    facts = [
        ("Dataset", info.dataset, info.dataset),
        ("Dataset hash", _short(info.dataset_hash), info.dataset_hash),
        ("Collection", info.collection, info.collection),
        ("Generation", _opt(info.index_generation), _opt(info.index_generation)),
        ("Judge model", judge, info.judge_model_hash or judge),
        ("Prompt version", _opt(info.prompt_version), _opt(info.prompt_version)),
        ("RAGAS version", _opt(info.ragas_version), _opt(info.ragas_version)),
        ("Git commit", _short(info.git_commit), _opt(info.git_commit)),
        ("When", _when(info.created_at), info.created_at.isoformat()),
        ("Took", _duration(info.seconds), _opt(info.seconds)),
        ("Answered by", info.target, info.target),
        ("Questions", str(questions), ", ".join(info.metrics)),
    ]
    facts += [(str(k), _short_text(str(v)), str(v)) for k, v in info.extra.items()]
    return facts


def _facts(info: RunInfo, questions: int) -> str:
    items = "".join(
        f'<dt>{_e(name)}</dt><dd title="{_e(full)}">{_e(shown)}</dd>'
        for name, shown, full in _fact_list(info, questions)
    )
    return f'<dl class="facts" id="facts">{items}</dl>'


_MUST_MATCH = ("Dataset", "Dataset hash", "Collection")
"""Facts that make a comparison meaningless when they differ."""


_SHOWN_IN_FULL = ("Dataset hash", "Git commit", "Judge model")
"""Identifiers a comparison shows whole, so a difference in any digit is visible."""

_EXPECTED_TO_DIFFER = ("When", "Took")


def _fact_pairs(run: RunInfo, baseline: RunInfo) -> list[tuple[str, str, str]]:
    """(name, baseline value, run value) of what the two runs ran on."""

    def values(info: RunInfo) -> dict[str, str]:
        return {
            name: full if name in _SHOWN_IN_FULL else shown
            for name, shown, full in _fact_list(info, 0)
        }

    ours, theirs = values(run), values(baseline)
    names = [n for n in ours if n != "Questions"]
    names += [n for n in theirs if n not in ours]
    return [(n, theirs.get(n, "—"), ours.get(n, "—")) for n in names]


def _runs_side_by_side(run: RunInfo, baseline: RunInfo) -> str:
    rows = []
    mismatched = []
    changed = []
    for name, base_value, run_value in _fact_pairs(run, baseline):
        differs = base_value != run_value and name not in _EXPECTED_TO_DIFFER
        if differs:
            changed.append(name.lower())
        if differs and name in _MUST_MATCH:
            mismatched.append(name.lower())
        css = ' class="differs"' if differs else ""
        rows.append(
            f'<tr{css}><th scope="row">{_e(name)}</th><td>{_e(base_value)}</td>'
            f"<td>{_e(run_value)}</td></tr>"
        )
    warning = (
        f'<p class="flag" role="alert">The runs differ in {_e(", ".join(mismatched))}: '
        "their scores are not measuring the same thing.</p>"
        if mismatched
        else ""
    )
    summary = (
        f"What ran: differs in {', '.join(changed)}"
        if changed
        else "What ran: the same setup in both runs"
    )
    opened = " open" if mismatched else ""
    return (
        f"{warning}<details{opened}><summary>{_e(summary)}</summary>"
        '<table id="runs"><thead><tr><th scope="col"></th>'
        '<th scope="col">Baseline</th><th scope="col">Run</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></details>"
    )


# -- metrics tables -----------------------------------------------------------------


def _metrics_table(summaries: Sequence[MetricSummary]) -> str:
    rows = []
    for s in summaries:
        flagged = " flagged" if s.errors else ""
        rows.append(
            f'<tr data-metric="{_e(s.metric)}"><th scope="row">{_e(s.metric)}</th>'
            f'<td class="num">{_num(s.mean)}</td>'
            f'<td class="num">{s.coverage:.0%}</td><td class="num">{s.scored}</td>'
            f'<td class="num">{s.not_applicable}</td>'
            f'<td class="errors{flagged}">{_error_cell(s)}</td></tr>'
        )
    return (
        '<table id="metrics"><thead><tr><th scope="col">Metric</th>'
        '<th scope="col">Mean</th><th scope="col">Coverage</th>'
        '<th scope="col">Scored</th><th scope="col">Not applicable</th>'
        '<th scope="col">Errors</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        '<p class="note">Coverage is scored cells over applicable cells; errors count '
        "against it. Means are over scored cells only.</p>"
    )


def _error_count(summary: MetricSummary) -> str:
    if not summary.errors:
        return "0"
    types = ", ".join(f"{t} ×{n}" for t, n in sorted(summary.error_types.items()))
    return f"{summary.errors} ({types})"


def _error_cell(summary: MetricSummary) -> str:
    if not summary.errors:
        return "0"
    return f'<span class="flag">⚠ {_e(_error_count(summary))}</span>'


def _comparison_table(
    comparison: Comparison,
    run_summaries: Sequence[MetricSummary],
    base_summaries: Sequence[MetricSummary],
) -> str:
    ours = {s.metric: s for s in run_summaries}
    theirs = {s.metric: s for s in base_summaries}
    rows = []
    for m in comparison.metrics:
        before, after = theirs.get(m.metric), ours.get(m.metric)
        failed = any(s is not None and s.errors for s in (before, after))
        flagged = " flagged" if failed else ""
        errors = [_errors_of(before), _errors_of(after)]
        reasons = "".join(f"<li>{_e(r)}</li>" for r in m.reasons)
        rows.append(
            f'<tr data-metric="{_e(m.metric)}"><th scope="row">{_e(m.metric)}</th>'
            f'<td class="verdict-{m.verdict}">{_e(m.verdict)}</td>'
            f'<td class="num">{_num(m.mean_baseline)}</td>'
            f'<td class="num">{_num(m.mean_run)}</td>'
            f'<td class="num">{_signed(m.mean_difference)}</td>'
            f'<td class="num">{_interval(m)}</td><td class="num">-{m.margin:g}</td>'
            f'<td class="num">{_num(m.floor)}</td><td class="num">{m.paired}</td>'
            f'<td class="num">{len(m.flipped)}</td>'
            f'<td class="errors{flagged}">{errors[0]} / {errors[1]}</td>'
            f'<td><ul class="reasons">{reasons}</ul></td></tr>'
        )
    return (
        '<div class="scroll"><table id="metrics"><thead><tr><th scope="col">Metric</th>'
        '<th scope="col">Verdict</th><th scope="col">Baseline</th>'
        '<th scope="col">Run</th><th scope="col">Difference</th>'
        f'<th scope="col">{comparison.confidence:.0%} interval</th>'
        '<th scope="col">Margin</th><th scope="col">Floor</th>'
        '<th scope="col">Paired</th><th scope="col">Flipped</th>'
        '<th scope="col">Errors (baseline / run)</th><th scope="col">Reasons</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        '<p class="note">Differences are run minus baseline over the questions both '
        "runs scored; flipped questions passed in the baseline and fail in the "
        "run.</p>"
    )


def _errors_of(summary: MetricSummary | None) -> str:
    if summary is None or not summary.errors:
        return "0"
    return f'<span class="flag">⚠ {_e(_error_count(summary))}</span>'


# -- plots --------------------------------------------------------------------------


def _trend_figures(
    info: RunInfo,
    summaries: Sequence[MetricSummary],
    history: History,
    metrics: Sequence[str],
) -> str:
    runs = _history_with(info, summaries, history)
    figures = []
    for metric in metrics:
        points = [
            TrendPoint(
                label=f"{i.run_id} ({_when(i.created_at)})",
                value=means.get(metric),
                current=i.run_id == info.run_id,
            )
            for i, means in runs
        ]
        figures.append(
            f"<figure>{trend_chart(metric, points)}<figcaption>{_e(metric)}: mean per "
            "run; the ringed point is this run.</figcaption></figure>"
        )
    return f'<div class="charts">{"".join(figures)}</div>'


def _history_with(
    info: RunInfo, summaries: Sequence[MetricSummary], history: History
) -> History:
    """The history in time order, with this run in it exactly once."""
    runs = [(i, m) for i, m in history if i.run_id != info.run_id]
    means = {s.metric: s.mean for s in summaries if s.mean is not None}
    runs.append((info, means))
    return sorted(runs, key=lambda item: _aware(item[0].created_at))


def _forest_figure(comparison: Comparison) -> str:
    rows = [
        Interval(
            label=m.metric,
            estimate=m.mean_difference,
            low=m.ci_low,
            high=m.ci_high,
            margin=m.margin,
            verdict=m.verdict,
        )
        for m in comparison.metrics
    ]
    return (
        f"<figure>{forest_plot(rows)}<figcaption>Each square is a metric's mean "
        f"difference (run minus baseline), the bar its {comparison.confidence:.0%} "
        "interval. The dashed mark is minus the margin: an interval wholly left of it "
        "is a regression.</figcaption></figure>"
    )


def _difference_figures(comparison: Comparison) -> str:
    figures = [
        f"<figure>{difference_dots(m.metric, m.differences, m.margin)}"
        f"<figcaption>{_e(m.metric)}: one dot per question (hover for its id); "
        "red dots scored lower in the run, the shaded band is beyond the "
        "margin.</figcaption></figure>"
        for m in comparison.metrics
    ]
    return f'<div class="charts">{"".join(figures)}</div>'


# -- question tables ----------------------------------------------------------------


def _questions_table(run: RunRecord, metrics: Sequence[str]) -> str:
    cells = _cells_by_question(run.cells)
    headers = "".join(f'<th scope="col">{_e(m)}</th>' for m in metrics)
    rows = []
    for answer in run.answers:
        mine = cells.get(answer.question_id, {})
        scores = "".join(_score_cell(mine.get(m)) for m in metrics)
        css = "question failed" if _has_error(answer, mine) else "question"
        rows.append(
            f'<tr class="{css}" id="q-{_e(answer.question_id)}">'
            f"{_question_header(answer)}<td>{_answer_cell(answer)}</td>"
            f"<td>{_passages_cell(answer)}</td>{scores}"
            f'<td class="reasons">{_reasons(mine, metrics)}</td></tr>'
        )
    return (
        '<div class="scroll"><table id="questions"><thead><tr>'
        '<th scope="col">Question</th>'
        '<th scope="col">Answer</th><th scope="col">Passages</th>'
        f'{headers}<th scope="col">Judge\'s reasons</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _comparison_questions(
    comparison: Comparison, run: RunRecord, baseline: RunRecord
) -> str:
    ours = _cells_by_question(run.cells)
    theirs = _cells_by_question(baseline.cells)
    base_answers = {a.question_id: a for a in baseline.answers}
    metrics = [m.metric for m in comparison.metrics]
    flipped = {(m.metric, q) for m in comparison.metrics for q in m.flipped}
    headers = "".join(f'<th scope="col">{_e(m)}</th>' for m in metrics)
    rows = []
    for answer in _by_largest_drop(run.answers, comparison):
        qid = answer.question_id
        scores = "".join(
            _paired_cell(
                theirs.get(qid, {}).get(m),
                ours.get(qid, {}).get(m),
                (m, qid) in flipped,
            )
            for m in metrics
        )
        earlier = base_answers.get(qid)
        css = "question failed" if _has_error(answer, ours.get(qid, {})) else "question"
        rows.append(
            f'<tr class="{css}" id="q-{_e(qid)}">{_question_header(answer)}'
            f"<td>{_answer_cell(answer)}{_baseline_answer(earlier)}</td>"
            f"<td>{_passages_cell(answer)}</td>{scores}"
            f'<td class="reasons">{_reasons(ours.get(qid, {}), metrics)}</td></tr>'
        )
    return (
        '<div class="scroll"><table id="questions"><thead><tr>'
        '<th scope="col">Question</th>'
        '<th scope="col">Answer (run)</th><th scope="col">Passages (run)</th>'
        f'{headers}<th scope="col">Judge\'s reasons (run)</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _by_largest_drop(
    answers: Sequence[AnswerRecord], comparison: Comparison
) -> list[AnswerRecord]:
    def worst(answer: AnswerRecord) -> float:
        diffs = [
            m.differences[answer.question_id]
            for m in comparison.metrics
            if answer.question_id in m.differences
        ]
        return min(diffs, default=0.0)

    return sorted(answers, key=worst)


def _question_header(answer: AnswerRecord) -> str:
    return (
        f'<th scope="row"><code>{_e(answer.question_id)}</code>'
        f"{_e(answer.question)}</th>"
    )


def _answer_cell(answer: AnswerRecord) -> str:
    if answer.error:
        return (
            '<span class="flag">⚠ pipeline error</span>'
            f'<p class="message">{_e(answer.error)}</p>'
        )
    latency = (
        f' <span class="badge">{answer.latency_ms:.0f} ms</span>'
        if answer.latency_ms is not None
        else ""
    )
    if len(answer.answer) <= _ANSWER_PREVIEW:
        return f'<p class="answer">{_e(answer.answer)}</p>{latency}'
    preview = answer.answer[:_ANSWER_PREVIEW].rstrip() + "…"
    return (
        f'<p class="answer">{_e(preview)}</p>{latency}<details><summary>Full answer '
        f'({len(answer.answer)} characters)</summary><p class="full">'
        f"{_e(answer.answer)}</p></details>"
    )


def _baseline_answer(answer: AnswerRecord | None) -> str:
    if answer is None:
        return '<p class="note">Not in the baseline.</p>'
    text = f"⚠ pipeline error: {answer.error}" if answer.error else answer.answer
    return (
        '<details><summary>Baseline answer</summary><p class="full">'
        f"{_e(text)}</p></details>"
    )


def _passages_cell(answer: AnswerRecord) -> str:
    if not answer.contexts:
        return '<span class="note">none</span>'
    cited = set(answer.cited_chunk_ids)
    items = []
    count = 0
    for index, text in enumerate(answer.contexts):
        chunk = _at(answer.context_chunk_ids, index)
        uri = _at(answer.context_uris, index)
        is_cited = bool(chunk) and chunk in cited
        count += is_cited
        badge = ' <span class="badge">cited</span>' if is_cited else ""
        css = "cited" if is_cited else "passage"
        items.append(
            f'<li class="{css}"><p class="uri">{_e(uri)}{badge}'
            f"</p><p>{_e(text)}</p></li>"
        )
    return (
        f"<details><summary>{len(answer.contexts)} passages, {count} cited</summary>"
        f'<ol class="passages">{"".join(items)}</ol></details>'
    )


def _score_cell(cell: Cell | None) -> str:
    if cell is None:
        return '<td class="na" data-status="missing">—</td>'
    if cell.status == "scored" and cell.score is not None:
        return (
            f'<td class="score num {_band(cell.score)}" data-status="scored">'
            f"{_num(cell.score)}</td>"
        )
    if cell.status == "not_applicable":
        why = cell.reason or "the metric does not apply to this question"
        return f'<td class="na" data-status="not_applicable" title="{_e(why)}">n/a</td>'
    return f'<td class="error" data-status="error" {_error_detail(cell)}</td>'


def _error_detail(cell: Cell) -> str:
    """The rest of an error cell's ``<td>``: hover title, flag and the message."""
    kind = cell.error_type or "error"
    message = cell.error or "no message"
    return (
        f'title="{_e(f"{kind}: {message}")}"><span class="flag">⚠ {_e(kind)}</span>'
        f'<details><summary>message</summary><p class="message">{_e(message)}</p>'
        "</details>"
    )


def _paired_cell(before: Cell | None, after: Cell | None, flipped: bool) -> str:
    if after is not None and after.status == "error":
        return f'<td class="error" data-status="error" {_error_detail(after)}</td>'
    if after is None or after.status != "scored" or after.score is None:
        status = after.status if after is not None else "missing"
        return f'<td class="na" data-status="{status}">n/a</td>'
    was = (
        _num(before.score) if before is not None and before.status == "scored" else "—"
    )
    diff = ""
    if before is not None and before.score is not None and before.status == "scored":
        diff = f" ({_signed(after.score - before.score)})"
    flag = ' <span class="flag">flipped</span>' if flipped else ""
    return (
        f'<td class="score num {_band(after.score)}" data-status="scored" '
        f'title="baseline {was}, run {_num(after.score)}">{was} → '
        f"{_num(after.score)}{diff}{flag}</td>"
    )


def _reasons(cells: dict[str, Cell], metrics: Sequence[str]) -> str:
    given = [(m, cells[m].reason) for m in metrics if m in cells and cells[m].reason]
    if not given:
        return '<span class="note">—</span>'
    items = "".join(f"<dt>{_e(m)}</dt><dd>{_e(r or '')}</dd>" for m, r in given)
    return f"<details><summary>{len(given)} reasons</summary><dl>{items}</dl></details>"


def _has_error(answer: AnswerRecord, cells: dict[str, Cell]) -> bool:
    return bool(answer.error) or any(c.status == "error" for c in cells.values())


def _cells_by_question(cells: Iterable[Cell]) -> dict[str, dict[str, Cell]]:
    table: dict[str, dict[str, Cell]] = {}
    for cell in cells:
        table.setdefault(cell.question_id, {})[cell.metric] = cell
    return table


# -- markdown pieces ----------------------------------------------------------------


def _md(text: str) -> str:
    """Text made safe for a Markdown table cell: no HTML, pipes or line breaks."""
    flat = " ".join(str(text).split())
    return html.escape(flat, quote=False).replace("|", "\\|")


def _md_label(info: RunInfo) -> str:
    return f" ({_md(info.label)})" if info.label else ""


def _md_facts(info: RunInfo, questions: int) -> list[str]:
    return [
        f"- **{name}:** {_md(shown)}" for name, shown, _ in _fact_list(info, questions)
    ]


def _md_history(
    info: RunInfo, summaries: Sequence[MetricSummary], history: History
) -> list[str]:
    runs = _history_with(info, summaries, history)
    metrics = [s.metric for s in summaries]
    lines = [
        "| run | when | " + " | ".join(_md(m) for m in metrics) + " |",
        "| --- | --- |" + " ---: |" * len(metrics),
    ]
    for i, means in runs:
        marker = " (this run)" if i.run_id == info.run_id else ""
        values = " | ".join(_num(means.get(m)) for m in metrics)
        lines.append(
            f"| {_md(i.run_id)}{marker} | {_md(_when(i.created_at))} | {values} |"
        )
    return lines


def _md_questions(run: RunRecord, metrics: Sequence[str]) -> list[str]:
    cells = _cells_by_question(run.cells)
    lines = [
        "| question | answer | " + " | ".join(_md(m) for m in metrics) + " |",
        "| --- | --- |" + " ---: |" * len(metrics),
    ]
    for answer in run.answers:
        mine = cells.get(answer.question_id, {})
        shown = f"pipeline error: {answer.error}" if answer.error else answer.answer
        scores = " | ".join(_md_score(mine.get(m)) for m in metrics)
        lines.append(
            f"| {_md(_short_text(answer.question, 120))} | "
            f"{_md(_short_text(shown, 160))} | {scores} |"
        )
    return lines


def _md_score(cell: Cell | None) -> str:
    if cell is None:
        return "—"
    if cell.status == "scored":
        return _num(cell.score)
    if cell.status == "not_applicable":
        return "n/a"
    return f"⚠ {_md(cell.error_type or 'error')}"


def _md_errors(run: RunRecord) -> list[str]:
    failed = [c for c in run.cells if c.status == "error"]
    if not failed:
        return []
    lines = ["", "## Errors", ""]
    lines += [
        f"- {_md(c.question_id)} / {_md(c.metric)}: "
        f"{_md(c.error_type or 'error')}: {_md(c.error or 'no message')}"
        for c in failed
    ]
    return lines


# -- values -------------------------------------------------------------------------


def _summaries(run: RunRecord) -> list[MetricSummary]:
    """Mean and cell counts per metric, for the coverage columns of a comparison."""
    summaries = []
    for metric in _metric_names(run):
        cells = [c for c in run.cells if c.metric == metric]
        scores = [
            c.score for c in cells if c.status == "scored" and c.score is not None
        ]
        failed = [c for c in cells if c.status == "error"]
        summaries.append(
            MetricSummary(
                metric=metric,
                mean=sum(scores) / len(scores) if scores else None,
                scored=len(scores),
                not_applicable=sum(1 for c in cells if c.status == "not_applicable"),
                errors=len(failed),
                error_types=dict(Counter(c.error_type or "error" for c in failed)),
            )
        )
    return summaries


def _metric_names(run: RunRecord) -> list[str]:
    names = list(run.info.metrics)
    names += sorted({c.metric for c in run.cells} - set(names))
    return names


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.3f}"


def _signed(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:+.3f}"


def _interval(m: MetricComparison) -> str:
    if m.ci_low is None or m.ci_high is None:
        return "—"
    return f"[{m.ci_low:+.3f}, {m.ci_high:+.3f}]"


def _band(score: float) -> str:
    return "high" if score >= 0.8 else "mid" if score >= 0.5 else "low"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _opt(value: object) -> str:
    return "—" if value is None else str(value)


def _short(value: str | None, length: int = 12) -> str:
    return "—" if not value else value[:length]


def _short_text(text: str, length: int = 80) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def _at(values: Sequence[str], index: int) -> str:
    return values[index] if index < len(values) else ""


def _aware(moment: datetime) -> datetime:
    """Naive times are taken as UTC, so runs from either kind sort together."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _when(moment: datetime) -> str:
    return _aware(moment).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _summary_dict(summary: MetricSummary) -> dict[str, Any]:
    return {**asdict(summary), "coverage": summary.coverage}


def _plain(record: Any) -> Any:
    return asdict(record)


def _dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
