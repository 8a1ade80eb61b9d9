"""``ragline keys``: create, list and revoke the API keys of the service.

Keys are stored hashed in the catalog database of the settings file
(``catalog.url``, or SQLite in ``data_dir``), the same database the service
checks them against. ``create`` prints a key once: the key on stdout, so
``KEY=$(ragline keys create ...)`` captures it, and what it is on stderr.
``list`` never prints secrets; nothing stored can show them.

The settings file is the one given to ``ragline --config`` (or ``ragline
keys --config``, or ``$RAGLINE_CONFIG``, or ``./ragline.yaml``). When the
settings carry a policy (``gateway.policy``), a key can only be created for a
team and roles the policy defines.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ingestion.errors import RequestError
from serving.gateway.identity import ApiKeysConfig, IdentityConfig
from serving.gateway.policy import Policy, PolicyConfig
from serving.gateway.store import ApiKeyRecord, ApiKeyStore

from .settings import CONFIG_ENV, Settings, load_settings

__all__ = ["app"]

app = typer.Typer(
    name="keys",
    help="Create, list and revoke API keys (stored hashed in the catalog database).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Wide enough that tables are not cut when the output is a file or a pipe.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

_STORE_WARNING = (
    "Store this key now, somewhere safe: it is shown only this once and cannot "
    "be recovered (only its hash is kept). A lost key is revoked and replaced."
)
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


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
    """Create, list and revoke API keys."""


@app.command("create")
def create(
    ctx: typer.Context,
    user: Annotated[
        str,
        typer.Option(
            "--user", "-u", help="Who holds the key (an email or a service name)."
        ),
    ],
    team: Annotated[
        str, typer.Option("--team", "-t", help="The team whose policy applies.")
    ],
    role: Annotated[
        list[str] | None,
        typer.Option("--role", "-r", help="A role within the team (repeatable)."),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            "-l",
            help="A document access label granted to this key itself (repeatable).",
        ),
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(
            help="When the key stops working: a date or time (2030-01-31, "
            "2030-01-31T12:00+02:00; UTC when no zone is given) or a duration "
            "from now (90d, 12h, 30m, 2w). Default: never."
        ),
    ] = None,
    description: Annotated[
        str, typer.Option("--description", "-d", help="What the key is for.")
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a key and print it once; only its hash is stored."""
    now = datetime.now(UTC)
    expires_at = _expiry(expires, now)
    settings = _settings(ctx)
    roles, labels = role or [], label or []
    with _store(settings) as store:
        try:
            _check_grant(settings, team, roles)
            record, key = store.create(
                user,
                team,
                roles=roles,
                labels=labels,
                expires_at=expires_at,
                description=description,
            )
        except RequestError as error:
            raise typer.BadParameter(str(error)) from error
    if as_json:
        payload = {"key": key, **record.to_json(now), "warning": _STORE_WARNING}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    err.print(_created_line(record), markup=False, highlight=False)
    sys.stdout.write(key + "\n")
    err.print(_STORE_WARNING, style="bold yellow", markup=False, highlight=False)


@app.command("list")
def list_keys(
    ctx: typer.Context,
    team: Annotated[
        str | None, typer.Option("--team", "-t", help="Only keys of this team.")
    ] = None,
    include_revoked: Annotated[
        bool, typer.Option("--all", "-a", help="Include revoked keys.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List keys (never their secrets), oldest first."""
    now = datetime.now(UTC)
    with _store(_settings(ctx)) as store:
        records = store.list(team=team, include_revoked=include_revoked)
    rows = [record.to_json(now) for record in records]
    if as_json:
        sys.stdout.write(json.dumps({"keys": rows}, indent=2) + "\n")
        return
    if not rows:
        out.print("No API keys yet; create one with `ragline keys create`.")
        return
    out.print(_table(rows))


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    key_id: Annotated[
        str, typer.Argument(help="The key id, as `ragline keys list` shows it.")
    ],
) -> None:
    """Revoke a key: the service stops accepting it."""
    settings = _settings(ctx)
    with _store(settings) as store:
        try:
            before = store.get(key_id)
            record = store.revoke(before.key_id)
        except RequestError as error:
            raise typer.BadParameter(str(error), param_hint="KEY_ID") from error
    if before.revoked_at is not None:
        out.print(
            f"API key {record.key_id} of {record.user} was already revoked on "
            f"{_iso(record.revoked_at)}.",
            markup=False,
            highlight=False,
        )
        return
    seconds = _api_keys_config(settings).cache_seconds
    out.print(
        f"Revoked API key {record.key_id} of {record.user} (team {record.team}). "
        f"Running services stop accepting it within {seconds:g} s, the time they "
        "cache a key.",
        markup=False,
        highlight=False,
    )


# -- helpers ----------------------------------------------------------------------


def _settings_path(ctx: typer.Context) -> Path:
    """The nearest ``--config`` up the command chain, else the environment."""
    node: click.Context | None = ctx  # type: ignore[assignment]
    while node is not None:
        value = node.params.get("config")
        if value is not None:
            return Path(value)
        node = node.parent
    return Path(os.environ.get(CONFIG_ENV, "ragline.yaml"))


def _settings(ctx: typer.Context) -> Settings:
    return load_settings(_settings_path(ctx))


@contextmanager
def _store(settings: Settings) -> Iterator[ApiKeyStore]:
    if settings.catalog.url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    # No cache: every command reads the database afresh.
    store = ApiKeyStore(settings.catalog_url(), cache_seconds=0)
    try:
        yield store
    finally:
        store.close()


def _check_grant(settings: Settings, team: str, roles: list[str]) -> None:
    policy = _policy_config(settings)
    if policy is not None:
        Policy(policy).check_grant(team, roles)


def _policy_config(settings: Settings) -> PolicyConfig | None:
    """The policy of the settings (``gateway.policy``), if they carry one."""
    policy = settings.gateway.policy
    return policy if isinstance(policy, PolicyConfig) else None


def _api_keys_config(settings: Settings) -> ApiKeysConfig:
    """The key settings (``gateway.identity.api_keys``), or their defaults."""
    identity = settings.gateway.identity
    if isinstance(identity, IdentityConfig) and identity.api_keys is not None:
        return identity.api_keys
    return ApiKeysConfig()


def _expiry(value: str | None, now: datetime) -> datetime | None:
    if value is None:
        return None
    text = value.strip()
    duration = _DURATION.fullmatch(text)
    if duration:
        amount, unit = int(duration.group(1)), duration.group(2)
        return now + timedelta(**{_UNITS[unit]: amount})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise typer.BadParameter(
            f"{value!r} is neither a date or time (2030-01-31, "
            "2030-01-31T12:00+02:00) nor a duration (90d, 12h, 30m, 2w).",
            param_hint="--expires",
        ) from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _created_line(record: ApiKeyRecord) -> str:
    roles = f", roles {', '.join(record.roles)}" if record.roles else ""
    expires = (
        f", expires {_iso(record.expires_at)}" if record.expires_at else ", no expiry"
    )
    return (
        f"Created API key {record.key_id} for {record.user} "
        f"(team {record.team}{roles}{expires})."
    )


def _table(rows: list[dict[str, object]]) -> Table:
    table = Table(title="API keys")
    columns = (
        "key_id",
        "user",
        "team",
        "roles",
        "labels",
        "status",
        "created_at",
        "expires_at",
        "revoked_at",
        "description",
    )
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(Text(_cell(row[c])) for c in columns))
    return table


def _cell(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
