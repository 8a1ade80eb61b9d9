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
    ...
    await budgets.close()  # reports what the slices below served

What holds:

- A reservation is all or nothing: it holds every applicable budget, or none
  and raises :class:`~ingestion.errors.BudgetExceeded` naming the first
  budget that cannot take it. Every hold a store grants, to a reservation or
  to a slice (below), is checked against the limit in one atomic step, in
  every store, so concurrent requests, in one process or many, never hold
  more than a limit between them.
- Spend only grows through settled use. A call that used more than its
  estimate is charged in full, so the recorded spend may pass a limit by the
  difference; every later reservation is then refused until the period
  resets.
- A reservation never settled nor released (its process died) stops counting
  ``reservation_ttl_s`` after it was made.
- Amounts are integers in the stores: tokens, and cost in billionths of the
  currency unit, so concurrent additions never drift.
- Periods are UTC calendar days and months; a reservation is charged to the
  period it was made in, even when it settles after midnight.

Slices (``leases``, on by default) keep the store off the request path. A
process takes a slice of a budget from the store in one atomic step: a hold
like a reservation's, in the process's name, that expires ``leases.ttl_s``
after it was last renewed. It then serves reservations from the slice in
memory, returns the over-estimates of settled calls to it, and reports what
it used as spend every ``leases.report_interval_s``, when the slice runs
low, and at :meth:`Budgets.close`, renewing the slice at the same time. A
slice is at most ``leases.fraction`` of what remains of the budget and at
most ``leases.max_requests`` worst cases of the request that takes it, so it
shrinks as the budget runs out; once it would hold fewer than
``leases.min_requests`` worst cases, the process reserves each request
exactly in the store, as it does with leases off. The bounds:

- *Hard limit*: slices are holds, so the spend plus everything held, slices
  included, never passes a limit (save for calls that used more than their
  estimate, as above).
- *Crash*: a process that dies loses the use it had not reported yet, at
  most one slice per budget window (``max_requests`` worst cases, and at
  most ``fraction`` of what remained when the slice was taken); its slices
  stop counting ``ttl_s`` after their last renewal.
- *Fragmentation*: a request may be refused while other processes hold
  unused slices, at most one slice each. Each holder gives back what the
  budget can no longer spare at its next report, and a slice its holder did
  not use since the last report is given back whole, so within about two
  report intervals the processes between them can spend the whole budget.
- A report that fails in a way that leaves unknown whether the store applied
  it (a timeout, say) is sent again, so such use may be counted twice, never
  less. A process stops serving from a slice it could not renew for half of
  ``ttl_s``, which leaves the other half for clocks of hosts that disagree.

