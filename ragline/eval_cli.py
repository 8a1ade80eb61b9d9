"""``ragline eval``: evaluation runs against golden sets, and their comparison.

Runs are stored in the catalog database of the settings file (``catalog.url``,
or SQLite in ``data_dir``). ``ragline eval runs`` lists them, newest first;
``ragline eval compare RUN [BASELINE]`` compares a run with a baseline (by
default the latest earlier run of the same golden set) and gives each metric
a verdict, as :mod:`eval.compare` describes. Margins, floors and the
interval's settings come from the ``eval:`` section of the settings file;
options override them.

``compare`` exits with 0 when no metric regressed, 1 when one did, and 2 when
the runs could not be compared (bad options, an unknown run, no baseline, an
unreachable database), so a CI step can tell a regression from a broken
setup.

The settings file is the one given to ``ragline --config`` (or ``ragline
eval --config``, or ``$RAGLINE_CONFIG``, or ``./ragline.yaml``). Every
command of this group is a function on :data:`app`; :func:`load_eval_settings`
and :func:`open_eval_store` are what a new command needs to reach them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

import click
import sqlalchemy as sa
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from eval.compare import compare, comparison_to_dict, summarize
from eval.models import Comparison, MetricComparison, RunInfo, RunRecord
from eval.store import EvalStore, run_info_to_dict
from ingestion.errors import RaglineError

from .logs import configure_logging
from .settings import CONFIG_ENV, Settings, load_settings

__all__ = ["app", "load_eval_settings", "open_eval_store"]

app = typer.Typer(
    name="eval",
    help="Evaluate answers against golden sets and compare runs for regressions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Wide enough that tables are not cut when the output is a file or a pipe.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

EXIT_REGRESSION = 1
EXIT_USAGE = 2

_VERDICT_STYLE = {"pass": "green", "inconclusive": "yellow", "regression": "bold red"}


@app.callback()
def _options(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="The settings file; default: the one given to ragline, "
            f"${CONFIG_ENV}, or ./ragline.yaml.",
        ),
    ] = None,
) -> None:
    """Evaluate answers against golden sets and compare runs for regressions."""


# -- compare ----------------------------------------------------------------------


@app.command("compare")
def compare_command(
    ctx: typer.Context,
    run: Annotated[
        str,
        typer.Argument(help="The run to judge: its id, the start of it, or 'latest'."),
    ],
    baseline: Annotated[
        str | None,
        typer.Argument(
            help="The run to compare with; default: the latest earlier run of the "
            "same golden set."
        ),
    ] = None,
    margin: Annotated[
        list[str] | None,
        typer.Option(
            "--margin",
            "-m",
            help="METRIC=DROP, the smallest drop of a metric worth flagging, or "
            "DROP for every metric without its own (repeatable).",
        ),
    ] = None,
    floor: Annotated[
        list[str] | None,
        typer.Option(
            "--floor",
            "-f",
            help="METRIC=SCORE, the lowest mean a run may have (repeatable).",
        ),
    ] = None,
    pass_threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="A question passes a metric at this score or above.",
        ),
    ] = None,
    confidence: Annotated[
        float | None,
        typer.Option(
            min=0.5,
            max=0.999,
            help="The confidence level of the intervals (default 0.95).",
        ),
    ] = None,
    resamples: Annotated[
        int | None,
        typer.Option(min=100, max=100_000, help="Bootstrap resamples per metric."),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="The bootstrap seed; the same seed, the same verdict.")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Compare a run with a baseline; exit 1 when a metric regressed."""
    settings = load_eval_settings(ctx)
    config = settings.eval
    margins, default_margin = _margins(margin, config.margins, config.default_margin)
    floors = {**config.floors, **_named_values(floor, "--floor")}

    try:
        with open_eval_store(settings) as store:
            current, previous = _runs_to_compare(store, run, baseline)
        result = compare(
            current,
            previous,
            margins=margins,
            floors=floors,
            pass_threshold=(
                config.pass_threshold if pass_threshold is None else pass_threshold
            ),
            confidence=config.confidence if confidence is None else confidence,
            resamples=config.resamples if resamples is None else resamples,
            seed=seed,
            default_margin=default_margin,
        )
    except RaglineError as error:
        err.print(f"error: {error}", markup=False, highlight=False)
        raise typer.Exit(EXIT_USAGE) from error

    if as_json:
        _print_json(current, previous, result)
    else:
        _print_comparison(current, previous, result)
    if result.regressed:
        raise typer.Exit(EXIT_REGRESSION)


