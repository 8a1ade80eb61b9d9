"""What every streaming source has: its settings and the backend protocol.

A streaming source is a source whose documents arrive as change events on a
durable stream (Redis Streams, NATS JetStream) instead of being listed. A
backend adapts one stream technology to four operations: read a few
messages, acknowledge them, set one aside in a dead-letter stream, and
append a new one. The consumer loop in :mod:`ingestion.streaming.consumer`
is the same for all of them, so a Kafka adapter would be one more class of
this shape.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import timedelta
from typing import ClassVar, Protocol, runtime_checkable

from pydantic import Field

from ..config import Duration, SourceConfig
from ..errors import SourceError
from .events import Delivery

__all__ = ["StreamBackend", "StreamSourceConfig", "default_consumer_name"]


def default_consumer_name() -> str:
    """A consumer name that is the same when the same host restarts the consumer.

    Keeping the name lets a restarted consumer pick up the messages it had
    read but not acknowledged before it stopped.
    """
    return os.environ.get("RAGLINE_CONSUMER_NAME") or f"ragline-{socket.gethostname()}"


class StreamSourceConfig(SourceConfig):
    """Settings shared by every streaming source."""

    streaming: ClassVar[bool] = True

    batch_max_events: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Most events applied together (one embedding pass, one commit).",
    )
    batch_max_wait: Duration = Field(
        default=timedelta(milliseconds=100),
        description="How long a micro-batch waits for more events after its first.",
    )
    poll_wait: Duration = Field(
        default=timedelta(seconds=1),
        description="How long one read blocks on an empty stream.",
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        description="A message that fails this many times goes to the dead-letter stream.",
    )
    max_backlog: int = Field(
        default=100_000,
        ge=1,
        description="Pushes are refused (HTTP 503) while this many events wait to be "
        "indexed: back-pressure on producers when the embedder falls behind.",
    )
    consumer: str = Field(
        default_factory=default_consumer_name,
        description="This consumer's name in its group; keep it stable across restarts.",
    )


@runtime_checkable
class StreamBackend(Protocol):
    """One durable stream, read through a consumer group (or durable consumer)."""

    def open(self) -> None:
        """Connect, and create the stream and consumer group if they do not exist."""
        ...

    def read(self, max_events: int, wait_s: float) -> list[Delivery]:
        """Up to ``max_events`` messages: first those delivered before and not
        acknowledged, then new ones, waiting up to ``wait_s`` for any."""
        ...

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge messages; they are never delivered again."""
        ...

    def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Copy a message with its error to the dead-letter stream (then ``ack`` it)."""
        ...

    def append(self, payload: bytes) -> str:
        """Append a message; returns its id once the stream has stored it."""
        ...

    def backlog(self) -> int:
        """Messages appended but not yet acknowledged by this consumer group."""
        ...

    def close(self) -> None: ...


def unavailable(what: str, where: str, err: BaseException) -> SourceError:
    """The error for a stream server that cannot be reached, saying what to check."""
    return SourceError(
        f"Cannot reach the {what} at {where} ({type(err).__name__}: {err}). Check "
        "that the server runs and the source's url is right; the consumer retries."
    )
