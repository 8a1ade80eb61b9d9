"""Evaluation runs, kept in the catalog database.

Three tables, created when missing, in the catalog's database (SQLite by
default, PostgreSQL at scale): ``eval_runs`` (one row per run: what it ran
on), ``eval_answers`` (one row per question answered) and ``eval_cells``
(one row per question and metric). Lists and mappings sit in JSON columns.
Example::

    store = EvalStore(settings.catalog_url())
    store.save(RunRecord(info, answers, cells))
    run = store.load(info.run_id)
    baseline = store.latest(dataset=info.dataset, before=info.run_id)
    store.close()

What holds:

- A run is written in one transaction: readers see all of it or none.
  Saving a run again under the same id replaces it whole.
- :meth:`EvalStore.load` gives back the answers and cells in the order they
  were saved, and a :class:`RunInfo` equal to the one saved (times in UTC).
- Run ids (:func:`new_run_id`) start with the UTC time of the run to the
  second, so they sort by time; a random suffix keeps runs of the same second
  apart. Listings are ordered by creation time, newest first.
"""

from __future__ import annotations

import json
import logging
import secrets
from contextlib import AbstractContextManager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from ingestion.errors import CatalogError, NotFound
from serving.gateway.store import database_error, open_engine, transaction

from .models import AnswerRecord, Cell, RunInfo, RunRecord

__all__ = [
    "EvalStore",
    "eval_answers",
    "eval_cells",
    "eval_metadata",
    "eval_runs",
    "new_run_id",
    "run_info_from_dict",
    "run_info_to_dict",
]

logger = logging.getLogger(__name__)

_RECENT_IN_MESSAGES = 5
_MAX_LIST_LIMIT = 10_000

eval_metadata = sa.MetaData()
"""The evaluation tables, created in the catalog database when missing."""

