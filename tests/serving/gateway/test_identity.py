"""API keys in real databases, JWTs signed with real keys, and the authenticator."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from ingestion.errors import (
    CatalogError,
    ConfigError,
    NotFound,
    RequestError,
    Unauthenticated,
)
from retrieval.filters import AccessScope
from serving.gateway.identity import (
    ANONYMOUS,
    ApiKeysConfig,
    Authenticator,
    Identity,
    IdentityConfig,
    JwtConfig,
    JwtVerifier,
    upstream_headers,
)
from serving.gateway.policy import Policy, PolicyConfig
from serving.gateway.store import ApiKeyStore, open_engine
from serving.service import Caller

ISSUER = "https://id.example.com"
AUDIENCE = "ragline"
SECRET = "a-shared-secret-of-at-least-thirty-two-bytes-for-hs256"
KEY_FORM = re.compile(r"rk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


# -- clocks -------------------------------------------------------------------------


@dataclass
class Clocks:
    """A wall clock and a monotonic clock that move only when told to."""

    now: datetime = datetime(2030, 1, 1, tzinfo=UTC)
    ticks: float = 1000.0

    def wall(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.ticks

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.ticks += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'catalog.db'}"


@pytest.fixture
def store(db_url: str, clocks: Clocks) -> Iterator[ApiKeyStore]:
    with ApiKeyStore(
        db_url, cache_seconds=5, clock=clocks.wall, monotonic=clocks.monotonic
    ) as opened:
        yield opened


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record of the serving packages, whatever configured them before."""
    serving = logging.getLogger("serving")
    propagate = serving.propagate
    serving.propagate = True
    caplog.set_level(logging.DEBUG)
    yield caplog
    serving.propagate = propagate


def _secret_of(key: str) -> str:
    return key.split("_", 2)[2]


def _rejection(store: ApiKeyStore, key: str) -> str:
    with pytest.raises(Unauthenticated) as caught:
        store.authenticate(key)
    return str(caught.value)


# -- API keys -----------------------------------------------------------------------


def test_a_key_lives_through_create_authenticate_list_and_revoke(
    catalog_url: str,
) -> None:
    with ApiKeyStore(catalog_url) as store:
        record, key = store.create(
            "alice@example.com",
            "search",
            roles=["analyst", "operator"],
            labels=["finance"],
            description="notebook",
        )

        assert KEY_FORM.fullmatch(key), "keys look like rk_<12 hex>_<43 chars>"
        assert record.key_id in key
        identity = store.authenticate(key)
        assert identity == Identity(
            user="alice@example.com",
            team="search",
            roles=frozenset({"analyst", "operator"}),
            key_id=record.key_id,
            method="api_key",
            labels=frozenset({"finance"}),
        )
        assert [r.key_id for r in store.list()] == [record.key_id]

        revoked = store.revoke(record.key_id)

        assert revoked.revoked_at is not None
        assert "revoked" in _rejection(store, key)
        assert store.list() == [], "revoked keys are hidden by default"
        assert [r.key_id for r in store.list(include_revoked=True)] == [record.key_id]


