"""One audit record per request, written in the background, secrets masked.

An :class:`AuditEntry` says who called (user, team, key id), what (route,
virtual model), which targets were tried and how each went, the tokens and
cost, the latency of each stage, whether the cache answered, which chunks
were cited, what the policies decided, and how the request ended (HTTP
status, error message). :class:`AuditLog` keeps them in the ``audit_log``
table of the catalog database (SQLite or PostgreSQL; lists and mappings in
JSON columns). Example::

    audit = AuditLog(catalog_url, settings.audit)
    await audit.record(AuditEntry(request_id=rid, route="/ask", status=200, ...))
    ...
    await audit.close()  # writes what is still queued
    for entry in audit.query(team="search", limit=20):
        print(entry.time, entry.route, entry.status)

What holds:

- Recording never waits for the database. :meth:`AuditLog.record` puts the
  entry on a bounded queue; one writer thread takes up to ``batch_size``
  entries, or what arrived within ``flush_interval_ms`` of the first, and
  inserts them in one transaction.
- The writer wakes once per batch, not once per record: after the first
  entry of a batch it sleeps out the interval (or until a full batch, a
  flush or a close wakes it) and then takes what has gathered. Waking a
  thread costs a context switch and a contest for the GIL with the event
  loop, which on a busy core cost more than writing the record.
- A full queue drops nothing silently: ``record`` waits up to
  ``full_queue_wait_s`` for room, and if none comes, drops the entry, counts
  it in ``dropped`` and logs an error naming its request id. A batch the
  database refuses three times is dropped, counted and logged the same way.
- :meth:`AuditLog.close` writes everything queued before it returns; a log
  never closed is closed when the interpreter exits.
- Secrets never reach the table: every free-text field (route, model, error,
  each attempt's target and error, every string inside the policy decisions)
  passes through :func:`mask_secrets` in the writer thread.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import queue
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ingestion.config import StrictModel
from ingestion.errors import CatalogError, RequestError

from .providers import Attempt

__all__ = [
    "AuditConfig",
    "AuditEntry",
    "AuditLog",
    "audit_log",
    "audit_metadata",
    "mask_secrets",
]

logger = logging.getLogger(__name__)

_WRITE_RETRIES_S = (0.1, 0.5)
_MAX_QUERY_LIMIT = 10_000

# Credentials that may turn up in free text: bearer headers, JWTs (three
# base64url parts, the first a JSON header starting with '{"'), ragline keys,
# OpenAI-style keys, URL passwords and key=value pairs named like secrets.
_SECRETS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer ***"),
    (
        re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
        "***",
    ),
    (re.compile(r"\brk_[A-Za-z0-9_-]+"), "rk_***"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{4,}"), "sk-***"),
    (
        re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@\s/]+@"),
        r"\g<head>:***@",
    ),
    (
        re.compile(
            r"(?i)(?P<name>\b[\w-]*(?:api[_-]?key|token|secret|password|passwd)"
            r"[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,;]+"
        ),
        r"\g<name>***",
    ),
)


# Each pattern above needs one of these to match at all, so text holding none
# of them, which is most text, is returned without running the patterns.
_SECRET_HINT = re.compile(r"(?i)bearer|eyj|rk_|sk-|://|api|token|secret|passw")


def mask_secrets(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``***``."""
    if not _SECRET_HINT.search(text):
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class AuditConfig(StrictModel):
    """The audit log (the ``audit:`` section of the settings file)."""

    enabled: bool = Field(default=True, description="Write one record per request.")
    batch_size: int = Field(
        default=200,
        ge=1,
        le=10_000,
        description="The most records written in one transaction.",
    )
    flush_interval_ms: float = Field(
        default=25.0,
        gt=0,
        le=10_000,
        description="How long the writer waits for more records after the "
        "first of a batch.",
    )
    queue_size: int = Field(
        default=10_000,
        ge=1,
        description="Records waiting to be written; a full queue makes "
        "requests wait up to full_queue_wait_s, then drops the record with an "
        "error in the log.",
    )
    full_queue_wait_s: float = Field(
        default=0.25,
        ge=0,
        description="How long recording waits for room in a full queue.",
    )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What happened to one request.

    ``time`` is when it arrived (timezone-aware; stored in UTC); ``model``
    the virtual model asked for; ``attempts`` the targets tried, in order;
    ``cost`` in the budgets' currency; ``latency_ms`` the milliseconds of
    each stage (``retrieve``, ``generate``, ``total``, …); ``policy`` the
    decisions of the policies that looked at the request, each a small
    mapping such as ``{"policy": "collections", "decision": "allow"}``.
    ``id`` is set on entries read back from the log.
    """

    request_id: str
    route: str
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    user: str | None = None
    team: str | None = None
    key_id: str | None = None
    model: str | None = None
    attempts: tuple[Attempt, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_ms: Mapping[str, float] = field(default_factory=dict)
    cache_hit: bool = False
    cited_chunk_ids: tuple[str, ...] = ()
    policy: tuple[Mapping[str, Any], ...] = ()
    status: int = 200
    error: str | None = None
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping, the form ``ragline audit --json`` prints."""
        data = asdict(self)
        data["time"] = self.time.astimezone(UTC).isoformat()
        return data


