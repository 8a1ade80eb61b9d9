"""Evaluation reports: structure of the HTML, escaping, Markdown, JSON and routes.

The runs here are built by hand (three metrics, a not-applicable cell, a cell
that failed with ``TimeoutError``, an answer carrying a script tag), so every
assertion can name the exact number it expects. The HTML is parsed with the
standard library's parser; one slow test renders it in headless Chromium and
checks the drawn document.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from eval.api import eval_router
from eval.models import (
    AnswerRecord,
    Cell,
    Comparison,
    MetricComparison,
    MetricSummary,
    RunInfo,
    RunRecord,
)
from eval.report import (
    render_comparison_html,
    render_comparison_json,
    render_comparison_markdown,
    render_run_html,
    render_run_json,
    render_run_markdown,
    write_reports,
)
from ingestion.errors import NotFound

METRICS = ("faithfulness", "answer_relevancy", "context_precision")
SCRIPT = "<script>alert(1)</script>"
LONG_ANSWER = "The context manager closes the file when the block ends. " * 8
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


# -- a tiny DOM -----------------------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def find_all(self, tag: str, css: str | None = None, **attrs: str) -> list[Node]:
        found = []
        for child in self.children:
            if (
                child.tag == tag
                and (css is None or css in child.classes)
                and all(child.attrs.get(k) == v for k, v in attrs.items())
            ):
                found.append(child)
            found.extend(child.find_all(tag, css, **attrs))
        return found

    def one(self, tag: str, css: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, css, **attrs)
        assert len(found) == 1, (
            f"expected one <{tag} {css or ''} {attrs}>, got {len(found)}"
        )
        return found[0]

    def walk(self) -> list[Node]:
        return [self] + [n for c in self.children for n in c.walk()]


_VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr"}


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


def parse(page: str) -> Node:
    builder = _Builder()
    builder.feed(page)
    builder.close()
    return builder.root


# -- synthetic runs -------------------------------------------------------------------


def _info(run_id: str, when: datetime, **extra: object) -> RunInfo:
    return RunInfo(
        run_id=run_id,
        created_at=when,
        dataset="python-docs-golden",
        dataset_hash="9f2c4e1a7b3d5f60718293a4b5c6d7e8",
        collection="docs",
        metrics=METRICS,
        git_commit="0123456789abcdef0123",
        index_generation=7,
        judge_model="smollm2-judge",
        prompt_version="judge-v3",
        ragas_version="0.2.15",
        label=str(extra.get("label")) if extra.get("label") else None,
        seconds=83.5,
    )


def _answers() -> list[AnswerRecord]:
    return [
        AnswerRecord(
            "q1",
            "How does a with statement close a file?",
            LONG_ANSWER,
            ("The with statement wraps a block.", "Files are context managers."),
            ("library/functions.html", "reference/compound_stmts.html"),
            ("c1", "c2"),
            cited_chunk_ids=("c2",),
            latency_ms=812.0,
        ),
        AnswerRecord(
            "q2",
            "What does html.escape do?",
            f"It escapes {SCRIPT} so that it shows as text.",
            ("html.escape(s) converts &, < and > to HTML-safe sequences.",),
            ("library/html.html",),
            ("c3",),
            cited_chunk_ids=("c3",),
        ),
        AnswerRecord(
            "q3",
            'Which "quote" <b>marks</b> does repr use?',
            "Single quotes, unless the string contains one.",
            ("repr returns a printable representation.",),
            ("library/functions.html",),
            ("c4",),
        ),
        AnswerRecord(
            "q4",
            "What is the GIL?",
            "A lock that lets one thread run Python bytecode at a time.",
            ("The global interpreter lock ...",),
            ("glossary.html",),
            ("c5",),
        ),
    ]


def _cells(scores: dict[str, dict[str, float]]) -> list[Cell]:
    cells = []
    for qid, by_metric in scores.items():
        for metric, score in by_metric.items():
            cells.append(
                Cell(qid, metric, "scored", score=score, reason=f"{metric} of {qid}")
            )
    cells.append(
        Cell("q3", "context_precision", "not_applicable", reason="no reference answer")
    )
    cells.append(
        Cell(
            "q4",
            "faithfulness",
            "error",
            error_type="TimeoutError",
            error="The judge model did not answer within 30 s.",
        )
    )
    return cells


BASELINE_SCORES = {
    "q1": {"faithfulness": 0.9, "answer_relevancy": 0.8, "context_precision": 1.0},
    "q2": {"faithfulness": 0.95, "answer_relevancy": 0.7, "context_precision": 0.5},
    "q3": {"faithfulness": 0.8, "answer_relevancy": 0.9},
    "q4": {"answer_relevancy": 0.6, "context_precision": 1.0},
}
RUN_SCORES = {
    "q1": {"faithfulness": 0.4, "answer_relevancy": 0.85, "context_precision": 1.0},
    "q2": {"faithfulness": 0.9, "answer_relevancy": 0.75, "context_precision": 0.5},
    "q3": {"faithfulness": 0.7, "answer_relevancy": 0.9},
    "q4": {"answer_relevancy": 0.65, "context_precision": 0.0},
}


def make_run(
    run_id: str, when: datetime, scores: dict[str, dict[str, float]]
) -> RunRecord:
    return RunRecord(_info(run_id, when), _answers(), _cells(scores))


def summaries_of(run: RunRecord) -> list[MetricSummary]:
    """Mean over scored cells and counts per status, per metric."""
    out = []
    for metric in run.info.metrics:
        cells = [c for c in run.cells if c.metric == metric]
        scores = [
            c.score for c in cells if c.status == "scored" and c.score is not None
        ]
        errors = [c for c in cells if c.status == "error"]
        out.append(
            MetricSummary(
                metric=metric,
                mean=sum(scores) / len(scores) if scores else None,
                scored=len(scores),
                not_applicable=sum(c.status == "not_applicable" for c in cells),
                errors=len(errors),
                error_types=dict(Counter(c.error_type or "error" for c in errors)),
            )
        )
    return out


def compare_runs(run: RunRecord, baseline: RunRecord) -> Comparison:
    """A comparison with fixed intervals: faithfulness regressed, the rest did not."""
    verdicts = {
        "faithfulness": ("regression", -0.45, -0.02, 0.05),
        "answer_relevancy": ("pass", -0.01, 0.09, 0.05),
        "context_precision": ("inconclusive", -0.75, 0.2, 0.05),
    }
    metrics = []
    for metric, (verdict, low, high, margin) in verdicts.items():
        ours, theirs = run.scores(metric), baseline.scores(metric)
        diffs = {q: ours[q] - theirs[q] for q in ours if q in theirs}
        metrics.append(
            MetricComparison(
                metric=metric,
                paired=len(diffs),
                mean_run=sum(ours[q] for q in diffs) / len(diffs),
                mean_baseline=sum(theirs[q] for q in diffs) / len(diffs),
                mean_difference=sum(diffs.values()) / len(diffs),
                ci_low=low,
                ci_high=high,
                margin=margin,
                floor=None,
                verdict=verdict,  # type: ignore[arg-type]
                reasons=(f"{metric} is {verdict}",),
                flipped=("q1",) if metric == "faithfulness" else (),
                differences=diffs,
            )
        )
    return Comparison(run.info.run_id, baseline.info.run_id, tuple(metrics), 0.95, 2000)


@pytest.fixture
def baseline() -> RunRecord:
    return make_run("r-001", T0, BASELINE_SCORES)


@pytest.fixture
def run() -> RunRecord:
    return make_run("r-002", T0 + timedelta(days=1), RUN_SCORES)


@pytest.fixture
def history(baseline: RunRecord) -> list[tuple[RunInfo, dict[str, float]]]:
    older = _info("r-000", T0 - timedelta(days=1))
    means = {s.metric: s.mean for s in summaries_of(baseline) if s.mean is not None}
    return [
        (older, {"faithfulness": 0.85, "answer_relevancy": 0.7}),
        (baseline.info, means),
    ]


@pytest.fixture
def run_page(run: RunRecord, history: list[tuple[RunInfo, dict[str, float]]]) -> Node:
    return parse(render_run_html(run, summaries_of(run), history))


@pytest.fixture
def compare_page(run: RunRecord, baseline: RunRecord) -> Node:
    return parse(render_comparison_html(compare_runs(run, baseline), run, baseline))


def _drawn(svg: Node) -> list[Node]:
    return [
        n for n in svg.walk() if n.tag in {"circle", "rect", "line", "polyline", "path"}
    ]


# -- the run report -------------------------------------------------------------------


def test_run_report_draws_a_trend_per_metric(run_page: Node) -> None:
    plots = run_page.find_all("svg", "trend")
    assert [p.attrs["data-metric"] for p in plots] == list(METRICS)
    faithfulness = plots[0]
    assert len(faithfulness.find_all("circle")) == 3, (
        "three runs have a faithfulness mean"
    )
    assert len(faithfulness.find_all("circle", "current")) == 1, "this run is marked"
    assert faithfulness.find_all("polyline"), "the runs are joined by a line"
    precision = plots[2]
    assert len(precision.find_all("circle")) == 2, (
        "the oldest run has no precision mean"
    )


def test_run_report_has_one_row_per_question(run_page: Node) -> None:
    rows = run_page.one("table", id="questions").find_all("tr", "question")
    assert [r.attrs["id"] for r in rows] == ["q-q1", "q-q2", "q-q3", "q-q4"]
    statuses = [
        td.attrs["data-status"]
        for td in rows[0].find_all("td")
        if "data-status" in td.attrs
    ]
    assert statuses == ["scored", "scored", "scored"]


def test_run_report_counts_and_flags_errors(run_page: Node) -> None:
    metrics = run_page.one("table", id="metrics")
    row = metrics.one("tr", **{"data-metric": "faithfulness"})
    errors = row.one("td", "errors")
    assert "flagged" in errors.classes, "a metric with errors is flagged"
    assert "1 (TimeoutError ×1)" in errors.all_text()
    clean = metrics.one("tr", **{"data-metric": "answer_relevancy"}).one("td", "errors")
    assert clean.all_text() == "0" and "flagged" not in clean.classes

    failed = run_page.one("tr", id="q-q4")
    cell = failed.one("td", "error")
    assert (
        cell.attrs["title"]
        == "TimeoutError: The judge model did not answer within 30 s."
    )
    assert "question" in failed.classes and "failed" in failed.classes

    banner = run_page.one("div", id="verdict")
    assert "warn" in banner.classes and banner.attrs["role"] == "alert"
    assert "TimeoutError" in banner.all_text()


def test_run_report_header_says_what_ran(run_page: Node) -> None:
    facts = run_page.one("dl", id="facts")
    shown = dict(
        zip(
            [dt.all_text() for dt in facts.find_all("dt")],
            [dd.all_text() for dd in facts.find_all("dd")],
            strict=True,
        )
    )
    assert shown["Dataset"] == "python-docs-golden"
    assert shown["Dataset hash"] == "9f2c4e1a7b3d"
    assert shown["Collection"] == "docs"
    assert shown["Generation"] == "7"
    assert shown["Judge model"] == "smollm2-judge"
    assert shown["Prompt version"] == "judge-v3"
    assert shown["RAGAS version"] == "0.2.15"
    assert shown["Git commit"] == "0123456789ab"
    assert shown["When"] == "2025-03-02 09:00 UTC"
    assert shown["Took"] == "1 min 24 s"


def test_not_applicable_and_long_answers_are_shown_as_such(run_page: Node) -> None:
    na = run_page.one("tr", id="q-q3").one("td", "na")
    assert na.all_text() == "n/a" and na.attrs["data-status"] == "not_applicable"
    first = run_page.one("tr", id="q-q1")
    details = first.find_all("details")
    assert details[0].one("p", "full").all_text() == LONG_ANSWER
    assert "2 passages, 1 cited" in details[1].one("summary").all_text()
    assert "faithfulness of q1" in first.one("td", "reasons").all_text()


def test_untrusted_text_is_escaped(run: RunRecord, run_page: Node) -> None:
    page = render_run_html(run, summaries_of(run), [])
    assert not run_page.find_all("script"), "an answer's script tag became an element"
    assert not run_page.find_all("b"), "a question's markup became an element"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert SCRIPT in run_page.one("tr", id="q-q2").all_text(), "shown as text"
    policy = run_page.one("meta", **{"http-equiv": "Content-Security-Policy"})
    assert "default-src 'none'" in policy.attrs["content"]
    assert "<script" not in render_run_markdown(run, summaries_of(run), [])


# -- the comparison report ------------------------------------------------------------


def test_comparison_banner_names_the_regressed_metric(compare_page: Node) -> None:
    banner = compare_page.one("div", id="verdict")
    assert "regression" in banner.classes and banner.attrs["role"] == "alert"
    assert banner.one("strong").all_text() == "Regression in faithfulness"
    assert "Inconclusive: context_precision." in banner.all_text()


def test_comparison_without_regression_says_so(
    run: RunRecord, baseline: RunRecord
) -> None:
    full = compare_runs(run, baseline)
    calm = Comparison(
        full.run_id,
        full.baseline_id,
        tuple(m for m in full.metrics if m.verdict == "pass"),
        0.95,
        2000,
    )
    banner = parse(render_comparison_html(calm, run, baseline)).one("div", id="verdict")
    assert "pass" in banner.classes
    assert banner.one("strong").all_text() == "No regression"


def test_comparison_warns_when_the_runs_used_different_datasets(
    run: RunRecord, baseline: RunRecord
) -> None:
    changed = RunRecord(
        replace(baseline.info, dataset_hash="00ff", index_generation=6),
        baseline.answers,
        baseline.cells,
    )
    page = parse(render_comparison_html(compare_runs(run, changed), run, changed))
    warning = page.one("p", role="alert")
    assert "The runs differ in dataset hash" in warning.all_text()
    facts = page.one("details", open="")
    assert "differs in dataset hash, generation" in facts.one("summary").all_text()
    highlighted = [r.one("th").all_text() for r in page.find_all("tr", "differs")]
    assert highlighted == ["Dataset hash", "Generation"], "times are expected to differ"


def test_comparison_draws_intervals_against_the_margin(compare_page: Node) -> None:
    forest = compare_page.one("svg", "forest")
    estimates = forest.find_all("rect", "estimate")
    assert len(estimates) == 3
    assert "regression" in estimates[0].classes
    assert len(forest.find_all("line", "margin")) == 3
    assert len(forest.find_all("line", "ci")) == 3


def test_comparison_draws_each_questions_difference(
    compare_page: Node, run: RunRecord, baseline: RunRecord
) -> None:
    plots = {
        p.attrs["data-metric"]: p for p in compare_page.find_all("svg", "differences")
    }
    assert set(plots) == set(METRICS)
    comparison = compare_runs(run, baseline)
    for m in comparison.metrics:
        dots = plots[m.metric].find_all("circle", "dot")
        assert len(dots) == len(m.differences), m.metric
    worse = plots["faithfulness"].find_all("circle", "worse")
    assert len(worse) == 3, "q1, q2 and q3 scored lower in faithfulness"


def test_comparison_lists_questions_largest_drop_first(compare_page: Node) -> None:
    table = compare_page.one("table", id="questions")
    rows = table.find_all("tr", "question")
    assert [r.attrs["id"] for r in rows] == ["q-q4", "q-q1", "q-q3", "q-q2"]
    q1 = table.one("tr", id="q-q1")
    assert "flipped" in q1.all_text()
    assert "0.900 → 0.400 (-0.500)" in q1.all_text()
    errors = compare_page.one("table", id="metrics").one(
        "tr", **{"data-metric": "faithfulness"}
    )
    assert "flagged" in errors.one("td", "errors").classes


# -- markdown, json and files ---------------------------------------------------------


def test_markdown_reports_carry_the_verdict_and_errors(
    run: RunRecord, baseline: RunRecord
) -> None:
    md = render_run_markdown(run, summaries_of(run), [])
    assert "| faithfulness | 0.667 | 75% | 3 | 0 | 1 (TimeoutError ×1) |" in md
    assert "- q4 / faithfulness: TimeoutError: The judge model did not answer" in md
    assert "&lt;script&gt;" in md
    comparison_md = render_comparison_markdown(
        compare_runs(run, baseline), run, baseline
    )
    assert "**Regression in faithfulness**" in comparison_md
    assert "- q1 (faithfulness)" in comparison_md


def test_json_reports_round_trip(run: RunRecord, baseline: RunRecord) -> None:
    document = json.loads(render_run_json(run, summaries_of(run), []))
    assert document["run"]["run_id"] == "r-002"
    assert document["run"]["created_at"] == "2025-03-02T09:00:00+00:00"
    faithfulness = document["summaries"][0]
    assert faithfulness["errors"] == 1 and faithfulness["coverage"] == 0.75
    assert any(c["error_type"] == "TimeoutError" for c in document["cells"])
    compared = json.loads(
        render_comparison_json(compare_runs(run, baseline), run, baseline)
    )
    assert compared["regressed"] is True
    assert compared["comparison"]["metrics"][0]["verdict"] == "regression"
    assert compared["summaries"]["baseline"][0]["errors"] == 1


def test_write_reports_writes_each_form(
    tmp_path: Path, run: RunRecord, baseline: RunRecord
) -> None:
    paths = write_reports(
        tmp_path / "reports",
        run,
        summaries_of(run),
        [],
        compare_runs(run, baseline),
        baseline,
    )
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "run-r-002.html",
            "run-r-002.md",
            "run-r-002.json",
            "compare-r-002-vs-r-001.html",
            "compare-r-002-vs-r-001.md",
            "compare-r-002-vs-r-001.json",
        ]
    )
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == names, (
        "no leftovers"
    )


# -- routes ---------------------------------------------------------------------------


@pytest.fixture
def client(run: RunRecord, baseline: RunRecord) -> TestClient:
    runs = {r.info.run_id: r for r in (run, baseline)}
    app = FastAPI()

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        # The service maps NotFound to 404 the same way (serving/app.py).
        return JSONResponse({"error": {"message": str(exc)}}, status_code=404)

    app.add_exception_handler(NotFound, not_found)
    app.include_router(
        eval_router(
            runs.get,
            lambda: [r.info for r in runs.values()],
            summaries_of,
            compare_runs,
        )
    )
    return TestClient(app)


def test_run_list_links_each_run_and_its_comparison(client: TestClient) -> None:
    response = client.get("/eval/runs")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    links = [a.attrs["href"] for a in parse(response.text).find_all("a")]
    assert "/eval/runs/r-002" in links and "/eval/runs/r-001" in links
    assert "/eval/runs/r-002/compare/r-001" in links

    listed = client.get("/eval/runs", params={"format": "json"}).json()
    assert [r["run_id"] for r in listed] == ["r-002", "r-001"], "newest first"
    assert listed[0]["report"] == "/eval/runs/r-002"


def test_run_route_serves_each_form(client: TestClient) -> None:
    page = client.get("/eval/runs/r-002")
    assert page.status_code == 200, page.text
    tree = parse(page.text)
    assert len(tree.one("table", id="questions").find_all("tr", "question")) == 4
    trend = tree.find_all("svg", "trend")[0]
    assert len(trend.find_all("circle")) == 2, "history from the store: r-001 and r-002"

    as_json = client.get("/eval/runs/r-002", params={"format": "json"})
    assert as_json.json()["run"]["run_id"] == "r-002"
    as_md = client.get("/eval/runs/r-002", params={"format": "md"})
    assert as_md.headers["content-type"].startswith("text/markdown")
    assert as_md.text.startswith("# ragline evaluation: run r-002")

    bad = client.get("/eval/runs/r-002", params={"format": "pdf"})
    assert bad.status_code == 422, bad.text


def test_comparison_route_serves_the_verdict(client: TestClient) -> None:
    page = client.get("/eval/runs/r-002/compare/r-001")
    assert page.status_code == 200, page.text
    banner = parse(page.text).one("div", id="verdict")
    assert banner.one("strong").all_text() == "Regression in faithfulness"
    as_json = client.get("/eval/runs/r-002/compare/r-001", params={"format": "json"})
    assert as_json.json()["regressed"] is True


def test_unknown_runs_answer_404_with_a_clear_message(client: TestClient) -> None:
    missing = client.get("/eval/runs/r-999")
    assert missing.status_code == 404, missing.text
    message = missing.json()["error"]["message"]
    assert "No evaluation run named 'r-999'" in message and "/eval/runs" in message
    baseline_missing = client.get("/eval/runs/r-002/compare/r-999")
    assert baseline_missing.status_code == 404, baseline_missing.text


# -- in a real browser ----------------------------------------------------------------

_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


def _rendered_dom(page: Path, profile: Path) -> Node:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(
            "Chromium is not installed; run `bash bench/prepare` (it installs the "
            "Debian packages chromium and chromium-driver)."
        )
    done = subprocess.run(
        [
            chromium,
            *_CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return parse(done.stdout)


@pytest.mark.slow
def test_reports_render_in_headless_chromium(
    tmp_path: Path,
    run: RunRecord,
    baseline: RunRecord,
    history: list[tuple[RunInfo, dict[str, float]]],
) -> None:
    paths = write_reports(
        tmp_path / "reports",
        run,
        summaries_of(run),
        history,
        compare_runs(run, baseline),
        baseline,
    )
    by_name = {p.name: p for p in paths}

    run_dom = _rendered_dom(by_name["run-r-002.html"], tmp_path / "profile-run")
    trends = run_dom.find_all("svg", "trend")
    assert len(trends) == 3 and all(_drawn(svg) for svg in trends)
    rows = run_dom.one("table", id="questions").find_all("tr", "question")
    assert len(rows) == 4
    assert not run_dom.find_all("script")
    assert SCRIPT in run_dom.one("tr", id="q-q2").all_text()

    compare_dom = _rendered_dom(
        by_name["compare-r-002-vs-r-001.html"], tmp_path / "profile-compare"
    )
    assert compare_dom.one("div", id="verdict").one("strong").all_text() == (
        "Regression in faithfulness"
    )
    forest = compare_dom.one("svg", "forest")
    assert len(forest.find_all("rect", "estimate")) == 3
    differences = compare_dom.find_all("svg", "differences")
    assert len(differences) == 3 and all(_drawn(svg) for svg in differences)
    assert len(compare_dom.one("table", id="questions").find_all("tr", "question")) == 4
