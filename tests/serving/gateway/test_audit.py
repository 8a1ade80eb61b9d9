"""The audit log: batched background writes, flush on close, masking, queries.

Stored in a real SQLite file and in PostgreSQL (``catalog_url`` runs both).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from ingestion.errors import RequestError
from serving.gateway.audit import (
    AuditConfig,
    AuditEntry,
    AuditLog,
    audit_log,
    mask_secrets,
)
from serving.gateway.providers import Attempt

T = TypeVar("T")

START = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def entry(n: int, **fields: Any) -> AuditEntry:
    values: dict[str, Any] = {
        "request_id": f"req-{n:04d}",
        "route": "/ask",
        "time": START + timedelta(seconds=n),
        "user": "ada",
        "team": "search",
        "key_id": "k-1",
        "model": "chat",
        "status": 200,
    }
    values.update(fields)
    return AuditEntry(**values)


def record_all(log: AuditLog, entries: list[AuditEntry], *, close: bool = True) -> None:
    async def main() -> None:
        for e in entries:
            await log.record(e)
        if close:
            await log.close()

    run(main())


def read(url: str, **filters: Any) -> list[AuditEntry]:
    log = AuditLog(url)
    try:
        return log.query(**filters)
    finally:
        log.close_blocking()


def count_commits(log: AuditLog) -> list[int]:
    commits: list[int] = []
    sa.event.listen(log._engine, "commit", lambda conn: commits.append(1))
    return commits


# -- writing ------------------------------------------------------------------------


def test_every_field_of_a_record_reads_back_as_written(catalog_url: str) -> None:
    written = entry(
        1,
        attempts=(
            Attempt("primary", "timeout", 2000.5, None, "read timed out"),
            Attempt("fallback", "ok", 312.0, 200),
        ),
        prompt_tokens=812,
        completion_tokens=95,
        cost=0.00123,
        latency_ms={"retrieve": 12.5, "generate": 2312.5, "total": 2330.0},
        cache_hit=False,
        cited_chunk_ids=("doc-1#3", "doc-7#0"),
        policy=({"policy": "collections", "decision": "allow"},),
        status=200,
    )
    log = AuditLog(catalog_url)
    record_all(log, [written])

    [stored] = read(catalog_url)

    assert stored.id is not None
    assert stored == dataclasses.replace(written, id=stored.id), stored
    assert stored.time.tzinfo is not None
    assert stored.time == START + timedelta(seconds=1)


def test_close_writes_everything_still_queued(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    log = AuditLog(url, AuditConfig(batch_size=50, flush_interval_ms=5000))

    record_all(log, [entry(n) for n in range(250)])

    assert log.written == 250 and log.dropped == 0, (log.written, log.dropped)
    assert len(read(url, limit=1000)) == 250


def test_records_are_written_in_batches_of_the_configured_size(tmp_path: Path) -> None:
    log = AuditLog(
        f"sqlite:///{tmp_path / 'catalog.db'}",
        AuditConfig(batch_size=100, flush_interval_ms=5000),
    )
    commits = count_commits(log)

    async def main() -> None:
        for n in range(300):
            await log.record(entry(n))
        await log.flush()
        await log.close()

    run(main())

    assert log.written == 300
    assert len(commits) == 3, f"{len(commits)} transactions for 300 records"


def test_a_quiet_moment_flushes_what_arrived_without_waiting_for_a_full_batch(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    log = AuditLog(url, AuditConfig(batch_size=1000, flush_interval_ms=20))

    async def main() -> int:
        for n in range(5):
            await log.record(entry(n))
        for _ in range(1000):  # the writer needs no flush or close to write
            if log.written == 5:
                break
            await asyncio.sleep(0.01)
        written = log.written
        await log.close()
        return written

    assert run(main()) == 5


def test_a_full_queue_drops_loudly_after_waiting_briefly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(
        f"sqlite:///{tmp_path / 'catalog.db'}",
        AuditConfig(queue_size=2, full_queue_wait_s=0.02),
    )
    log._start_writer = lambda: None  # type: ignore[method-assign]  # nobody drains

    with caplog.at_level(logging.ERROR, logger="serving.gateway.audit"):
        record_all(log, [entry(1), entry(2), entry(3)], close=False)

    assert log.dropped == 1, log.dropped
    assert "req-0003" in caplog.text and "dropped" in caplog.text, caplog.text
    log.close_blocking()


def test_a_record_after_close_is_dropped_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(f"sqlite:///{tmp_path / 'catalog.db'}")
    log.close_blocking()

    with caplog.at_level(logging.ERROR, logger="serving.gateway.audit"):
        record_all(log, [entry(1)], close=False)

    assert log.dropped == 1 and "req-0001" in caplog.text, caplog.text


def test_a_disabled_log_writes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    log = AuditLog(url, AuditConfig(enabled=False))

    record_all(log, [entry(1)])

    assert read(url) == []


# -- masking ------------------------------------------------------------------------

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZGEifQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
SECRETS = (
    "rk_live_8f3a9c2d1e",
    "abc.def-SECRET",
    JWT,
    "sk-proj-4fj39vK2mzQ",
    "hunter2pw",
    "s3cr3t-value",
)


@pytest.mark.parametrize(
    "text",
    [
        "upstream said 401 to Authorization: Bearer abc.def-SECRET",
        f"invalid token {JWT} presented",
        "unknown key rk_live_8f3a9c2d1e",
        "OpenAI rejected sk-proj-4fj39vK2mzQ: quota",
        "could not connect to redis://:hunter2pw@10.0.0.5:6379/0",
        "request had api_key=s3cr3t-value in the query",
        'body {"password": "s3cr3t-value"}',
    ],
)
def test_credentials_in_free_text_are_masked(text: str) -> None:
    masked = mask_secrets(text)

    assert not any(secret in masked for secret in SECRETS), masked
    assert "***" in masked, masked


@pytest.mark.parametrize(
    "text",
    [
        "max_tokens: 512 exceeds the context window",
        "work_item 42 failed; task-queue is empty",
        "the upstream answered 503 Service Unavailable",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert mask_secrets(text) == text


def test_secrets_never_reach_the_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    log = AuditLog(url)
    leaky = entry(
        1,
        route="/v1/chat/completions?api_key=s3cr3t-value",
        attempts=(
            Attempt("openai", "error", 20.0, 401, "bad key sk-proj-4fj39vK2mzQ"),
        ),
        policy=({"policy": "auth", "detail": f"Bearer {JWT}"},),
        status=401,
        error="The API key rk_live_8f3a9c2d1e is not valid",
    )

    record_all(log, [leaky])

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(audit_log)).mappings().one()
    engine.dispose()
    stored = repr(dict(row))
    assert not any(secret in stored for secret in SECRETS), stored
    assert row["error"] == "The API key rk_*** is not valid", row["error"]


# -- queries ------------------------------------------------------------------------


@pytest.fixture
def filled(catalog_url: str) -> Iterator[AuditLog]:
    """A log holding 12 records, one a second from START, in three teams."""
    log = AuditLog(catalog_url)
    record_all(
        log,
        [
            entry(
                n,
                team=("search", "support", "eval")[n % 3],
                user="ada" if n < 6 else "bob",
                key_id=f"k-{n % 2}",
                route="/ask" if n % 4 else "/v1/chat/completions",
                status=429 if n in (5, 7) else 200,
            )
            for n in range(12)
        ],
    )
    reader = AuditLog(catalog_url)
    yield reader
    reader.close_blocking()


def ids(entries: list[AuditEntry]) -> list[int]:
    return [int(e.request_id.split("-")[1]) for e in entries]


def test_queries_return_newest_first_up_to_the_limit(filled: AuditLog) -> None:
    assert ids(filled.query()) == list(range(11, -1, -1))
    assert ids(filled.query(limit=3)) == [11, 10, 9]


def test_queries_filter_by_each_field(filled: AuditLog) -> None:
    assert ids(filled.query(team="support")) == [10, 7, 4, 1]
    assert ids(filled.query(user="ada", key_id="k-1")) == [5, 3, 1]
    assert ids(filled.query(route="/v1/chat/completions")) == [8, 4, 0]
    assert ids(filled.query(status=429)) == [7, 5]


def test_queries_filter_by_time_since_inclusive_until_exclusive(
    filled: AuditLog,
) -> None:
    since = START + timedelta(seconds=3)
    until = START + timedelta(seconds=6)

    assert ids(filled.query(since=since, until=until)) == [5, 4, 3]
    naive = since.replace(tzinfo=None)
    assert ids(filled.query(since=naive, until=until)) == [5, 4, 3]


def test_a_query_limit_out_of_range_is_refused(filled: AuditLog) -> None:
    with pytest.raises(RequestError, match="1 to 10000"):
        filled.query(limit=0)


def test_a_full_batch_is_written_without_waiting_out_the_interval(
    tmp_path: Path,
) -> None:
    log = AuditLog(
        f"sqlite:///{tmp_path / 'catalog.db'}",
        AuditConfig(batch_size=10, flush_interval_ms=10_000),
    )

    async def main() -> int:
        for n in range(10):
            await log.record(entry(n))
        for _ in range(500):  # half the 10 s the interval would take
            if log.written == 10:
                break
            await asyncio.sleep(0.01)
        written = log.written
        await log.close()
        return written

    assert run(main()) == 10


def test_a_flush_does_not_wait_out_the_interval(tmp_path: Path) -> None:
    log = AuditLog(
        f"sqlite:///{tmp_path / 'catalog.db'}",
        AuditConfig(batch_size=1000, flush_interval_ms=10_000),
    )

    async def main() -> int:
        for n in range(3):
            await log.record(entry(n))
        await asyncio.wait_for(log.flush(), timeout=5)  # half the interval
        written = log.written
        await log.close()
        return written

    assert run(main()) == 3
