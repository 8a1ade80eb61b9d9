"""NATS JetStream as a streaming source, read through a durable pull consumer.

Producers publish event JSON to the source's ``subject``; the JetStream
stream that holds the subject keeps the messages until the durable consumer
acknowledges them after the index commit. A message that is not
acknowledged within ``ack_wait`` (the consumer died) is delivered again.
Bad messages are published to ``dead_letter_subject``, held by a stream of
their own.

The NATS client is asynchronous; the backend runs it on an event loop in a
thread of its own and offers the same blocking calls as every backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import Field

from ..config import Duration
from ..connectors.base import register_connector
from ..errors import SourceError
from .base import StreamSourceConfig, unavailable
from .events import Delivery

__all__ = ["NatsStreamBackend", "NatsStreamConfig", "NatsStreamSource"]

_T = TypeVar("_T")


class NatsStreamConfig(StreamSourceConfig):
    """``type: nats``: change events from a NATS JetStream subject."""

    servers: tuple[str, ...] = Field(
        default=("nats://127.0.0.1:4222",),
        min_length=1,
        description="NATS server URLs.",
    )
    stream: str = Field(min_length=1, description="The JetStream stream's name.")
    subject: str = Field(
        min_length=1, description="The subject events are published to."
    )
    durable: str | None = Field(
        default=None, description="Durable consumer name; default 'ragline-<source>'."
    )
    ack_wait: Duration = Field(
        default=timedelta(seconds=30),
        description="An unacknowledged message is delivered again after this long.",
    )
    dead_letter_subject: str | None = Field(
        default=None,
        description="Where bad messages go; default 'ragline.dead.<stream>'.",
    )
    create_stream: bool = Field(
        default=True,
        description="Create the stream (and the dead-letter stream) when missing.",
    )
    timeout: Duration = Field(
        default=timedelta(seconds=10), description="Connect and request timeout."
    )

    @property
    def durable_name(self) -> str:
        return self.durable or f"ragline-{self.name}".replace(".", "-")

    @property
    def dead_letter(self) -> str:
        return self.dead_letter_subject or f"ragline.dead.{self.stream}"


class NatsStreamBackend:
    """The :class:`~ingestion.streaming.base.StreamBackend` for NATS JetStream."""

    def __init__(self, config: NatsStreamConfig) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None

    # -- the client's own event loop -----------------------------------------

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever,
                name=f"ragline-nats-{self.config.name}",
                daemon=True,
            )
            thread.start()
            self._loop, self._thread = loop, thread
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        limit = (
            timeout if timeout is not None else self.config.timeout.total_seconds() + 5
        )
        try:
            return future.result(limit)
        except TimeoutError as err:
            future.cancel()
            raise unavailable(
                "NATS server", ", ".join(self.config.servers), err
            ) from err

    # -- the protocol ----------------------------------------------------------

    def open(self) -> None:
        self._run(self._open())

    async def _connect(self) -> None:
        import nats

        if self._nc is not None and self._nc.is_connected:
            return
        try:
            self._nc = await nats.connect(
                servers=list(self.config.servers),
                connect_timeout=self.config.timeout.total_seconds(),
                max_reconnect_attempts=-1,
                allow_reconnect=True,
            )
        except Exception as err:
            raise unavailable(
                "NATS server", ", ".join(self.config.servers), err
            ) from err
        self._js = self._nc.jetstream(timeout=self.config.timeout.total_seconds())

    async def _open(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        await self._connect()
        config = self.config
        if config.create_stream:
            for name, subject in (
                (config.stream, config.subject),
                (f"{config.stream}_DEAD", config.dead_letter),
            ):
                try:
                    await self._js.stream_info(name)
                except NotFoundError:
                    await self._js.add_stream(name=name, subjects=[subject])
        self._sub = await self._js.pull_subscribe(
            config.subject,
            durable=config.durable_name,
            stream=config.stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=config.ack_wait.total_seconds(),
                max_ack_pending=max(1000, config.batch_max_events * 4),
            ),
        )

    def read(self, max_events: int, wait_s: float) -> list[Delivery]:
        return self._run(self._read(max_events, wait_s), timeout=wait_s + 15)

    async def _read(self, max_events: int, wait_s: float) -> list[Delivery]:
        import nats.errors

        if self._sub is None:
            await self._open()
        try:
            messages = await self._sub.fetch(max_events, timeout=max(0.05, wait_s))
        except TimeoutError:
            # No message in time. The client raises its own TimeoutError or
            # plain asyncio's, depending on where the wait ran out.
            return []
        except nats.errors.Error as err:
            raise unavailable(
                "NATS server", ", ".join(self.config.servers), err
            ) from err
        deliveries = []
        for message in messages:
            meta = message.metadata
            stamp = meta.timestamp.timestamp() if meta.timestamp else time.time()
            deliveries.append(
                Delivery(
                    f"{meta.sequence.stream:020d}",
                    bytes(message.data),
                    stamp,
                    int(meta.num_delivered or 1),
                    message,
                )
            )
        return deliveries

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            self._run(self._ack(deliveries))

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await delivery.handle.ack()
        await self._nc.flush()

    def dead_letter(self, delivery: Delivery, error: str) -> None:
        headers = {
            "Ragline-Error": error[:4000].replace("\n", " "),
            "Ragline-Source": self.config.name,
            "Ragline-Stream-Sequence": delivery.message_id,
        }
        self._run(self._publish(self.config.dead_letter, delivery.payload, headers))

    def append(self, payload: bytes) -> str:
        ack = self._run(self._publish(self.config.subject, payload, None))
        return f"{ack.seq:020d}"

    async def _publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None
    ) -> Any:
        import nats.errors

        await self._connect()
        try:
            return await self._js.publish(subject, payload, headers=headers)
        except nats.errors.Error as err:
            raise SourceError(
                f"NATS did not store the message on {subject!r} ({err}); check that "
                "a JetStream stream holds the subject."
            ) from err

    def backlog(self) -> int:
        return self._run(self._backlog())

    async def _backlog(self) -> int:
        if self._sub is None:
            await self._open()
        info = await self._sub.consumer_info()
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    def close(self) -> None:
        if self._loop is None:
            return
        if self._nc is not None:
            with contextlib.suppress(SourceError):
                self._run(self._nc.close(), timeout=5)
        self._nc = self._js = self._sub = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._loop.close()
        self._loop = self._thread = None


@register_connector("nats", NatsStreamConfig)
class NatsStreamSource:
    """A NATS JetStream subject as a source; it is consumed, never listed."""

    def __init__(self, config: NatsStreamConfig) -> None:
        self.config = config

    def documents(self, known: Any) -> Iterator[Any]:
        raise SourceError(
            f"Source {self.config.name!r} is a stream; run `ragline stream "
            f"{self.config.name}` (or the stream_ingest flow) to consume it."
        )

    def backend(self) -> NatsStreamBackend:
        return NatsStreamBackend(self.config)
