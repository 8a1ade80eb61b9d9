"""``ragline keys``: create, list and revoke keys in the catalog of a settings file."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner, Result

from ingestion.errors import NotFound, Unauthenticated
from ragline import keys_cli
from ragline.keys_cli import app
from serving.gateway.policy import PolicyConfig
from serving.gateway.store import ApiKeyStore

KEY_FORM = re.compile(r"rk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")

SETTINGS = """
data_dir: ./data
collections:
  - name: docs
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ragline.yaml"
    path.write_text(SETTINGS, encoding="utf-8")
    return path


@pytest.fixture
def database(config: Path) -> str:
    """The catalog database the settings name: SQLite in data_dir."""
    return f"sqlite:///{config.parent / 'data' / 'catalog.db'}"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    serving = logging.getLogger("serving")
    propagate = serving.propagate
    serving.propagate = True
    caplog.set_level(logging.DEBUG)
    yield caplog
    serving.propagate = propagate


def keys(config: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["--config", str(config), *args])


def create(config: Path, *args: str) -> str:
    result = keys(config, "create", *args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_create_prints_the_key_once_with_a_warning(config: Path, database: str):
    result = keys(
        config,
        "create",
        "--user",
        "alice@example.com",
        "--team",
        "search",
        "--role",
        "analyst",
        "--label",
        "finance",
        "--description",
        "notebook",
    )

    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    match = KEY_FORM.fullmatch(key)
    assert match, f"stdout holds the key alone: {result.stdout!r}"
    assert f"Created API key {match.group(1)} for alice@example.com" in result.stderr
    assert "team search, roles analyst, no expiry" in result.stderr
    assert "shown only this once" in result.stderr, "warns to store the key"
    with ApiKeyStore(database) as store:
        identity = store.authenticate(key)
    assert (identity.user, identity.team, identity.labels) == (
        "alice@example.com",
        "search",
        {"finance"},
    )


def test_create_with_json_prints_the_key_and_its_record(config: Path) -> None:
    result = keys(config, "create", "-u", "bot", "-t", "search", "--json")

    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert KEY_FORM.fullmatch(payload["key"])
    assert payload["key_id"] in payload["key"]
    assert payload["status"] == "active" and "shown only" in payload["warning"]


def test_list_shows_keys_but_never_their_secrets(config: Path) -> None:
    alice = create(config, "-u", "alice", "-t", "search", "-r", "analyst")
    bob = create(config, "-u", "bob", "-t", "support")

    table = keys(config, "list")
    listed = keys(config, "list", "--json")
    support = keys(config, "list", "--team", "support", "--json")

    assert table.exit_code == listed.exit_code == support.exit_code == 0
    for key in (alice, bob):
        key_id = KEY_FORM.fullmatch(key).group(1)  # type: ignore[union-attr]
        assert key_id in table.stdout and key_id in listed.stdout
        secret = key.split("_", 2)[2]
        assert secret not in table.output + listed.output, "a secret was listed"
    rows = json.loads(listed.stdout)["keys"]
    assert [(r["user"], r["team"], r["roles"]) for r in rows] == [
        ("alice", "search", ["analyst"]),
        ("bob", "support", []),
    ]
    assert set(rows[0]) >= {"key_id", "created_at", "expires_at", "revoked_at"}
    assert "key" not in rows[0]
    assert [r["user"] for r in json.loads(support.stdout)["keys"]] == ["bob"]


def test_revoke_stops_the_key_and_hides_it_from_the_list(
    config: Path, database: str
) -> None:
    key = create(config, "-u", "alice", "-t", "search")
    key_id = KEY_FORM.fullmatch(key).group(1)  # type: ignore[union-attr]

    revoked = keys(config, "revoke", key_id)

    assert revoked.exit_code == 0, revoked.output
    assert f"Revoked API key {key_id} of alice (team search)" in revoked.stdout
    assert "within 5 s" in revoked.stdout, "says when running services notice"
    with (
        ApiKeyStore(database) as store,
        pytest.raises(Unauthenticated, match="revoked"),
    ):
        store.authenticate(key)
    assert json.loads(keys(config, "list", "--json").stdout)["keys"] == []
    [row] = json.loads(keys(config, "list", "--all", "--json").stdout)["keys"]
    assert row["status"] == "revoked" and row["revoked_at"]
    again = keys(config, "revoke", f"rk_{key_id}")
    assert again.exit_code == 0 and "already revoked" in again.stdout


def test_revoking_an_unknown_id_is_not_found(config: Path) -> None:
    result = keys(config, "revoke", "0123456789ab")

    assert isinstance(result.exception, NotFound), result.output
    assert "ragline keys list" in str(result.exception)


def test_expiry_takes_a_duration_or_a_date(config: Path) -> None:
    in_90_days = json.loads(
        keys(
            config, "create", "-u", "a", "-t", "t", "--expires", "90d", "--json"
        ).stdout
    )
    dated = json.loads(
        keys(
            config, "create", "-u", "a", "-t", "t", "--expires", "2031-01-31", "--json"
        ).stdout
    )

    expected = datetime.now(UTC) + timedelta(days=90)
    got = datetime.fromisoformat(in_90_days["expires_at"])
    assert abs(got - expected) < timedelta(minutes=5), got
    assert dated["expires_at"] == "2031-01-31T00:00:00+00:00"


@pytest.mark.parametrize(
    ("args", "fault"),
    [
        (["-u", "a", "-t", "t", "--expires", "soon"], "neither a date or time"),
        (["-u", "a", "-t", "t", "--expires", "2001-01-01"], "not in the future"),
        (["-u", "a", "-t", "bad team"], "team 'bad team' is not valid"),
        (["-u", "a", "-t", "t", "-r", "bad/role"], "role 'bad/role' is not valid"),
    ],
)
def test_bad_arguments_are_usage_errors_naming_the_fault(
    config: Path, args: list[str], fault: str
) -> None:
    result = keys(config, "create", *args)

    assert result.exit_code == 2, result.output
    assert fault in " ".join(result.stderr.split()), result.stderr
    assert json.loads(keys(config, "list", "--all", "--json").stdout)["keys"] == []


def test_a_policy_in_the_settings_limits_teams_and_roles(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = PolicyConfig.parse({"teams": {"search": {"roles": {"analyst": {}}}}})
    monkeypatch.setattr(keys_cli, "_policy_config", lambda _settings: policy)

    unknown_team = keys(config, "create", "-u", "a", "-t", "support")
    unknown_role = keys(config, "create", "-u", "a", "-t", "search", "-r", "lead")

    assert unknown_team.exit_code == 2 and "not in the policy" in unknown_team.stderr
    assert unknown_role.exit_code == 2 and "no role 'lead'" in unknown_role.stderr
    assert create(config, "-u", "a", "-t", "search", "-r", "analyst")


def test_mounted_under_the_root_command_it_reads_the_roots_config(
    config: Path,
) -> None:
    root = typer.Typer()

    @root.callback()
    def _root(
        config: Annotated[Path, typer.Option("--config")] = Path("ragline.yaml"),
    ) -> None:
        pass

    root.add_typer(app, name="keys")

    result = CliRunner().invoke(
        root, ["--config", str(config), "keys", "create", "-u", "a", "-t", "t"]
    )

    assert result.exit_code == 0, result.output
    assert (config.parent / "data" / "catalog.db").exists()


def test_the_settings_file_may_come_from_the_environment(config: Path) -> None:
    result = CliRunner().invoke(
        app, ["list", "--json"], env={"RAGLINE_CONFIG": str(config)}
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"keys": []}


def test_no_command_leaks_a_secret_to_the_logs(
    config: Path, logs: pytest.LogCaptureFixture
) -> None:
    key = create(config, "-u", "alice", "-t", "search")
    key_id = KEY_FORM.fullmatch(key).group(1)  # type: ignore[union-attr]
    keys(config, "list")
    keys(config, "revoke", key_id)

    assert key_id in logs.text, "the store logs creation and revocation"
    assert key.split("_", 2)[2] not in logs.text


@pytest.mark.postgres
def test_keys_live_in_a_postgresql_catalog(tmp_path: Path, postgres_url: str) -> None:
    config = tmp_path / "ragline.yaml"
    config.write_text(
        SETTINGS + f"catalog:\n  url: {json.dumps(postgres_url)}\n", encoding="utf-8"
    )

    key = create(config, "-u", "alice", "-t", "search")
    key_id = KEY_FORM.fullmatch(key).group(1)  # type: ignore[union-attr]
    assert keys(config, "revoke", key_id).exit_code == 0

    with ApiKeyStore(postgres_url) as store:
        [record] = store.list(include_revoked=True)
    assert record.key_id == key_id and record.revoked_at is not None
    assert not (tmp_path / "data").exists(), "no SQLite file beside a PostgreSQL URL"