eval_runs = sa.Table(
    "eval_runs",
    eval_metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("dataset", sa.String(256), nullable=False),
    sa.Column("dataset_hash", sa.String(64), nullable=False),
    sa.Column("collection", sa.String(64), nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("git_commit", sa.String(64)),
    sa.Column("index_generation", sa.Integer),
    sa.Column("judge_model", sa.Text),
    sa.Column("judge_model_hash", sa.String(128)),
    sa.Column("prompt_version", sa.String(128)),
    sa.Column("ragas_version", sa.String(64)),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("label", sa.Text),
    sa.Column("seconds", sa.Double),
    sa.Column("extra", sa.JSON, nullable=False),
    sa.Index("ix_eval_runs_dataset", "dataset", "created_at"),
    sa.Index("ix_eval_runs_collection", "collection", "created_at"),
    sa.Index("ix_eval_runs_created_at", "created_at"),
)

eval_answers = sa.Table(
    "eval_answers",
    eval_metadata,
    sa.Column(
        "run_id",
        sa.String(64),
        sa.ForeignKey("eval_runs.run_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("question_id", sa.String(256), nullable=False),
    sa.Column("question", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("contexts", sa.JSON, nullable=False),
    sa.Column("context_uris", sa.JSON, nullable=False),
    sa.Column("context_chunk_ids", sa.JSON, nullable=False),
    sa.Column("cited_chunk_ids", sa.JSON, nullable=False),
    sa.Column("latency_ms", sa.Double),
    sa.Column("error", sa.Text),
)

eval_cells = sa.Table(
    "eval_cells",
    eval_metadata,
    sa.Column(
        "run_id",
        sa.String(64),
        sa.ForeignKey("eval_runs.run_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("question_id", sa.String(256), nullable=False),
    sa.Column("metric", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("score", sa.Double),
    sa.Column("error_type", sa.String(256)),
    sa.Column("error", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Index("ix_eval_cells_metric", "run_id", "metric"),
)

_TABLES = [eval_runs, eval_answers, eval_cells]


def new_run_id(now: datetime | None = None) -> str:
    """A short id that sorts by time, such as ``20261204-153012-ab12cd``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class EvalStore:
    """Saves, loads and lists evaluation runs in a SQL database.

    ``database`` is a SQLAlchemy URL (the store opens and closes its own
    engine) or an engine shared with the catalog (left open on :meth:`close`).
    """

    def __init__(self, database: str | Engine) -> None:
        self._owns_engine = isinstance(database, str)
        self._engine = open_engine(database) if isinstance(database, str) else database
        self._where = self._engine.url.render_as_string(hide_password=True)
        self._create_tables()

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()

    def __enter__(self) -> EvalStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------

    def save(self, run: RunRecord) -> None:
        """Write a run, its answers and its cells in one transaction."""
        run_id = run.info.run_id
        with self._tx(f"save the evaluation run {run_id}") as conn:
            self._delete(conn, run_id)
            conn.execute(eval_runs.insert().values(**_run_row(run.info)))
            if run.answers:
                conn.execute(
                    eval_answers.insert(),
                    [_answer_row(run_id, i, a) for i, a in enumerate(run.answers)],
                )
            if run.cells:
                conn.execute(
                    eval_cells.insert(),
                    [_cell_row(run_id, i, c) for i, c in enumerate(run.cells)],
                )
        logger.info(
            "evaluation run saved: run_id=%s dataset=%s collection=%s answers=%d "
            "cells=%d",
            run_id,
            run.info.dataset,
            run.info.collection,
            len(run.answers),
            len(run.cells),
        )

    def delete(self, run_id: str) -> None:
        """Remove a run and everything recorded with it; unknown ids raise NotFound."""
        with self._tx(f"delete the evaluation run {run_id}") as conn:
            if not self._delete(conn, run_id):
                raise self._not_found(conn, run_id)

    # -- reading ----------------------------------------------------------------

    def load(self, run_id: str, *, answers: bool = True) -> RunRecord:
        """The run with this id (or the one run whose id starts with it).

        ``answers=False`` leaves the answers out (an empty list), for callers
        that only need the scores. Raises :class:`~ingestion.errors.NotFound`,
        naming recent runs, when there is no such run or the prefix fits more
        than one.
        """
        with self._tx(f"load the evaluation run {run_id}") as conn:
            info = self._info(conn, run_id)
            answer_rows = (
                conn.execute(
                    sa.select(eval_answers)
                    .where(eval_answers.c.run_id == info.run_id)
                    .order_by(eval_answers.c.seq)
                ).all()
                if answers
                else []
            )
            cells = conn.execute(
                sa.select(eval_cells)
                .where(eval_cells.c.run_id == info.run_id)
                .order_by(eval_cells.c.seq)
            ).all()
        return RunRecord(
            info=info,
            answers=[_answer(row) for row in answer_rows],
            cells=[_cell(row) for row in cells],
        )

    def info(self, run_id: str) -> RunInfo:
        """What :meth:`load` gives as ``.info``, without reading answers and cells."""
        with self._tx(f"read the evaluation run {run_id}") as conn:
            return self._info(conn, run_id)

    def list(
        self,
        *,
        limit: int = 20,
        collection: str | None = None,
        dataset: str | None = None,
    ) -> list[RunInfo]:
        """The most recent runs, newest first, optionally of one collection or dataset."""
        query = sa.select(eval_runs)
        if collection is not None:
            query = query.where(eval_runs.c.collection == collection)
        if dataset is not None:
            query = query.where(eval_runs.c.dataset == dataset)
        query = _newest_first(query).limit(max(1, min(limit, _MAX_LIST_LIMIT)))
        with self._tx("list evaluation runs") as conn:
            return [_run_info(row) for row in conn.execute(query)]

    def latest(
        self,
        *,
        dataset: str | None = None,
        collection: str | None = None,
        before: str | None = None,
    ) -> RunInfo | None:
        """The newest run matching the filters, created before the run ``before``.

        This is the default baseline of a run: ``latest(dataset=run.dataset,
        before=run.run_id)``. None when there is no such run; NotFound when
        ``before`` names no run.
        """
        query = sa.select(eval_runs)
        if dataset is not None:
            query = query.where(eval_runs.c.dataset == dataset)
        if collection is not None:
            query = query.where(eval_runs.c.collection == collection)
        with self._tx("find the latest evaluation run") as conn:
            if before is not None:
                pivot = self._info(conn, before)
                query = query.where(
                    sa.or_(
                        eval_runs.c.created_at < pivot.created_at,
                        sa.and_(
                            eval_runs.c.created_at == pivot.created_at,
                            eval_runs.c.run_id < pivot.run_id,
                        ),
                    )
                )
            row = conn.execute(_newest_first(query).limit(1)).first()
        return None if row is None else _run_info(row)

    # -- database ---------------------------------------------------------------

    def _info(self, conn: Connection, run_id: str) -> RunInfo:
        row = conn.execute(
            sa.select(eval_runs).where(eval_runs.c.run_id == run_id)
        ).first()
        if row is not None:
            return _run_info(row)
        matches = conn.execute(
            _newest_first(
                sa.select(eval_runs).where(
                    eval_runs.c.run_id.startswith(run_id, autoescape=True)
                )
            ).limit(_RECENT_IN_MESSAGES + 1)
        ).all()
        if len(matches) == 1 and run_id:
            return _run_info(matches[0])
        if len(matches) > 1 and run_id:
            names = ", ".join(m.run_id for m in matches[:_RECENT_IN_MESSAGES])
            raise NotFound(
                f"The run id {run_id!r} is the start of more than one run ({names}); "
                "give more of it."
            )
        raise self._not_found(conn, run_id)

    def _not_found(self, conn: Connection, run_id: str) -> NotFound:
        recent = conn.execute(
            _newest_first(sa.select(eval_runs.c.run_id)).limit(_RECENT_IN_MESSAGES)
        ).scalars()
        names = ", ".join(recent)
        hint = f"recent runs: {names}" if names else "no evaluation run is stored yet"
        return NotFound(
            f"No evaluation run {run_id!r} in {self._where} ({hint}); "
            "`ragline eval runs` lists them."
        )

    @staticmethod
    def _delete(conn: Connection, run_id: str) -> bool:
        # Children first: SQLite does not cascade without its foreign-key pragma.
        conn.execute(eval_cells.delete().where(eval_cells.c.run_id == run_id))
        conn.execute(eval_answers.delete().where(eval_answers.c.run_id == run_id))
        result = conn.execute(eval_runs.delete().where(eval_runs.c.run_id == run_id))
        return bool(result.rowcount)

    def _create_tables(self) -> None:
        try:
            eval_metadata.create_all(self._engine, tables=_TABLES)
        except SQLAlchemyError as err:
            # Two processes starting at once may both try; one of them wins.
            if not self._tables_exist():
                raise self._failed("create the evaluation tables", err) from err

    def _tables_exist(self) -> bool:
        try:
            inspector = sa.inspect(self._engine)
            return all(inspector.has_table(table.name) for table in _TABLES)
        except SQLAlchemyError:
            return False

    def _tx(self, what: str) -> AbstractContextManager[Connection]:
        return transaction(self._engine, what, self._where)

    def _failed(self, what: str, err: SQLAlchemyError) -> CatalogError:
        return database_error(what, self._where, err)


# -- rows and records -------------------------------------------------------------


def run_info_to_dict(info: RunInfo) -> dict[str, Any]:
    """A JSON-ready mapping of a run's description (times in ISO 8601, UTC)."""
    data = asdict(info)
    data["created_at"] = _utc(info.created_at).isoformat()
    data["metrics"] = list(info.metrics)
    return data


def run_info_from_dict(data: dict[str, Any]) -> RunInfo:
    """The inverse of :func:`run_info_to_dict`."""
    fields = dict(data)
    fields["created_at"] = _utc(datetime.fromisoformat(fields["created_at"]))
    fields["metrics"] = tuple(fields.get("metrics") or ())
    fields["extra"] = dict(fields.get("extra") or {})
    return RunInfo(**fields)


def _newest_first(query: sa.Select[Any]) -> sa.Select[Any]:
    return query.order_by(eval_runs.c.created_at.desc(), eval_runs.c.run_id.desc())


def _run_row(info: RunInfo) -> dict[str, Any]:
    return {
        "run_id": info.run_id,
        "created_at": _utc(info.created_at),
        "dataset": info.dataset,
        "dataset_hash": info.dataset_hash,
        "collection": info.collection,
        "metrics": list(info.metrics),
        "git_commit": info.git_commit,
        "index_generation": info.index_generation,
        "judge_model": info.judge_model,
        "judge_model_hash": info.judge_model_hash,
        "prompt_version": info.prompt_version,
        "ragas_version": info.ragas_version,
        "target": info.target,
        "label": info.label,
        "seconds": info.seconds,
        "extra": _json_ready(info.extra),
    }


def _run_info(row: Any) -> RunInfo:
    return RunInfo(
        run_id=row.run_id,
        created_at=_utc(row.created_at),
        dataset=row.dataset,
        dataset_hash=row.dataset_hash,
        collection=row.collection,
        metrics=tuple(row.metrics),
        git_commit=row.git_commit,
        index_generation=row.index_generation,
        judge_model=row.judge_model,
        judge_model_hash=row.judge_model_hash,
        prompt_version=row.prompt_version,
        ragas_version=row.ragas_version,
        target=row.target,
        label=row.label,
        seconds=row.seconds,
        extra=dict(row.extra or {}),
    )


def _answer_row(run_id: str, seq: int, answer: AnswerRecord) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "seq": seq,
        "question_id": answer.question_id,
        "question": answer.question,
        "answer": answer.answer,
        "contexts": list(answer.contexts),
        "context_uris": list(answer.context_uris),
        "context_chunk_ids": list(answer.context_chunk_ids),
        "cited_chunk_ids": list(answer.cited_chunk_ids),
        "latency_ms": answer.latency_ms,
        "error": answer.error,
    }


def _answer(row: Any) -> AnswerRecord:
    return AnswerRecord(
        question_id=row.question_id,
        question=row.question,
        answer=row.answer,
        contexts=tuple(row.contexts),
        context_uris=tuple(row.context_uris),
        context_chunk_ids=tuple(row.context_chunk_ids),
        cited_chunk_ids=tuple(row.cited_chunk_ids),
        latency_ms=row.latency_ms,
        error=row.error,
    )


def _cell_row(run_id: str, seq: int, cell: Cell) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "seq": seq,
        "question_id": cell.question_id,
        "metric": cell.metric,
        "status": cell.status,
        "score": cell.score,
        "error_type": cell.error_type,
        "error": cell.error,
        "reason": cell.reason,
    }


def _cell(row: Any) -> Cell:
    return Cell(
        question_id=row.question_id,
        metric=row.metric,
        status=row.status,
        score=row.score,
        error_type=row.error_type,
        error=row.error,
        reason=row.reason,
    )


def _json_ready(value: dict[str, Any]) -> dict[str, Any]:
    """``extra`` as JSON holds it; a value JSON cannot hold fails here, by name."""
    try:
        return dict(json.loads(json.dumps(value, allow_nan=False)))
    except (TypeError, ValueError) as err:
        raise CatalogError(
            f"The run's extra fields cannot be stored as JSON ({err}); keep them to "
            "strings, finite numbers, booleans, lists and mappings."
        ) from err


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
