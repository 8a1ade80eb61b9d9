"""The consumer loop, against the in-memory stream beside the backend protocol."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import pytest

from ingestion.errors import CatalogError, SourceError
from ingestion.streaming.base import StreamBackend, StreamSourceConfig
from ingestion.streaming.consumer import BatchOutcome, StreamConsumer
from ingestion.streaming.events import Change, Delivery, Upsert
from ingestion.streaming.memory import MemoryStream, MemoryStreamBackend


def _config(**overrides: Any) -> StreamSourceConfig:
    values: dict[str, Any] = {
        "name": "tickets",
        "type": "memory",
        "collection": "docs",
        "batch_max_events": 4,
        "batch_max_wait": timedelta(milliseconds=50),
        "poll_wait": timedelta(milliseconds=20),
        "max_deliveries": 3,
        "consumer": "test",
    }
    values.update(overrides)
    return StreamSourceConfig(**values)


def _upsert(key: str, content: str | None = None) -> bytes:
    return json.dumps(
        {"op": "upsert", "key": key, "content": content or f"text of {key}"}
    ).encode()


class Recorder:
    """An ``apply`` callback that records every call and can be told to fail."""

    def __init__(
        self, fail: Callable[[Sequence[Change]], Exception | None] | None = None
    ) -> None:
        self.calls: list[list[str]] = []
        self.applied: list[str] = []
        self.fail = fail

    def __call__(self, changes: Sequence[Change]) -> Mapping[str, str]:
        self.calls.append([c.doc_id for c in changes])
        error = self.fail(changes) if self.fail else None
        if error is not None:
            raise error
        self.applied.extend(c.doc_id for c in changes)
        return {}


def _consumer(
    backend: StreamBackend, apply: Any, **config: Any
) -> tuple[StreamConsumer, list[BatchOutcome]]:
    outcomes: list[BatchOutcome] = []
    consumer = StreamConsumer(
        _config(**config),
        backend,
        apply,
        on_batch=outcomes.append,
        retry_base_s=0.001,
        retry_max_s=0.01,
    )
    return consumer, outcomes


def _filled(*payloads: bytes) -> MemoryStreamBackend:
    backend = MemoryStreamBackend()
    for payload in payloads:
        backend.append(payload)
    return backend


def test_the_memory_backend_satisfies_the_protocol() -> None:
    assert isinstance(MemoryStreamBackend(), StreamBackend)


def test_a_micro_batch_closes_when_it_is_full() -> None:
    backend = _filled(*(_upsert(f"k{i}") for i in range(10)))
    apply = Recorder()
    consumer, outcomes = _consumer(backend, apply)

    stats = consumer.run(idle_exit_s=0.05)

    assert [o.events for o in outcomes] == [4, 4, 2], outcomes
    assert [o.caught_up for o in outcomes] == [False, False, True]
    assert stats.events == stats.applied == 10
    assert sorted(apply.applied) == sorted(f"tickets:k{i}" for i in range(10))


class Trickle(MemoryStreamBackend):
    """Hands over one message per read, as a slow producer would."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def read(self, max_events: int, wait_s: float) -> list[Delivery]:
        self.waits.append(wait_s)
        if not self.stream.unread:
            self.append(_upsert(f"k{len(self.stream.messages)}"))
        return super().read(1, wait_s)


def test_a_micro_batch_closes_when_its_wait_is_over() -> None:
    backend = Trickle()
    apply = Recorder()
    consumer, outcomes = _consumer(
        backend,
        apply,
        batch_max_events=10_000,
        batch_max_wait=timedelta(milliseconds=30),
    )

    consumer.run(max_events=1)

    assert len(outcomes) == 1
    assert 1 <= outcomes[0].events < 10_000, "the batch closed by time, not by count"
    assert backend.waits[0] == pytest.approx(0.02), "the first read waits poll_wait"
    assert all(w <= 0.03 for w in backend.waits[1:]), (
        f"reads after the first wait only for what is left: {backend.waits}"
    )


