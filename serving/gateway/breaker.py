"""Circuit breakers: stop calling a target that keeps failing, and try it again later.

A :class:`CircuitBreaker` guards one provider target and is in one of three
states:

- **closed**: calls pass. The outcome of each call goes into a *count-based*
  window of the last ``window`` calls. Once the window holds at least
  ``min_requests`` outcomes and the share of failures in it reaches
  ``failure_rate``, the breaker opens. Outcomes age out only by being pushed
  out by newer ones, not by time, so a quiet target keeps its recent record.
- **open**: calls are refused without reaching the target until ``cooldown``
  seconds have passed since it opened; then the next look at the breaker
  finds it half-open.
- **half-open**: at most ``half_open_probes`` trial calls pass at a time. As
  soon as that many have succeeded the breaker closes with an empty window;
  the first failed trial opens it again for another cooldown.

A caller asks :meth:`CircuitBreaker.allow` before each call and gets a ticket
(or ``None`` when the call must not be made), then reports the outcome with
that ticket: :meth:`~CircuitBreaker.record_success`,
:meth:`~CircuitBreaker.record_failure`, or :meth:`~CircuitBreaker.release`
when the call ended without saying anything about the target's health (the
caller went away, the request itself was at fault). Every change of state
starts a new epoch, and a ticket from an earlier epoch is ignored: the calls
still in flight when a breaker opens do not count twice, and a call admitted
while closed cannot close a half-open breaker.

Breakers do pure bookkeeping with no locks and no awaits: they are meant for
one event loop, where nothing runs between two statements of a method. Time
comes from an injectable clock (``time.monotonic`` by default) so tests can
move it by hand.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable

from pydantic import Field, model_validator

from ingestion.config import StrictModel
from ingestion.errors import ConfigError

__all__ = [
    "BreakerConfig",
    "BreakerListener",
    "BreakerState",
    "CircuitBreaker",
]

logger = logging.getLogger(__name__)


class BreakerState(enum.StrEnum):
    """Where a breaker stands; the values appear in metrics and admin views."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


BreakerListener = Callable[[str, BreakerState, BreakerState], None]
"""Called with (target, old state, new state) on every change, e.g. for metrics."""


class BreakerConfig(StrictModel):
    """When a target's breaker opens, and how it recovers."""

    failure_rate: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Share of failed calls in the window at which the breaker opens.",
    )
    window: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="How many of the latest calls the failure rate is measured over "
        "(a count-based window: old outcomes leave only when newer ones arrive).",
    )
    min_requests: int = Field(
        default=10,
        ge=1,
        description="Calls the window must hold before the breaker may open, so a "
        "single early failure does not open it.",
    )
    cooldown: float = Field(
        default=30.0,
        gt=0.0,
        description="Seconds an open breaker refuses calls before letting trial "
        "calls through.",
    )
    half_open_probes: int = Field(
        default=1,
        ge=1,
        le=100,
        description="Trial calls let through at a time while half-open; this many "
        "must succeed to close the breaker.",
    )

    @model_validator(mode="after")
    def _min_requests_fit_the_window(self) -> BreakerConfig:
        if self.min_requests > self.window:
            raise ConfigError(
                f"breaker.min_requests ({self.min_requests}) cannot exceed "
                f"breaker.window ({self.window}): the window would never hold "
                "enough calls to open. Lower min_requests or widen the window."
            )
        return self


class CircuitBreaker:
    """The breaker of one target; see the module docstring for its rules."""

    __slots__ = (
        "_clock",
        "_config",
        "_epoch",
        "_failures",
        "_listener",
        "_opened_at",
        "_outcomes",
        "_probe_successes",
        "_probes",
        "_state",
        "name",
    )

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        listener: BreakerListener | None = None,
    ) -> None:
        self.name = name
        self._config = config or BreakerConfig()
        self._clock = clock
        self._listener = listener
        self._state = BreakerState.CLOSED
        self._epoch = 0
        self._outcomes: deque[bool] = deque(maxlen=self._config.window)
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._probe_successes = 0

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose cooldown is over turns half-open."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self._config.cooldown
        ):
            self._change(BreakerState.HALF_OPEN)
        return self._state

    @property
    def failures(self) -> int:
        """Failed calls in the window (always 0 unless closed)."""
        return self._failures

    @property
    def calls(self) -> int:
        """Calls in the window (always 0 unless closed)."""
        return len(self._outcomes)

    def retry_after(self) -> float:
        """Seconds until an open breaker lets trial calls through; 0 otherwise."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._config.cooldown - self._clock())

    def allow(self) -> int | None:
        """A ticket for one call, or ``None`` when the call must not be made."""
        state = self.state
        if state is BreakerState.CLOSED:
            return self._epoch
        if state is BreakerState.HALF_OPEN and self._probes < (
            self._config.half_open_probes
        ):
            self._probes += 1
            return self._epoch
        return None

    def record_success(self, ticket: int) -> None:
        """The call made with ``ticket`` succeeded."""
        if ticket != self._epoch:
            return
        if self._state is BreakerState.HALF_OPEN:
            self._probe_successes += 1
            if self._probe_successes >= self._config.half_open_probes:
                self._change(BreakerState.CLOSED)
        elif self._state is BreakerState.CLOSED:
            self._push(failed=False)

    def record_failure(self, ticket: int) -> None:
        """The call made with ``ticket`` failed in a way that blames the target."""
        if ticket != self._epoch:
            return
        if self._state is BreakerState.HALF_OPEN:
            self._change(BreakerState.OPEN)
        elif self._state is BreakerState.CLOSED:
            self._push(failed=True)
            if self._tripped():
                self._change(BreakerState.OPEN)

    def release(self, ticket: int) -> None:
        """The call made with ``ticket`` ended without a verdict on the target."""
        if ticket == self._epoch and self._state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)

    def _push(self, *, failed: bool) -> None:
        outcomes = self._outcomes
        if len(outcomes) == outcomes.maxlen and outcomes[0]:
            self._failures -= 1
        outcomes.append(failed)
        if failed:
            self._failures += 1

    def _tripped(self) -> bool:
        calls = len(self._outcomes)
        return (
            calls >= self._config.min_requests
            and self._failures >= self._config.failure_rate * calls
        )

    def _change(self, new: BreakerState) -> None:
        old = self._state
        self._log_change(old, new)
        self._state = new
        self._epoch += 1
        self._probes = 0
        self._probe_successes = 0
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        self._outcomes.clear()
        self._failures = 0
        if self._listener is not None:
            self._listener(self.name, old, new)

    def _log_change(self, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN and old is BreakerState.CLOSED:
            logger.warning(
                "breaker opened: target=%s failures=%d calls=%d cooldown=%.1f",
                self.name,
                self._failures,
                len(self._outcomes),
                self._config.cooldown,
            )
        elif new is BreakerState.OPEN:
            logger.warning(
                "breaker opened again: target=%s reason=trial_call_failed "
                "cooldown=%.1f",
                self.name,
                self._config.cooldown,
            )
        else:
            logger.info("breaker %s: target=%s", new.value, self.name)
