"""Requests and tokens per minute, per API key and per team.

Each limit is a bucket kept by the generic cell rate algorithm (GCRA): one
number per bucket, the *theoretical arrival time* (TAT), the moment the
bucket would be full again. A request costing ``c`` units moves it to
``max(TAT, now) + c * 60 / limit`` and is admitted when that lies no more
than a minute ahead. So a quiet key may send a whole minute's allowance at
once, after which the allowance refills evenly; over any longer stretch the
rate never passes the limit. Example::

    limiter = RateLimiter.open(settings.rate_limits)
    await limiter.acquire(Subjects(key_id="k-42", team="search"), tokens=350)
    result = await provider.generate(request)
    await limiter.add_tokens(subjects, result.usage.total_tokens - 350)

What holds:

- :meth:`RateLimiter.acquire` is all or nothing: it takes one request and
  ``tokens`` (the estimated prompt) from every bucket of the key and the
  team, or takes nothing and raises :class:`~ingestion.errors.RateLimited`
  with the seconds until the fullest bucket admits the request.
- Tokens are known only after the call: :meth:`RateLimiter.add_tokens`
  charges them without a check. A call that used more than a minute's
  allowance leaves its bucket in debt, and the key waits until it is repaid.
- :class:`RedisRateStore` runs each step as one Lua script, so any number of
  replicas share one allowance; it reads the time from the Redis server
  unless a clock is given, so replicas with skewed clocks still agree.
  :class:`MemoryRateStore` keeps the buckets in one process.
- ``fail_open`` (the default) lets requests through, with a warning, when
  Redis cannot be reached: rate limits protect capacity, budgets keep the
  accounts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field, SecretStr

from ingestion.config import StrictModel
from ingestion.errors import CatalogError, RateLimited, RequestError

from .budgets import Subjects, WarningThrottle, connect_redis

__all__ = [
    "Bucket",
    "MemoryRateStore",
    "RateLimit",
    "RateLimiter",
    "RateLimitsConfig",
    "RateStore",
    "RedisRateStore",
    "open_rate_store",
]

logger = logging.getLogger(__name__)

_PERIOD_S = 60.0
# Unix times near 1.7e9 carry rounding errors of about 1e-7 s per addition,
# so "no more than a minute ahead" allows a millisecond (or half an interval,
# when that is shorter) of slack; it never admits a whole extra request.
_TOLERANCE_S = 0.001
_MEMORY_SWEEP_EVERY = 10_000


class RateLimit(StrictModel):
    """Per-minute limits of one key or team; unset means no limit of that kind."""

    requests_per_minute: int | None = Field(
        default=None, gt=0, description="Requests per minute."
    )
    tokens_per_minute: int | None = Field(
        default=None, gt=0, description="Prompt plus completion tokens per minute."
    )


class RateLimitsConfig(StrictModel):
    """Rate limits (the ``rate_limits:`` section of the settings file).

    ``memory`` counts in this process (one replica); ``redis`` shares the
    counts between replicas through the server at ``redis_url``.
    """

    enabled: bool = Field(default=True, description="Check rate limits.")
    backend: Literal["memory", "redis"] = "memory"
    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="redis://[[user]:password@]host:port/db; write the password "
        "as ${VAR} to keep it out of the file.",
    )
    key_prefix: str = Field(
        default="ragline:rate:",
        min_length=1,
        pattern=r"^\S+$",
        description="Prefix of every Redis key the rate limits write.",
    )
    timeout_s: float = Field(
        default=0.25, gt=0, description="Redis connect and read timeout."
    )
    keys: dict[str, RateLimit] = Field(
        default_factory=dict, description="Limits per API key id."
    )
    teams: dict[str, RateLimit] = Field(
        default_factory=dict, description="Limits per team name."
    )
    default_key: RateLimit | None = Field(
        default=None, description="Limits of every key not listed under 'keys'."
    )
    default_team: RateLimit | None = Field(
        default=None, description="Limits of every team not listed under 'teams'."
    )
    fail_open: bool = Field(
        default=True,
        description="When Redis cannot be reached: true lets requests through "
        "with a warning, false refuses them.",
    )


@dataclass(frozen=True, slots=True)
class Bucket:
    """One per-minute limit of one subject, such as ``key:k-42 requests/minute``."""

    subject: str
    unit: Literal["requests", "tokens"]
    limit: int

    @property
    def name(self) -> str:
        return f"{self.subject} {self.unit}/minute"

    @property
    def interval(self) -> float:
        """Seconds one unit takes to refill."""
        return _PERIOD_S / self.limit


@runtime_checkable
class RateStore(Protocol):
    """Keeps the TAT of every bucket; each call is atomic over all its buckets.

    ``now`` is the time in seconds, or ``None`` for the store's own clock.
    """

    async def admit(
        self, buckets: Sequence[Bucket], costs: Sequence[float], now: float | None
    ) -> tuple[int, float] | None:
        """Charges every bucket if all admit; else returns ``(index, retry_after)``.

        ``retry_after`` is ``inf`` when the cost alone passes a bucket's limit.
        """

    async def charge(
        self, buckets: Sequence[Bucket], costs: Sequence[float], now: float | None
    ) -> None:
        """Charges every bucket without a check."""

    async def close(self) -> None:
        """Releases connections; may be called more than once."""


class MemoryRateStore:
    """Buckets in this process; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}
        self._calls = 0

    async def admit(
        self, buckets: Sequence[Bucket], costs: Sequence[float], now: float | None
    ) -> tuple[int, float] | None:
        t = self._clock() if now is None else now
        with self._lock:
            self._sweep(t)
            new: list[float] = []
            worst: tuple[int, float] | None = None
            for i, (bucket, cost) in enumerate(zip(buckets, costs, strict=True)):
                need = cost * bucket.interval
                tolerance = _tolerance(bucket)
                if need > _PERIOD_S + tolerance:
                    return i, math.inf
                tat = max(self._tat.get(bucket.name, t), t) + need
                over = tat - t - _PERIOD_S
                if over > tolerance and (worst is None or over > worst[1]):
                    worst = (i, over)
                new.append(tat)
            if worst is not None:
                return worst
            for bucket, tat in zip(buckets, new, strict=True):
                self._tat[bucket.name] = tat
        return None

    async def charge(
        self, buckets: Sequence[Bucket], costs: Sequence[float], now: float | None
    ) -> None:
        t = self._clock() if now is None else now
        with self._lock:
            for bucket, cost in zip(buckets, costs, strict=True):
                tat = max(self._tat.get(bucket.name, t), t)
                self._tat[bucket.name] = tat + cost * bucket.interval

    async def close(self) -> None:
        return None

    def _sweep(self, now: float) -> None:
        """Forgets full buckets now and then, so idle keys cost no memory."""
        self._calls += 1
        if self._calls % _MEMORY_SWEEP_EVERY:
            return
        for name in [name for name, tat in self._tat.items() if tat <= now]:
            del self._tat[name]


