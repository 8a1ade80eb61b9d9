"""The consumer loop: micro-batches from a stream into the index, at least once.

Each turn reads a micro-batch (up to ``batch_max_events``, waiting at most
``batch_max_wait`` after the first event), turns the messages into changes,
hands the changes to the ``apply`` callback (the index's sync step), and only
then acknowledges the messages. A process that dies between the commit and
the acknowledgement sees the same messages again; applying them again
changes nothing, because the sync step compares content hashes.

A message that is not a valid event, or whose document cannot be parsed,
goes to the dead-letter stream with its error and the loop goes on. When
``apply`` itself fails (the catalog is down, the embedder crashed), nothing
is acknowledged and the batch is retried with backoff; after
``max_deliveries`` attempts its changes are applied one at a time, so a
single message that breaks the embedder ends in the dead-letter stream
instead of stopping the source. Failures of the catalog or the index are
never blamed on a message: those batches wait and retry until the store is
back, and a stop leaves them unacknowledged for the next run.

Back-pressure is built in: the loop reads the next batch only after the
last one is committed, so events wait in the durable stream, not in memory,
when the embedder falls behind.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import BadEvent, CatalogError, IndexBackendError, RaglineError
from .base import StreamBackend, StreamSourceConfig
from .events import Change, Delivery, latest_per_document, parse_event

__all__ = ["ApplyChanges", "BatchOutcome", "ConsumerStats", "StreamConsumer"]

logger = logging.getLogger(__name__)

_STORE_ERRORS = (CatalogError, IndexBackendError, OSError)
"""Failures of the stores, not of a message: retried without limit."""


class _Stopped(Exception):
    """Raised inside a retry wait when the consumer is asked to stop."""


ApplyChanges = Callable[[Sequence[Change]], Mapping[str, str]]
"""Writes changes to the index and returns ``{message_id: error}`` for the
changes that could not be applied on their own (a document that fails to
parse); those go to the dead-letter stream. Raising means nothing was
applied for good and the whole batch is tried again."""


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one micro-batch did; ``lags`` are event-to-queryable seconds."""

    source: str
    events: int
    applied: int
    dead_lettered: int
    lags: tuple[float, ...]
    committed_at: float
    caught_up: bool


@dataclass
class ConsumerStats:
    batches: int = 0
    events: int = 0
    applied: int = 0
    dead_lettered: int = 0
    failures: int = 0
    lags: list[float] = field(default_factory=list)


