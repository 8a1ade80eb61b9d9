"""An in-memory stream, the fake beside :class:`~ingestion.streaming.base.StreamBackend`.

Tests of the consumer loop and of anything that pushes events use it in
place of a stream server. It keeps the semantics that matter to callers:
a message handed over stays pending until it is acknowledged, a backend
opened again (a restarted consumer) gets the pending messages first, and
dead letters keep the payload with its error. It lives in one process and
keeps nothing on disk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .events import Delivery

__all__ = ["MemoryStream", "MemoryStreamBackend"]


@dataclass
class MemoryStream:
    """The shared state of one stream: messages, who read what, dead letters."""

    messages: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)
    pending: dict[str, int] = field(default_factory=dict)
    acked: list[str] = field(default_factory=list)
    dead: list[tuple[str, bytes, str]] = field(default_factory=list)
    condition: threading.Condition = field(default_factory=threading.Condition)
    _next_id: int = 0

    def append(self, payload: bytes) -> str:
        with self.condition:
            self._next_id += 1
            message_id = f"{self._next_id:020d}"
            self.messages[message_id] = (payload, time.time())
            self.unread.append(message_id)
            self.condition.notify_all()
            return message_id


class MemoryStreamBackend:
    """A :class:`~ingestion.streaming.base.StreamBackend` over a :class:`MemoryStream`."""

    def __init__(self, stream: MemoryStream | None = None) -> None:
        self.stream = stream if stream is not None else MemoryStream()
        self._redeliver: list[str] = []
        self.opened = False

    def open(self) -> None:
        with self.stream.condition:
            self._redeliver = sorted(self.stream.pending)
        self.opened = True

    def read(self, max_events: int, wait_s: float) -> list[Delivery]:
        stream = self.stream
        with stream.condition:
            if not self._redeliver and not stream.unread:
                stream.condition.wait_for(lambda: bool(stream.unread), wait_s)
            taken: list[str] = []
            while self._redeliver and len(taken) < max_events:
                taken.append(self._redeliver.pop(0))
            while stream.unread and len(taken) < max_events:
                taken.append(stream.unread.pop(0))
            deliveries = []
            for message_id in taken:
                attempt = stream.pending.get(message_id, 0) + 1
                stream.pending[message_id] = attempt
                payload, appended_at = stream.messages[message_id]
                deliveries.append(Delivery(message_id, payload, appended_at, attempt))
            return deliveries

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        with self.stream.condition:
            for delivery in deliveries:
                if self.stream.pending.pop(delivery.message_id, None) is not None:
                    self.stream.acked.append(delivery.message_id)

    def dead_letter(self, delivery: Delivery, error: str) -> None:
        with self.stream.condition:
            self.stream.dead.append((delivery.message_id, delivery.payload, error))

    def append(self, payload: bytes) -> str:
        return self.stream.append(payload)

    def backlog(self) -> int:
        with self.stream.condition:
            return len(self.stream.unread) + len(self.stream.pending)

    def close(self) -> None:
        self.opened = False