# KEYS: one string per bucket holding its TAT. ARGV[1]: now in seconds, or ""
# for the server's clock; ARGV[2]: the period; then, per bucket, its interval
# and the cost. A bucket's key expires when the bucket is full again, so idle
# keys vanish; a refund that fills it deletes the key at once.
_HELPERS_LUA = """
local function clock(given)
  if given ~= '' then
    return tonumber(given)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function store(key, tat, now)
  local ttl = math.ceil((tat - now) * 1000)
  if ttl > 0 then
    redis.call('SET', key, string.format('%.17g', tat), 'PX', ttl)
  else
    redis.call('DEL', key)
  end
end
local function tolerance(interval)
  return math.min(TOLERANCE_S, interval / 2)
end
""".replace("TOLERANCE_S", repr(_TOLERANCE_S))

_ADMIT_LUA = (
    _HELPERS_LUA
    + """
local now = clock(ARGV[1])
local period = tonumber(ARGV[2])
local new, worst, worst_over = {}, 0, 0
for i, key in ipairs(KEYS) do
  local interval, cost = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local need = interval * cost
  if need > period + tolerance(interval) then
    return {i, 'inf'}
  end
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then
    tat = now
  end
  new[i] = tat + need
  local over = new[i] - now - period
  if over > tolerance(interval) and over > worst_over then
    worst, worst_over = i, over
  end
end
if worst > 0 then
  return {worst, string.format('%.6f', worst_over)}
end
for i, key in ipairs(KEYS) do
  store(key, new[i], now)
end
return {0, '0'}
"""
)

_CHARGE_LUA = (
    _HELPERS_LUA
    + """
local now = clock(ARGV[1])
for i, key in ipairs(KEYS) do
  local interval, cost = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then
    tat = now
  end
  store(key, tat + interval * cost, now)
end
return 0
"""
)