def test_only_the_digest_of_the_secret_is_stored(store: ApiKeyStore, db_url: str):
    _, key = store.create("alice", "search")
    secret = _secret_of(key)

    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        [row] = conn.execute(sa.text("SELECT * FROM api_keys")).mappings().all()
    engine.dispose()

    assert secret not in json.dumps(dict(row), default=str), "the secret was stored"
    assert row["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()


def test_two_keys_never_share_id_or_secret(store: ApiKeyStore) -> None:
    keys = [store.create("alice", "search")[1] for _ in range(20)]

    assert len({k.split("_")[1] for k in keys}) == 20
    assert len({_secret_of(k) for k in keys}) == 20
    assert all(len(base64.urlsafe_b64decode(_secret_of(k) + "=")) == 32 for k in keys)


@pytest.mark.parametrize(
    "presented",
    [
        "rk_",
        "rk_0123456789ab",
        "rk_0123456789ab_short",
        "rk_XYZ456789abc_" + "a" * 43,
        "rk_0123456789ab_" + "a" * 42 + "!",
        "rk_0123456789ab_" + "a" * 44,
    ],
)
def test_a_malformed_key_is_refused_as_malformed(
    store: ApiKeyStore, presented: str
) -> None:
    message = _rejection(store, presented)

    assert "malformed" in message, message
    assert "rk_<12 hex digits>" in message, "the message shows the expected form"


def test_an_unknown_key_is_refused_as_not_issued(store: ApiKeyStore) -> None:
    message = _rejection(store, "rk_0123456789ab_" + "a" * 43)

    assert "rk_0123456789ab_…" in message and "no key with this id" in message


def test_a_wrong_secret_is_refused_like_an_unknown_key(store: ApiKeyStore) -> None:
    record, key = store.create("alice", "search")
    forged = f"rk_{record.key_id}_" + "b" * 43

    message = _rejection(store, forged)

    assert "no key with this id and secret" in message, message
    assert _secret_of(key) not in message


def test_a_revoked_key_stops_working_at_once_in_the_revoking_store(
    store: ApiKeyStore,
) -> None:
    record, key = store.create("alice", "search")
    store.authenticate(key)  # now cached

    store.revoke(record.key_id)

    message = _rejection(store, key)
    assert f"rk_{record.key_id}_…" in message and "revoked" in message, message
    assert "new key" in message, "the message says what to do"


def test_a_key_revoked_elsewhere_stops_working_within_cache_seconds(
    db_url: str, clocks: Clocks
) -> None:
    server = ApiKeyStore(
        db_url, cache_seconds=5, clock=clocks.wall, monotonic=clocks.monotonic
    )
    cli = ApiKeyStore(db_url, cache_seconds=0)
    record, key = cli.create("alice", "search")
    server.authenticate(key)

    cli.revoke(record.key_id)

    clocks.advance(4.9)
    assert server.authenticate(key).user == "alice", "still cached, as documented"
    clocks.advance(0.2)
    assert "revoked" in _rejection(server, key)
    server.close()
    cli.close()


def test_an_expired_key_is_refused_as_expired(
    store: ApiKeyStore, clocks: Clocks
) -> None:
    _, key = store.create("alice", "search", expires_at=clocks.now + timedelta(hours=1))
    assert store.authenticate(key).user == "alice"

    clocks.advance(3600)

    message = _rejection(store, key)
    assert "expired on 2030-01-01T01:00:00+00:00" in message, message


def test_cached_keys_are_answered_without_reading_the_database(
    db_url: str, clocks: Clocks
) -> None:
    engine = open_engine(db_url)
    statements: list[str] = []
    sa.event.listen(
        engine, "before_cursor_execute", lambda *args: statements.append(args[2])
    )
    store = ApiKeyStore(
        engine, cache_seconds=5, clock=clocks.wall, monotonic=clocks.monotonic
    )
    _, key = store.create("alice", "search")
    store.authenticate(key)
    statements.clear()

    for _ in range(100):
        store.authenticate(key)
    asyncio.run(store.authenticate_async(key))

    assert statements == [], statements
    clocks.advance(5)
    store.authenticate(key)
    assert len(statements) == 1, "a stale entry is read again, once"
    store.close()
    engine.dispose()


def test_unknown_key_ids_are_cached_too(db_url: str, clocks: Clocks) -> None:
    engine = open_engine(db_url)
    store = ApiKeyStore(engine, clock=clocks.wall, monotonic=clocks.monotonic)
    statements: list[str] = []
    sa.event.listen(
        engine, "before_cursor_execute", lambda *args: statements.append(args[2])
    )
    unknown = "rk_0123456789ab_" + "a" * 43

    for _ in range(10):
        _rejection(store, unknown)

    assert len(statements) == 1, statements
    engine.dispose()


def test_authenticate_async_reads_the_database_off_the_event_loop(
    store: ApiKeyStore,
) -> None:
    _, key = store.create("alice", "search", roles=["analyst"])

    identity = asyncio.run(store.authenticate_async(key))

    assert identity.roles == {"analyst"}


def test_revoke_takes_an_id_in_any_form_and_refuses_unknown_ids(
    store: ApiKeyStore,
) -> None:
    record, key = store.create("alice", "search")

    assert store.revoke(f"rk_{record.key_id}").revoked_at is not None
    assert store.revoke(key).key_id == record.key_id, "revoking twice is harmless"
    with pytest.raises(NotFound, match="ragline keys list"):
        store.revoke("0123456789ab")
    with pytest.raises(RequestError, match="12 hexadecimal digits"):
        store.revoke("nonsense")


def test_list_filters_by_team(store: ApiKeyStore) -> None:
    first, _ = store.create("alice", "search")
    store.create("bob", "support")

    assert [r.user for r in store.list(team="search")] == ["alice"]
    assert {r.user for r in store.list()} == {"alice", "bob"}
    assert first.hint == f"rk_{first.key_id}_…"


@pytest.mark.parametrize(
    ("arguments", "fault"),
    [
        ({"user": "", "team": "search"}, "user"),
        ({"user": "alice\n", "team": "search"}, "user"),
        ({"user": "alice", "team": "no spaces"}, "team"),
        ({"user": "alice", "team": "search", "roles": ["bad role"]}, "role"),
        ({"user": "alice", "team": "search", "labels": [" "]}, "access label"),
        (
            {"user": "alice", "team": "search", "expires_at": datetime(2031, 1, 1)},
            "time zone",
        ),
        (
            {
                "user": "alice",
                "team": "search",
                "expires_at": datetime(2029, 1, 1, tzinfo=UTC),
            },
            "not in the future",
        ),
    ],
)
def test_create_refuses_bad_input_naming_the_fault(
    store: ApiKeyStore, arguments: dict[str, Any], fault: str
) -> None:
    with pytest.raises(RequestError, match=fault):
        store.create(**arguments)
    assert store.list(include_revoked=True) == [], "nothing was stored"


def test_secrets_never_reach_logs_errors_or_records(
    store: ApiKeyStore, logs: pytest.LogCaptureFixture, clocks: Clocks
) -> None:
    record, key = store.create(
        "alice", "search", expires_at=clocks.now + timedelta(minutes=1)
    )
    secret = _secret_of(key)
    messages = [
        _rejection(store, key[:-1] + ("a" if key[-1] != "a" else "b")),
        _rejection(store, key + "x"),
    ]
    store.authenticate(key)
    clocks.advance(120)
    messages.append(_rejection(store, key))
    store.revoke(record.key_id)
    clocks.advance(10)
    messages.append(_rejection(store, key))

    assert logs.records, "the store logs what it does"
    assert record.key_id in logs.text, "key ids are logged"
    for text in [logs.text, *messages, repr(store.list(include_revoked=True))]:
        assert secret not in text and key not in text, text


def test_an_unreachable_database_is_a_catalog_error_naming_it_without_password() -> (
    None
):
    url = "postgresql+psycopg://ragline:hunter2@127.0.0.1:1/none?connect_timeout=2"
    with pytest.raises(CatalogError) as caught:
        ApiKeyStore(url)

    assert "127.0.0.1:1" in str(caught.value) and "hunter2" not in str(caught.value)


# -- JWT ----------------------------------------------------------------------------


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": "bob",
        "team": "search",
        "roles": ["analyst"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hs_config(**overrides: Any) -> JwtConfig:
    return JwtConfig(
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=["HS256"],
        secret=SECRET,
        **overrides,
    )


def _hs_token(secret: str = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    return jwt.encode(_claims(**claims), secret, algorithm=algorithm)


def _refusal(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token)
    message = str(caught.value)
    assert token not in message, "a token never appears in a message"
    return message


@dataclass
class Jwks:
    """A JWKS file on disk and the private keys that sign for it."""

    path: Path
    private: dict[str, Any]

    def write(self, *kids: str) -> None:
        keys = []
        for kid in kids:
            public = self.private[kid].public_key()
            if isinstance(public, rsa.RSAPublicKey):
                jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
            else:
                jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
            keys.append({**jwk, "kid": kid, "use": "sig"})
        self.path.write_text(json.dumps({"keys": keys}), encoding="utf-8")

    def token(self, kid: str, algorithm: str = "RS256", **claims: Any) -> str:
        return jwt.encode(
            _claims(**claims),
            self.private[kid],
            algorithm=algorithm,
            headers={"kid": kid},
        )


@pytest.fixture(scope="module")
def signing_keys() -> dict[str, Any]:
    return {
        "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa-2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec-1": ec.generate_private_key(ec.SECP256R1()),
    }


@pytest.fixture
def jwks(tmp_path: Path, signing_keys: dict[str, Any]) -> Jwks:
    file = Jwks(tmp_path / "jwks.json", signing_keys)
    file.write("rsa-1", "ec-1")
    return file


def _rs_config(jwks: Jwks, **overrides: Any) -> JwtConfig:
    return JwtConfig(
        issuer=ISSUER,
        audience=[AUDIENCE, "other"],
        algorithms=["RS256", "ES256"],
        jwks_file=jwks.path,
        **overrides,
    )


def test_an_hs256_token_maps_its_claims_to_an_identity() -> None:
    verifier = JwtVerifier(_hs_config())

    identity = verifier.verify(_hs_token(roles=["analyst", "operator"]))

    assert identity == Identity(
        user="bob",
        team="search",
        roles=frozenset({"analyst", "operator"}),
        key_id=None,
        method="jwt",
    )


def test_rs256_and_es256_tokens_verify_with_the_key_their_kid_names(
    jwks: Jwks,
) -> None:
    verifier = JwtVerifier(_rs_config(jwks))

    assert verifier.verify(jwks.token("rsa-1")).user == "bob"
    assert verifier.verify(jwks.token("ec-1", "ES256", sub="carol")).user == "carol"


def test_claim_names_are_configurable_and_roles_may_be_a_string() -> None:
    verifier = JwtVerifier(
        _hs_config(
            user_claim="email",
            team_claim="org.team",
            roles_claim="realm_access.roles",
        )
    )
    token = _hs_token(
        email="bob@example.com",
        org={"team": "support"},
        realm_access={"roles": "reader writer"},
    )

    identity = verifier.verify(token)

    assert (identity.user, identity.team) == ("bob@example.com", "support")
    assert identity.roles == {"reader", "writer"}


def test_a_token_without_team_gets_the_default_team_or_is_refused() -> None:
    token = _hs_token(team=None)

    assert JwtVerifier(_hs_config(default_team="public")).verify(token).team == (
        "public"
    )
    assert "'team' claim" in _refusal(JwtVerifier(_hs_config()), token)


def test_a_token_expired_within_the_leeway_is_still_accepted() -> None:
    token = _hs_token(exp=int(time.time()) - 5)

    assert JwtVerifier(_hs_config(leeway_seconds=60)).verify(token).user == "bob"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (lambda: _hs_token(exp=int(time.time()) - 600), "expired"),
        (lambda: _hs_token(aud="someone-else"), "audience"),
        (lambda: _hs_token(iss="https://evil.example.com"), "issuer"),
        (
            lambda: _hs_token(secret="another-secret-that-is-long-enough-to-sign"),
            "signature",
        ),
        (lambda: _hs_token(nbf=int(time.time()) + 600), "not valid yet"),
        (lambda: _hs_token(exp=None), "'exp' claim"),
        (lambda: _hs_token(aud=None), "'aud' claim"),
        (lambda: _hs_token(sub=None), "'sub' claim"),
        (lambda: _hs_token(roles=42), "list of role names"),
        (lambda: _hs_token(algorithm="HS512", secret=SECRET * 2), "'HS512'"),
        (lambda: "not-a-token.at.all", "well-formed"),
        (lambda: "e30.e30.e30", "names no signing algorithm"),
    ],
    ids=[
        "expired",
        "audience",
        "issuer",
        "signature",
        "not-yet-valid",
        "no-exp",
        "no-aud",
        "no-sub",
        "bad-roles",
        "other-algorithm",
        "malformed",
        "no-algorithm",
    ],
)
def test_every_bad_token_is_refused_with_its_own_reason(
    token: Callable[[], str], expected: str
) -> None:
    # Tokens are made when the test runs: made at collection, a long test run
    # could let them expire or come into force.
    message = _refusal(JwtVerifier(_hs_config()), token())

    assert expected in message, message


def _part(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_an_unsigned_token_is_never_accepted() -> None:
    token = f"{_part({'alg': 'none', 'typ': 'JWT'})}.{_part(_claims())}."

    message = _refusal(JwtVerifier(_hs_config()), token)

    assert "'none'" in message and "HS256" in message, message


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"alg": ["HS256"]}, "names no signing algorithm"),
        ({"alg": "RS256", "kid": ["rsa-1"]}, "well-formed"),
        ({"alg": "RS256", "kid": "x" * 500}, "x…'"),
    ],
)
def test_hostile_headers_are_refused_cleanly(
    jwks: Jwks, header: dict[str, Any], expected: str
) -> None:
    token = f"{_part(header)}.{_part(_claims())}.c2lnbmF0dXJl"

    message = _refusal(JwtVerifier(_rs_config(jwks)), token)

    assert expected in message and len(message) < 300, message


