"""``ragline audit``: the recent audit records of the service, newest first.

The command reads the settings file named by the root ``--config`` option
(or its own ``--config``, or ``RAGLINE_CONFIG``, or ``./ragline.yaml``) and
the audit table of the catalog database it names. Mount it on the root app
with ``app.command("audit")(audit)``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from serving.gateway.audit import AuditEntry, AuditLog

from .logs import configure_logging
from .settings import CONFIG_ENV, Settings, load_settings

__all__ = ["audit", "parse_time"]

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

_COLUMNS = (
    "time (UTC)",
    "request_id",
    "user",
    "team",
    "key_id",
    "route",
    "model",
    "targets",
    "status",
    "tokens",
    "cost",
    "ms",
    "cache",
    "error",
)


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means UTC), or a span ago such as ``30m``, ``2h``, ``7d``."""
    now = now or datetime.now(UTC)
    relative = _RELATIVE.match(text)
    if relative:
        amount, unit = float(relative.group(1)), relative.group(2)
        return now - timedelta(**{_UNITS[unit]: amount})
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as err:
        raise typer.BadParameter(
            f"{text!r} is neither an ISO 8601 time (2025-03-10T14:00) nor a span "
            "ago such as 30m, 2h or 7d."
        ) from err
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def audit(
    ctx: typer.Context,
    since: Annotated[
        str | None,
        typer.Option(
            help="From this time: ISO 8601 (UTC if no offset) or 30m, 2h, 7d ago."
        ),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Before this time, in the same forms as --since.")
    ] = None,
    user: Annotated[str | None, typer.Option(help="Only this user.")] = None,
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None,
    key_id: Annotated[str | None, typer.Option(help="Only this API key id.")] = None,
    route: Annotated[
        str | None, typer.Option(help="Only this route, e.g. /ask.")
    ] = None,
    status: Annotated[
        int | None, typer.Option(help="Only this HTTP status, e.g. 429.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=10_000, help="How many records.")
    ] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="The settings file, when not given to ragline itself.",
        ),
    ] = None,
) -> None:
    """Print the recent audit records, newest first, filtered by the options."""
    start = None if since is None else parse_time(since)
    end = None if until is None else parse_time(until)
    settings = _settings(ctx, config)

    log = _open_log(settings)
    if log is None:
        entries: list[AuditEntry] = []
    else:
        try:
            entries = log.query(
                since=start,
                until=end,
                user=user,
                team=team,
                key_id=key_id,
                route=route,
                status=status,
                limit=limit,
            )
        finally:
            log.close_blocking()

    if as_json:
        records = [entry.to_dict() for entry in entries]
        sys.stdout.write(json.dumps({"records": records}, indent=2) + "\n")
        return
    _print_table(entries)


def _settings(ctx: typer.Context, config: Path | None) -> Settings:
    root = ctx.find_root()
    path = config or root.params.get("config")
    if path is None:
        path = Path(os.environ.get(CONFIG_ENV, "ragline.yaml"))
    settings = load_settings(path)
    catalog_secret = settings.catalog.url
    configure_logging(
        root.params.get("log_level") or settings.logging.level,
        json_format=settings.logging.json_format,
        secrets=[catalog_secret.get_secret_value()] if catalog_secret else [],
    )
    return settings


def _open_log(settings: Settings) -> AuditLog | None:
    """The audit log of the catalog, or None when the catalog does not exist yet."""
    url = settings.catalog_url()
    return None if _missing_sqlite_file(url) else AuditLog(url)


def _missing_sqlite_file(url: str) -> bool:
    """True for a SQLite catalog not created yet: nothing to read, nothing to create."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return False
    return parsed.database != ":memory:" and not Path(parsed.database).exists()


def _print_table(entries: list[AuditEntry]) -> None:
    out = Console(width=None if sys.stdout.isatty() else 200)
    if not entries:
        out.print("No audit records match.")
        return
    table = Table(title="audit")
    for column in _COLUMNS:
        numeric = column in ("status", "tokens", "cost", "ms")
        table.add_column(
            column, justify="right" if numeric else "left", overflow="fold"
        )
    for entry in entries:
        table.add_row(*(Text(cell) for cell in _cells(entry)))
    out.print(table)


def _cells(entry: AuditEntry) -> list[str]:
    total_ms = entry.latency_ms.get("total", sum(entry.latency_ms.values()))
    targets = ", ".join(f"{a.target}:{a.outcome}" for a in entry.attempts)
    return [
        entry.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        entry.request_id,
        entry.user or "",
        entry.team or "",
        entry.key_id or "",
        entry.route,
        entry.model or "",
        targets,
        str(entry.status),
        f"{entry.prompt_tokens}+{entry.completion_tokens}",
        f"{entry.cost:.6f}".rstrip("0").rstrip("."),
        f"{total_ms:.0f}",
        "hit" if entry.cache_hit else "",
        _short(entry.error or ""),
    ]


def _short(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