def _runs_to_compare(
    store: EvalStore | None, run: str, baseline: str | None
) -> tuple[RunRecord, RunRecord]:
    if store is None:
        raise typer.BadParameter(
            "No evaluation run is stored yet; `ragline eval run` makes one.",
            param_hint="RUN",
        )
    current = _load(store, run)
    if baseline is not None:
        return current, _load(store, baseline)

    found = store.latest(dataset=current.info.dataset, before=current.info.run_id)
    if found is None:
        raise typer.BadParameter(
            f"No run of the golden set {current.info.dataset!r} is older than "
            f"{current.info.run_id}, so there is no baseline to compare with; give "
            "BASELINE, or compare the next run with this one.",
            param_hint="BASELINE",
        )
    return current, store.load(found.run_id)


def _load(store: EvalStore, reference: str) -> RunRecord:
    if reference != "latest":
        return store.load(reference)
    newest = store.list(limit=1)
    if not newest:
        raise typer.BadParameter("No evaluation run is stored yet.", param_hint="RUN")
    return store.load(newest[0].run_id)


def _margins(
    given: list[str] | None, configured: dict[str, float], default: float
) -> tuple[dict[str, float], float]:
    """Per-metric margins and the default one, options over settings."""
    margins = dict(configured)
    for text in given or []:
        if "=" in text:
            margins.update(_named_values([text], "--margin"))
        else:
            default = _number(text, "--margin")
    for metric, value in {"(default)": default, **margins}.items():
        if value < 0:
            raise typer.BadParameter(
                f"The margin of {metric} is {value:g}; give 0 or more.",
                param_hint="--margin",
            )
    return margins, default


