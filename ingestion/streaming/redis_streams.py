"""Redis Streams as a streaming source, read through a consumer group.

Producers append with ``XADD <stream> * event '<json>'`` (or write the event's
fields flat: ``XADD <stream> * op delete key tickets/4711``). The consumer
reads with ``XREADGROUP``; a message stays in the group's pending list until
it is acknowledged after the index commit, so a consumer that dies re-reads
its own pending messages when it starts again under the same name, and
messages left pending by a consumer that never came back are claimed after
``claim_idle``. Bad messages are copied to ``<stream>.dead`` with the error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import redis
from pydantic import Field, SecretStr

from ..config import Duration
from ..connectors.base import register_connector
from ..errors import SourceError
from .base import StreamSourceConfig, unavailable
from .events import Delivery

__all__ = ["RedisStreamBackend", "RedisStreamConfig", "RedisStreamSource"]

logger = logging.getLogger(__name__)


class RedisStreamConfig(StreamSourceConfig):
    """``type: redis_stream``: change events from a Redis stream."""

    url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL; put a password in ${REDIS_URL}, not in the file.",
    )
    stream: str = Field(
        min_length=1, description="The stream key events are appended to."
    )
    group: str = Field(default="ragline", min_length=1, description="Consumer group.")
    dead_letter_stream: str | None = Field(
        default=None, description="Where bad messages go; default '<stream>.dead'."
    )
    max_length: int | None = Field(
        default=None,
        ge=1,
        description="Trim the stream to about this many entries on append (unset: "
        "keep all). Trimming may drop messages no consumer has read yet.",
    )
    claim_idle: Duration = Field(
        default=timedelta(minutes=1),
        description="Messages another consumer read and left unacknowledged this long "
        "are taken over.",
    )

    @property
    def dead_letter(self) -> str:
        return self.dead_letter_stream or f"{self.stream}.dead"


def _position(message_id: str) -> str:
    """A Redis id as a string that sorts in stream order."""
    millis, _, seq = message_id.partition("-")
    return f"{int(millis):015d}-{int(seq or 0):010d}"


def _delivery(message_id: str, fields: dict[Any, Any], attempt: int) -> Delivery:
    return Delivery(
        message_id,
        _payload(fields),
        _appended_at(message_id),
        attempt,
        position=_position(message_id),
    )


def _appended_at(message_id: str) -> float:
    """Seconds since the epoch when Redis accepted the message (from its id)."""
    millis, _, _ = message_id.partition("-")
    try:
        return int(millis) / 1000.0
    except ValueError:
        return time.time()


class RedisStreamBackend:
    """The :class:`~ingestion.streaming.base.StreamBackend` for Redis Streams."""

    def __init__(self, config: RedisStreamConfig) -> None:
        self.config = config
        self._client: redis.Redis | None = None
        self._own_pending = True
        self._pending_cursor = "0"
        self._next_claim = 0.0

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except redis.exceptions.ResponseError as err:
            raise SourceError(
                f"Redis refused to {doing} on stream {self.config.stream!r}: {err}."
            ) from err
        except redis.exceptions.RedisError as err:
            raise unavailable("Redis server", self._where(), err) from err

    def _where(self) -> str:
        url = self.config.url.get_secret_value()
        return url.rsplit("@", 1)[-1]  # never the password

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.config.url.get_secret_value(),
                socket_timeout=self.config.poll_wait.total_seconds() + 10,
                socket_connect_timeout=5,
            )
        return self._client

    def open(self) -> None:
        with self._errors("create the consumer group"):
            try:
                self.client.xgroup_create(
                    self.config.stream, self.config.group, id="0", mkstream=True
                )
            except redis.exceptions.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise
        self._own_pending = True
        self._pending_cursor = "0"

    def read(self, max_events: int, wait_s: float) -> list[Delivery]:
        with self._errors("read"):
            # The pending list is walked once per open, from a cursor: reading
            # it from "0" again would hand the same messages over twice.
            while self._own_pending:
                own = self._read_group(self._pending_cursor, max_events, block_ms=None)
                if own:
                    return own
            claimed = self._claim_abandoned(max_events)
            if claimed:
                return claimed
            return self._read_group(
                ">", max_events, block_ms=max(1, int(wait_s * 1000))
            )

    def _read_group(
        self, start: str, count: int, *, block_ms: int | None
    ) -> list[Delivery]:
        reply: Any = self.client.xreadgroup(
            self.config.group,
            self.config.consumer,
            {self.config.stream: start},
            count=count,
            block=block_ms,
        )
        entries: list[Any] = reply[0][1] if reply else []
        attempt = 1 if start == ">" else 2
        if start != ">":
            if not entries:
                self._own_pending = False
            else:
                last = entries[-1][0]
                self._pending_cursor = (
                    last.decode() if isinstance(last, bytes) else last
                )
        deliveries = []
        gone = []
        for raw_id, fields in entries:
            message_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            if not fields:  # trimmed away while pending: nothing left to apply
                gone.append(message_id)
                continue
            deliveries.append(_delivery(message_id, fields, attempt))
        if gone:
            self.client.xack(self.config.stream, self.config.group, *gone)
        return deliveries

    def _claim_abandoned(self, count: int) -> list[Delivery]:
        now = time.monotonic()
        if now < self._next_claim:
            return []
        self._next_claim = now + max(1.0, self.config.claim_idle.total_seconds() / 2)
        reply = self.client.xautoclaim(
            self.config.stream,
            self.config.group,
            self.config.consumer,
            min_idle_time=int(self.config.claim_idle.total_seconds() * 1000),
            start_id="0-0",
            count=count,
        )
        entries = reply[1] if reply and len(reply) > 1 else []
        deliveries = []
        for raw_id, fields in entries:
            message_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            if fields:
                deliveries.append(_delivery(message_id, fields, 2))
        if deliveries:
            logger.warning(
                "claimed messages another consumer left unacknowledged: source=%s count=%d",
                self.config.name,
                len(deliveries),
            )
        return deliveries

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        with self._errors("acknowledge messages"):
            self.client.xack(
                self.config.stream,
                self.config.group,
                *[d.message_id for d in deliveries],
            )

    def dead_letter(self, delivery: Delivery, error: str) -> None:
        with self._errors("write the dead-letter stream"):
            self.client.xadd(
                self.config.dead_letter,
                {
                    "payload": delivery.payload,
                    "error": error,
                    "source": self.config.name,
                    "stream": self.config.stream,
                    "message_id": delivery.message_id,
                    "failed_at": f"{time.time():.3f}",
                },
            )

    def append(self, payload: bytes) -> str:
        with self._errors("append"):
            kwargs: dict[str, Any] = {}
            if self.config.max_length is not None:
                kwargs = {"maxlen": self.config.max_length, "approximate": True}
            message_id = self.client.xadd(
                self.config.stream, {"event": payload}, **kwargs
            )
        return message_id.decode() if isinstance(message_id, bytes) else str(message_id)

    def backlog(self) -> int:
        with self._errors("read the group's backlog"):
            for group in self.client.xinfo_groups(self.config.stream):
                name = group.get("name")
                if isinstance(name, bytes):
                    name = name.decode()
                if name == self.config.group:
                    lag = group.get("lag")
                    pending = int(group.get("pending") or 0)
                    if lag is None:  # Redis cannot tell after trimming
                        return int(self.client.xlen(self.config.stream))
                    return int(lag) + pending
            return int(self.client.xlen(self.config.stream))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _payload(fields: dict[Any, Any]) -> bytes:
    decoded = {
        (k.decode() if isinstance(k, bytes) else str(k)): v for k, v in fields.items()
    }
    if "event" in decoded:
        value = decoded["event"]
        return value if isinstance(value, bytes) else str(value).encode()
    flat = {
        k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
        for k, v in decoded.items()
    }
    return json.dumps(flat).encode()


@register_connector("redis_stream", RedisStreamConfig)
class RedisStreamSource:
    """A Redis stream as a source; it is consumed, never listed."""

    def __init__(self, config: RedisStreamConfig) -> None:
        self.config = config

    def documents(self, known: Any) -> Iterator[Any]:
        raise SourceError(
            f"Source {self.config.name!r} is a stream; run `ragline stream "
            f"{self.config.name}` (or the stream_ingest flow) to consume it."
        )

    def backend(self) -> RedisStreamBackend:
        return RedisStreamBackend(self.config)
