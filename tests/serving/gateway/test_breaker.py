"""The circuit breaker of one target, driven by a clock the tests move by hand."""

from __future__ import annotations

import pydantic
import pytest

from serving.gateway.breaker import BreakerConfig, BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_breaker(clock: FakeClock, **settings: object) -> CircuitBreaker:
    options: dict[str, object] = {
        "failure_rate": 0.5,
        "window": 4,
        "min_requests": 4,
        "cooldown": 10.0,
    }
    options.update(settings)
    return CircuitBreaker("a", BreakerConfig.model_validate(options), clock=clock)


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        ticket = breaker.allow()
        assert ticket is not None, f"the breaker refused a call while {breaker.state}"
        breaker.record_failure(ticket)


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        ticket = breaker.allow()
        assert ticket is not None, f"the breaker refused a call while {breaker.state}"
        breaker.record_success(ticket)


def test_a_closed_breaker_opens_once_the_failure_rate_is_reached() -> None:
    breaker = make_breaker(FakeClock())

    succeed(breaker, 2)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED, "3 calls are fewer than min_requests"
    fail(breaker)

    assert breaker.state is BreakerState.OPEN, "2 failures of 4 reach the 0.5 rate"
    assert breaker.allow() is None, "an open breaker lets no call through"


def test_it_does_not_open_before_min_requests_calls() -> None:
    breaker = make_breaker(FakeClock(), window=10, min_requests=5)

    fail(breaker, 4)

    assert breaker.state is BreakerState.CLOSED, "4 calls are fewer than 5"
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_old_outcomes_leave_the_count_based_window() -> None:
    breaker = make_breaker(FakeClock(), window=4, min_requests=4, failure_rate=0.75)

    fail(breaker, 2)
    succeed(breaker, 4)  # pushes both failures out of the window of 4
    fail(breaker, 2)

    assert breaker.state is BreakerState.CLOSED, "2 failures of the last 4 calls"
    assert (breaker.failures, breaker.calls) == (2, 4)
    fail(breaker)
    assert breaker.state is BreakerState.OPEN, "3 failures of the last 4 calls"


def test_closed_open_half_open_closed() -> None:
    clock = FakeClock()
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        "a",
        BreakerConfig(window=2, min_requests=2, cooldown=10.0, half_open_probes=2),
        clock=clock,
        listener=lambda name, old, new: changes.append((old, new)),
    )

    fail(breaker, 2)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == pytest.approx(10.0)
    clock.advance(9.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == pytest.approx(1.0)
    clock.advance(1.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.retry_after() == 0.0
    first, second = breaker.allow(), breaker.allow()
    assert first is not None and second is not None, "two trial calls may pass"
    assert breaker.allow() is None, "a third waits while two trials are out"
    breaker.record_success(first)
    assert breaker.state is BreakerState.HALF_OPEN, "one success of two is not enough"
    breaker.record_success(second)

    assert breaker.state is BreakerState.CLOSED
    assert (breaker.failures, breaker.calls) == (0, 0), "closing starts a new window"
    assert changes == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_a_failed_trial_call_opens_the_breaker_again_for_a_full_cooldown() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, window=1, min_requests=1)
    fail(breaker)
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN

    fail(breaker)

    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == pytest.approx(10.0)


def test_calls_admitted_before_the_breaker_opened_do_not_count_afterwards() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, window=2, min_requests=2)
    in_flight = [breaker.allow() for _ in range(5)]
    tickets = [t for t in in_flight if t is not None]
    assert len(tickets) == 5

    for ticket in tickets[:2]:
        breaker.record_failure(ticket)
    assert breaker.state is BreakerState.OPEN
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN
    for ticket in tickets[2:]:
        breaker.record_success(ticket)

    assert breaker.state is BreakerState.HALF_OPEN, (
        "successes of calls admitted while closed must not close a half-open breaker"
    )


def test_releasing_a_trial_call_lets_another_one_through() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, window=1, min_requests=1)
    fail(breaker)
    clock.advance(10.0)
    ticket = breaker.allow()
    assert ticket is not None
    assert breaker.allow() is None

    breaker.release(ticket)

    assert breaker.allow() is not None, "a released trial frees its place"
    assert breaker.state is BreakerState.HALF_OPEN, "a release says nothing of health"


def test_min_requests_larger_than_the_window_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="min_requests"):
        BreakerConfig(window=5, min_requests=6)
