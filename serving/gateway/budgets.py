"""Token and cost budgets per team and per API key, with hard limits.

A budget caps the tokens or the cost (in ``currency``, priced from the
``prices`` table) that one team or one API key may use in a UTC calendar day
or month. Before a model call, :meth:`Budgets.reserve` checks every budget
that applies to the caller and holds the call's worst case (the estimated
prompt plus ``max_completion_tokens``); after it, :meth:`Budgets.settle`
replaces the hold by the real usage, or :meth:`Budgets.release` drops it when
the call failed. Example::

    budgets = Budgets.open(settings.budgets, catalog_url)
    reservation = await budgets.reserve(
        Subjects(key_id="k-42", team="search"), "chat", 350, 512
    )
    try:
        result = await provider.generate(request)
    except BaseException:
        await budgets.release(reservation)
        raise
    await budgets.settle(reservation, result.usage)

What holds:

- A reservation is all or nothing: it holds every applicable budget, or none
  and raises :class:`~ingestion.errors.BudgetExceeded` naming the first
  budget that cannot take it. The check and the hold are one atomic step in
  every store, so concurrent requests, in one process or many, never hold
  more than a limit between them.
- Spend only grows through ``settle``. A call that used more than its
  estimate is charged in full, so the recorded spend may pass a limit by the
  difference; every later reservation is then refused until the period
  resets.
- A reservation never settled nor released (its process died) stops counting
  ``reservation_ttl_s`` after it was made.
- Amounts are integers in the stores: tokens, and cost in billionths of the
  currency unit, so concurrent additions never drift.
- Periods are UTC calendar days and months; a reservation is charged to the
  period it was made in, even when it settles after midnight.

Three stores keep the counters behind :class:`BudgetStore`, and all pass one
contract suite: :class:`SqlBudgetStore` in the catalog database (SQLite or
PostgreSQL), :class:`RedisBudgetStore` for many replicas, and
:class:`MemoryBudgetStore` for one process and for tests of callers.

With the SQL store every reservation and settlement is one short write
transaction in the catalog database: good for one host. Many replicas at a
thousand requests per second want the Redis store, where each is one script
run.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, runtime_checkable

import sqlalchemy as sa
from pydantic import Field, SecretStr
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from ingestion.config import StrictModel
from ingestion.errors import BudgetExceeded, CatalogError, ConfigError, RequestError

from .providers import Usage

__all__ = [
    "COST_SCALE",
    "Budget",
    "BudgetLimits",
    "BudgetStatus",
    "BudgetStore",
    "Budgets",
    "BudgetsConfig",
    "Hold",
    "MemoryBudgetStore",
    "ModelPrice",
    "RedisBudgetStore",
    "Refusal",
    "Reservation",
    "SqlBudgetStore",
    "Subjects",
    "WarningThrottle",
    "budget_metadata",
    "connect_redis",
    "open_budget_store",
    "period_window",
]

logger = logging.getLogger(__name__)

Metric = Literal["tokens", "cost"]
Period = Literal["day", "month"]

COST_SCALE = 1_000_000_000
"""Costs are stored as integers in billionths of the currency unit."""

# The stores add integers; Redis scripts compare them as doubles, exact below
# 2**53, which bounds a cost limit to about nine million currency units.
_MAX_COST_LIMIT = 1_000_000.0
_GC_INTERVAL_S = 60.0


# -- settings -------------------------------------------------------------------


class BudgetLimits(StrictModel):
    """The hard limits of one team or one key; unset means no limit of that kind."""

    tokens_per_day: int | None = Field(
        default=None, gt=0, description="Prompt plus completion tokens per UTC day."
    )
    tokens_per_month: int | None = Field(
        default=None,
        gt=0,
        description="Prompt plus completion tokens per UTC calendar month.",
    )
    cost_per_day: float | None = Field(
        default=None,
        gt=0,
        le=_MAX_COST_LIMIT,
        description="Cost per UTC day, in the budgets' currency.",
    )
    cost_per_month: float | None = Field(
        default=None,
        gt=0,
        le=_MAX_COST_LIMIT,
        description="Cost per UTC calendar month, in the budgets' currency.",
    )


class ModelPrice(StrictModel):
    """What a model's tokens cost, per million, in the budgets' currency."""

    input_per_million: float = Field(
        ge=0, description="Price of one million prompt tokens."
    )
    output_per_million: float = Field(
        ge=0, description="Price of one million completion tokens."
    )


class BudgetsConfig(StrictModel):
    """Token and cost budgets (the ``budgets:`` section of the settings file).

    ``sql`` keeps the counters in the catalog database; ``redis`` shares them
    between replicas through the server at ``redis_url``.
    """

    enabled: bool = Field(default=True, description="Check and charge budgets.")
    backend: Literal["sql", "redis", "memory"] = Field(
        default="sql",
        description="sql: the catalog database; redis: shared by replicas; "
        "memory: this process only (tests and demos).",
    )
    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="redis://[[user]:password@]host:port/db; write the password "
        "as ${VAR} to keep it out of the file.",
    )
    key_prefix: str = Field(
        default="ragline:budget:",
        min_length=1,
        pattern=r"^\S+$",
        description="Prefix of every Redis key the budgets write.",
    )
    timeout_s: float = Field(
        default=1.0, gt=0, description="Redis connect and read timeout."
    )
    currency: str = Field(
        default="USD", min_length=1, description="Unit of prices and cost limits."
    )
    teams: dict[str, BudgetLimits] = Field(
        default_factory=dict, description="Limits per team name."
    )
    keys: dict[str, BudgetLimits] = Field(
        default_factory=dict, description="Limits per API key id."
    )
    default_team: BudgetLimits | None = Field(
        default=None, description="Limits of every team not listed under 'teams'."
    )
    default_key: BudgetLimits | None = Field(
        default=None, description="Limits of every key not listed under 'keys'."
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description="Price per model name (the name a reservation names).",
    )
    default_price: ModelPrice | None = Field(
        default=None,
        description="Price of models missing from 'prices'; unset makes a cost "
        "budget refuse such models with a configuration error.",
    )
    reservation_ttl_s: float = Field(
        default=600.0,
        gt=0,
        description="A reservation neither settled nor released (its process "
        "died) stops counting after this many seconds. Keep it above the "
        "longest model call.",
    )
    fail_open: bool = Field(
        default=False,
        description="When the counter store cannot be reached: false refuses "
        "requests (limits stay hard), true lets them through uncounted and "
        "logs a warning.",
    )


# -- values ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subjects:
    """Who a request is charged to: its API key and its team (either may be unset)."""

    key_id: str | None = None
    team: str | None = None

    def names(self) -> list[str]:
        """``team:<name>`` and ``key:<id>``, for those that are set."""
        names = []
        if self.team is not None:
            names.append(f"team:{self.team}")
        if self.key_id is not None:
            names.append(f"key:{self.key_id}")
        return names


@dataclass(frozen=True, slots=True)
class Budget:
    """One limit of one subject, such as ``team:search tokens/day``."""

    subject: str
    metric: Metric
    period: Period
    limit: float

    @property
    def name(self) -> str:
        return f"{self.subject} {self.metric}/{self.period}"


@dataclass(frozen=True, slots=True)
class Hold:
    """What one reservation asks of one budget in one period, in store units.

    ``window`` labels the period (``2025-03-10`` or ``2025-03``); ``key`` is
    the budget and window together, the unit a store counts in.
    """

    budget: str
    metric: Metric
    window: str
    limit: int
    amount: int
    resets_at: datetime

    @property
    def key(self) -> str:
        return f"{self.budget}@{self.window}"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A store's answer when a hold does not fit: which one, and what was in use."""

    index: int
    used: int