def test_messages_are_acknowledged_only_after_apply_returned() -> None:
    backend = _filled(*(_upsert(f"k{i}") for i in range(3)))
    acked_during_apply: list[list[str]] = []

    def apply(changes: Sequence[Change]) -> Mapping[str, str]:
        acked_during_apply.append(list(backend.stream.acked))
        assert len(backend.stream.pending) == 3, "the batch is still pending"
        return {}

    consumer, _ = _consumer(backend, apply)
    consumer.run(idle_exit_s=0.05)

    assert acked_during_apply == [[]]
    assert len(backend.stream.acked) == 3 and not backend.stream.pending


def test_a_poison_message_is_dead_lettered_and_the_rest_applied() -> None:
    backend = _filled(
        _upsert("a"),
        b"{this is not json",
        json.dumps({"op": "upsert", "key": "no-content"}).encode(),
        _upsert("b"),
    )
    apply = Recorder()
    consumer, outcomes = _consumer(backend, apply)

    stats = consumer.run(idle_exit_s=0.05)

    assert apply.applied == ["tickets:a", "tickets:b"]
    dead = {payload: error for _, payload, error in backend.stream.dead}
    assert "not a JSON object" in dead[b"{this is not json"]
    assert "needs 'content'" in dead[b'{"op": "upsert", "key": "no-content"}']
    assert len(backend.stream.acked) == 4, "poison messages are acknowledged too"
    assert (stats.applied, stats.dead_lettered) == (2, 2)
    assert outcomes[0].dead_lettered == 2 and len(outcomes[0].lags) == 2


def test_errors_returned_by_apply_are_dead_lettered() -> None:
    backend = _filled(_upsert("a"), _upsert("broken"))

    def apply(changes: Sequence[Change]) -> Mapping[str, str]:
        return {
            c.delivery.message_id: "the PDF is encrypted"
            for c in changes
            if c.doc_id == "tickets:broken"
        }

    consumer, _ = _consumer(backend, apply)
    stats = consumer.run(idle_exit_s=0.05)

    assert [(p, e) for _, p, e in backend.stream.dead] == [
        (_upsert("broken"), "the PDF is encrypted")
    ]
    assert (stats.applied, stats.dead_lettered) == (1, 1)
    assert len(backend.stream.acked) == 2


def test_only_the_last_change_of_a_document_in_a_batch_is_applied() -> None:
    backend = _filled(_upsert("a", "one"), _upsert("a", "two"), _upsert("a", "three"))
    seen: list[str] = []

    def apply(changes: Sequence[Change]) -> Mapping[str, str]:
        seen.extend(str(c.document.content) for c in changes if isinstance(c, Upsert))
        return {}

    consumer, _ = _consumer(backend, apply)
    consumer.run(idle_exit_s=0.05)

    assert seen == ["three"]
    assert len(backend.stream.acked) == 3


def _culprit(changes: Sequence[Change]) -> Exception | None:
    if any(c.doc_id == "tickets:culprit" for c in changes):
        return RuntimeError("the embedder crashed on this text")
    return None


def test_a_failing_batch_is_retried_then_applied_alone_to_find_the_culprit() -> None:
    backend = _filled(_upsert("a"), _upsert("culprit"), _upsert("b"))
    apply = Recorder(_culprit)
    consumer, _ = _consumer(backend, apply, max_deliveries=3)

    stats = consumer.run(idle_exit_s=0.05)

    whole = ["tickets:a", "tickets:culprit", "tickets:b"]
    assert apply.calls[:3] == [whole, whole, whole], "three tries of the whole batch"
    assert apply.calls[3:] == [["tickets:a"], ["tickets:culprit"], ["tickets:b"]]
    assert sorted(apply.applied) == ["tickets:a", "tickets:b"]
    assert len(backend.stream.dead) == 1
    _, payload, error = backend.stream.dead[0]
    assert payload == _upsert("culprit")
    assert "the embedder crashed on this text" in error
    assert len(backend.stream.acked) == 3
    assert stats.dead_lettered == 1