def _named_values(given: list[str] | None, option: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for text in given or []:
        name, sep, number = text.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(
                f"{text!r} is not METRIC=NUMBER, such as faithfulness=0.7.",
                param_hint=option,
            )
        values[name.strip()] = _number(number, option)
    return values


def _number(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise typer.BadParameter(
            f"{text!r} is not a number.", param_hint=option
        ) from error
    if not math.isfinite(value):
        raise typer.BadParameter(f"{text!r} is not a finite number.", param_hint=option)
    return value


def _print_json(current: RunRecord, previous: RunRecord, result: Comparison) -> None:
    payload = {
        "run": run_info_to_dict(current.info),
        "baseline": run_info_to_dict(previous.info),
        "comparison": comparison_to_dict(result),
    }
    sys.stdout.write(json.dumps(payload, indent=2, allow_nan=False) + "\n")


def _print_comparison(
    current: RunRecord, previous: RunRecord, result: Comparison
) -> None:
    run_info, base_info = current.info, previous.info
    out.print(
        f"run {run_info.run_id} ({_describe(run_info)}) against baseline "
        f"{base_info.run_id} ({_describe(base_info)})",
        markup=False,
        highlight=False,
    )
    if run_info.dataset_hash != base_info.dataset_hash:
        err.print(
            "note: the two runs used different versions of the golden set; only "
            "questions with the same id are paired.",
            markup=False,
            highlight=False,
        )
    out.print(_comparison_table(result))
    for metric in result.metrics:
        for reason in metric.reasons:
            out.print(Text(f"{metric.metric}: {reason}"))
    regressed = [m.metric for m in result.metrics if m.verdict == "regression"]
    if regressed:
        out.print(Text(f"regression: {', '.join(regressed)}", style="bold red"))
    else:
        out.print(Text("no regression", style="green"))


def _comparison_table(result: Comparison) -> Table:
    level = f"{result.confidence:.0%}"
    table = Table(title="comparison")
    table.add_column("metric")
    for column in ("paired", "baseline", "run", f"difference [{level} CI]"):
        table.add_column(column, justify="right")
    for column in ("margin", "floor", "verdict", "flipped"):
        table.add_column(column, justify="right" if column != "verdict" else "left")
    for metric in result.metrics:
        table.add_row(
            Text(metric.metric),
            str(metric.paired),
            _score(metric.mean_baseline),
            _score(metric.mean_run),
            _difference(metric),
            f"{metric.margin:g}",
            "" if metric.floor is None else f"{metric.floor:g}",
            Text(metric.verdict, style=_VERDICT_STYLE[metric.verdict]),
            str(len(metric.flipped)),
        )
    return table


def _difference(metric: MetricComparison) -> str:
    if metric.mean_difference is None:
        return ""
    text = f"{metric.mean_difference:+.3f}"
    if metric.ci_low is not None and metric.ci_high is not None:
        text += f" [{metric.ci_low:+.3f}, {metric.ci_high:+.3f}]"
    return text


# -- runs -------------------------------------------------------------------------


@app.command("runs")
def runs_command(
    ctx: typer.Context,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Only runs of this golden set."),
    ] = None,
    collection: Annotated[
        str | None, typer.Option("--collection", help="Only runs on this collection.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=10_000, help="How many runs.")
    ] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List evaluation runs, newest first, with each metric's mean and coverage."""
    settings = load_eval_settings(ctx)
    with open_eval_store(settings) as store:
        infos = (
            []
            if store is None
            else store.list(limit=limit, dataset=dataset, collection=collection)
        )
        rows = [
            _run_row(store.load(info.run_id, answers=False))
            for info in infos
            if store is not None
        ]

    if as_json:
        sys.stdout.write(json.dumps({"runs": rows}, indent=2, allow_nan=False) + "\n")
        return
    if not rows:
        out.print("No evaluation runs match; `ragline eval run` makes one.")
        return
    out.print(_runs_table(rows))


def _run_row(run: RunRecord) -> dict[str, Any]:
    metrics = {
        summary.metric: {
            "mean": summary.mean,
            "coverage": summary.coverage,
            "scored": summary.scored,
            "not_applicable": summary.not_applicable,
            "errors": summary.errors,
        }
        for summary in summarize(run)
    }
    questions = len({cell.question_id for cell in run.cells})
    return {**run_info_to_dict(run.info), "questions": questions, "scores": metrics}


def _runs_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="evaluation runs")
    for column in ("run", "created (UTC)", "dataset", "collection", "target"):
        table.add_column(column, overflow="fold")
    table.add_column("questions", justify="right")
    table.add_column("metrics (mean, coverage)", overflow="fold")
    for row in rows:
        created = row["created_at"][:19].replace("T", " ")
        scores = "\n".join(
            f"{name} {_score(s['mean'])} ({s['coverage']:.0%})"
            for name, s in row["scores"].items()
        )
        table.add_row(
            *(
                Text(str(cell))
                for cell in (
                    row["run_id"],
                    created,
                    row["dataset"],
                    row["collection"],
                    row["target"],
                    row["questions"],
                    scores,
                )
            )
        )
    return table


# -- shared by the commands ---------------------------------------------------------


def load_eval_settings(ctx: typer.Context) -> Settings:
    """The settings named by the nearest ``--config`` up the command chain.

    Also sets up logging from them, as the root command does.
    """
    path: Path | None = None
    node: click.Context | None = ctx  # type: ignore[assignment]
    while node is not None and path is None:
        value = node.params.get("config")
        path = Path(value) if value is not None else None
        node = node.parent
    settings = load_settings(path or Path(os.environ.get(CONFIG_ENV, "ragline.yaml")))
    root = ctx.find_root()
    catalog_secret = settings.catalog.url
    configure_logging(
        root.params.get("log_level") or settings.logging.level,
        json_format=settings.logging.json_format,
        secrets=[catalog_secret.get_secret_value()] if catalog_secret else [],
    )
    return settings


@contextmanager
def open_eval_store(
    settings: Settings, *, create: bool = False
) -> Iterator[EvalStore | None]:
    """The run store of the settings' catalog; None when it does not exist yet.

    A SQLite catalog that was never created yields None, so that reading
    commands do not create an empty database; ``create=True`` creates it (for
    commands that save runs).
    """
    url = settings.catalog_url()
    if _missing_sqlite_file(url):
        if not create:
            yield None
            return
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = EvalStore(url)
    try:
        yield store
    finally:
        store.close()


def _missing_sqlite_file(url: str) -> bool:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return False
    return parsed.database != ":memory:" and not Path(parsed.database).exists()


def _describe(info: RunInfo) -> str:
    created = info.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    return f"{info.dataset}, {info.collection}, {created} UTC"


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