@dataclass(eq=False)
class Reservation:
    """The budgets held for one model call, until it is settled or released.

    ``counted`` is false when the store could not be reached and
    ``fail_open`` let the call through; settling still tries to record it.
    """

    id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    holds: tuple[Hold, ...]
    counted: bool = True
    done: bool = field(default=False, repr=False)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """Where one budget stands in the current period, in its own unit."""

    budget: str
    limit: float
    spent: float
    held: float
    resets_at: datetime

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.spent - self.held)


def period_window(period: Period, now: datetime) -> tuple[str, datetime]:
    """The label of the UTC period holding ``now``, and when the next one begins."""
    now = now.astimezone(UTC)
    if period == "day":
        start = datetime(now.year, now.month, now.day, tzinfo=UTC)
        return start.strftime("%Y-%m-%d"), start + timedelta(days=1)
    days = calendar.monthrange(now.year, now.month)[1]
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    return start.strftime("%Y-%m"), start + timedelta(days=days)


# -- the stores -----------------------------------------------------------------


@runtime_checkable
class BudgetStore(Protocol):
    """Keeps the spent and held amounts of budget windows; every step is atomic.

    ``now`` and ``expires_at`` are Unix times; a hold whose ``expires_at`` is
    at or before ``now`` no longer counts.
    """

    async def reserve(
        self,
        reservation_id: str,
        holds: Sequence[Hold],
        *,
        now: float,
        expires_at: float,
    ) -> Refusal | None:
        """Holds every amount if all fit under their limits; else holds nothing."""

    async def settle(
        self,
        reservation_id: str,
        holds: Sequence[Hold],
        charges: Sequence[int],
        *,
        now: float,
    ) -> None:
        """Drops the reservation's holds and adds ``charges[i]`` to ``holds[i]``."""

    async def release(self, reservation_id: str, holds: Sequence[Hold]) -> None:
        """Drops the reservation's holds without charging anything."""

    async def usage(
        self, holds: Sequence[Hold], *, now: float
    ) -> list[tuple[int, int]]:
        """``(spent, held)`` of each hold's window."""

    async def close(self) -> None:
        """Releases connections; may be called more than once."""


