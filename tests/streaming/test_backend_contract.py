"""Every stream backend keeps the same promises, on the real servers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from ingestion.streaming.base import StreamBackend
from ingestion.streaming.events import Delivery

from .conftest import StreamKit

Opener = Callable[[], StreamBackend]


@pytest.fixture
def open_backend(kit: StreamKit) -> Iterator[Opener]:
    """Opens backends on the kit's stream and closes them all afterwards."""
    opened: list[StreamBackend] = []

    def make() -> StreamBackend:
        backend = kit.backend()
        opened.append(backend)
        backend.open()
        return backend

    yield make
    for backend in opened:
        backend.close()


def _read_all(backend: StreamBackend, count: int, wait_s: float) -> list[Delivery]:
    """Read until ``count`` messages came or ``wait_s`` passed."""
    got: list[Delivery] = []
    deadline = time.monotonic() + wait_s
    while len(got) < count and time.monotonic() < deadline:
        got.extend(backend.read(count - len(got), 0.5))
    return got


def test_open_creates_what_is_missing_and_twice_is_fine(open_backend: Opener) -> None:
    first = open_backend()
    first.open()

    assert first.backlog() == 0
    assert first.read(10, 0.1) == []


def test_an_appended_message_is_read_back_with_its_time(open_backend: Opener) -> None:
    backend = open_backend()
    before = time.time()

    message_id = backend.append(b'{"op": "delete", "key": "a"}')
    (delivery,) = _read_all(backend, 1, 5)

    assert delivery.message_id == message_id
    assert delivery.payload == b'{"op": "delete", "key": "a"}'
    assert delivery.attempt == 1
    assert before - 1 <= delivery.appended_at <= time.time() + 1, delivery


def test_messages_are_read_in_append_order(open_backend: Opener) -> None:
    backend = open_backend()
    ids = [backend.append(f"m{i}".encode()) for i in range(5)]

    deliveries = _read_all(backend, 5, 5)

    assert [d.message_id for d in deliveries] == ids
    orders = [d.order for d in deliveries]
    assert orders == sorted(orders), "positions sort in stream order"


def test_unacknowledged_messages_come_back_after_a_restart(
    kit: StreamKit, open_backend: Opener
) -> None:
    first = open_backend()
    ids = [first.append(f"m{i}".encode()) for i in range(3)]
    assert len(_read_all(first, 3, 5)) == 3
    first.close()

    second = open_backend()
    again = _read_all(second, 3, 10)  # NATS: after ack_wait

    assert sorted(d.message_id for d in again) == sorted(ids)
    assert all(d.attempt >= 2 for d in again), [d.attempt for d in again]


def test_pending_messages_are_handed_over_once_per_run(open_backend: Opener) -> None:
    first = open_backend()
    for i in range(3):
        first.append(f"m{i}".encode())
    assert len(_read_all(first, 3, 5)) == 3
    first.close()
    second = open_backend()
    again = _read_all(second, 3, 10)

    more = second.read(10, 0.3)

    assert len(again) == 3
    assert more == [], "a pending message was handed over twice in one run"


def test_acknowledged_messages_never_come_back(
    kit: StreamKit, open_backend: Opener
) -> None:
    first = open_backend()
    ids = [first.append(f"m{i}".encode()) for i in range(4)]
    deliveries = _read_all(first, 4, 5)
    first.ack(deliveries[:2])
    first.close()

    second = open_backend()
    again = _read_all(second, 2, 10)
    second.ack(again)
    if kit.name == "nats":
        time.sleep(1.5)  # past ack_wait: anything unacknowledged would be back
    late = second.read(10, 0.3)

    assert sorted(d.message_id for d in again) == sorted(ids[2:])
    assert late == []
    assert second.backlog() == 0


def test_a_dead_letter_keeps_the_payload_and_the_error(
    kit: StreamKit, open_backend: Opener
) -> None:
    backend = open_backend()
    backend.append(b"{not json")
    (delivery,) = _read_all(backend, 1, 5)

    backend.dead_letter(delivery, "message 1 is not a JSON object")
    backend.ack([delivery])

    assert kit.dead_letters() == [(b"{not json", "message 1 is not a JSON object")]
    assert backend.backlog() == 0


def test_the_backlog_counts_waiting_and_unacknowledged_messages(
    open_backend: Opener,
) -> None:
    backend = open_backend()
    for i in range(5):
        backend.append(f"m{i}".encode())

    assert backend.backlog() == 5
    deliveries = _read_all(backend, 2, 5)
    assert backend.backlog() == 5, "read but unacknowledged still counts"
    backend.ack(deliveries)
    assert backend.backlog() == 3
