"""API keys, stored hashed in the catalog database.

A key is ``rk_<key id>_<secret>``: a 12-hex-digit id, which is not secret and
names the key in listings, logs and audit records, and 43 characters of
URL-safe base64 holding 32 bytes from :mod:`secrets`. The plaintext is
returned once, by :meth:`ApiKeyStore.create`; the database keeps only the
SHA-256 digest of the secret. A slow password hash (bcrypt, scrypt, argon2)
protects low-entropy passwords against guessing; a 256-bit random secret
cannot be guessed, so one SHA-256 is enough and keeps checking a key cheap.
Digests are compared in constant time.

The ``api_keys`` table lives in the catalog's database (SQLite by default,
PostgreSQL at scale) and is created when missing.

Caching: :meth:`ApiKeyStore.authenticate` answers from memory for
``cache_seconds`` after a key was read (unknown key ids included), so a busy
service does not read the database per request. A key revoked through the
same store stops working at once; revoked by another process (the CLI,
another replica), it stops working once this process's cached copy is older
than ``cache_seconds``. Expiry is checked against the clock on every request.

Every method but :meth:`ApiKeyStore.authenticate_async` may block on the
database; from async code call them with :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ingestion.config import NAME_PATTERN
from ingestion.errors import CatalogError, NotFound, RequestError, Unauthenticated

from .identity import KEY_PREFIX, ApiKeysConfig, Identity

__all__ = [
    "ApiKeyRecord",
    "ApiKeyStore",
    "KeyStatus",
    "api_keys",
    "metadata",
    "open_engine",
]

logger = logging.getLogger(__name__)

KeyStatus = Literal["active", "revoked", "expired"]

metadata = sa.MetaData()

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("user_name", sa.String(256), nullable=False),
    sa.Column("team", sa.String(64), nullable=False, index=True),
    sa.Column("roles", sa.Text, nullable=False),  # JSON list of names
    sa.Column("labels", sa.Text, nullable=False),  # JSON list of labels
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)

_KEY_FORM = re.compile(r"rk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_KEY_ID_FORM = re.compile(r"(?:rk_)?([0-9a-f]{12})(?:_.*)?", re.DOTALL)
_NAME = re.compile(NAME_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ID_ATTEMPTS = 5


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """What the store knows about a key; never its secret."""

    key_id: str
    user: str
    team: str
    roles: tuple[str, ...]
    labels: tuple[str, ...]
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def hint(self) -> str:
        """How the key starts, for people to recognise it: ``rk_<id>_…``."""
        return f"{KEY_PREFIX}{self.key_id}_…"

    def status(self, now: datetime) -> KeyStatus:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def identity(self) -> Identity:
        return Identity(
            user=self.user,
            team=self.team,
            roles=frozenset(self.roles),
            key_id=self.key_id,
            method="api_key",
            labels=frozenset(self.labels),
        )

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "user": self.user,
            "team": self.team,
            "roles": list(self.roles),
            "labels": list(self.labels),
            "description": self.description,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "status": self.status(now),
        }


@dataclass(frozen=True, slots=True)
class _Cached:
    """A key as read from the database; ``record`` None when no such key exists."""

    record: ApiKeyRecord | None
    digest: bytes
    identity: Identity | None
    read_at: float


class ApiKeyStore:
    """Creates, lists, revokes and checks API keys in a SQL database.

    ``database`` is a SQLAlchemy URL (the store opens and closes its own
    engine) or an engine shared with the catalog (left open on
    :meth:`close`). ``clock`` gives the wall time (creation, expiry) and
    ``monotonic`` the cache's time; tests inject both.

    >>> store = ApiKeyStore("sqlite:///catalog.db")
    >>> record, key = store.create("alice", "search", roles=["analyst"])
    >>> store.authenticate(key).team
    'search'
    """

    def __init__(
        self,
        database: str | Engine,
        *,
        cache_seconds: float = 5.0,
        cache_size: int = 10_000,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._owns_engine = isinstance(database, str)
        self._engine = open_engine(database) if isinstance(database, str) else database
        self._where = _masked(self._engine)
        self._cache_seconds = cache_seconds
        self._cache_size = cache_size
        self._clock = clock
        self._monotonic = monotonic
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._lock = threading.Lock()
        self._create_table()

    @classmethod
    def from_config(cls, database: str | Engine, config: ApiKeysConfig) -> ApiKeyStore:
        """A store with the cache settings of ``identity.api_keys``."""
        return cls(
            database, cache_seconds=config.cache_seconds, cache_size=config.cache_size
        )

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()

    def __enter__(self) -> ApiKeyStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- administration ---------------------------------------------------------

    def create(
        self,
        user: str,
        team: str,
        roles: Iterable[str] = (),
        labels: Iterable[str] = (),
        expires_at: datetime | None = None,
        description: str = "",
    ) -> tuple[ApiKeyRecord, str]:
        """A new key: its record, and its plaintext, which nobody can see again."""
        record = self._new_record(user, team, roles, labels, expires_at, description)
        for _attempt in range(_ID_ATTEMPTS):
            record, secret = _with_fresh_id(record)
            try:
                self._insert(record, secret)
            except IntegrityError:
                continue  # a 48-bit id collided; draw another
            logger.info(
                "api key created: key_id=%s user=%s team=%s roles=%s expires_at=%s",
                record.key_id,
                record.user,
                record.team,
                ",".join(record.roles),
                _iso(record.expires_at),
            )
            return record, f"{KEY_PREFIX}{record.key_id}_{secret}"
        raise CatalogError(
            f"Could not find a free key id in {_ID_ATTEMPTS} attempts on "
            f"{self._where}; check the api_keys table."
        )

    def get(self, key_id: str) -> ApiKeyRecord:
        """The record of a key; raises ``NotFound``."""
        wanted = _key_id(key_id)
        with self._tx("read an API key") as conn:
            row = conn.execute(
                api_keys.select().where(api_keys.c.key_id == wanted)
            ).first()
        if row is None:
            raise NotFound(
                f"No API key with id {wanted!r}; `ragline keys list` shows the ids."
            )
        return _record(row)

    def list(
        self, team: str | None = None, include_revoked: bool = False
    ) -> list[ApiKeyRecord]:
        """Keys, oldest first; revoked ones only when asked for."""
        query = api_keys.select().order_by(api_keys.c.created_at, api_keys.c.key_id)
        if team is not None:
            query = query.where(api_keys.c.team == team)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self._tx("list API keys") as conn:
            return [_record(row) for row in conn.execute(query)]

    def revoke(self, key_id: str) -> ApiKeyRecord:
        """Stop a key from working; revoking it again changes nothing."""
        wanted = _key_id(key_id)
        with self._tx("revoke an API key") as conn:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == wanted, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=self._clock())
            )
        with self._lock:
            self._cache.pop(wanted, None)
        record = self.get(wanted)
        logger.info(
            "api key revoked: key_id=%s user=%s team=%s",
            record.key_id,
            record.user,
            record.team,
        )
        return record

    # -- the hot path -----------------------------------------------------------

    def authenticate(self, plaintext: str) -> Identity:
        """The identity of a key; raises ``Unauthenticated``. May read the database."""
        key_id, secret = _parsed(plaintext)
        cached = self._cached(key_id) or self._load(key_id)
        return self._checked(cached, key_id, secret)

    async def authenticate_async(self, plaintext: str) -> Identity:
        """Like :meth:`authenticate`, reading the database on a worker thread.

        A key in the cache is answered on the calling thread, with no thread
        hop; only a cache miss waits for the database.
        """
        key_id, secret = _parsed(plaintext)
        cached = self._cached(key_id)
        if cached is None:
            cached = await asyncio.to_thread(self._load, key_id)
        return self._checked(cached, key_id, secret)

    def _cached(self, key_id: str) -> _Cached | None:
        with self._lock:
            cached = self._cache.get(key_id)
            if cached is None:
                return None
            if self._monotonic() - cached.read_at >= self._cache_seconds:
                del self._cache[key_id]
                return None
            self._cache.move_to_end(key_id)
            return cached

    def _load(self, key_id: str) -> _Cached:
        with self._tx("check an API key") as conn:
            row = conn.execute(
                api_keys.select().where(api_keys.c.key_id == key_id)
            ).first()
        if row is None:
            cached = _Cached(None, b"", None, self._monotonic())
        else:
            record = _record(row)
            digest = bytes.fromhex(row.secret_sha256)
            cached = _Cached(record, digest, record.identity(), self._monotonic())
        if self._cache_seconds > 0:
            with self._lock:
                self._cache[key_id] = cached
                self._cache.move_to_end(key_id)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return cached

    def _checked(self, cached: _Cached, key_id: str, secret: str) -> Identity:
        record, identity = cached.record, cached.identity
        if (
            record is None
            or identity is None
            or not hmac.compare_digest(cached.digest, _digest(secret))
        ):
            _rejected(key_id, "unknown")
            raise Unauthenticated(
                f"API key {KEY_PREFIX}{key_id}_… is not valid: no key with this id "
                "and secret was issued here. Check that you sent the whole key, or "
                "ask an administrator for a new one."
            )
        if record.revoked_at is not None:
            _rejected(key_id, "revoked")
            raise Unauthenticated(
                f"API key {record.hint} was revoked on {_iso(record.revoked_at)}; "
                "ask an administrator for a new key."
            )
        if record.expires_at is not None and self._clock() >= record.expires_at:
            _rejected(key_id, "expired")
            raise Unauthenticated(
                f"API key {record.hint} expired on {_iso(record.expires_at)}; ask "
                "an administrator for a new key."
            )
        return identity

    # -- database ---------------------------------------------------------------

    def _new_record(
        self,
        user: str,
        team: str,
        roles: Iterable[str],
        labels: Iterable[str],
        expires_at: datetime | None,
        description: str,
    ) -> ApiKeyRecord:
        now = self._clock()
        return ApiKeyRecord(
            key_id="",
            user=_checked_user(user),
            team=_checked_name(team, "team"),
            roles=tuple(sorted({_checked_name(r, "role") for r in roles})),
            labels=tuple(sorted({_checked_label(label) for label in labels})),
            description=_checked_description(description),
            created_at=now,
            expires_at=_checked_expiry(expires_at, now),
            revoked_at=None,
        )

    def _insert(self, record: ApiKeyRecord, secret: str) -> None:
        values = {
            "key_id": record.key_id,
            "secret_sha256": _digest(secret).hex(),
            "user_name": record.user,
            "team": record.team,
            "roles": json.dumps(list(record.roles)),
            "labels": json.dumps(list(record.labels)),
            "description": record.description,
            "created_at": record.created_at,
            "expires_at": record.expires_at,
            "revoked_at": None,
        }
        try:
            with self._engine.begin() as conn:
                conn.execute(api_keys.insert().values(**values))
        except IntegrityError:
            raise  # the caller draws another id
        except SQLAlchemyError as err:
            raise self._failed("create an API key", err) from err

    def _create_table(self) -> None:
        try:
            metadata.create_all(self._engine, tables=[api_keys])
        except SQLAlchemyError as err:
            # Two processes starting at once may both try; one of them wins.
            if not self._table_exists():
                raise self._failed("create the api_keys table", err) from err

    def _table_exists(self) -> bool:
        try:
            return sa.inspect(self._engine).has_table(api_keys.name)
        except SQLAlchemyError:
            return False

    def _tx(self, what: str) -> AbstractContextManager[Connection]:
        return transaction(self._engine, what, self._where)

    def _failed(self, what: str, err: SQLAlchemyError) -> CatalogError:
        return database_error(what, self._where, err)


@contextmanager
def transaction(engine: Engine, what: str, where: str) -> Iterator[Connection]:
    """A transaction whose database errors become a :class:`CatalogError` saying
    what could not be done, and where."""
    try:
        with engine.begin() as conn:
            yield conn
    except SQLAlchemyError as err:
        raise database_error(what, where, err) from err


def database_error(what: str, where: str, err: SQLAlchemyError) -> CatalogError:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return CatalogError(
        f"Could not {what} in {where}: {first_line}. Check catalog.url "
        "and that the database is running."
    )


def open_engine(url: str) -> Engine:
    """An engine for the catalog database; SQLite gets WAL so readers never wait."""
    try:
        if not url.startswith("sqlite"):
            return sa.create_engine(url, pool_pre_ping=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
    except (SQLAlchemyError, ValueError) as err:
        raise CatalogError(
            f"The database URL {_masked_url(url)} is not valid: {err}. "
            "Check catalog.url."
        ) from err
    sa.event.listen(engine, "connect", _sqlite_setup)
    return engine


def _sqlite_setup(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


# -- helpers --------------------------------------------------------------------


def _parsed(plaintext: str) -> tuple[str, str]:
    match = _KEY_FORM.fullmatch(plaintext)
    if match is None:
        _rejected(None, "malformed")
        raise Unauthenticated(
            "The API key is malformed: ragline keys look like rk_<12 hex "
            "digits>_<43 characters>. Send the whole key exactly as "
            "`ragline keys create` printed it."
        )
    return match.group(1), match.group(2)


def _key_id(value: str) -> str:
    """A key id from an id, ``rk_<id>``, a hint or a whole key (never echoed)."""
    match = _KEY_ID_FORM.fullmatch(value.strip())
    if match is None:
        raise RequestError(
            "A key id is 12 hexadecimal digits (the part after rk_ in the key); "
            "`ragline keys list` shows them."
        )
    return match.group(1)


def _with_fresh_id(record: ApiKeyRecord) -> tuple[ApiKeyRecord, str]:
    """The record under a new random id, and a new 32-byte secret."""
    return replace(record, key_id=secrets.token_hex(6)), secrets.token_urlsafe(32)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _rejected(key_id: str | None, reason: str) -> None:
    logger.info("api key rejected: key_id=%s reason=%s", key_id, reason)


def _record(row: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row.key_id,
        user=row.user_name,
        team=row.team,
        roles=tuple(json.loads(row.roles)),
        labels=tuple(json.loads(row.labels)),
        description=row.description,
        created_at=_aware(row.created_at),
        expires_at=_aware(row.expires_at),
        revoked_at=_aware(row.revoked_at),
    )


def _checked_user(user: str) -> str:
    if not user.strip() or len(user) > 256 or _CONTROL.search(user):
        raise RequestError(
            f"The user {user!r} is not valid: give a name of 1 to 256 characters "
            "without control characters, such as an email address."
        )
    return user.strip()


def _checked_name(name: str, kind: str) -> str:
    if not _NAME.fullmatch(name):
        raise RequestError(
            f"The {kind} {name!r} is not valid: use 1 to 64 letters, digits, '_', "
            "'.' or '-', starting with a letter or digit."
        )
    return name


def _checked_label(label: str) -> str:
    if not label.strip() or len(label) > 256 or _CONTROL.search(label):
        raise RequestError(
            f"The access label {label!r} is not valid: give 1 to 256 characters "
            "without control characters."
        )
    return label.strip()


def _checked_description(description: str) -> str:
    if len(description) > 1000 or _CONTROL.search(description):
        raise RequestError(
            "The description is not valid: at most 1000 characters, on one line."
        )
    return description


def _checked_expiry(expires_at: datetime | None, now: datetime) -> datetime | None:
    if expires_at is None:
        return None
    if expires_at.tzinfo is None:
        raise RequestError(
            f"The expiry {expires_at.isoformat()} has no time zone; give one "
            "(for example 2030-01-31T00:00:00+00:00)."
        )
    if expires_at <= now:
        raise RequestError(
            f"The expiry {_iso(expires_at)} is not in the future; a key must "
            "expire later than now."
        )
    return expires_at.astimezone(UTC)


def _aware(value: datetime | None) -> Any:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _masked(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _masked_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid database URL>"