class MemoryBudgetStore:
    """Counters in this process: for one process, and for tests of callers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spent: dict[str, int] = {}
        self._holds: dict[str, dict[str, tuple[int, float]]] = {}

    async def reserve(
        self,
        reservation_id: str,
        holds: Sequence[Hold],
        *,
        now: float,
        expires_at: float,
    ) -> Refusal | None:
        with self._lock:
            for i, hold in enumerate(holds):
                used = self._spent.get(hold.key, 0) + self._held(hold.key, now)
                if used + hold.amount > hold.limit:
                    return Refusal(i, used)
            for hold in holds:
                self._holds.setdefault(hold.key, {})[reservation_id] = (
                    hold.amount,
                    expires_at,
                )
        return None

    async def settle(
        self,
        reservation_id: str,
        holds: Sequence[Hold],
        charges: Sequence[int],
        *,
        now: float,
    ) -> None:
        with self._lock:
            for hold, charge in zip(holds, charges, strict=True):
                self._holds.get(hold.key, {}).pop(reservation_id, None)
                self._spent[hold.key] = self._spent.get(hold.key, 0) + charge

    async def release(self, reservation_id: str, holds: Sequence[Hold]) -> None:
        with self._lock:
            for hold in holds:
                self._holds.get(hold.key, {}).pop(reservation_id, None)

    async def usage(
        self, holds: Sequence[Hold], *, now: float
    ) -> list[tuple[int, int]]:
        with self._lock:
            return [(self._spent.get(h.key, 0), self._held(h.key, now)) for h in holds]

    async def close(self) -> None:
        return None

    def _held(self, key: str, now: float) -> int:
        holds = self._holds.get(key)
        if not holds:
            return 0
        for rid in [rid for rid, (_, until) in holds.items() if until <= now]:
            del holds[rid]
        return sum(amount for amount, _ in holds.values())


budget_metadata = sa.MetaData()
"""The budget tables, created in the catalog database when missing."""

budget_counters = sa.Table(
    "budget_counters",
    budget_metadata,
    sa.Column("budget", sa.String(300), primary_key=True),
    sa.Column("window_label", sa.String(16), primary_key=True),
    sa.Column("spent", sa.BigInteger, nullable=False, default=0),
)

budget_holds = sa.Table(
    "budget_holds",
    budget_metadata,
    sa.Column("reservation_id", sa.String(64), primary_key=True),
    sa.Column("budget", sa.String(300), primary_key=True),
    sa.Column("window_label", sa.String(16), primary_key=True),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Index("ix_budget_holds_window", "budget", "window_label", "expires_at"),
    sa.Index("ix_budget_holds_expires_at", "expires_at"),
)


class SqlBudgetStore:
    """Budget counters in the catalog database (SQLite or PostgreSQL).

    Each step is one transaction. On SQLite it begins with ``BEGIN
    IMMEDIATE``, which takes the database's write lock before reading, so
    transactions of every process using the file run one after the other. On
    PostgreSQL the counter rows of the reservation are locked with ``SELECT
    ... FOR UPDATE``, in one order, so concurrent reservations of the same
    budgets wait for each other and never deadlock. The blocking work runs in
    a worker thread; the event loop only waits.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._dialect = _dialect_of(url)
        if self._dialect not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"Budgets in SQL need SQLite or PostgreSQL, not {self._dialect}; "
                "point catalog.url at one of them, or set budgets.backend: redis."
            )
        try:
            self._engine = _create_engine(url)
            budget_metadata.create_all(self._engine)
        except SQLAlchemyError as err:
            raise CatalogError(
                f"Could not open the budget tables in {_masked_db_url(url)}: "
                f"{_first_line(err)}. Check catalog.url and that the database "
                "is running."
            ) from err
        self._next_gc = 0.0

    async def reserve(
        self,
        reservation_id: str,
        holds: Sequence[Hold],
        *,
        now: float,
        expires_at: float,
    ) -> Refusal | None:
        return await asyncio.to_thread(
            self.reserve_blocking, reservation_id, holds, now, expires_at
        )

    async def settle(
        self,
        reservation_id: str,
        holds: Sequence[Hold],
        charges: Sequence[int],
        *,
        now: float,
    ) -> None:
        await asyncio.to_thread(self.settle_blocking, reservation_id, holds, charges)

    async def release(self, reservation_id: str, holds: Sequence[Hold]) -> None:
        await asyncio.to_thread(self.release_blocking, reservation_id)

    async def usage(
        self, holds: Sequence[Hold], *, now: float
    ) -> list[tuple[int, int]]:
        return await asyncio.to_thread(self.usage_blocking, holds, now)

    async def close(self) -> None:
        self._engine.dispose()

    # The blocking steps, for callers outside an event loop.

    def reserve_blocking(
        self,
        reservation_id: str,
        holds: Sequence[Hold],
        now: float,
        expires_at: float,
    ) -> Refusal | None:
        """:meth:`reserve`, in the calling thread."""
        keys = _window_keys(holds)
        with self._transaction("reserve") as conn:
            self._ensure_counters(conn, keys)
            spent = self._lock_counters(conn, keys)
            held = self._held(conn, keys, now)
            for i, hold in enumerate(holds):
                key = (hold.budget, hold.window)
                used = spent.get(key, 0) + held.get(key, 0)
                if used + hold.amount > hold.limit:
                    return Refusal(i, used)
            conn.execute(
                budget_holds.insert(),
                [
                    {
                        "reservation_id": reservation_id,
                        "budget": h.budget,
                        "window_label": h.window,
                        "amount": h.amount,
                        "expires_at": expires_at,
                    }
                    for h in holds
                ],
            )
            self._collect_garbage(conn, now)
        return None

    def settle_blocking(
        self, reservation_id: str, holds: Sequence[Hold], charges: Sequence[int]
    ) -> None:
        """:meth:`settle`, in the calling thread."""
        keys = _window_keys(holds)
        with self._transaction("settle") as conn:
            conn.execute(
                budget_holds.delete().where(
                    budget_holds.c.reservation_id == reservation_id
                )
            )
            self._ensure_counters(conn, keys)
            by_key: dict[tuple[str, str], int] = {}
            for hold, charge in zip(holds, charges, strict=True):
                key = (hold.budget, hold.window)
                by_key[key] = by_key.get(key, 0) + charge
            for (budget, window), charge in sorted(by_key.items()):
                if charge:
                    conn.execute(
                        budget_counters.update()
                        .where(
                            budget_counters.c.budget == budget,
                            budget_counters.c.window_label == window,
                        )
                        .values(spent=budget_counters.c.spent + charge)
                    )

    def release_blocking(self, reservation_id: str) -> None:
        """:meth:`release`, in the calling thread."""
        with self._transaction("release") as conn:
            conn.execute(
                budget_holds.delete().where(
                    budget_holds.c.reservation_id == reservation_id
                )
            )

    def usage_blocking(
        self, holds: Sequence[Hold], now: float
    ) -> list[tuple[int, int]]:
        """:meth:`usage`, in the calling thread."""
        keys = _window_keys(holds)
        with self._transaction("read usage") as conn:
            rows = conn.execute(
                sa.select(
                    budget_counters.c.budget,
                    budget_counters.c.window_label,
                    budget_counters.c.spent,
                ).where(
                    sa.tuple_(
                        budget_counters.c.budget, budget_counters.c.window_label
                    ).in_(keys)
                )
            ).all()
            spent = {(b, w): int(s) for b, w, s in rows}
            held = self._held(conn, keys, now)
        return [
            (spent.get((h.budget, h.window), 0), held.get((h.budget, h.window), 0))
            for h in holds
        ]

    # -- steps -----------------------------------------------------------------

    @contextmanager
    def _transaction(self, step: str) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except SQLAlchemyError as err:
            raise CatalogError(
                f"Could not {step} budgets in {_masked_db_url(self._url)}: "
                f"{_first_line(err)}. Check that the catalog database is running."
            ) from err

    def _ensure_counters(self, conn: Connection, keys: list[tuple[str, str]]) -> None:
        insert: Any
        if self._dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        rows = [{"budget": b, "window_label": w, "spent": 0} for b, w in keys]
        conn.execute(insert(budget_counters).on_conflict_do_nothing(), rows)

    def _lock_counters(
        self, conn: Connection, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], int]:
        # FOR UPDATE renders nothing on SQLite, where BEGIN IMMEDIATE already
        # holds the lock; ORDER BY makes PostgreSQL lock rows in one order.
        table = budget_counters
        rows = conn.execute(
            sa.select(table.c.budget, table.c.window_label, table.c.spent)
            .where(sa.tuple_(table.c.budget, table.c.window_label).in_(keys))
            .order_by(table.c.budget, table.c.window_label)
            .with_for_update()
        ).all()
        return {(b, w): int(s) for b, w, s in rows}

    def _held(
        self, conn: Connection, keys: list[tuple[str, str]], now: float
    ) -> dict[tuple[str, str], int]:
        table = budget_holds
        rows = conn.execute(
            sa.select(table.c.budget, table.c.window_label, sa.func.sum(table.c.amount))
            .where(
                sa.tuple_(table.c.budget, table.c.window_label).in_(keys),
                table.c.expires_at > now,
            )
            .group_by(table.c.budget, table.c.window_label)
        ).all()
        return {(b, w): int(total or 0) for b, w, total in rows}

    def _collect_garbage(self, conn: Connection, now: float) -> None:
        """Deletes expired holds now and then; they no longer count anyway."""
        if now < self._next_gc:
            return
        self._next_gc = now + _GC_INTERVAL_S
        result = conn.execute(
            budget_holds.delete().where(budget_holds.c.expires_at <= now)
        )
        if result.rowcount:
            logger.info("expired budget holds removed: holds=%d", result.rowcount)


