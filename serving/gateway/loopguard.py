"""Throttling a caller that sends the same request again and again.

An agent stuck in a loop, or a client retrying without end, sends identical
requests. The guard keeps, per caller (an API key, or the user of a bearer
token) and request *fingerprint* (a hash of
the route and the normalised body), the times of the recent identical
requests; more than ``max_repeats`` of them within ``window_s`` seconds is
refused with :class:`~ingestion.errors.LoopDetected`, whose ``retry_after``
says when the oldest of them leaves the window. Example::

    guard = LoopGuard.open(settings.loop_guard)
    await guard.check(identity.key_id or f"user:{identity.user}", "/ask", body)

What holds:

- The body is normalised before hashing: object keys sorted, runs of
  whitespace in strings collapsed and trimmed, and the fields named in
  ``ignore_fields`` dropped at every depth (a ``stream`` flag or a request id
  does not make a request different). Any other difference does.
- A refused request is not counted, so a client that waits as told is
  admitted again.
- :class:`RedisLoopStore` checks and records in one Lua script, so replicas
  share the count; :class:`MemoryLoopStore` keeps at most ``max_tracked``
  fingerprints, forgetting the least recently seen first.
- ``fail_open`` (the default) lets requests through, with a warning, when
  Redis cannot be reached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field, SecretStr

from ingestion.config import StrictModel
from ingestion.errors import CatalogError, LoopDetected

from .budgets import WarningThrottle, connect_redis

__all__ = [
    "LoopGuard",
    "LoopGuardConfig",
    "LoopStore",
    "MemoryLoopStore",
    "RedisLoopStore",
    "fingerprint",
    "open_loop_store",
]

logger = logging.getLogger(__name__)

_SPACES = re.compile(r"\s+")


class LoopGuardConfig(StrictModel):
    """The loop guard (the ``loop_guard:`` section of the settings file)."""

    enabled: bool = Field(default=True, description="Refuse repeated requests.")
    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description="memory: this process only; redis: shared by replicas.",
    )
    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="redis://[[user]:password@]host:port/db; write the password "
        "as ${VAR} to keep it out of the file.",
    )
    key_prefix: str = Field(
        default="ragline:loop:",
        min_length=1,
        pattern=r"^\S+$",
        description="Prefix of every Redis key the loop guard writes.",
    )
    timeout_s: float = Field(
        default=0.25, gt=0, description="Redis connect and read timeout."
    )
    max_repeats: int = Field(
        default=10,
        ge=1,
        description="How many identical requests one key may send within "
        "window_s; the next one is refused.",
    )
    window_s: float = Field(
        default=60.0, gt=0, description="The window identical requests count in."
    )
    ignore_fields: tuple[str, ...] = Field(
        default=("stream", "user", "request_id"),
        description="Body fields, at any depth, that do not make requests differ.",
    )
    max_tracked: int = Field(
        default=100_000,
        ge=1,
        description="In memory: the most fingerprints kept; the least recently "
        "seen is forgotten first.",
    )
    fail_open: bool = Field(
        default=True,
        description="When Redis cannot be reached: true lets requests through "
        "with a warning, false refuses them.",
    )


# The canonical JSON of a normalised body, with the encoder made once.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
)


def fingerprint(route: str, body: Any, ignore_fields: Collection[str] = ()) -> str:
    """A hash of the route and the normalised body (see the module docstring)."""
    canonical = _CANONICAL.encode(_normalised(body, frozenset(ignore_fields)))
    digest = hashlib.sha256(f"{route}\n{canonical}".encode())
    return digest.hexdigest()[:32]


def _normalised(value: Any, ignore: frozenset[str]) -> Any:
    if isinstance(value, str):
        return _SPACES.sub(" ", value).strip()
    if isinstance(value, dict):
        return {
            str(k): _normalised(v, ignore) for k, v in value.items() if k not in ignore
        }
    if isinstance(value, list | tuple):
        return [_normalised(v, ignore) for v in value]
    return value


@runtime_checkable
class LoopStore(Protocol):
    """Counts recent identical requests; one call checks and records atomically."""

    async def hit(
        self, key: str, *, now: float | None, window_s: float, max_repeats: int
    ) -> float | None:
        """Records a request and returns None, or returns the seconds to wait."""

    async def close(self) -> None:
        """Releases connections; may be called more than once."""


class MemoryLoopStore:
    """Recent request times in this process; thread-safe."""

    def __init__(
        self, max_tracked: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_tracked = max_tracked
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    async def hit(
        self, key: str, *, now: float | None, window_s: float, max_repeats: int
    ) -> float | None:
        t = self._clock() if now is None else now
        with self._lock:
            times = self._seen.get(key)
            if times is None:
                times = self._seen[key] = deque()
                if len(self._seen) > self._max_tracked:
                    self._seen.popitem(last=False)
            else:
                self._seen.move_to_end(key)
            while times and times[0] <= t - window_s:
                times.popleft()
            if len(times) >= max_repeats:
                return times[len(times) - max_repeats] + window_s - t
            times.append(t)
        return None

    async def close(self) -> None:
        return None


# KEYS[1]: a sorted set of request ids scored by time. ARGV: now ("" for the
# server's clock), the window, the most repeats, and a fresh id.
_HIT_LUA = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local window, most = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.17g', now - window))
local count = redis.call('ZCARD', KEYS[1])
if count >= most then
  local oldest = redis.call('ZRANGE', KEYS[1], count - most, count - most, 'WITHSCORES')
  return string.format('%.6f', tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], string.format('%.17g', now), ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return false
"""