def test_a_store_error_is_retried_without_dead_lettering() -> None:
    backend = _filled(_upsert("a"), _upsert("b"))
    outage = iter(range(5))

    def fail(changes: Sequence[Change]) -> Exception | None:
        return (
            CatalogError("database is locked")
            if next(outage, None) is not None
            else None
        )

    apply = Recorder(fail)
    consumer, _ = _consumer(backend, apply, max_deliveries=2)

    stats = consumer.run(idle_exit_s=0.05)

    assert len(apply.calls) == 6, "five failures, then the batch went through"
    assert all(len(call) == 2 for call in apply.calls), "never split into single events"
    assert backend.stream.dead == []
    assert sorted(apply.applied) == ["tickets:a", "tickets:b"]
    assert len(backend.stream.acked) == 2
    assert stats.failures == 5


def test_a_store_error_while_applying_alone_is_not_blamed_on_the_event() -> None:
    backend = _filled(_upsert("a"), _upsert("culprit"))
    store_down = iter([True])

    def fail(changes: Sequence[Change]) -> Exception | None:
        if len(changes) == 1 and next(store_down, False):
            return CatalogError("the catalog went away")
        return _culprit(changes)

    apply = Recorder(fail)
    consumer, _ = _consumer(backend, apply, max_deliveries=2)

    consumer.run(idle_exit_s=0.05)

    errors = [error for _, _, error in backend.stream.dead]
    assert len(errors) == 1 and "embedder crashed" in errors[0], errors
    assert apply.applied == ["tickets:a"]


def test_a_stop_during_the_retry_wait_leaves_the_batch_unacknowledged() -> None:
    backend = _filled(_upsert("a"), _upsert("b"))
    stop = threading.Event()

    def fail(changes: Sequence[Change]) -> Exception | None:
        stop.set()  # as a signal handler would, while the store is down
        return CatalogError("database is locked")

    consumer = StreamConsumer(
        _config(), backend, Recorder(fail), retry_base_s=60.0, retry_max_s=60.0
    )
    done = threading.Event()
    worker = threading.Thread(target=lambda: (consumer.run(stop), done.set()))
    worker.start()
    worker.join(timeout=10)

    assert done.is_set(), "the consumer did not stop while waiting to retry"
    assert backend.stream.acked == [] and backend.stream.dead == []
    assert len(backend.stream.pending) == 2, "the batch waits for the next run"

    restarted = MemoryStreamBackend(backend.stream)
    apply = Recorder()
    again, _ = _consumer(restarted, apply)
    again.run(idle_exit_s=0.05)

    assert sorted(apply.applied) == ["tickets:a", "tickets:b"]
    assert not backend.stream.pending


class Flaky(MemoryStreamBackend):
    """A stream server that is away for the first few reads."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def read(self, max_events: int, wait_s: float) -> list[Delivery]:
        if self.failures:
            self.failures -= 1
            raise SourceError("Cannot reach the stream server.")
        return super().read(max_events, wait_s)


def test_read_failures_back_off_and_the_loop_goes_on() -> None:
    backend = Flaky(failures=3)
    backend.append(_upsert("a"))
    apply = Recorder()
    consumer, _ = _consumer(backend, apply)

    stats = consumer.run(idle_exit_s=0.2)

    assert stats.failures == 3
    assert apply.applied == ["tickets:a"]
    assert len(backend.stream.acked) == 1


def test_a_stopped_consumer_reads_nothing_more() -> None:
    backend = _filled(_upsert("a"))
    stop = threading.Event()
    stop.set()
    apply = Recorder()
    consumer, _ = _consumer(backend, apply)

    stats = consumer.run(stop)

    assert stats.events == 0 and apply.calls == []
    assert backend.backlog() == 1


def test_max_events_ends_the_run_after_the_batch_that_reached_it() -> None:
    backend = _filled(*(_upsert(f"k{i}") for i in range(10)))
    consumer, outcomes = _consumer(backend, Recorder())

    stats = consumer.run(max_events=5)

    assert stats.events == 8 and len(outcomes) == 2
    assert backend.backlog() == 2


def test_the_shared_stream_hands_pending_messages_to_a_restarted_backend() -> None:
    stream = MemoryStream()
    first = MemoryStreamBackend(stream)
    first.append(_upsert("a"))
    first.open()
    (delivery,) = first.read(10, 0.01)

    second = MemoryStreamBackend(stream)
    second.open()
    again = second.read(10, 0.01)

    assert [d.message_id for d in again] == [delivery.message_id]
    assert again[0].attempt == 2
    assert second.read(10, 0.01) == [], "handed over once per open"