Three stores keep the counters behind :class:`BudgetStore`, and all pass one
contract suite: :class:`SqlBudgetStore` in the catalog database (SQLite or
PostgreSQL), :class:`RedisBudgetStore` for many replicas, and
:class:`MemoryBudgetStore` for one process and for tests of callers. With
slices, each store sees a few renewals per second per process whatever the
request rate; without them (or near a limit), one write per reservation and
one per settlement. SQLite runs them on one thread of its own per process,
so requests never wait on each other for its write lock.
"""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import sqlalchemy as sa
from pydantic import Field, SecretStr, model_validator
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from ingestion.config import StrictModel
from ingestion.errors import BudgetExceeded, CatalogError, ConfigError, RequestError

from .providers import Usage

__all__ = [
    "COST_SCALE",
    "Budget",
    "BudgetLeasesConfig",
    "BudgetLimits",
    "BudgetStatus",
    "BudgetStore",
    "Budgets",
    "BudgetsConfig",
    "Hold",
    "LeaseGrant",
    "LeaseRequest",
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

T = TypeVar("T")
Metric = Literal["tokens", "cost"]
Period = Literal["day", "month"]

COST_SCALE = 1_000_000_000
"""Costs are stored as integers in billionths of the currency unit."""

# The stores add integers; Redis scripts compare them as doubles, exact below
# 2**53, which bounds a cost limit to about nine million currency units.
_MAX_COST_LIMIT = 1_000_000.0
_GC_INTERVAL_S = 60.0
# Windows whose spend the facade remembers before it forgets ended ones.
_FLOORS_KEPT = 4096


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


class BudgetLeasesConfig(StrictModel):
    """Slices of budgets held by each process, so reservations need no store I/O.

    The defaults let a process serve a few dozen requests per store round
    trip, while a budget with fewer than about ``min_requests / fraction``
    (80) worst cases left is reserved exactly, request by request.
    """

    enabled: bool = Field(
        default=True,
        description="Serve reservations from slices held in memory; false "
        "reserves every request in the store.",
    )
    fraction: float = Field(
        default=0.05,
        gt=0,
        le=0.5,
        description="A slice is at most this share of what remains of the "
        "budget, so slices shrink as the budget runs out.",
    )
    max_requests: int = Field(
        default=32,
        ge=1,
        description="A slice holds at most this many worst cases of the "
        "request that takes it: what a crash may lose, per budget.",
    )
    min_requests: int = Field(
        default=4,
        ge=1,
        description="A slice that would hold fewer worst cases than this is "
        "not taken: near the limit requests are reserved exactly.",
    )
    report_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="How often a process reports the use of its slices as "
        "spend and resizes them; an unused slice is given back.",
    )
    ttl_s: float = Field(
        default=30.0,
        gt=0,
        description="A slice not renewed for this long (its process died) "
        "stops counting. A process serves from a slice for at most half of "
        "it after the last renewal; keep it above three report intervals.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> BudgetLeasesConfig:
        if self.min_requests > self.max_requests:
            raise ValueError(
                f"leases.min_requests ({self.min_requests}) is above "
                f"leases.max_requests ({self.max_requests}); lower it"
            )
        if self.ttl_s < 3 * self.report_interval_s:
            raise ValueError(
                f"leases.ttl_s ({self.ttl_s:g}) must be at least three "
                f"report intervals ({3 * self.report_interval_s:g}), so that "
                "slices are renewed well before they expire"
            )
        return self


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
    leases: BudgetLeasesConfig = Field(
        default_factory=BudgetLeasesConfig,
        description="Slices of budgets held by each process (see the module "
        "docstring for what they bound).",
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
    """A store's answer when a hold does not fit: which one, and what was in use.

    ``used`` is the window's spend plus its holds; ``spent`` the spend alone,
    when the store tells it (spend never shrinks within a window, so the
    facade refuses later requests that cannot fit without asking again).
    """

    index: int
    used: int
    spent: int | None = None


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """What a process asks of one budget window when it reports and renews its slice.

    The store adds ``charge`` (use served from the slice) to the spend and
    then holds ``keep`` for the process, of which ``free`` is unused room
    and the rest calls in flight, plus a top-up: unused room up to the
    *target*, the smallest of ``cap`` and ``fraction`` of the room left
    beside the other holds and the calls in flight. A target below
    ``minimum`` counts as none (reserve exactly). ``hold`` names the window
    and its limit; its amount is not used.
    """

    hold: Hold
    charge: int
    keep: int
    free: int
    cap: int
    minimum: int
    fraction: float


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """A store's answer to a :class:`LeaseRequest`.

    ``held`` is what the store now holds for the process in the window,
    ``granted`` the unused room added to it, ``target`` the unused room the
    budget can spare a process now (0: reserve exactly), and ``spent`` the
    window's spend after the charge.
    """

    held: int
    granted: int
    target: int
    spent: int


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
    # Per hold: whether it was served from this process's slice of the
    # budget (settled in memory) or held in the store (settled there).
    leased: tuple[bool, ...] = field(default=(), repr=False)


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


def _size_slice(
    request: LeaseRequest, spent: int, others: int, current: int
) -> tuple[int, int, int]:
    """What a store holds for a process after ``request``: ``(held, granted, target)``.

    ``spent`` is the window's spend after the charge, ``others`` what the
    other reservations and slices hold, ``current`` what the process held
    until now. Unused room the process asks to keep is kept as is, unless
    its hold expired meanwhile (``current`` below ``keep``): then only what
    still fits under the limit is. The Redis script repeats this arithmetic.
    """
    in_flight = request.keep - request.free
    room = request.hold.limit - spent - others - in_flight
    free = request.free
    if current < request.keep:
        free = max(0, min(free, room))
    target = min(request.cap, math.floor(request.fraction * room)) if room > 0 else 0
    if target < request.minimum:
        target = 0
    granted = max(0, min(target - free, room - free))
    return in_flight + free + granted, granted, target


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

    async def lease(
        self,
        lease_id: str,
        requests: Sequence[LeaseRequest],
        *,
        now: float,
        expires_at: float,
    ) -> list[LeaseGrant]:
        """Charges the use of ``lease_id``'s slices and resizes them, one window each.

        Each window is one atomic step; the slice becomes a hold of the
        lease that expires at ``expires_at``, or no hold when it is empty.
        """

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
                spent = self._spent.get(hold.key, 0)
                used = spent + self._held(hold.key, now)
                if used + hold.amount > hold.limit:
                    return Refusal(i, used, spent)
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

    async def lease(
        self,
        lease_id: str,
        requests: Sequence[LeaseRequest],
        *,
        now: float,
        expires_at: float,
    ) -> list[LeaseGrant]:
        with self._lock:
            return [self._lease(lease_id, r, now, expires_at) for r in requests]

    async def usage(
        self, holds: Sequence[Hold], *, now: float
    ) -> list[tuple[int, int]]:
        with self._lock:
            return [(self._spent.get(h.key, 0), self._held(h.key, now)) for h in holds]

    async def close(self) -> None:
        return None

    def _lease(
        self, lease_id: str, request: LeaseRequest, now: float, expires_at: float
    ) -> LeaseGrant:
        key = request.hold.key
        held = self._held(key, now)
        holds = self._holds.setdefault(key, {})
        current = holds[lease_id][0] if lease_id in holds else 0
        spent = self._spent.get(key, 0) + request.charge
        self._spent[key] = spent
        size, granted, target = _size_slice(request, spent, held - current, current)
        if size:
            holds[lease_id] = (size, expires_at)
        else:
            holds.pop(lease_id, None)
        return LeaseGrant(size, granted, target, spent)

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
    transactions of every process using the file run one after the other;
    within a process they run on one thread and connection of the store's
    own, in the order they were asked for, so they never contend for the
    lock with each other nor wait in SQLite's busy loop. On PostgreSQL the
    counter rows of the step are locked with ``SELECT ... FOR UPDATE``, in
    one order, so concurrent steps on the same budgets wait for each other
    and never deadlock, and steps on other budgets run side by side on
    worker threads. Either way the event loop only waits.
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
        self._serial = self._dialect == "sqlite"
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def reserve(
        self,
        reservation_id: str,
        holds: Sequence[Hold],
        *,
        now: float,
        expires_at: float,
    ) -> Refusal | None:
        return await self._call(
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
        await self._call(self.settle_blocking, reservation_id, holds, charges)

    async def release(self, reservation_id: str, holds: Sequence[Hold]) -> None:
        await self._call(self.release_blocking, reservation_id)

    async def lease(
        self,
        lease_id: str,
        requests: Sequence[LeaseRequest],
        *,
        now: float,
        expires_at: float,
    ) -> list[LeaseGrant]:
        return await self._call(
            self.lease_blocking, lease_id, requests, now, expires_at
        )

    async def usage(
        self, holds: Sequence[Hold], *, now: float
    ) -> list[tuple[int, int]]:
        return await self._call(self.usage_blocking, holds, now)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            self._engine.dispose()
            return
        # After the steps already queued, so none loses its connection.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, self._engine.dispose)
        executor.shutdown(wait=False)

    async def _call(self, step: Callable[..., T], *args: Any) -> T:
        if not self._serial:
            return await asyncio.to_thread(step, *args)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="ragline-budgets"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, step, *args)

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
                    return Refusal(i, used, spent.get(key, 0))
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
            self._charge(conn, list(zip(holds, charges, strict=True)))

    def release_blocking(self, reservation_id: str) -> None:
        """:meth:`release`, in the calling thread."""
        with self._transaction("release") as conn:
            conn.execute(
                budget_holds.delete().where(
                    budget_holds.c.reservation_id == reservation_id
                )
            )

    def lease_blocking(
        self,
        lease_id: str,
        requests: Sequence[LeaseRequest],
        now: float,
        expires_at: float,
    ) -> list[LeaseGrant]:
        """:meth:`lease`, in the calling thread."""
        keys = _window_keys([r.hold for r in requests])
        with self._transaction("renew slices of") as conn:
            self._ensure_counters(conn, keys)
            spent = self._lock_counters(conn, keys)
            held, mine = self._held_by(conn, keys, now, lease_id)
            grants = []
            for request in requests:
                key = (request.hold.budget, request.hold.window)
                spent[key] = spent.get(key, 0) + request.charge
                current = mine.get(key, 0)
                size, granted, target = _size_slice(
                    request, spent[key], held.get(key, 0) - current, current
                )
                grants.append(LeaseGrant(size, granted, target, spent[key]))
            self._charge(conn, [(r.hold, r.charge) for r in requests])
            conn.execute(
                budget_holds.delete().where(
                    budget_holds.c.reservation_id == lease_id,
                    _in_windows(budget_holds, keys),
                )
            )
            rows = [
                {
                    "reservation_id": lease_id,
                    "budget": r.hold.budget,
                    "window_label": r.hold.window,
                    "amount": grant.held,
                    "expires_at": expires_at,
                }
                for r, grant in zip(requests, grants, strict=True)
                if grant.held
            ]
            if rows:
                conn.execute(budget_holds.insert(), rows)
            self._collect_garbage(conn, now)
        return grants

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
                ).where(_in_windows(budget_counters, keys))
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
            .where(_in_windows(table, keys))
            .order_by(table.c.budget, table.c.window_label)
            .with_for_update()
        ).all()
        return {(b, w): int(s) for b, w, s in rows}

    def _held(
        self, conn: Connection, keys: list[tuple[str, str]], now: float
    ) -> dict[tuple[str, str], int]:
        """What the live holds of each window add up to."""
        return self._held_by(conn, keys, now, "")[0]

    def _held_by(
        self, conn: Connection, keys: list[tuple[str, str]], now: float, holder: str
    ) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
        """What the live holds of each window add up to, and those of ``holder``."""
        table = budget_holds
        own = sa.case((table.c.reservation_id == holder, table.c.amount), else_=0)
        rows = conn.execute(
            sa.select(
                table.c.budget,
                table.c.window_label,
                sa.func.sum(table.c.amount),
                sa.func.sum(own),
            )
            .where(_in_windows(table, keys), table.c.expires_at > now)
            .group_by(table.c.budget, table.c.window_label)
        ).all()
        every = {(b, w): int(total or 0) for b, w, total, _ in rows}
        theirs = {(b, w): int(mine or 0) for b, w, _, mine in rows}
        return every, theirs

    def _charge(self, conn: Connection, charges: Sequence[tuple[Hold, int]]) -> None:
        """Adds each charge to its window's spend; the counter rows must exist."""
        by_key: dict[tuple[str, str], int] = {}
        for hold, charge in charges:
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