class RedisLoopStore:
    """Recent request times in Redis, shared by every replica.

    The client is made for the event loop that first uses it.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "ragline:loop:",
        timeout_s: float = 0.25,
    ) -> None:
        self._client, self.url = connect_redis(url, timeout_s, "loop_guard.redis_url")
        self._prefix = key_prefix
        self._hit = self._client.register_script(_HIT_LUA)

    async def hit(
        self, key: str, *, now: float | None, window_s: float, max_repeats: int
    ) -> float | None:
        from redis.exceptions import RedisError

        args = [
            "" if now is None else repr(now),
            repr(float(window_s)),
            str(max_repeats),
            uuid.uuid4().hex,
        ]
        try:
            wait = await self._hit(keys=[f"{self._prefix}{key}"], args=args)
        except RedisError as err:
            raise CatalogError(
                f"Could not check the loop guard in Redis at {self.url}: "
                f"{err.__class__.__name__}: {err}. Check loop_guard.redis_url and "
                "that the server is running."
            ) from err
        return None if wait is None else float(wait)

    async def close(self) -> None:
        await self._client.aclose()


def open_loop_store(config: LoopGuardConfig) -> LoopStore:
    """The store ``config.backend`` names."""
    if config.backend == "redis":
        return RedisLoopStore(
            config.redis_url.get_secret_value(),
            key_prefix=config.key_prefix,
            timeout_s=config.timeout_s,
        )
    return MemoryLoopStore(config.max_tracked)


class LoopGuard:
    """Refuses a key's request when it is the same one too many times in a row.

    ``clock`` returns the time in seconds; unset, the store uses its own
    (Redis: the server's). Tests pass a fake one.
    """

    def __init__(
        self,
        config: LoopGuardConfig,
        store: LoopStore,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._clock = clock
        self._ignore = frozenset(config.ignore_fields)
        self._unreachable = WarningThrottle()

    @classmethod
    def open(
        cls, config: LoopGuardConfig, *, clock: Callable[[], float] | None = None
    ) -> LoopGuard:
        """A guard over the store the settings name."""
        return cls(config, open_loop_store(config), clock=clock)

    async def close(self) -> None:
        await self.store.close()

    async def check(self, caller: str | None, route: str, body: Any) -> None:
        """Records the request, or raises ``LoopDetected`` if it repeats too often.

        ``caller`` names who is counted: the API key id, or for callers
        without a key (bearer tokens) the user. None counts every anonymous
        caller together.
        """
        if not self.config.enabled:
            return
        digest = fingerprint(route, body, self._ignore)
        key = f"{caller or '-'}:{digest}"
        now = None if self._clock is None else self._clock()

        try:
            wait = await self.store.hit(
                key,
                now=now,
                window_s=self.config.window_s,
                max_repeats=self.config.max_repeats,
            )
        except CatalogError:
            if not self.config.fail_open:
                raise
            self._unreachable.warning(
                logger, "loop guard store unreachable, request admitted"
            )
            return

        if wait is not None:
            logger.warning(
                "loop detected: caller=%s route=%s fingerprint=%s retry_after=%.1f",
                caller,
                route,
                digest,
                wait,
            )
            raise LoopDetected(
                f"The same {route} request came more than "
                f"{self.config.max_repeats} times within {self.config.window_s:g} s, "
                f"which looks like a loop; retry in {wait:.1f} s, or change the "
                "request.",
                retry_after=max(0.0, wait),
            )