def _window_keys(holds: Sequence[Hold]) -> list[tuple[str, str]]:
    return sorted({(h.budget, h.window) for h in holds})


def _create_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        # The driver must not begin transactions by itself, so that "begin"
        # below decides how: IMMEDIATE takes the write lock at once and two
        # processes can never both read a counter and then both raise it.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL never corrupts the file; a power loss may forget
        # the last few charges, which budgets tolerate.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    sa.event.listen(engine, "connect", on_connect)
    sa.event.listen(engine, "begin", on_begin)
    return engine


def _dialect_of(url: str) -> str:
    try:
        return sa.engine.make_url(url).get_backend_name()
    except sa.exc.ArgumentError as err:
        raise ConfigError(
            f"{_masked_db_url(url)} is not a database URL; write catalog.url as "
            "sqlite:///path/to/catalog.db or postgresql+psycopg://user@host/db."
        ) from err


def _masked_db_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid database URL>"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


# Keys, under the prefix P, for the window key W (budget@window): "P W" is a
# hash with the integer fields "spent", "held" and "h:<reservation id>" (the
# amount each live reservation holds), and "P W:x" a sorted set of
# reservation ids by expiry time. Both expire ttl seconds after the window
# ends. Holds past their expiry are removed, and subtracted from "held", by
# the next script that touches the window. Amounts always travel as the
# decimal strings they were written as, never through Lua numbers, so they
# stay exact; "-0" is not a valid increment, hence the zero checks.
_PURGE_LUA = """
local function purge(counter, expiries, now)
  local stale = redis.call('ZRANGEBYSCORE', expiries, '-inf', now)
  for _, id in ipairs(stale) do
    local amount = redis.call('HGET', counter, 'h:' .. id)
    if amount then
      if amount ~= '0' then
        redis.call('HINCRBY', counter, 'held', '-' .. amount)
      end
      redis.call('HDEL', counter, 'h:' .. id)
    end
  end
  if #stale > 0 then
    redis.call('ZREMRANGEBYSCORE', expiries, '-inf', now)
  end
end
"""