def _in_windows(table: sa.Table, keys: list[tuple[str, str]]) -> Any:
    """``table``'s rows of these windows; one window (the usual case) needs no IN."""
    if len(keys) == 1:
        [(budget, window)] = keys
        return sa.and_(table.c.budget == budget, table.c.window_label == window)
    return sa.tuple_(table.c.budget, table.c.window_label).in_(keys)


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
    return {i, used, tonumber(state[1] or '0')}
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
return {0, 0, 0}
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

# The slice of lease ARGV[1]: the arithmetic of _size_slice, on Lua numbers
# (doubles, exact for every amount below 2**53), written back as integers.
_LEASE_LUA = (
    _PURGE_LUA
    + """
local function int(x)
  return string.format('%.0f', x)
end
local lid, now, until_ = ARGV[1], ARGV[2], ARGV[3]
local result = {}
for i = 1, #KEYS / 2 do
  local counter, expiries = KEYS[2 * i - 1], KEYS[2 * i]
  local at = 3 + 8 * (i - 1)
  local limit, charge = tonumber(ARGV[at + 1]), ARGV[at + 2]
  local keep, free = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  local cap, minimum = tonumber(ARGV[at + 5]), tonumber(ARGV[at + 6])
  local fraction, ttl = tonumber(ARGV[at + 7]), ARGV[at + 8]
  purge(counter, expiries, now)
  if charge ~= '0' then
    redis.call('HINCRBY', counter, 'spent', charge)
  end
  local state = redis.call('HMGET', counter, 'spent', 'held', 'h:' .. lid)
  local spent = tonumber(state[1] or '0')
  local current = tonumber(state[3] or '0')
  local others = tonumber(state[2] or '0') - current
  local in_flight = keep - free
  local room = limit - spent - others - in_flight
  if current < keep then
    free = math.max(0, math.min(free, room))
  end
  local target = 0
  if room > 0 then
    target = math.min(cap, math.floor(fraction * room))
  end
  if target < minimum then
    target = 0
  end
  local granted = math.max(0, math.min(target - free, room - free))
  local size = in_flight + free + granted
  if size ~= current then
    redis.call('HINCRBY', counter, 'held', int(size - current))
  end
  if size > 0 then
    redis.call('HSET', counter, 'h:' .. lid, int(size))
    redis.call('ZADD', expiries, until_, lid)
  else
    redis.call('HDEL', counter, 'h:' .. lid)
    redis.call('ZREM', expiries, lid)
  end
  redis.call('EXPIRE', counter, ttl)
  redis.call('EXPIRE', expiries, ttl)
  result[4 * i - 3] = size
  result[4 * i - 2] = granted
  result[4 * i - 1] = target
  result[4 * i] = spent
end
return result
"""
)

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
        self._lease = self._client.register_script(_LEASE_LUA)
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
        index, used, spent = await self._run(self._reserve, "reserve", holds, args)
        if index == 0:
            return None
        return Refusal(int(index) - 1, int(used), int(spent))

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

    async def lease(
        self,
        lease_id: str,
        requests: Sequence[LeaseRequest],
        *,
        now: float,
        expires_at: float,
    ) -> list[LeaseGrant]:
        args: list[str] = [lease_id, repr(now), repr(expires_at)]
        for r in requests:
            args += [
                str(r.hold.limit),
                str(r.charge),
                str(r.keep),
                str(r.free),
                str(r.cap),
                str(r.minimum),
                repr(r.fraction),
                self._key_ttl(r.hold, now),
            ]
        holds = [r.hold for r in requests]
        values = await self._run(self._lease, "renew slices of", holds, args)
        return [
            LeaseGrant(*(int(v) for v in values[4 * i : 4 * i + 4]))
            for i in range(len(requests))
        ]

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