def test_a_tampered_rs256_token_fails_the_signature_check(jwks: Jwks) -> None:
    header, _, signature = jwks.token("rsa-1").split(".")
    forged = jwt.encode(_claims(team="admins"), "x" * 32, algorithm="HS256")
    payload = forged.split(".")[1]

    message = _refusal(JwtVerifier(_rs_config(jwks)), f"{header}.{payload}.{signature}")

    assert "signature does not verify" in message, message


def test_an_hmac_token_is_refused_where_only_public_keys_are_trusted(
    jwks: Jwks,
) -> None:
    # The classic forgery: HMAC-sign with the public key, which anyone has.
    public_keys = jwks.path.read_bytes()
    signing_input = f"{_part({'alg': 'HS256', 'kid': 'rsa-1'})}.{_part(_claims())}"
    mac = hmac.new(public_keys, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"

    message = _refusal(JwtVerifier(_rs_config(jwks)), token)

    assert "'HS256'" in message and "does not accept" in message, message


def test_a_token_from_an_untrusted_key_names_the_unknown_kid(jwks: Jwks) -> None:
    message = _refusal(JwtVerifier(_rs_config(jwks)), jwks.token("rsa-2"))

    assert "'rsa-2'" in message and "does not trust" in message, message


def test_a_token_without_kid_is_refused(jwks: Jwks) -> None:
    token = jwt.encode(_claims(), jwks.private["rsa-1"], algorithm="RS256")

    assert "no 'kid'" in _refusal(JwtVerifier(_rs_config(jwks)), token)


def test_a_key_cannot_verify_an_algorithm_of_another_family(jwks: Jwks) -> None:
    token = jwks.token("rsa-1", sub="bob")
    header = _part({"alg": "ES256", "kid": "rsa-1", "typ": "JWT"})
    forged = header + token[token.index(".") :]

    message = _refusal(JwtVerifier(_rs_config(jwks)), forged)

    assert "RSA key" in message and "ES256" in message, message


def test_a_rotated_key_is_picked_up_without_a_restart(jwks: Jwks) -> None:
    ticks = [0.0]
    verifier = JwtVerifier(
        _rs_config(jwks, jwks_refresh_seconds=60), monotonic=lambda: ticks[0]
    )
    jwks.write("rsa-1", "rsa-2")
    token = jwks.token("rsa-2")

    assert "'rsa-2'" in _refusal(verifier, token), "not due for a re-read yet"
    ticks[0] = 61.0
    assert asyncio.run(verifier.verify_async(token)).user == "bob"
    assert verifier.verify(jwks.token("rsa-1")).user == "bob"


def test_a_key_dropped_from_the_jwks_file_stops_working_on_reload(
    jwks: Jwks,
) -> None:
    verifier = JwtVerifier(_rs_config(jwks))
    token = jwks.token("rsa-1")
    verifier.verify(token)

    jwks.write("ec-1")
    verifier.reload()

    assert "'rsa-1'" in _refusal(verifier, token)


def test_a_broken_jwks_file_on_reload_keeps_the_loaded_keys(
    jwks: Jwks, logs: pytest.LogCaptureFixture
) -> None:
    verifier = JwtVerifier(_rs_config(jwks))
    jwks.path.write_text("{not json", encoding="utf-8")

    verifier.reload()

    assert verifier.verify(jwks.token("rsa-1")).user == "bob"
    assert "jwks reload failed" in logs.text


def test_a_verified_token_is_remembered_for_cache_seconds_only() -> None:
    wall = [time.time()]
    verifier = JwtVerifier(_hs_config(cache_seconds=10), wall=lambda: wall[0])
    token = _hs_token()

    first = verifier.verify(token)
    assert verifier.verify(token) is first, "the second check is answered from memory"
    wall[0] += 10
    again = verifier.verify(token)

    assert again == first and again is not first, "verified afresh after 10 s"


@pytest.mark.parametrize(
    ("settings", "fault"),
    [
        ({"algorithms": ["HS256"]}, "need 'secret'"),
        ({"algorithms": ["RS256"], "secret": SECRET}, "no HS"),
        ({"algorithms": ["RS256"]}, "jwks_file"),
        ({"algorithms": ["HS512"], "secret": SECRET}, "at least 64"),
        ({"algorithms": ["none"], "secret": SECRET}, "algorithms"),
    ],
)
def test_jwt_settings_that_cannot_work_are_refused(
    settings: dict[str, Any], fault: str
) -> None:
    with pytest.raises(ValidationError, match=fault):
        JwtConfig(issuer=ISSUER, audience=AUDIENCE, **settings)


def test_jwks_files_with_faults_are_config_errors(
    tmp_path: Path, jwks: Jwks, signing_keys: dict[str, Any]
) -> None:
    cases = {
        "missing.json": None,
        "no-keys.json": {"keys": []},
        "no-kid.json": {"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}]},
        "private.json": {"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]},
        "broken.json": {"keys": [{"kty": "RSA", "kid": "r", "n": "!", "e": "AQAB"}]},
    }
    for name, document in cases.items():
        path = tmp_path / name
        if document is not None:
            path.write_text(json.dumps(document), encoding="utf-8")

        with pytest.raises(ConfigError, match=re.escape(str(path))):
            JwtVerifier(_rs_config(jwks).model_copy(update={"jwks_file": path}))


# -- the authenticator --------------------------------------------------------------


@pytest.fixture
def authenticator(store: ApiKeyStore, jwks: Jwks) -> Authenticator:
    config = IdentityConfig(
        api_keys=ApiKeysConfig(),
        jwt=JwtConfig(
            issuer=ISSUER,
            audience=AUDIENCE,
            algorithms=["HS256", "RS256"],
            secret=SECRET,
            jwks_file=jwks.path,
        ),
    )
    return Authenticator(config, key_store=store)


def _refused(authenticator: Authenticator, headers: dict[str, str]) -> str:
    with pytest.raises(Unauthenticated) as caught:
        authenticator.authenticate(headers)
    return str(caught.value)


def test_keys_and_tokens_are_accepted_in_either_header(
    authenticator: Authenticator, store: ApiKeyStore, jwks: Jwks
) -> None:
    _, key = store.create("alice", "search")
    token = jwks.token("rsa-1")

    assert authenticator.authenticate({"Authorization": f"Bearer {key}"}).user == (
        "alice"
    )
    assert authenticator.authenticate({"X-API-Key": key}).method == "api_key"
    assert authenticator.authenticate({"authorization": f"bearer {token}"}).user == (
        "bob"
    )
    assert authenticator.authenticate({"x-api-key": _hs_token()}).method == "jwt"


def test_authenticate_async_gives_the_same_identities(
    authenticator: Authenticator, store: ApiKeyStore, jwks: Jwks
) -> None:
    _, key = store.create("alice", "search")

    async def both() -> list[Identity]:
        return [
            await authenticator.authenticate_async({"x-api-key": key}),
            await authenticator.authenticate_async(
                {"authorization": f"Bearer {jwks.token('rsa-1')}"}
            ),
        ]

    assert [i.user for i in asyncio.run(both())] == ["alice", "bob"]


def test_a_request_without_credentials_is_told_how_to_send_them(
    authenticator: Authenticator,
) -> None:
    message = _refused(authenticator, {"accept": "application/json"})

    assert "Authorization: Bearer <key>" in message and "X-API-Key" in message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": "Basic YWxpY2U6c2VjcmV0"}, "'Basic' is not supported"),
        ({"x-api-key": "hello-i-am-a-static-key"}, "neither a ragline API key"),
        ({"x-api-key": "rk_nonsense"}, "malformed"),
    ],
)
def test_credentials_of_unknown_forms_are_refused_clearly(
    authenticator: Authenticator, headers: dict[str, str], expected: str
) -> None:
    assert expected in _refused(authenticator, headers)


def test_a_method_that_is_switched_off_says_which_to_use(
    store: ApiKeyStore, jwks: Jwks
) -> None:
    keys_only = Authenticator(IdentityConfig(), key_store=store)
    tokens_only = Authenticator(
        IdentityConfig(api_keys=None, jwt=_rs_config(jwks)), key_store=store
    )

    assert "does not accept JWT" in _refused(keys_only, {"x-api-key": _hs_token()})
    assert "does not accept API keys" in _refused(
        tokens_only, {"x-api-key": "rk_0123456789ab_" + "a" * 43}
    )


def test_an_open_service_makes_every_caller_anonymous() -> None:
    authenticator = Authenticator(None)

    assert authenticator.is_open
    assert authenticator.authenticate({}) is ANONYMOUS
    assert asyncio.run(authenticator.authenticate_async({"x-api-key": "x"})) == (
        Identity(user="anonymous", team="public", method="anonymous")
    )


def test_identity_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValidationError, match="nobody could call"):
        IdentityConfig(api_keys=None, jwt=None)
    with pytest.raises(ConfigError, match="no key store"):
        Authenticator(IdentityConfig())


def test_upstream_headers_carry_the_identity_safely() -> None:
    identity = Identity(
        user="zoë\r\nX-Evil: 1",
        team="search",
        roles=frozenset({"writer", "reader"}),
    )

    headers = upstream_headers(identity)

    assert headers["X-Ragline-Team"] == "search"
    assert headers["X-Ragline-Roles"] == "reader,writer"
    assert headers["X-Ragline-User"] == "zo%C3%AB%0D%0AX-Evil: 1"
    assert all(v.isascii() and v.isprintable() for v in headers.values())


def test_an_identity_from_a_key_becomes_the_callers_of_ask_and_search(
    store: ApiKeyStore,
) -> None:
    policy = Policy(
        PolicyConfig.parse(
            {"teams": {"search": {"collections": ["handbook"], "labels": ["staff"]}}}
        )
    )
    _, key = store.create("alice", "search", labels=["finance"])

    caller = policy.caller(store.authenticate(key))

    assert caller == Caller(
        user="alice",
        scope=AccessScope.of({"staff", "finance"}),
        collections=frozenset({"handbook"}),
    )