class StreamConsumer:
    """Consumes one streaming source until told to stop."""

    def __init__(
        self,
        config: StreamSourceConfig,
        backend: StreamBackend,
        apply: ApplyChanges,
        *,
        on_batch: Callable[[BatchOutcome], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        retry_base_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        self.config = config
        self.backend = backend
        self.apply = apply
        self.on_batch = on_batch
        self.on_idle = on_idle
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.stats = ConsumerStats()
        self._opened = False
        self._stop = threading.Event()

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        max_events: int | None = None,
        idle_exit_s: float | None = None,
    ) -> ConsumerStats:
        """Consume until ``stop`` is set, ``max_events`` were handled, or the
        stream stayed empty for ``idle_exit_s`` (tests and catch-up runs)."""
        stop = stop or threading.Event()
        self._stop = stop
        idle_since = time.monotonic()
        failures = 0
        while not stop.is_set():
            if max_events is not None and self.stats.events >= max_events:
                break
            try:
                handled = self.poll_once()
            except _Stopped:
                break
            except RaglineError as err:
                # A stream server that went away: wait, then try again.
                failures += 1
                self.stats.failures += 1
                delay = self._backoff(failures)
                logger.error(
                    "stream read failed: source=%s attempt=%d retry_in_s=%.1f error=%s",
                    self.config.name,
                    failures,
                    delay,
                    err,
                )
                stop.wait(delay)
                continue
            failures = 0
            now = time.monotonic()
            if handled:
                idle_since = now
            elif idle_exit_s is not None and now - idle_since >= idle_exit_s:
                break
        return self.stats

    def poll_once(self) -> int:
        """Read, apply and acknowledge one micro-batch; returns the messages handled."""
        if not self._opened:
            self.backend.open()
            self._opened = True
        deliveries = self._gather()
        if not deliveries:
            if self.on_idle is not None:
                self.on_idle()
            return 0
        self._handle(deliveries)
        return len(deliveries)

    def close(self) -> None:
        self.backend.close()
        self._opened = False

    # -- one batch ---------------------------------------------------------

    def _gather(self) -> list[Delivery]:
        limit = self.config.batch_max_events
        asked = time.time()
        batch = self.backend.read(limit, self.config.poll_wait.total_seconds())
        if not batch or batch[0].appended_at < asked - 0.001:
            # Events were already waiting: the consumer is behind, and lingering
            # for more would only leave the embedder idle.
            return batch
        deadline = time.monotonic() + self.config.batch_max_wait.total_seconds()
        while len(batch) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            more = self.backend.read(limit - len(batch), left)
            if not more:
                break
            batch.extend(more)
        return batch

    def _handle(self, deliveries: list[Delivery]) -> None:
        name = self.config.name
        changes: list[Change] = []
        dead: list[tuple[Delivery, str]] = []
        for delivery in deliveries:
            try:
                changes.append(
                    parse_event(
                        delivery, source=name, default_labels=self.config.access_labels
                    )
                )
            except BadEvent as err:
                dead.append((delivery, str(err)))
        errors = self._apply_with_retries(latest_per_document(changes))
        by_id = {d.message_id: d for d in deliveries}
        dead.extend((by_id[mid], error) for mid, error in errors.items())
        for delivery, error in dead:
            self.backend.dead_letter(delivery, error)
            logger.warning(
                "event dead-lettered: source=%s message_id=%s error=%s",
                name,
                delivery.message_id,
                error,
            )
        self.backend.ack(deliveries)
        committed = time.time()
        dead_ids = {d.message_id for d, _ in dead}
        lags = tuple(
            max(0.0, committed - d.appended_at)
            for d in deliveries
            if d.message_id not in dead_ids
        )
        outcome = BatchOutcome(
            source=name,
            events=len(deliveries),
            applied=len(lags),
            dead_lettered=len(dead),
            lags=lags,
            committed_at=committed,
            caught_up=len(deliveries) < self.config.batch_max_events,
        )
        self.stats.batches += 1
        self.stats.events += outcome.events
        self.stats.applied += outcome.applied
        self.stats.dead_lettered += outcome.dead_lettered
        self.stats.lags.extend(lags)
        logger.info(
            "stream batch committed: source=%s events=%d applied=%d dead_lettered=%d "
            "max_lag_s=%.3f",
            name,
            outcome.events,
            outcome.applied,
            outcome.dead_lettered,
            max(lags, default=0.0),
        )
        if self.on_batch is not None:
            self.on_batch(outcome)

    def _apply_with_retries(self, changes: list[Change]) -> dict[str, str]:
        if not changes:
            return {}
        attempt = 0
        alone = False
        while True:
            attempt += 1
            try:
                if alone:
                    return self._apply_one_by_one(changes)
                return dict(self.apply(changes))
            except Exception as err:
                self.stats.failures += 1
                store_failed = isinstance(err, _STORE_ERRORS)
                if (
                    not alone
                    and attempt >= self.config.max_deliveries
                    and not store_failed
                ):
                    logger.error(
                        "stream batch keeps failing; applying its events one by one: "
                        "source=%s events=%d attempts=%d error=%s",
                        self.config.name,
                        len(changes),
                        attempt,
                        err,
                    )
                    alone = True
                    continue
                delay = self._backoff(attempt)
                logger.warning(
                    "stream batch failed, retrying: source=%s events=%d attempt=%d "
                    "retry_in_s=%.1f error=%s",
                    self.config.name,
                    len(changes),
                    attempt,
                    delay,
                    err,
                )
                if self._stop.wait(delay):
                    raise _Stopped from err

    def _apply_one_by_one(self, changes: list[Change]) -> dict[str, str]:
        """Each change alone; a store failure is raised, never blamed on the event."""
        errors: dict[str, str] = {}
        for change in changes:
            try:
                errors.update(self.apply([change]))
            except _STORE_ERRORS:
                raise
            except Exception as err:  # noqa: BLE001 - recorded with the dead letter
                errors[change.delivery.message_id] = (
                    f"applying the event failed {self.config.max_deliveries} times in "
                    f"its batch and once alone: {type(err).__name__}: {err}"
                )
        return errors

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.retry_max_s, self.retry_base_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)
