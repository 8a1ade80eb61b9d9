"""The ``/eval`` routes: evaluation reports served by the ragline service.

* ``GET /eval/runs``: the runs, newest first, each linked to its report and to
  a comparison with the run before it (``?format=json`` for machines).
* ``GET /eval/runs/{run_id}``: one run's report (``?format=json`` or ``md``).
* ``GET /eval/runs/{run_id}/compare/{baseline_id}``: a run against a
  baseline, computed on request (``?format=json`` or ``md``).

The router takes plain callables for storage and statistics, so it works over
any run store and ``serving`` never imports ``eval``: the composition root
builds the router and mounts it on the app. An unknown run raises
:class:`~ingestion.errors.NotFound`, which the service answers with 404.

``readable`` decides who reads what: given the request, it identifies the
caller (raising 401 without credentials) and returns which collections the
caller may use. Runs of other collections are left out of the list, and
their reports answer 403. Without it every run is readable.

Without a ``history`` callable, a run's trend is built by loading the most
recent runs of the same dataset and collection (``history_limit`` of them)
and summarizing each; a store that keeps summaries should pass its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ingestion.errors import AccessDenied, NotFound

from .models import Comparison, MetricSummary, RunInfo, RunRecord
from .report import (
    History,
    render_comparison_html,
    render_comparison_json,
    render_comparison_markdown,
    render_run_html,
    render_run_json,
    render_run_list_html,
    render_run_markdown,
)

__all__ = ["eval_router"]

LoadRun = Callable[[str], RunRecord | None]
"""A run by id, or ``None`` (or ``NotFound``) when there is no such run."""
ListRuns = Callable[[], Sequence[RunInfo]]
Summarize = Callable[[RunRecord], list[MetricSummary]]
CompareRuns = Callable[[RunRecord, RunRecord], Comparison]
"""A run against a baseline, in that order."""
HistoryOf = Callable[[RunRecord], History]
Readable = Callable[[Request], Awaitable[Callable[[str], bool]]]
"""The collections the caller of a request may read runs of."""


async def _everything(_request: Request) -> Callable[[str], bool]:
    return lambda _collection: True


Format = Annotated[
    Literal["html", "json", "md"],
    Query(alias="format", description="html (the default), json or md."),
]


def eval_router(
    load_run: LoadRun,
    list_runs: ListRuns,
    summarize: Summarize,
    compare: CompareRuns,
    *,
    history: HistoryOf | None = None,
    history_limit: int = 20,
    readable: Readable | None = None,
) -> APIRouter:
    """The ``/eval`` report routes over a run store and the statistics."""
    router = APIRouter(prefix="/eval", tags=["eval"])
    allowed_for = readable or _everything

    async def readable_run(request: Request, run_id: str) -> RunRecord:
        may_read = await allowed_for(request)
        run = await asyncio.to_thread(run_or_404, run_id)
        if not may_read(run.info.collection):
            raise AccessDenied(
                f"Run {run_id!r} evaluated the collection {run.info.collection!r}, "
                "which your team may not use; ask an administrator for access to it."
            )
        return run

    def run_or_404(run_id: str) -> RunRecord:
        run = load_run(run_id)
        if run is None:
            raise NotFound(
                f"No evaluation run named {run_id!r}; GET /eval/runs lists the runs "
                "there are."
            )
        return run

    def history_of(run: RunRecord) -> History:
        if history is not None:
            return history(run)
        return _recent_history(run, list_runs(), load_run, summarize, history_limit)

    @router.get("/runs", name="eval_runs", response_model=None)
    async def runs(request: Request, fmt: Format = "html") -> Response:
        """Every run the caller may read, newest first, linked to its report."""
        may_read = await allowed_for(request)
        listed = await asyncio.to_thread(list_runs)
        infos = [info for info in listed if may_read(info.collection)]
        if fmt == "json":
            return JSONResponse(
                [
                    {
                        **jsonable_encoder(asdict(info)),
                        "report": request.url_for("eval_run", run_id=info.run_id).path,
                    }
                    for info in sorted(infos, key=_newest_first)
                ]
            )
        if fmt == "md":
            return _markdown(_run_list_markdown(infos))
        return HTMLResponse(
            render_run_list_html(
                infos,
                lambda run_id: request.url_for("eval_run", run_id=run_id).path,
                lambda run_id, baseline_id: (
                    request.url_for(
                        "eval_compare", run_id=run_id, baseline_id=baseline_id
                    ).path
                ),
            )
        )

    @router.get("/runs/{run_id}", name="eval_run", response_model=None)
    async def run_report(
        request: Request, run_id: str, fmt: Format = "html"
    ) -> Response:
        """One run's report."""
        run = await readable_run(request, run_id)
        summaries = summarize(run)
        past = await asyncio.to_thread(history_of, run)
        if fmt == "json":
            return _json(render_run_json(run, summaries, past))
        if fmt == "md":
            return _markdown(render_run_markdown(run, summaries, past))
        return HTMLResponse(render_run_html(run, summaries, past))

    @router.get(
        "/runs/{run_id}/compare/{baseline_id}", name="eval_compare", response_model=None
    )
    async def comparison_report(
        request: Request, run_id: str, baseline_id: str, fmt: Format = "html"
    ) -> Response:
        """A run against a baseline, compared on request."""
        run = await readable_run(request, run_id)
        baseline = await readable_run(request, baseline_id)
        comparison = await asyncio.to_thread(compare, run, baseline)
        if fmt == "json":
            return _json(render_comparison_json(comparison, run, baseline))
        if fmt == "md":
            return _markdown(render_comparison_markdown(comparison, run, baseline))
        return HTMLResponse(render_comparison_html(comparison, run, baseline))

    return router


def _recent_history(
    run: RunRecord,
    infos: Sequence[RunInfo],
    load_run: LoadRun,
    summarize: Summarize,
    limit: int,
) -> History:
    """Means of the latest runs on the same dataset and collection, up to this one."""
    key = (run.info.dataset, run.info.collection)
    until = _aware(run.info.created_at)
    earlier = sorted(
        (
            i
            for i in infos
            if (i.dataset, i.collection) == key
            and _aware(i.created_at) <= until
            and i.run_id != run.info.run_id
        ),
        key=lambda i: _aware(i.created_at),
    )
    keep = max(0, limit - 1)
    earlier = earlier[len(earlier) - keep :] if keep else []
    history: History = []
    for info in earlier:
        record = load_run(info.run_id)
        if record is not None:
            history.append((info, _means(summarize(record))))
    history.append((run.info, _means(summarize(run))))
    return history


def _means(summaries: list[MetricSummary]) -> dict[str, float]:
    return {s.metric: s.mean for s in summaries if s.mean is not None}


def _run_list_markdown(infos: Sequence[RunInfo]) -> str:
    lines = ["# ragline evaluation runs", "", "| run | when | dataset | collection |"]
    lines.append("| --- | --- | --- | --- |")
    for info in sorted(infos, key=_newest_first):
        cells = (
            info.run_id,
            info.created_at.isoformat(),
            info.dataset,
            info.collection,
        )
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _json(text: str) -> Response:
    return Response(text, media_type="application/json")


def _markdown(text: str) -> Response:
    return Response(text, media_type="text/markdown; charset=utf-8")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _newest_first(info: RunInfo) -> float:
    return -_aware(info.created_at).timestamp()