_RESERVE_LUA = (
    _PURGE_LUA
    + """
local rid, now, until_ = ARGV[1], ARGV[2], ARGV[3]
local n = #KEYS / 2
for i = 1, n do
  local counter, expiries = KEYS[2 * i - 1], KEYS[2 * i]
  purge(counter, expiries, now)
  local state = redis.call('HMGET', counter, 'spent', 'held')
  local used = tonumber(state[1] or '0') + tonumber(state[2] or '0')
  local limit, amount = tonumber(ARGV[1 + 3 * i]), tonumber(ARGV[2 + 3 * i])
  if used + amount > limit then
    return {i, used}
  end
end
for i = 1, n do
  local counter, expiries = KEYS[2 * i - 1], KEYS[2 * i]
  local amount, ttl = ARGV[2 + 3 * i], ARGV[3 + 3 * i]
  if amount ~= '0' then
    redis.call('HINCRBY', counter, 'held', amount)
  end
  redis.call('HSET', counter, 'h:' .. rid, amount)
  redis.call('ZADD', expiries, until_, rid)
  redis.call('EXPIRE', counter, ttl)
  redis.call('EXPIRE', expiries, ttl)
end
return {0, 0}
"""
)

_SETTLE_LUA = """
local rid = ARGV[1]
for i = 1, #KEYS / 2 do
  local counter, expiries = KEYS[2 * i - 1], KEYS[2 * i]
  local amount = redis.call('HGET', counter, 'h:' .. rid)
  if amount then
    if amount ~= '0' then
      redis.call('HINCRBY', counter, 'held', '-' .. amount)
    end
    redis.call('HDEL', counter, 'h:' .. rid)
    redis.call('ZREM', expiries, rid)
  end
  local charge, ttl = ARGV[2 * i], ARGV[2 * i + 1]
  if charge ~= '0' then
    redis.call('HINCRBY', counter, 'spent', charge)
    redis.call('EXPIRE', counter, ttl)
    redis.call('EXPIRE', expiries, ttl)
  end
end
return 0
"""