# -- slices ---------------------------------------------------------------------

# How a slice is renewed: "refill" gives back its unused room and asks for a
# fresh slice (a request did not fit); "report" charges its use, shrinks it
# to what the budget last said it can spare and tops it up; "idle" and
# "close" charge its use and give back all its unused room.
_Plan = Literal["refill", "report", "idle", "close"]


@dataclass(eq=False)
class _Lease:
    """This process's slice of one budget window, and what it serves.

    ``size`` is what the store holds for the process. Invariant, outside a
    renewal: ``size`` equals the store's hold, and ``used`` plus the calls in
    flight stay within it, save for calls that used more than reserved.
    """

    hold: Hold
    size: int = 0
    used: int = 0
    in_flight: dict[str, tuple[int, float]] = field(default_factory=dict)
    held_in_flight: int = 0
    target: int = 0
    unit: int = 1
    valid_until: float = 0.0
    exact_until: float = 0.0
    active: bool = False
    pending: asyncio.Task[None] | None = None

    @property
    def free(self) -> int:
        return self.size - self.used - self.held_in_flight

    def renewing(self) -> bool:
        return self.pending is not None and not self.pending.done()

    def serves(self, amount: int, now: float) -> bool:
        return now < self.valid_until and self.free >= amount

    def take(self, reservation_id: str, amount: int, expires_at: float) -> None:
        self.in_flight[reservation_id] = (amount, expires_at)
        self.held_in_flight += amount
        self.active = True

    def drop(self, reservation_id: str) -> None:
        amount, _ = self.in_flight.pop(reservation_id, (0, 0.0))
        self.held_in_flight -= amount

    def expire(self, now: float) -> None:
        """Forgets calls in flight past their reservation's TTL, as stores do."""
        for rid in [r for r, (_, until) in self.in_flight.items() if until <= now]:
            self.drop(rid)


