"""One fixture for both stream backends: a fresh, uniquely named stream per test.

Each backend kit knows how to make a config (as settings and as YAML), open
a backend on it, read its dead-letter stream the way an operator would, and
delete everything it created, also when the test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
import redis

from ingestion.streaming.base import StreamBackend, StreamSourceConfig
from ingestion.streaming.nats_jetstream import NatsStreamBackend, NatsStreamConfig
from ingestion.streaming.redis_streams import RedisStreamBackend, RedisStreamConfig

REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
SOURCE = "tickets"


class StreamKit(Protocol):
    name: str

    def source(self, **overrides: Any) -> dict[str, Any]:
        """The source entry of a settings file."""
        ...

    def config(self, **overrides: Any) -> StreamSourceConfig: ...

    def backend(self, **overrides: Any) -> StreamBackend: ...

    def dead_letters(self) -> list[tuple[bytes, str]]:
        """(payload, error) of every dead letter, oldest first."""
        ...

    def cleanup(self) -> None: ...


_BASE: dict[str, Any] = {
    "name": SOURCE,
    "collection": "docs",
    "batch_max_wait": "50ms",
    "poll_wait": "200ms",
    "consumer": "test-consumer",
}


@dataclass
class RedisKit:
    stream: str
    name: str = "redis"

    def source(self, **overrides: Any) -> dict[str, Any]:
        return {
            **_BASE,
            "type": "redis_stream",
            "url": REDIS_URL,
            "stream": self.stream,
            **overrides,
        }

    def config(self, **overrides: Any) -> StreamSourceConfig:
        return RedisStreamConfig(**self.source(**overrides))

    def backend(self, **overrides: Any) -> StreamBackend:
        config = self.config(**overrides)
        assert isinstance(config, RedisStreamConfig)
        return RedisStreamBackend(config)

    def dead_letters(self) -> list[tuple[bytes, str]]:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            entries = client.xrange(f"{self.stream}.dead")
        finally:
            client.close()
        return [(f[b"payload"], f[b"error"].decode()) for _, f in entries]

    def cleanup(self) -> None:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            client.delete(self.stream, f"{self.stream}.dead")
        finally:
            client.close()


@dataclass
class NatsKit:
    stream: str
    name: str = "nats"

    @property
    def subject(self) -> str:
        return f"tests.{self.stream}.events"

    def source(self, **overrides: Any) -> dict[str, Any]:
        return {
            **_BASE,
            "type": "nats",
            "servers": [NATS_URL],
            "stream": self.stream,
            "subject": self.subject,
            "ack_wait": "1s",
            **overrides,
        }

    def config(self, **overrides: Any) -> StreamSourceConfig:
        return NatsStreamConfig(**self.source(**overrides))

    def backend(self, **overrides: Any) -> StreamBackend:
        config = self.config(**overrides)
        assert isinstance(config, NatsStreamConfig)
        return NatsStreamBackend(config)

    def dead_letters(self) -> list[tuple[bytes, str]]:
        return asyncio.run(self._dead_letters())

    async def _dead_letters(self) -> list[tuple[bytes, str]]:
        import nats
        from nats.js.errors import NotFoundError

        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            try:
                info = await js.stream_info(f"{self.stream}_DEAD")
            except NotFoundError:
                return []
            letters: list[tuple[bytes, str]] = []
            if not info.state.messages:
                return letters
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                message = await js.get_msg(f"{self.stream}_DEAD", seq)
                headers = message.headers or {}
                letters.append((bytes(message.data), headers.get("Ragline-Error", "")))
            return letters
        finally:
            await nc.close()

    def cleanup(self) -> None:
        asyncio.run(self._cleanup())

    async def _cleanup(self) -> None:
        import nats
        from nats.js.errors import NotFoundError

        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            for name in (self.stream, f"{self.stream}_DEAD"):
                with contextlib.suppress(NotFoundError):
                    await js.delete_stream(name)
        finally:
            await nc.close()


@pytest.fixture(params=["redis", "nats"])
def kit(request: pytest.FixtureRequest) -> Iterator[StreamKit]:
    """A stream nobody used before, on Redis Streams or NATS JetStream."""
    unique = uuid.uuid4().hex[:12]
    made: StreamKit = (
        RedisKit(f"ragline-test-{unique}")
        if request.param == "redis"
        else NatsKit(f"RAGLINE_TEST_{unique}")
    )
    yield made
    made.cleanup()