_USAGE_LUA = (
    _PURGE_LUA
    + """
local result = {}
for i = 1, #KEYS / 2 do
  local counter, expiries = KEYS[2 * i - 1], KEYS[2 * i]
  purge(counter, expiries, ARGV[1])
  local state = redis.call('HMGET', counter, 'spent', 'held')
  result[2 * i - 1] = tonumber(state[1] or '0')
  result[2 * i] = tonumber(state[2] or '0')
end
return result
"""
)


class RedisBudgetStore:
    """Budget counters in Redis, shared by every replica of the service.

    Each step is one Lua script, which Redis runs atomically: a reservation
    checks and holds all its budgets with no other command in between. The
    keys of one reservation span hash slots, so this needs one Redis server
    (with replicas if wanted), not Redis Cluster. The client is made for the
    event loop that first uses it; open the store inside that loop.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "ragline:budget:",
        timeout_s: float = 1.0,
        ttl_s: float = 600.0,
    ) -> None:
        self._client, self.url = connect_redis(url, timeout_s, "budgets.redis_url")
        self._prefix = key_prefix
        self._ttl_s = ttl_s
        self._reserve = self._client.register_script(_RESERVE_LUA)
        self._settle = self._client.register_script(_SETTLE_LUA)
        self._usage = self._client.register_script(_USAGE_LUA)

    async def reserve(
        self,
        reservation_id: str,
        holds: Sequence[Hold],
        *,
        now: float,
        expires_at: float,
    ) -> Refusal | None:
        args: list[str] = [reservation_id, repr(now), repr(expires_at)]
        for hold in holds:
            args += [str(hold.limit), str(hold.amount), self._key_ttl(hold, now)]
        index, used = await self._run(self._reserve, "reserve", holds, args)
        return None if index == 0 else Refusal(int(index) - 1, int(used))

    async def settle(
        self,
        reservation_id: str,
        holds: Sequence[Hold],
        charges: Sequence[int],
        *,
        now: float,
    ) -> None:
        args: list[str] = [reservation_id]
        for hold, charge in zip(holds, charges, strict=True):
            args += [str(charge), self._key_ttl(hold, now)]
        await self._run(self._settle, "settle", holds, args)

    async def release(self, reservation_id: str, holds: Sequence[Hold]) -> None:
        args: list[str] = [reservation_id]
        for _hold in holds:
            args += ["0", "1"]
        await self._run(self._settle, "release", holds, args)

    async def usage(
        self, holds: Sequence[Hold], *, now: float
    ) -> list[tuple[int, int]]:
        values = await self._run(self._usage, "read usage", holds, [repr(now)])
        return [(int(values[2 * i]), int(values[2 * i + 1])) for i in range(len(holds))]

    async def close(self) -> None:
        await self._client.aclose()

    async def _run(
        self, script: Any, step: str, holds: Sequence[Hold], args: list[str]
    ) -> Any:
        from redis.exceptions import RedisError

        keys: list[str] = []
        for hold in holds:
            counter = f"{self._prefix}{hold.key}"
            keys += [counter, f"{counter}:x"]
        try:
            return await script(keys=keys, args=args)
        except RedisError as err:
            raise CatalogError(
                f"Could not {step} budgets in Redis at {self.url}: "
                f"{err.__class__.__name__}: {err}. Check budgets.redis_url and "
                "that the server is running."
            ) from err

    def _key_ttl(self, hold: Hold, now: float) -> str:
        """Seconds the window's keys live: to the window's end, plus late settles."""
        return str(max(1, math.ceil(hold.resets_at.timestamp() - now + self._ttl_s)))


class WarningThrottle:
    """Logs a warning that repeats on every request at most once per interval.

    An unreachable store would otherwise log once per request; each warning
    that does get through says how many were held back since the last one.
    """

    def __init__(
        self, interval_s: float = 10.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0
        self._held_back = 0

    def warning(self, log: logging.Logger, message: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            if now < self._next:
                self._held_back += 1
                return
            self._next = now + self._interval_s
            held_back, self._held_back = self._held_back, 0
        failing = sys.exc_info()[0] is not None
        log.warning(message + " held_back=%d", *args, held_back, exc_info=failing)


def connect_redis(url: str, timeout_s: float, setting: str) -> tuple[Any, str]:
    """An asyncio Redis client for ``url`` and the URL with its password masked.

    The client waits at most ``timeout_s`` and retries once, to replace a
    pooled connection the server closed. A URL that is not a Redis URL raises
    :class:`~ingestion.errors.ConfigError` naming ``setting``.
    """
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from serving.cache.redis import masked_url

    masked = masked_url(url)
    try:
        client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
    except ValueError as err:
        raise ConfigError(
            f"{setting} {masked} is not a Redis URL ({err}). Write "
            "redis://[:password@]host:port/db, rediss://… for TLS, or "
            "unix:///path/to/socket."
        ) from err
    return client, masked


def open_budget_store(config: BudgetsConfig, catalog_url: str) -> BudgetStore:
    """The store ``config.backend`` names; ``catalog_url`` is used by ``sql``."""
    if config.backend == "redis":
        return RedisBudgetStore(
            config.redis_url.get_secret_value(),
            key_prefix=config.key_prefix,
            timeout_s=config.timeout_s,
            ttl_s=config.reservation_ttl_s,
        )
    if config.backend == "memory":
        return MemoryBudgetStore()
    return SqlBudgetStore(catalog_url)


# -- the facade -----------------------------------------------------------------


class Budgets:
    """Checks, holds and charges the budgets that apply to a request.

    ``clock`` returns Unix time; tests pass a fake one to cross periods
    without waiting. See the module docstring for an example.
    """

    def __init__(
        self,
        config: BudgetsConfig,
        store: BudgetStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self._clock = clock
        self._scale: dict[Metric, int] = {"tokens": 1, "cost": COST_SCALE}
        self._unreachable = WarningThrottle()

    @classmethod
    def open(
        cls,
        config: BudgetsConfig,
        catalog_url: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> Budgets:
        """Budgets over the store the settings name."""
        return cls(config, open_budget_store(config, catalog_url), clock=clock)

    async def close(self) -> None:
        await self.store.close()

    def budgets_for(self, subjects: Subjects) -> list[Budget]:
        """The budgets that apply to a request of these subjects."""
        config = self.config
        found: list[Budget] = []
        if subjects.team is not None:
            limits = config.teams.get(subjects.team, config.default_team)
            found += _budgets_of(f"team:{subjects.team}", limits)
        if subjects.key_id is not None:
            limits = config.keys.get(subjects.key_id, config.default_key)
            found += _budgets_of(f"key:{subjects.key_id}", limits)
        return found

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """What the tokens cost in the budgets' currency; 0 for an unpriced model."""
        price = self._price(model)
        if price is None:
            return 0.0
        return (
            prompt_tokens * price.input_per_million
            + completion_tokens * price.output_per_million
        ) / 1_000_000

    async def reserve(
        self,
        subjects: Subjects,
        model: str,
        estimated_prompt_tokens: int,
        max_completion_tokens: int,
    ) -> Reservation:
        """Holds the call's worst case in every applicable budget.

        Raises :class:`~ingestion.errors.BudgetExceeded` when one of them
        cannot take it, and :class:`~ingestion.errors.ConfigError` when a cost
        budget applies to a model without a price.
        """
        if estimated_prompt_tokens < 0 or max_completion_tokens < 0:
            raise RequestError(
                "Token estimates of a budget reservation cannot be negative: "
                f"prompt={estimated_prompt_tokens}, "
                f"completion={max_completion_tokens}."
            )
        now = self._clock()
        budgets = self.budgets_for(subjects) if self.config.enabled else []
        holds = tuple(
            self._hold(b, model, estimated_prompt_tokens, max_completion_tokens, now)
            for b in budgets
        )
        reservation = Reservation(
            id=uuid.uuid4().hex,
            model=model,
            prompt_tokens=estimated_prompt_tokens,
            completion_tokens=max_completion_tokens,
            holds=holds,
        )
        if not holds:
            return reservation

        try:
            refusal = await self.store.reserve(
                reservation.id,
                holds,
                now=now,
                expires_at=now + self.config.reservation_ttl_s,
            )
        except CatalogError:
            if not self.config.fail_open:
                raise
            self._unreachable.warning(
                logger,
                "budget store unreachable, request let through uncounted: model=%s",
                model,
            )
            reservation.counted = False
            return reservation

        if refusal is not None:
            raise self._exceeded(holds[refusal.index], refusal.used, now)
        return reservation

    async def settle(
        self, reservation: Reservation, usage: Usage, *, model: str | None = None
    ) -> None:
        """Replaces the held estimate by what the call used.

        ``model`` names the model that answered when it is not the one
        reserved for (a fallback), so its price is charged. Settling or
        releasing a reservation twice does nothing the second time. A store
        that cannot be reached is logged as an error, never raised: the
        answer has been written by then.
        """
        if reservation.done:
            logger.warning("budget reservation settled twice: id=%s", reservation.id)
            return
        reservation.done = True
        if not reservation.holds:
            return
        charges = [
            self._amount(
                hold.metric,
                model or reservation.model,
                usage.prompt_tokens,
                usage.completion_tokens,
            )
            for hold in reservation.holds
        ]
        try:
            await self.store.settle(
                reservation.id, reservation.holds, charges, now=self._clock()
            )
        except CatalogError:
            # The answer exists by now; failing the request would not bring
            # the charge back. The hold stays until it expires.
            logger.error(
                "budget charge lost, store unreachable: reservation=%s model=%s",
                reservation.id,
                model or reservation.model,
                exc_info=True,
            )

    async def release(self, reservation: Reservation) -> None:
        """Drops the holds of a call that failed; nothing is charged."""
        if reservation.done:
            return
        reservation.done = True
        if reservation.holds and reservation.counted:
            await self.store.release(reservation.id, reservation.holds)

    async def status(self, subjects: Subjects) -> list[BudgetStatus]:
        """Where each budget of these subjects stands in its current period."""
        now = self._clock()
        holds = [
            self._hold(b, "", 0, 0, now, priced=False)
            for b in self.budgets_for(subjects)
        ]
        if not holds:
            return []
        usage = await self.store.usage(holds, now=now)
        return [
            BudgetStatus(
                budget=hold.budget,
                limit=self._in_unit(hold.metric, hold.limit),
                spent=self._in_unit(hold.metric, spent),
                held=self._in_unit(hold.metric, held),
                resets_at=hold.resets_at,
            )
            for hold, (spent, held) in zip(holds, usage, strict=True)
        ]

    # -- helpers ---------------------------------------------------------------

    def _hold(
        self,
        budget: Budget,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        now: float,
        *,
        priced: bool = True,
    ) -> Hold:
        window, resets_at = period_window(
            budget.period, datetime.fromtimestamp(now, UTC)
        )
        amount = (
            self._amount(budget.metric, model, prompt_tokens, completion_tokens)
            if priced
            else 0
        )
        return Hold(
            budget=budget.name,
            metric=budget.metric,
            window=window,
            limit=round(budget.limit * self._scale[budget.metric]),
            amount=amount,
            resets_at=resets_at,
        )

    def _amount(
        self, metric: Metric, model: str, prompt_tokens: int, completion_tokens: int
    ) -> int:
        if metric == "tokens":
            return prompt_tokens + completion_tokens
        price = self._price(model)
        if price is None:
            raise ConfigError(
                f"Model {model!r} has no price, so its cost cannot be counted "
                "against a cost budget. Add it under budgets.prices, or set "
                "budgets.default_price."
            )
        # Prices are per million tokens; billionths of a unit are a thousand
        # per million-token unit of price. Rounding up never undercounts.
        nanos = (
            prompt_tokens * price.input_per_million
            + completion_tokens * price.output_per_million
        ) * (COST_SCALE // 1_000_000)
        return math.ceil(nanos - 1e-6)

    def _price(self, model: str) -> ModelPrice | None:
        return self.config.prices.get(model, self.config.default_price)

    def _in_unit(self, metric: Metric, amount: int) -> float:
        return amount / self._scale[metric]

    def _exceeded(self, hold: Hold, used: int, now: float) -> BudgetExceeded:
        unit = "tokens" if hold.metric == "tokens" else self.config.currency
        limit = self._in_unit(hold.metric, hold.limit)
        spent = self._in_unit(hold.metric, used)
        need = self._in_unit(hold.metric, hold.amount)
        resets = hold.resets_at.strftime("%Y-%m-%d %H:%M UTC")
        if hold.amount > hold.limit:
            return BudgetExceeded(
                f"Budget {hold.budget} allows {_fmt(limit)} {unit}, but this "
                f"request alone may use up to {_fmt(need)} {unit}; lower "
                "max_tokens or shorten the prompt.",
                budget=hold.budget,
                limit=limit,
                spent=spent,
                resets_at=hold.resets_at,
                retry_after=None,
            )
        wait = max(0.0, hold.resets_at.timestamp() - now)
        logger.info(
            "budget exceeded: budget=%s limit=%s used=%s needed=%s",
            hold.budget,
            _fmt(limit),
            _fmt(spent),
            _fmt(need),
        )
        return BudgetExceeded(
            f"Budget {hold.budget} is spent: {_fmt(spent)} of {_fmt(limit)} {unit} "
            f"are used or held, and this request may use up to {_fmt(need)} more. "
            f"It resets at {resets} (in {_duration(wait)}); wait until then or "
            "ask an administrator for a higher limit.",
            budget=hold.budget,
            limit=limit,
            spent=spent,
            resets_at=hold.resets_at,
            retry_after=wait,
        )


def _budgets_of(subject: str, limits: BudgetLimits | None) -> list[Budget]:
    if limits is None:
        return []
    candidates: list[tuple[Metric, Period, float | None]] = [
        ("tokens", "day", limits.tokens_per_day),
        ("tokens", "month", limits.tokens_per_month),
        ("cost", "day", limits.cost_per_day),
        ("cost", "month", limits.cost_per_month),
    ]
    return [
        Budget(subject, metric, period, float(limit))
        for metric, period, limit in candidates
        if limit is not None
    ]


def _fmt(value: float) -> str:
    if value == int(value):
        return f"{value:,.0f}"
    return f"{value:,.6f}".rstrip("0").rstrip(".")


def _duration(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} days {hours % 24} h"