class _Leases:
    """The slices this process holds, keyed by budget window.

    Taking from and settling into a slice happen in memory, on the event
    loop; renewals run as tasks, at most one per slice at a time, so a call
    cancelled while it waits for one never leaves a slice half renewed. A
    background task reports every ``report_interval_s`` while slices exist.
    """

    def __init__(
        self,
        config: BudgetLeasesConfig,
        store: BudgetStore,
        clock: Callable[[], float],
        floors: dict[str, tuple[int, float]],
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._floors = floors
        self._id = f"lease:{uuid.uuid4().hex}"
        self._table: dict[str, _Lease] = {}
        self._reporter: asyncio.Task[None] | None = None
        self._unreachable = WarningThrottle()
        # Once closed, slices are only reported and given back, never taken.
        self._closed = False

    def slices(self) -> dict[str, tuple[int, int, int]]:
        """``(size, used, in flight)`` per window key, for status and tests."""
        return {k: (s.size, s.used, s.held_in_flight) for k, s in self._table.items()}

    async def take(
        self, reservation_id: str, holds: Sequence[Hold], expires_at: float
    ) -> list[bool]:
        """Serves what it can of ``holds`` from slices; says which it served.

        A hold the slice cannot take, where a slice is worth having, waits
        for a refill; the others are left for an exact reservation.
        """
        now = self._clock()
        taken = [self._take(reservation_id, h, expires_at, now) for h in holds]
        wanted = [
            i
            for i, hold in enumerate(holds)
            if not taken[i] and self._worth_a_slice(hold, now)
        ]
        if not wanted:
            return taken
        try:
            await self._refill([holds[i] for i in wanted])
        except BaseException:
            self.give_back(reservation_id, holds, taken)
            raise
        now = self._clock()
        for i in wanted:
            taken[i] = self._take(reservation_id, holds[i], expires_at, now)
        return taken

    def give_back(
        self, reservation_id: str, holds: Sequence[Hold], taken: Sequence[bool]
    ) -> None:
        """Returns to their slices the holds of a reservation that did not happen."""
        for hold, was_taken in zip(holds, taken, strict=False):
            lease = self._table.get(hold.key)
            if was_taken and lease is not None:
                lease.drop(reservation_id)

    def settle(self, reservation_id: str, hold: Hold, charge: int) -> bool:
        """Moves a call's hold in its slice to the slice's use; false if no slice."""
        lease = self._table.get(hold.key)
        if lease is None:
            return False
        lease.drop(reservation_id)
        lease.used += charge
        self._prefetch(lease)
        return True

    async def flush(
        self, keys: Collection[str] | None = None, *, closing: bool = False
    ) -> None:
        """Reports the use of the slices (of ``keys``, or all) and renews them."""
        while True:
            leases = [
                lease
                for key, lease in self._table.items()
                if keys is None or key in keys
            ]
            busy = {
                lease.pending
                for lease in leases
                if lease.pending is not None and not lease.pending.done()
            }
            if not busy:
                break
            await _wait_for(busy)
        now = self._clock()
        plans: list[tuple[_Lease, _Plan]] = []
        for lease in leases:
            lease.expire(now)
            if lease.size == 0 and lease.used == 0 and not lease.in_flight:
                del self._table[lease.hold.key]
            elif closing or self._closed:
                plans.append((lease, "close"))
            elif not lease.active or now >= lease.hold.resets_at.timestamp():
                plans.append((lease, "idle"))
            else:
                plans.append((lease, "report"))
        if plans:
            await _wait_for({self._renew_soon(plans)})

    async def close(self) -> None:
        """Stops the reporting task, then reports every slice and gives back the rest."""
        self._closed = True
        reporter, self._reporter = self._reporter, None
        if reporter is not None and not reporter.done():
            reporter.cancel()
            await asyncio.wait([reporter])
        await self.flush(closing=True)
        for lease in self._table.values():
            if lease.used:
                logger.error(
                    "budget use not reported, store unreachable: budget=%s "
                    "window=%s use=%d",
                    lease.hold.budget,
                    lease.hold.window,
                    lease.used,
                )

    # -- steps -----------------------------------------------------------------

    def _take(
        self, reservation_id: str, hold: Hold, expires_at: float, now: float
    ) -> bool:
        lease = self._table.get(hold.key)
        if lease is None or not lease.serves(hold.amount, now):
            return False
        lease.take(reservation_id, hold.amount, expires_at)
        self._prefetch(lease, hold.amount)
        return True

    def _worth_a_slice(self, hold: Hold, now: float) -> bool:
        """Whether asking the store for a slice may serve this hold."""
        if self._closed:
            return False
        lease = self._table.get(hold.key)
        if lease is not None:
            if lease.renewing() or lease.free > 0:
                return True
            if now < lease.exact_until:
                return False
        spent = self._floors.get(hold.key, (0, 0.0))[0]
        room = hold.limit - spent
        wanted = self._config.min_requests * max(hold.amount, 1)
        return self._config.fraction * room >= wanted

    async def _refill(self, holds: Sequence[Hold]) -> None:
        """Waits for renewals of the slices of ``holds``, starting those needed."""
        refilled: set[str] = set()
        for _ in range(2):
            waiting: set[asyncio.Task[None]] = set()
            fresh: list[tuple[_Lease, _Plan]] = []
            for hold in holds:
                lease = self._table.get(hold.key)
                if lease is None:
                    lease = self._table[hold.key] = _Lease(hold=_window_of(hold))
                lease.unit = max(hold.amount, 1)
                if lease.serves(hold.amount, self._clock()):
                    continue
                if lease.pending is not None and not lease.pending.done():
                    waiting.add(lease.pending)
                elif hold.key not in refilled and (
                    lease.free > 0 or self._clock() >= lease.exact_until
                ):
                    refilled.add(hold.key)
                    fresh.append((lease, "refill"))
            if fresh:
                waiting.add(self._renew_soon(fresh))
            if not waiting:
                return
            await _wait_for(waiting)

    def _prefetch(self, lease: _Lease, amount: int = 0) -> None:
        """Renews a slice in the background when it runs low."""
        low = lease.free < max(lease.target // 4, amount)
        if lease.target and low and not lease.renewing() and not self._closed:
            self._renew_soon([(lease, "report")])

    def _renew_soon(self, plans: list[tuple[_Lease, _Plan]]) -> asyncio.Task[None]:
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._renew(plans))
        for lease, _ in plans:
            lease.pending = task
        stopped = self._reporter is None or self._reporter.done()
        if stopped and not self._closed:
            self._reporter = loop.create_task(self._report_periodically())
        return task

    async def _renew(self, plans: list[tuple[_Lease, _Plan]]) -> None:
        """One store round trip for all ``plans``; a failure leaves the use to report later."""
        now = self._clock()
        requests = [self._request(lease, plan, now) for lease, plan in plans]
        try:
            grants = await self._store.lease(
                self._id, requests, now=now, expires_at=now + self._config.ttl_s
            )
        except CatalogError:
            self._unreachable.warning(
                logger,
                "budget slices not renewed, store unreachable: slices=%d",
                len(plans),
            )
            # Requests go to the store directly for a while, rather than
            # waiting for one failed renewal after another.
            for lease, _ in plans:
                lease.exact_until = now + self._config.report_interval_s
            return
        finally:
            task = asyncio.current_task()
            for lease, _ in plans:
                if lease.pending is task:
                    lease.pending = None
        for (lease, plan), request, grant in zip(plans, requests, grants, strict=True):
            self._apply(lease, plan, request, grant, now)

    def _request(self, lease: _Lease, plan: _Plan, now: float) -> LeaseRequest:
        """What to ask for ``lease``; gives back its unused room at once, if it must."""
        lease.expire(now)
        free = lease.free
        if plan == "report" and now < lease.valid_until:
            release = max(0, free - lease.target)
        else:
            release = max(0, free)
        lease.size -= release
        lease.active = False
        keep = max(lease.size - lease.used, lease.held_in_flight)
        grow = plan in ("refill", "report")
        return LeaseRequest(
            hold=lease.hold,
            charge=lease.used,
            keep=keep,
            free=keep - lease.held_in_flight,
            cap=self._config.max_requests * lease.unit if grow else 0,
            minimum=self._config.min_requests * lease.unit,
            fraction=self._config.fraction,
        )

    def _apply(
        self,
        lease: _Lease,
        plan: _Plan,
        request: LeaseRequest,
        grant: LeaseGrant,
        now: float,
    ) -> None:
        key = lease.hold.key
        lease.used -= request.charge
        lease.size = grant.held
        lease.target = grant.target
        lease.valid_until = now + self._config.ttl_s / 2
        lease.exact_until = (
            now + self._config.report_interval_s if not grant.target else 0.0
        )
        _note_spent(self._floors, lease.hold, grant.spent, now)
        if grant.granted:
            logger.debug(
                "budget slice renewed: budget=%s window=%s held=%d granted=%d",
                lease.hold.budget,
                lease.hold.window,
                grant.held,
                grant.granted,
            )
        idle = plan in ("idle", "close") and not lease.active
        empty = lease.size == 0 and lease.used == 0 and not lease.in_flight
        if idle and empty and self._table.get(key) is lease:
            del self._table[key]

    async def _report_periodically(self) -> None:
        while self._table:
            await asyncio.sleep(self._config.report_interval_s)
            try:
                await self.flush()
            except Exception:
                # A bug in one report must not end reporting for good.
                logger.exception("budget slices not reported")


async def _wait_for(tasks: Collection[asyncio.Task[None]]) -> None:
    """Waits for renewals; cancelling the waiter leaves them running."""
    await asyncio.shield(asyncio.gather(*tasks))


def _window_of(hold: Hold) -> Hold:
    """The window of ``hold``, with no amount: what a slice is a slice of."""
    return Hold(hold.budget, hold.metric, hold.window, hold.limit, 0, hold.resets_at)


def _note_spent(
    floors: dict[str, tuple[int, float]], hold: Hold, spent: int | None, now: float
) -> None:
    """Remembers the highest spend seen in a window; it never shrinks there."""
    if spent is None:
        return
    known = floors.get(hold.key)
    if known is None and len(floors) >= _FLOORS_KEPT:
        for key in [k for k, (_, ends) in floors.items() if ends <= now]:
            del floors[key]
    if known is None or spent > known[0]:
        floors[hold.key] = (spent, hold.resets_at.timestamp())


# -- the facade -----------------------------------------------------------------


class Budgets:
    """Checks, holds and charges the budgets that apply to a request.

    ``clock`` returns Unix time; tests pass a fake one to cross periods
    without waiting. One instance serves one event loop; with slices on, it
    reports in a background task of that loop, so close it there when done.
    See the module docstring for an example.
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
        # The highest spend seen per window key, and when the window ends.
        self._floors: dict[str, tuple[int, float]] = {}
        self._leases = (
            _Leases(config.leases, store, clock, self._floors)
            if config.leases.enabled
            else None
        )

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
        """Reports the use of every slice, gives back the rest, and closes the store."""
        try:
            if self._leases is not None:
                await self._leases.close()
        finally:
            await self.store.close()

    async def flush(self) -> None:
        """Reports the use of every slice as spend now, and resizes the slices.

        The background task does this every ``leases.report_interval_s``; call
        it to make the store current at once.
        """
        if self._leases is not None:
            await self._leases.flush()

    def slices(self) -> dict[str, tuple[int, int, int]]:
        """The slices this process holds: ``(held, used, in flight)`` per window.

        Keys read ``<budget>@<window>``, such as ``team:search tokens/day@2025-03-10``.
        """
        return self._leases.slices() if self._leases is not None else {}

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

        self._refuse_if_spent(holds, now)
        expires_at = now + self.config.reservation_ttl_s
        leased = [False] * len(holds)
        if self._leases is not None:
            leased = await self._leases.take(reservation.id, holds, expires_at)
        try:
            await self._reserve_exactly(reservation, leased, now, expires_at)
        except BaseException:
            if self._leases is not None:
                self._leases.give_back(reservation.id, holds, leased)
            raise
        return reservation

    async def settle(
        self, reservation: Reservation, usage: Usage, *, model: str | None = None
    ) -> None:
        """Replaces the held estimate by what the call used.

        ``model`` names the model that answered when it is not the one
        reserved for (a fallback), so its price is charged. Settling or
        releasing a reservation twice does nothing the second time. A store
        that cannot be reached is logged as an error, never raised: the
        answer has been written by then. Holds served from a slice settle in
        memory; their use reaches the store with the slice's next report.
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
        exact: list[tuple[Hold, int]] = []
        leases = self._leases
        for hold, charge, leased in zip(
            reservation.holds, charges, _leased(reservation), strict=True
        ):
            # A slice gone meanwhile (its calls expired) leaves it to the store.
            if not (
                leases is not None
                and leased
                and leases.settle(reservation.id, hold, charge)
            ):
                exact.append((hold, charge))
        if not exact:
            return
        try:
            await self.store.settle(
                reservation.id,
                [hold for hold, _ in exact],
                [charge for _, charge in exact],
                now=self._clock(),
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
        leased = _leased(reservation)
        if self._leases is not None:
            self._leases.give_back(reservation.id, reservation.holds, leased)
        exact = [h for h, was in zip(reservation.holds, leased, strict=True) if not was]
        if exact and reservation.counted:
            await self.store.release(reservation.id, exact)

    async def status(self, subjects: Subjects) -> list[BudgetStatus]:
        """Where each budget of these subjects stands in its current period.

        This process's slices of them are reported first, so their use shows
        as spent; the unused room of any process's slices shows as held.
        """
        now = self._clock()
        holds = [
            self._hold(b, "", 0, 0, now, priced=False)
            for b in self.budgets_for(subjects)
        ]
        if not holds:
            return []
        if self._leases is not None:
            await self._leases.flush({h.key for h in holds})
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

    # -- reserving -------------------------------------------------------------

    def _refuse_if_spent(self, holds: Sequence[Hold], now: float) -> None:
        """Refuses, without the store, a hold that cannot fit beside the known spend."""
        for hold in holds:
            known = self._floors.get(hold.key)
            if known is not None and known[0] + hold.amount > hold.limit:
                raise self._exceeded(hold, known[0], now)

    async def _reserve_exactly(
        self,
        reservation: Reservation,
        leased: Sequence[bool],
        now: float,
        expires_at: float,
    ) -> None:
        """Holds in the store what no slice served; fills in ``reservation``."""
        holds = reservation.holds
        exact = [h for h, was in zip(holds, leased, strict=True) if not was]
        reservation.leased = tuple(leased)
        if not exact:
            return
        try:
            refusal = await self.store.reserve(
                reservation.id, exact, now=now, expires_at=expires_at
            )
        except CatalogError:
            if not self.config.fail_open:
                raise
            self._unreachable.warning(
                logger,
                "budget store unreachable, request let through uncounted: model=%s",
                reservation.model,
            )
            # Settling tries to record the whole call in the store.
            if self._leases is not None:
                self._leases.give_back(reservation.id, holds, leased)
            reservation.counted = False
            reservation.leased = ()
            return

        if refusal is not None:
            hold = exact[refusal.index]
            _note_spent(self._floors, hold, refusal.spent, now)
            raise self._exceeded(hold, refusal.used, now)

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


def _leased(reservation: Reservation) -> tuple[bool, ...]:
    return reservation.leased or (False,) * len(reservation.holds)


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
