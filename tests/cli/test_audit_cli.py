"""``ragline audit`` through typer's CliRunner, over a real SQLite catalog.

The command is mounted on a root app with the same global ``--config``
option as ``ragline.cli.app``, the way the composition root mounts it.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from ragline.audit_cli import audit, parse_time
from serving.gateway.audit import AuditEntry, AuditLog
from serving.gateway.providers import Attempt

SETTINGS = """
data_dir: ./data
collections:
  - name: docs
"""

NOW = datetime.now(UTC)


def root_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _global_options(
        config: Annotated[Path, typer.Option("--config", "-c")] = Path("ragline.yaml"),
        log_level: Annotated[str | None, typer.Option()] = None,
    ) -> None:
        pass

    app.command("audit")(audit)
    return app


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ragline.yaml"
    path.write_text(SETTINGS, encoding="utf-8")
    return path


@pytest.fixture
def seeded(config: Path) -> Path:
    """Four records: two of team search, one refused with 429, one two days old."""
    (config.parent / "data").mkdir()
    log = AuditLog(f"sqlite:///{config.parent / 'data' / 'catalog.db'}")
    entries = [
        AuditEntry(
            request_id="req-old",
            route="/ask",
            time=NOW - timedelta(days=2),
            team="search",
            status=200,
        ),
        AuditEntry(
            request_id="req-a",
            route="/ask",
            time=NOW - timedelta(minutes=30),
            user="ada",
            team="search",
            key_id="k-1",
            model="chat",
            attempts=(Attempt("llama", "ok", 840.0, 200),),
            prompt_tokens=812,
            completion_tokens=95,
            cost=0.0021,
            latency_ms={"total": 901.0},
            status=200,
        ),
        AuditEntry(
            request_id="req-b",
            route="/v1/chat/completions",
            time=NOW - timedelta(minutes=20),
            user="bob",
            team="support",
            key_id="k-2",
            status=429,
            error="Rate limit key:k-2 requests/minute of 5 per minute is reached",
        ),
        AuditEntry(
            request_id="req-c",
            route="/ask",
            time=NOW - timedelta(minutes=10),
            user="ada",
            team="search",
            key_id="k-1",
            cache_hit=True,
            status=200,
            error="upstream said Bearer abc123-secret was wrong",
        ),
    ]

    async def fill() -> None:
        for e in entries:
            await log.record(e)
        await log.close()

    asyncio.run(fill())
    return config


def invoke(config: Path, *args: str) -> typer.testing.Result:
    return CliRunner().invoke(root_app(), ["--config", str(config), "audit", *args])


def records(result: typer.testing.Result) -> list[dict[str, object]]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["records"]


def test_json_lists_the_records_newest_first(seeded: Path) -> None:
    found = records(invoke(seeded, "--json"))

    assert [r["request_id"] for r in found] == ["req-c", "req-b", "req-a", "req-old"]
    first_with_usage = found[2]
    assert first_with_usage["prompt_tokens"] == 812, first_with_usage
    assert first_with_usage["attempts"] == [
        {
            "target": "llama",
            "outcome": "ok",
            "latency_ms": 840.0,
            "status": 200,
            "error": None,
        }
    ], first_with_usage


def test_options_filter_the_records(seeded: Path) -> None:
    def ids(*args: str) -> list[object]:
        return [r["request_id"] for r in records(invoke(seeded, "--json", *args))]

    assert ids("--team", "search") == ["req-c", "req-a", "req-old"]
    assert ids("--user", "ada", "--key-id", "k-1") == ["req-c", "req-a"]
    assert ids("--status", "429") == ["req-b"]
    assert ids("--route", "/v1/chat/completions") == ["req-b"]
    assert ids("--since", "1h") == ["req-c", "req-b", "req-a"]
    assert ids("--until", "15m", "--since", "25m") == ["req-b"]
    assert ids("-n", "2") == ["req-c", "req-b"]


def test_the_table_shows_each_record_with_secrets_masked(seeded: Path) -> None:
    result = invoke(seeded)

    assert result.exit_code == 0, result.output
    for request_id in ("req-a", "req-b", "req-c", "req-old"):
        assert request_id in result.stdout, result.stdout
    assert "llama:ok" in result.stdout and "812+95" in result.stdout, result.stdout
    assert "abc123-secret" not in result.stdout, result.stdout


def test_the_command_takes_its_own_config_option_too(seeded: Path) -> None:
    app = typer.Typer(add_completion=False)
    app.command("audit")(audit)
    app.command("other")(lambda: None)

    result = CliRunner().invoke(
        app, ["audit", "--config", str(seeded), "--json", "-n", "1"]
    )

    assert [r["request_id"] for r in records(result)] == ["req-c"]


def test_a_catalog_not_created_yet_lists_nothing_and_creates_nothing(
    config: Path,
) -> None:
    table = invoke(config)
    as_json = invoke(config, "--json")

    assert table.exit_code == 0 and "No audit records" in table.stdout, table.output
    assert records(as_json) == []
    assert not (config.parent / "data" / "catalog.db").exists()


def test_a_time_that_cannot_be_read_is_a_usage_error(config: Path) -> None:
    result = invoke(config, "--since", "last tuesday")

    assert result.exit_code == 2, result.output
    assert "30m, 2h or 7d" in result.output, result.output


def test_times_are_iso_8601_or_a_span_ago() -> None:
    now = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)

    assert parse_time("90m", now=now) == now - timedelta(minutes=90)
    assert parse_time("7d", now=now) == now - timedelta(days=7)
    assert parse_time("2025-03-01", now=now) == datetime(2025, 3, 1, tzinfo=UTC)
    assert parse_time("2025-03-01T10:00:00+02:00", now=now) == datetime(
        2025, 3, 1, 8, tzinfo=UTC
    )