class RedisRateStore:
    """Buckets in Redis, shared by every replica; each call is one Lua script.

    The keys of one call span hash slots, so this needs one Redis server, not
    Redis Cluster. The client is made for the event loop that first uses it.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "ragline:rate:",
        timeout_s: float = 0.25,
    ) -> None:
        self._client, self.url = connect_redis(url, timeout_s, "rate_limits.redis_url")
        self._prefix = key_prefix
        self._admit = self._client.register_script(_ADMIT_LUA)
        self._charge = self._client.register_script(_CHARGE_LUA)

    async def admit(
        self, buckets: Sequence[Bucket], costs: Sequence[float], now: float | None
    ) -> tuple[int, float] | None:
        index, over = await self._run(self._admit, "check", buckets, costs, now)
        if int(index) == 0:
            return None
        return int(index) - 1, float(over)

    async def charge(
        self, buckets: Sequence[Bucket], costs: Sequence[float], now: float | None
    ) -> None:
        await self._run(self._charge, "charge", buckets, costs, now)

    async def close(self) -> None:
        await self._client.aclose()

    async def _run(
        self,
        script: Any,
        step: str,
        buckets: Sequence[Bucket],
        costs: Sequence[float],
        now: float | None,
    ) -> Any:
        from redis.exceptions import RedisError

        keys = [f"{self._prefix}{b.name}" for b in buckets]
        args = ["" if now is None else repr(now), repr(_PERIOD_S)]
        for bucket, cost in zip(buckets, costs, strict=True):
            args += [repr(bucket.interval), repr(float(cost))]
        try:
            return await script(keys=keys, args=args)
        except RedisError as err:
            raise CatalogError(
                f"Could not {step} rate limits in Redis at {self.url}: "
                f"{err.__class__.__name__}: {err}. Check rate_limits.redis_url "
                "and that the server is running."
            ) from err


def open_rate_store(config: RateLimitsConfig) -> RateStore:
    """The store ``config.backend`` names."""
    if config.backend == "redis":
        return RedisRateStore(
            config.redis_url.get_secret_value(),
            key_prefix=config.key_prefix,
            timeout_s=config.timeout_s,
        )
    return MemoryRateStore()


class RateLimiter:
    """Admits requests within the per-minute limits of their key and team.

    ``clock`` returns the time in seconds; unset, the store uses its own
    (Redis: the server's). Tests pass a fake one.
    """

    def __init__(
        self,
        config: RateLimitsConfig,
        store: RateStore,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._clock = clock
        self._unreachable = WarningThrottle()

    @classmethod
    def open(
        cls, config: RateLimitsConfig, *, clock: Callable[[], float] | None = None
    ) -> RateLimiter:
        """A limiter over the store the settings name."""
        return cls(config, open_rate_store(config), clock=clock)

    async def close(self) -> None:
        await self.store.close()

    def buckets_for(self, subjects: Subjects) -> list[Bucket]:
        """The per-minute limits that apply to a request of these subjects."""
        config = self.config
        found: list[Bucket] = []
        if subjects.key_id is not None:
            limit = config.keys.get(subjects.key_id, config.default_key)
            found += _buckets_of(f"key:{subjects.key_id}", limit)
        if subjects.team is not None:
            limit = config.teams.get(subjects.team, config.default_team)
            found += _buckets_of(f"team:{subjects.team}", limit)
        return found

    async def acquire(self, subjects: Subjects, *, tokens: int = 0) -> None:
        """Admits one request expected to use ``tokens``, or raises ``RateLimited``."""
        if tokens < 0:
            raise RequestError(f"A token estimate cannot be negative, not {tokens}.")
        buckets = self.buckets_for(subjects) if self.config.enabled else []
        if not buckets:
            return
        costs = [1.0 if b.unit == "requests" else float(tokens) for b in buckets]

        try:
            refusal = await self.store.admit(buckets, costs, self._now())
        except CatalogError:
            if not self.config.fail_open:
                raise
            self._unreachable.warning(
                logger, "rate limit store unreachable, request admitted"
            )
            return

        if refusal is not None:
            raise _limited(buckets[refusal[0]], refusal[1], tokens)

    async def add_tokens(self, subjects: Subjects, tokens: int) -> None:
        """Charges tokens a call used beyond its estimate (negative: refunds)."""
        buckets = self.buckets_for(subjects) if self.config.enabled else []
        token_buckets = [b for b in buckets if b.unit == "tokens"]
        if not token_buckets or tokens == 0:
            return
        try:
            await self.store.charge(
                token_buckets, [float(tokens)] * len(token_buckets), self._now()
            )
        except CatalogError:
            self._unreachable.warning(
                logger, "rate limit store unreachable, tokens not counted"
            )

    def _now(self) -> float | None:
        return None if self._clock is None else self._clock()


def _tolerance(bucket: Bucket) -> float:
    return min(_TOLERANCE_S, bucket.interval / 2)


def _buckets_of(subject: str, limit: RateLimit | None) -> list[Bucket]:
    if limit is None:
        return []
    found = []
    if limit.requests_per_minute is not None:
        found.append(Bucket(subject, "requests", limit.requests_per_minute))
    if limit.tokens_per_minute is not None:
        found.append(Bucket(subject, "tokens", limit.tokens_per_minute))
    return found


def _limited(bucket: Bucket, retry_after: float, tokens: int) -> RateLimited:
    if math.isinf(retry_after):
        return RateLimited(
            f"Rate limit {bucket.name} allows {bucket.limit} tokens per minute, "
            f"but this request alone is expected to use {tokens}; shorten the "
            "prompt or lower max_tokens.",
            retry_after=None,
        )
    logger.info(
        "rate limited: bucket=%s limit=%d retry_after=%.2f",
        bucket.name,
        bucket.limit,
        retry_after,
    )
    return RateLimited(
        f"Rate limit {bucket.name} of {bucket.limit} per minute is reached; "
        f"retry in {retry_after:.1f} s.",
        retry_after=retry_after,
    )