audit_metadata = sa.MetaData()
"""The audit table, created in the catalog database when missing."""

audit_log = sa.Table(
    "audit_log",
    audit_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("user_name", sa.String(200)),
    sa.Column("team", sa.String(200)),
    sa.Column("key_id", sa.String(200)),
    sa.Column("route", sa.String(500), nullable=False),
    sa.Column("model", sa.String(200)),
    sa.Column("attempts", sa.JSON, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cost", sa.Double, nullable=False),
    sa.Column("latency_ms", sa.JSON, nullable=False),
    sa.Column("cache_hit", sa.Boolean, nullable=False),
    sa.Column("cited_chunk_ids", sa.JSON, nullable=False),
    sa.Column("policy", sa.JSON, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("error", sa.Text),
    sa.Index("ix_audit_log_created_at", "created_at"),
    sa.Index("ix_audit_log_request_id", "request_id"),
    sa.Index("ix_audit_log_team", "team", "created_at"),
    sa.Index("ix_audit_log_key_id", "key_id", "created_at"),
    sa.Index("ix_audit_log_user", "user_name", "created_at"),
)


class _Flush:
    """A marker on the queue: the writer sets it once everything before is written."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class AuditLog:
    """The audit records in the catalog database; see the module docstring.

    Opening creates the table when it is missing. The writer thread starts
    with the first record, so a log opened only to be read (``ragline
    audit``) starts none. ``written`` and ``dropped`` count records.
    """

    def __init__(self, url: str, config: AuditConfig | None = None) -> None:
        self.config = config or AuditConfig()
        self._url = url
        try:
            self._engine = _create_engine(url)
            audit_metadata.create_all(self._engine)
        except SQLAlchemyError as err:
            raise CatalogError(
                f"Could not open the audit log in {_masked_db_url(url)}: "
                f"{_first_line(err)}. Check catalog.url and that the database "
                "is running."
            ) from err
        self._insert = _Insert(self._engine.dialect)
        self._queue: queue.Queue[object] = queue.Queue(self.config.queue_size)
        # Entries that make the writer start a batch at once rather than wait.
        self._full_batch = min(self.config.batch_size, self.config.queue_size)
        self._wake = threading.Event()
        # Flush and stop markers queued and not yet reached: no batch waits then.
        self._markers = 0
        self._markers_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._count_lock = threading.Lock()
        self.written = 0
        self.dropped = 0

    # -- writing ---------------------------------------------------------------

    async def record(self, entry: AuditEntry) -> None:
        """Queues the entry for the writer; waits only when the queue is full."""
        if not self.config.enabled:
            return
        if self._closed:
            self._drop([entry], "the audit log is closed")
            return
        self._start_writer()
        if self._put(entry):
            return

        deadline = time.monotonic() + self.config.full_queue_wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            if self._put(entry):
                return
        self._drop([entry], "the queue stayed full")

    def _put(self, entry: AuditEntry) -> bool:
        """Queues the entry if there is room; wakes the writer for a full batch."""
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._wake.set()
            return False
        if self._queue.qsize() >= self._full_batch:
            self._wake.set()
        return True

    async def flush(self) -> None:
        """Waits until every entry recorded so far is written (or dropped)."""
        await asyncio.to_thread(self.flush_blocking)

    def flush_blocking(self) -> None:
        """:meth:`flush`, in the calling thread."""
        if self._writer is None or self._closed:
            return
        marker = _Flush()
        self._put_marker(marker)
        marker.done.wait()

    async def close(self) -> None:
        """Writes what is queued, stops the writer and closes the connections."""
        await asyncio.to_thread(self.close_blocking)

    def close_blocking(self) -> None:
        """:meth:`close`, in the calling thread; may be called more than once."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        if self._writer is not None:
            self._put_marker(_STOP)
            self._writer.join()
        self._engine.dispose()

    def _put_marker(self, marker: object) -> None:
        with self._markers_lock:
            self._markers += 1
        self._queue.put(marker)
        self._wake.set()

    def _start_writer(self) -> None:
        if self._writer is not None:
            return
        with self._start_lock:
            if self._writer is not None or self._closed:
                return
            # A daemon, so a log never closed does not keep the process alive;
            # the exit hook still writes what it holds.
            writer = threading.Thread(
                target=self._run, name="ragline-audit-writer", daemon=True
            )
            writer.start()
            self._writer = writer
            atexit.register(_close_at_exit, weakref.ref(self))

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping, markers = self._next_batch()
            if batch:
                self._write(batch)
            for marker in markers:
                marker.done.set()

    def _next_batch(self) -> tuple[list[AuditEntry], bool, list[_Flush]]:
        """Blocks for the first item, lets more gather, then takes a batch.

        The wait for more is a sleep on ``_wake``, not on the queue, so that
        records arriving meanwhile do not wake the writer one by one.
        """
        batch: list[AuditEntry] = []
        markers: list[_Flush] = []
        item = self._queue.get()
        if not self._markers and self._queue.qsize() + 1 < self._full_batch:
            self._wake.wait(self.config.flush_interval_ms / 1000)
        self._wake.clear()
        while True:
            if item is _STOP or isinstance(item, _Flush):
                with self._markers_lock:
                    self._markers -= 1
            if item is _STOP:
                return batch, True, markers
            if isinstance(item, _Flush):
                markers.append(item)
                return batch, False, markers
            batch.append(cast(AuditEntry, item))
            if len(batch) >= self.config.batch_size:
                return batch, False, markers
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False, markers

    def _write(self, batch: list[AuditEntry]) -> None:
        rows = []
        for entry in batch:
            try:
                rows.append(self._insert.values(_row(entry)))
            except (TypeError, ValueError) as err:
                self._drop([entry], f"it cannot be stored ({err})")
        if not rows:
            return

        for attempt in range(len(_WRITE_RETRIES_S) + 1):
            try:
                with self._engine.begin() as conn:
                    self._insert.run(conn, rows)
            except SQLAlchemyError as err:
                if attempt == len(_WRITE_RETRIES_S):
                    self._drop(batch, f"the database refused it: {_first_line(err)}")
                    return
                logger.warning(
                    "audit write failed, retrying: records=%d attempt=%d error=%s",
                    len(rows),
                    attempt + 1,
                    _first_line(err),
                )
                time.sleep(_WRITE_RETRIES_S[attempt])
            else:
                self.written += len(rows)
                logger.debug("audit records written: records=%d", len(rows))
                return

    def _drop(self, entries: Sequence[AuditEntry], reason: str) -> None:
        with self._count_lock:
            self.dropped += len(entries)
        logger.error(
            "audit records dropped, %s: records=%d request_ids=%s dropped_total=%d",
            reason,
            len(entries),
            ",".join(e.request_id for e in entries[:10]),
            self.dropped,
        )

    # -- reading ---------------------------------------------------------------

    def query(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
        team: str | None = None,
        key_id: str | None = None,
        route: str | None = None,
        status: int | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Records matching every filter given, newest first.

        ``since`` is inclusive and ``until`` exclusive; naive datetimes are
        taken as UTC. Records still queued are not seen; :meth:`flush` first
        to include them.
        """
        if not 1 <= limit <= _MAX_QUERY_LIMIT:
            raise RequestError(
                f"An audit query returns 1 to {_MAX_QUERY_LIMIT} records, not {limit}."
            )
        table = audit_log
        conditions: list[Any] = []
        if since is not None:
            conditions.append(table.c.created_at >= _utc(since))
        if until is not None:
            conditions.append(table.c.created_at < _utc(until))
        for column, value in (
            (table.c.user_name, user),
            (table.c.team, team),
            (table.c.key_id, key_id),
            (table.c.route, route),
            (table.c.status, status),
        ):
            if value is not None:
                conditions.append(column == value)
        statement = (
            sa.select(table)
            .where(*conditions)
            .order_by(table.c.created_at.desc(), table.c.id.desc())
            .limit(limit)
        )
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(statement).mappings().all()
        except SQLAlchemyError as err:
            raise CatalogError(
                f"Could not read the audit log in {_masked_db_url(self._url)}: "
                f"{_first_line(err)}"
            ) from err
        return [_entry(row) for row in rows]

    async def aquery(self, **filters: Any) -> list[AuditEntry]:
        """:meth:`query`, off the event loop."""
        return await asyncio.to_thread(lambda: self.query(**filters))


def _close_at_exit(ref: weakref.ref[AuditLog]) -> None:
    log = ref()
    if log is not None:
        log.close_blocking()


# -- rows -------------------------------------------------------------------------


def _row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "request_id": entry.request_id,
        "created_at": _utc(entry.time),
        "user_name": entry.user,
        "team": entry.team,
        "key_id": entry.key_id,
        "route": mask_secrets(entry.route),
        "model": None if entry.model is None else mask_secrets(entry.model),
        "attempts": [_attempt_row(a) for a in entry.attempts],
        "prompt_tokens": int(entry.prompt_tokens),
        "completion_tokens": int(entry.completion_tokens),
        "cost": float(entry.cost),
        "latency_ms": {str(k): float(v) for k, v in entry.latency_ms.items()},
        "cache_hit": bool(entry.cache_hit),
        "cited_chunk_ids": [str(c) for c in entry.cited_chunk_ids],
        "policy": [_masked_json(dict(p)) for p in entry.policy],
        "status": int(entry.status),
        "error": None if entry.error is None else mask_secrets(entry.error),
    }


def _attempt_row(attempt: Attempt) -> dict[str, Any]:
    return {
        "target": mask_secrets(attempt.target),
        "outcome": attempt.outcome,
        "latency_ms": attempt.latency_ms,
        "status": attempt.status,
        "error": None if attempt.error is None else mask_secrets(attempt.error),
    }


class _Insert:
    """The batch insert of audit rows, compiled once for the database's dialect.

    The rows go to the driver's ``executemany`` as tuples, each value turned
    into what the driver takes by its column type's own conversion (JSON to
    text, datetimes to SQLite's text form), as SQLAlchemy would, without
    building a statement and looking up conversions again for every batch.
    """

    def __init__(self, dialect: sa.Dialect) -> None:
        columns = [c for c in audit_log.columns if c.name != "id"]
        self.names = tuple(c.name for c in columns)
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        if dialect.paramstyle not in ("qmark", "format", "pyformat"):
            raise CatalogError(
                f"The audit log cannot write to a {dialect.name} database (its "
                f"driver takes {dialect.paramstyle} parameters); use SQLite or "
                "PostgreSQL for the catalog."
            )
        self.sql = (
            f"INSERT INTO {audit_log.name} ({', '.join(self.names)}) "
            f"VALUES ({', '.join(mark for _ in columns)})"
        )
        self._convert = tuple(
            c.type.dialect_impl(dialect).bind_processor(dialect) for c in columns
        )

    def values(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """The row's values in column order, as the driver takes them."""
        return tuple(
            value if convert is None else convert(value)
            for convert, value in zip(
                self._convert, (row[name] for name in self.names), strict=True
            )
        )

    def run(self, conn: sa.Connection, rows: list[tuple[Any, ...]]) -> None:
        conn.exec_driver_sql(self.sql, rows)


def _masked_json(value: Any) -> Any:
    """``value`` as plain JSON (unknown types as strings), every string masked."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, Mapping):
        return {str(k): _masked_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_masked_json(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return mask_secrets(json.dumps(value, default=str).strip('"'))


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        id=row["id"],
        request_id=row["request_id"],
        time=_utc(row["created_at"]),
        user=row["user_name"],
        team=row["team"],
        key_id=row["key_id"],
        route=row["route"],
        model=row["model"],
        attempts=tuple(
            Attempt(
                target=a["target"],
                outcome=a["outcome"],
                latency_ms=a["latency_ms"],
                status=a.get("status"),
                error=a.get("error"),
            )
            for a in row["attempts"]
        ),
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        cost=row["cost"],
        latency_ms=dict(row["latency_ms"]),
        cache_hit=row["cache_hit"],
        cited_chunk_ids=tuple(row["cited_chunk_ids"]),
        policy=tuple(row["policy"]),
        status=row["status"],
        error=row["error"],
    )


def _utc(value: datetime) -> datetime:
    """Aware UTC; a naive value (SQLite returns those) is taken as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# -- the database -----------------------------------------------------------------


def _create_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        # WAL lets the service append while `ragline audit` reads; in WAL
        # mode NORMAL never corrupts the file, and a power loss may forget
        # only the last batches.
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sa.event.listen(engine, "connect", on_connect)
    return engine


def _masked_db_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid database URL>"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__
