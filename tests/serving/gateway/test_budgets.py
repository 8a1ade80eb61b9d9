"""Budgets: the contract every store keeps, the facade's rules, and hard limits
under concurrency, in one process and across two.

The contract runs against every store: in memory, SQLite, PostgreSQL (marked
``postgres``) and the Redis server at 127.0.0.1:6379 (each test under a
random key prefix, deleted afterwards). A fake clock crosses periods and
expiry times without waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from pydantic import ValidationError

from ingestion.errors import BudgetExceeded, CatalogError, ConfigError
from serving.gateway.budgets import (
    BudgetLeasesConfig,
    BudgetLimits,
    Budgets,
    BudgetsConfig,
    BudgetStore,
    MemoryBudgetStore,
    ModelPrice,
    RedisBudgetStore,
    SqlBudgetStore,
    Subjects,
    WarningThrottle,
    period_window,
)
from serving.gateway.providers import Usage
from tests.conftest import REPO

from ._support import REDIS_URL, run

T = TypeVar("T")

START = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
TEAM = Subjects(key_id="k-1", team="search")


class FakeClock:
    """Unix time that moves only when told."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


StoreFactory = Callable[[BudgetsConfig], BudgetStore]


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        "redis",
    ]
)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Makes a store of one kind; call it inside the event loop that uses it.

    Every store it makes for one test keeps the same counters, as processes
    sharing a database or a Redis do.
    """
    kind = request.param
    if kind == "memory":
        shared = MemoryBudgetStore()  # so that two facades can share it
        return lambda config: shared
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
        return lambda config: SqlBudgetStore(url)
    if kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        return lambda config: SqlBudgetStore(url)
    prefix = request.getfixturevalue("redis_prefix")
    return lambda config: RedisBudgetStore(
        REDIS_URL, key_prefix=prefix, ttl_s=config.reservation_ttl_s
    )


def config(**overrides: Any) -> BudgetsConfig:
    values: dict[str, Any] = {
        "teams": {"search": BudgetLimits(tokens_per_day=1000)},
        "prices": {"chat": ModelPrice(input_per_million=1.0, output_per_million=2.0)},
        "reservation_ttl_s": 60,
    }
    values.update(overrides)
    return BudgetsConfig(**values)


def scenario(
    make_store: StoreFactory,
    settings: BudgetsConfig,
    body: Callable[[Budgets, FakeClock], Awaitable[T]],
) -> T:
    """Runs ``body`` with budgets over a fresh store and a fake clock."""

    async def main() -> T:
        clock = FakeClock()
        budgets = Budgets(settings, make_store(settings), clock=clock)
        try:
            return await body(budgets, clock)
        finally:
            await budgets.close()

    return run(main())


async def team_status(budgets: Budgets, subjects: Subjects = TEAM) -> dict[str, Any]:
    return {s.budget: s for s in await budgets.status(subjects)}


# -- the contract of every store ---------------------------------------------------


def test_a_reservation_holds_its_worst_case_until_settled(
    make_store: StoreFactory,
) -> None:
    async def body(budgets: Budgets, clock: FakeClock) -> None:
        await budgets.reserve(TEAM, "chat", 100, 50)

        status = (await team_status(budgets))["team:search tokens/day"]
        assert (status.spent, status.held, status.limit) == (0, 150, 1000), status
        assert status.remaining == 850

    scenario(make_store, config(), body)


def test_a_reservation_past_the_limit_names_the_budget_and_when_it_resets(
    make_store: StoreFactory,
) -> None:
    async def body(budgets: Budgets, clock: FakeClock) -> BudgetExceeded:
        await budgets.reserve(TEAM, "chat", 500, 100)
        with pytest.raises(BudgetExceeded) as caught:
            await budgets.reserve(TEAM, "chat", 500, 100)
        return caught.value

    error = scenario(make_store, config(), body)

    assert error.budget == "team:search tokens/day", error.budget
    assert (error.limit, error.spent) == (1000, 600), (error.limit, error.spent)
    assert error.resets_at == datetime(2025, 3, 11, tzinfo=UTC), error.resets_at
    assert error.retry_after == pytest.approx(12 * 3600), error.retry_after
    assert "team:search tokens/day" in str(error) and "2025-03-11 00:00 UTC" in str(
        error
    ), str(error)


def test_settling_replaces_the_estimate_by_the_real_usage(
    make_store: StoreFactory,
) -> None:
    async def body(budgets: Budgets, clock: FakeClock) -> None:
        reservation = await budgets.reserve(TEAM, "chat", 500, 400)
        await budgets.settle(reservation, Usage(100, 50))

        status = (await team_status(budgets))["team:search tokens/day"]
        assert (status.spent, status.held) == (150, 0), status
        await budgets.reserve(TEAM, "chat", 450, 400)  # 150 + 850 fits exactly

    scenario(make_store, config(), body)


def test_a_call_that_used_more_than_estimated_is_charged_in_full(
    make_store: StoreFactory,
) -> None:
    async def body(budgets: Budgets, clock: FakeClock) -> None:
        reservation = await budgets.reserve(TEAM, "chat", 50, 50)
        await budgets.settle(reservation, Usage(700, 400))

        status = (await team_status(budgets))["team:search tokens/day"]
        assert status.spent == 1100, status
        with pytest.raises(BudgetExceeded):
            await budgets.reserve(TEAM, "chat", 1, 0)

    scenario(make_store, config(), body)


def test_releasing_a_failed_call_frees_its_hold_and_charges_nothing(
    make_store: StoreFactory,
) -> None:
    async def body(budgets: Budgets, clock: FakeClock) -> None:
        reservation = await budgets.reserve(TEAM, "chat", 600, 300)
        await budgets.release(reservation)

        status = (await team_status(budgets))["team:search tokens/day"]
        assert (status.spent, status.held) == (0, 0), status
        await budgets.reserve(TEAM, "chat", 600, 300)

    scenario(make_store, config(), body)


def test_a_reservation_never_settled_stops_counting_after_its_ttl(
    make_store: StoreFactory,
) -> None:
    async def body(budgets: Budgets, clock: FakeClock) -> None:
        await budgets.reserve(TEAM, "chat", 800, 100)  # its process "dies"
        clock.advance(59)
        with pytest.raises(BudgetExceeded):
            await budgets.reserve(TEAM, "chat", 800, 100)

        clock.advance(2)

        await budgets.reserve(TEAM, "chat", 800, 100)
        status = (await team_status(budgets))["team:search tokens/day"]
        assert status.held == 900, status

    scenario(make_store, config(reservation_ttl_s=60), body)


def test_a_settle_after_the_hold_expired_still_charges_the_usage(
    make_store: StoreFactory,
) -> None:
    async def body(budgets: Budgets, clock: FakeClock) -> None:
        reservation = await budgets.reserve(TEAM, "chat", 300, 200)
        clock.advance(120)  # a very slow call, past the reservation TTL
        await budgets.reserve(TEAM, "chat", 1, 0)  # purges the expired hold

        await budgets.settle(reservation, Usage(300, 200))

        status = (await team_status(budgets))["team:search tokens/day"]
        assert (status.spent, status.held) == (500, 1), status

    # Exact holds only: with slices, the one-token probe would take a slice.
    settings = config(reservation_ttl_s=60, leases=BudgetLeasesConfig(enabled=False))
    scenario(make_store, settings, body)


def test_a_new_utc_day_starts_from_zero_while_the_month_keeps_counting(
    make_store: StoreFactory,
) -> None:
    settings = config(
        teams={"search": BudgetLimits(tokens_per_day=1000, tokens_per_month=1500)}
    )

    async def body(budgets: Budgets, clock: FakeClock) -> BudgetExceeded:
        reservation = await budgets.reserve(TEAM, "chat", 900, 100)
        await budgets.settle(reservation, Usage(900, 100))
        clock.advance(12 * 3600)  # midnight UTC

        reservation = await budgets.reserve(TEAM, "chat", 400, 100)
        await budgets.settle(reservation, Usage(400, 100))
        with pytest.raises(BudgetExceeded) as caught:
            await budgets.reserve(TEAM, "chat", 1, 0)
        return caught.value

    error = scenario(make_store, settings, body)

    assert error.budget == "team:search tokens/month", error.budget
    assert error.resets_at == datetime(2025, 4, 1, tzinfo=UTC), error.resets_at


def test_a_refused_reservation_holds_nothing_in_any_budget(
    make_store: StoreFactory,
) -> None:
    settings = config(
        teams={"search": BudgetLimits(tokens_per_day=10_000)},
        keys={"k-1": BudgetLimits(tokens_per_day=100)},
    )

    async def body(budgets: Budgets, clock: FakeClock) -> None:
        with pytest.raises(BudgetExceeded) as caught:
            await budgets.reserve(TEAM, "chat", 150, 50)

        assert caught.value.budget == "key:k-1 tokens/day", caught.value.budget
        status = await team_status(budgets)
        assert status["team:search tokens/day"].held == 0, status
        assert status["key:k-1 tokens/day"].held == 0, status

    scenario(make_store, settings, body)


def test_cost_budgets_are_priced_from_the_price_table(
    make_store: StoreFactory,
) -> None:
    # 2,000 prompt tokens at 1.0 and 1,000 completion tokens at 2.0 per
    # million: 0.004 per call, so two fit under 0.01 and a third does not.
    settings = config(teams={"search": BudgetLimits(cost_per_day=0.01)})

    async def body(budgets: Budgets, clock: FakeClock) -> BudgetExceeded:
        first = await budgets.reserve(TEAM, "chat", 2000, 1000)
        await budgets.reserve(TEAM, "chat", 2000, 1000)
        await budgets.settle(first, Usage(1000, 500))  # really cost 0.002
        await budgets.reserve(TEAM, "chat", 2000, 1000)
        with pytest.raises(BudgetExceeded) as caught:
            await budgets.reserve(TEAM, "chat", 2000, 1000)
        return caught.value

    error = scenario(make_store, settings, body)

    assert error.budget == "team:search cost/day", error.budget
    assert error.limit == pytest.approx(0.01) and error.spent == pytest.approx(0.010)
    assert "USD" in str(error), str(error)


def test_fifty_concurrent_requests_against_room_for_ten_admit_exactly_ten(
    make_store: StoreFactory,
) -> None:
    async def body(budgets: Budgets, clock: FakeClock) -> tuple[list[bool], float]:
        async def one_call() -> bool:
            try:
                reservation = await budgets.reserve(TEAM, "chat", 60, 40)
            except BudgetExceeded:
                return False
            await asyncio.sleep(0)
            await budgets.settle(reservation, Usage(60, 40))
            return True

        outcomes = await asyncio.gather(*(one_call() for _ in range(50)))
        status = (await team_status(budgets))["team:search tokens/day"]
        return outcomes, status.spent

    outcomes, spent = scenario(make_store, config(), body)

    assert sum(outcomes) == 10, f"{sum(outcomes)} of 50 admitted, room for 10"
    assert spent == 1000, f"recorded spend {spent} for a limit of 1000"


# -- slices (local leases), against every store --------------------------------------

WINDOW = "team:search tokens/day@2025-03-10"


def leased_config(limit: int = 1_000_000, **overrides: Any) -> BudgetsConfig:
    """Slices on, with reports only when a test asks (the interval is long)."""
    leases = BudgetLeasesConfig(
        fraction=0.05,
        max_requests=32,
        min_requests=4,
        report_interval_s=100,
        ttl_s=300,
    )
    values: dict[str, Any] = {"teams": {"search": BudgetLimits(tokens_per_day=limit)}}
    values["leases"] = leases
    values.update(overrides)
    return config(**values)


class CountingStore:
    """A store that counts the calls made to the real store it wraps."""

    def __init__(self, inner: BudgetStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        step = getattr(self.inner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await step(*args, **kwargs)

        return counted


def counting(make_store: StoreFactory) -> Callable[[BudgetsConfig], CountingStore]:
    return lambda settings: CountingStore(make_store(settings))


async def spend(budgets: Budgets, prompt: int = 60, completion: int = 40) -> bool:
    """One call that uses its whole estimate; false when its budget refused it."""
    try:
        reservation = await budgets.reserve(TEAM, "chat", prompt, completion)
    except BudgetExceeded:
        return False
    await budgets.settle(reservation, Usage(prompt, completion))
    return True


def test_a_slice_serves_reservations_in_memory_and_reports_their_use(
    make_store: StoreFactory,
) -> None:
    # Worst case 100 tokens: the slice is 32 of them, far below 5 % of 10**6.
    async def body(budgets: Budgets, clock: FakeClock) -> None:
        store = budgets.store
        assert isinstance(store, CountingStore)
        for _ in range(20):
            reservation = await budgets.reserve(TEAM, "chat", 60, 40)
            await budgets.settle(reservation, Usage(30, 20))  # 50 back to the slice

        assert dict(store.calls) == {"lease": 1}, store.calls
        assert budgets.slices() == {WINDOW: (3200, 1000, 0)}, budgets.slices()
        status = (await team_status(budgets))["team:search tokens/day"]
        assert (status.spent, status.held) == (1000, 3200), status

    scenario(counting(make_store), leased_config(), body)


def test_slices_shrink_near_the_limit_and_give_way_to_exact_reservations(
    make_store: StoreFactory,
) -> None:
    # A slice is at most 5 % of what remains; below 4 worst cases (400
    # tokens, so under 8,000 remaining) every request is reserved exactly.
    async def body(budgets: Budgets, clock: FakeClock) -> None:
        sizes: list[int] = []
        modes: list[bool] = []
        while True:
            try:
                reservation = await budgets.reserve(TEAM, "chat", 60, 40)
            except BudgetExceeded:
                break
            sizes += [held for held, _, _ in budgets.slices().values()]
            modes += reservation.leased
            await budgets.settle(reservation, Usage(60, 40))
        await budgets.flush()
        await budgets.flush()

        assert len(modes) == 100, f"{len(modes)} calls admitted, room for 100"
        assert modes[0] and not any(modes[-60:]), modes
        assert max(sizes) == 500 and sizes == sorted(sizes, reverse=True), sizes
        status = (await team_status(budgets))["team:search tokens/day"]
        assert (status.spent, status.held) == (10_000, 0), status

    scenario(make_store, leased_config(limit=10_000), body)


def test_close_reports_the_use_of_every_slice_and_gives_back_the_rest(
    make_store: StoreFactory,
) -> None:
    settings = leased_config()

    async def body() -> list[tuple[float, float]]:
        clock = FakeClock()
        budgets = Budgets(settings, make_store(settings), clock=clock)
        for _ in range(5):
            await spend(budgets)
        await budgets.reserve(TEAM, "chat", 60, 40)  # in flight at shutdown
        await budgets.close()

        reader = Budgets(
            config(teams=settings.teams), make_store(settings), clock=clock
        )
        seen = []
        try:
            for advance in (0, 301):
                clock.advance(advance)
                status = (await team_status(reader))["team:search tokens/day"]
                seen.append((status.spent, status.held))
        finally:
            await reader.close()
        return seen

    seen = run(body())

    # The call in flight keeps its worst case held until the slice expires.
    assert seen == [(500, 100), (500, 0)], seen


def test_the_slice_of_a_process_that_died_stops_counting_after_its_ttl(
    make_store: StoreFactory,
) -> None:
    settings = leased_config(limit=10_000)

    async def body() -> list[tuple[float, float]]:
        clock = FakeClock()
        dead_store = make_store(settings)
        dead = Budgets(settings, dead_store, clock=clock)
        await spend(dead)
        await spend(dead)  # 200 used, not reported: lost with the process
        await dead_store.close()

        survivor = Budgets(settings, make_store(settings), clock=clock)
        seen = []
        try:
            for advance in (0, 299, 2):
                clock.advance(advance)
                status = (await team_status(survivor))["team:search tokens/day"]
                seen.append((status.spent, status.held))
        finally:
            await survivor.close()
        return seen

    seen = run(body())

    assert seen == [(0, 500), (0, 500), (0, 0)], seen


def test_two_processes_sharing_a_budget_can_spend_all_of_it(
    make_store: StoreFactory,
) -> None:
    """Each refusal is followed by a report of both; two reports free every slice."""
    settings = leased_config(limit=10_000)

    async def body() -> tuple[int, list[int], Any]:
        clock = FakeClock()
        both = [Budgets(settings, make_store(settings), clock=clock) for _ in "ab"]
        reader = Budgets(
            config(teams=settings.teams), make_store(settings), clock=clock
        )
        admitted, worst, refusals = 0, [], 0
        try:
            while refusals < 3:
                outcomes = [await spend(budgets) for budgets in both]
                admitted += sum(outcomes)
                if all(outcomes):
                    refusals = 0
                else:
                    refusals += 1
                    for budgets in both:
                        await budgets.flush()
                usage = await reader.store.usage(
                    [reader._hold(reader.budgets_for(TEAM)[0], "", 0, 0, clock())],
                    now=clock(),
                )
                worst.append(sum(usage[0]))
        finally:
            for budgets in both:
                await budgets.close()
            final = (await team_status(reader))["team:search tokens/day"]
            await reader.close()
        return admitted, worst, final

    admitted, worst, final = run(body())

    assert admitted == 100, f"{admitted} calls admitted between two, room for 100"
    assert max(worst) <= 10_000, f"spent and held reached {max(worst)}"
    assert (final.spent, final.held) == (10_000, 0), final


def test_a_spent_budget_is_refused_without_asking_the_store_again(
    make_store: StoreFactory,
) -> None:
    async def body(budgets: Budgets, clock: FakeClock) -> None:
        store = budgets.store
        assert isinstance(store, CountingStore)
        await spend(budgets, 600, 400)
        assert not await spend(budgets, 1, 0)  # the store says 1,000 are spent
        calls = dict(store.calls)

        for _ in range(10):
            with pytest.raises(BudgetExceeded) as caught:
                await budgets.reserve(TEAM, "chat", 1, 0)

        assert dict(store.calls) == calls, (calls, store.calls)
        assert caught.value.spent == 1000, caught.value

    scenario(counting(make_store), config(), body)


# -- slices: the facade's own rules -----------------------------------------------------


class FlakyLeases(MemoryBudgetStore):
    """Grants slices until told to fail, as a store that went away would."""

    failing = False

    async def lease(self, *args: Any, **kwargs: Any) -> Any:
        if self.failing:
            raise CatalogError("the counter store is down")
        return await super().lease(*args, **kwargs)


def test_a_slice_not_renewed_for_half_its_ttl_is_no_longer_served_from(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = FlakyLeases()
    budgets = Budgets(leased_config(), store, clock=clock)

    async def body() -> list[tuple[bool, ...]]:
        modes = [(await budgets.reserve(TEAM, "chat", 60, 40)).leased]
        store.failing = True
        clock.advance(149)
        modes.append((await budgets.reserve(TEAM, "chat", 60, 40)).leased)
        clock.advance(1)
        modes.append((await budgets.reserve(TEAM, "chat", 60, 40)).leased)
        store.failing = False
        await budgets.close()
        return modes

    with caplog.at_level(logging.WARNING, logger="serving.gateway.budgets"):
        modes = run(body())

    assert modes == [(True,), (True,), (False,)], modes
    assert "budget slices not renewed" in caplog.text, caplog.text


def test_a_call_in_flight_in_a_slice_stops_counting_after_the_reservation_ttl() -> None:
    clock = FakeClock()
    budgets = Budgets(
        leased_config(reservation_ttl_s=60), MemoryBudgetStore(), clock=clock
    )

    async def body() -> list[tuple[int, int, int]]:
        slow = await budgets.reserve(TEAM, "chat", 60, 40)
        seen = [budgets.slices()[WINDOW]]
        clock.advance(61)
        await budgets.flush()
        seen.append(budgets.slices()[WINDOW])
        await budgets.settle(slow, Usage(60, 40))  # still charged, late
        seen.append(budgets.slices()[WINDOW])
        await budgets.close()
        return seen

    seen = run(body())

    assert [(used, in_flight) for _, used, in_flight in seen] == [
        (0, 100),
        (0, 0),
        (100, 0),
    ], seen


def test_a_stream_of_calls_renews_its_slice_before_it_runs_out() -> None:
    store = CountingStore(MemoryBudgetStore())
    budgets = Budgets(leased_config(), store, clock=FakeClock())

    async def body() -> list[bool]:
        modes: list[bool] = []
        for _ in range(200):
            reservation = await budgets.reserve(TEAM, "chat", 60, 40)
            modes += reservation.leased
            await budgets.settle(reservation, Usage(60, 40))
            await asyncio.sleep(0)  # lets a renewal in the background run
        await budgets.close()
        return modes

    modes = run(body())

    assert all(modes), f"{modes.count(False)} of 200 calls missed their slice"
    # 200 worst cases through slices of 32: a handful of renewals, no more.
    assert store.calls["lease"] <= 10, store.calls
    assert store.calls["reserve"] == 0, store.calls


def test_slices_are_reported_in_the_background_and_close_leaves_no_task() -> None:
    settings = leased_config(
        leases=BudgetLeasesConfig(report_interval_s=0.02, ttl_s=1.0)
    )
    store = MemoryBudgetStore()
    budgets = Budgets(settings, store)  # the real clock: the reporter sleeps

    async def body() -> tuple[list[int], set[asyncio.Task[Any]]]:
        await spend(budgets)
        await spend(budgets)
        reader = Budgets(config(teams=settings.teams), store)
        spent: list[int] = []
        for _ in range(500):  # up to 5 s; a report takes 20 ms
            [status] = await reader.status(TEAM)
            spent.append(int(status.spent))
            if status.spent:
                break
            await asyncio.sleep(0.01)
        await budgets.close()
        return spent, asyncio.all_tasks() - {asyncio.current_task()}

    spent, left = run(body())

    assert spent[-1] == 200, f"the slice's use never reached the store: {spent}"
    assert not left, left


class DownStore(MemoryBudgetStore):
    """A store that cannot be reached at all."""

    async def reserve(self, *args: Any, **kwargs: Any) -> Any:
        raise CatalogError("the counter store is down")

    async def lease(self, *args: Any, **kwargs: Any) -> Any:
        raise CatalogError("the counter store is down")


def test_with_slices_an_unreachable_store_still_refuses_unless_failing_open() -> None:
    closed = Budgets(leased_config(), DownStore(), clock=FakeClock())
    open_ = Budgets(leased_config(fail_open=True), DownStore(), clock=FakeClock())

    with pytest.raises(CatalogError):
        run(closed.reserve(TEAM, "chat", 60, 40))
    reservation = run(open_.reserve(TEAM, "chat", 60, 40))

    assert reservation.counted is False, reservation
    assert open_.slices() == {WINDOW: (0, 0, 0)}, open_.slices()


def test_lease_settings_must_agree() -> None:
    with pytest.raises(ValidationError, match="min_requests"):
        BudgetLeasesConfig(min_requests=8, max_requests=4)
    with pytest.raises(ValidationError, match="three"):
        BudgetLeasesConfig(report_interval_s=10, ttl_s=20)


# -- the facade --------------------------------------------------------------------


def memory_budgets(settings: BudgetsConfig, clock: FakeClock | None = None) -> Budgets:
    return Budgets(settings, MemoryBudgetStore(), clock=clock or FakeClock())


def test_listed_keys_use_their_own_limits_and_others_the_default() -> None:
    budgets = memory_budgets(
        config(
            teams={},
            keys={"vip": BudgetLimits(tokens_per_month=10**9)},
            default_key=BudgetLimits(tokens_per_day=1000, cost_per_month=5),
        )
    )

    vip = budgets.budgets_for(Subjects(key_id="vip"))
    other = budgets.budgets_for(Subjects(key_id="k-2", team="unlisted"))

    assert [b.name for b in vip] == ["key:vip tokens/month"], vip
    assert [b.name for b in other] == ["key:k-2 tokens/day", "key:k-2 cost/month"]


def test_a_request_without_applicable_budgets_is_never_refused() -> None:
    budgets = memory_budgets(config(teams={}))

    reservation = run(budgets.reserve(Subjects(key_id="k-9"), "chat", 10**9, 10**9))

    assert reservation.holds == (), reservation


def test_a_request_larger_than_the_whole_budget_says_to_ask_for_less() -> None:
    budgets = memory_budgets(config())

    with pytest.raises(BudgetExceeded) as caught:
        run(budgets.reserve(TEAM, "chat", 900, 512))

    assert caught.value.retry_after is None, caught.value.retry_after
    assert "max_tokens" in str(caught.value), str(caught.value)


def test_a_cost_budget_refuses_a_model_without_a_price() -> None:
    budgets = memory_budgets(config(teams={"search": BudgetLimits(cost_per_day=1)}))

    with pytest.raises(ConfigError, match=r"budgets\.prices"):
        run(budgets.reserve(TEAM, "unpriced-model", 10, 10))


def test_a_fallback_model_is_charged_at_its_own_price() -> None:
    settings = config(
        teams={"search": BudgetLimits(cost_per_day=1)},
        prices={
            "chat": ModelPrice(input_per_million=1, output_per_million=1),
            "big": ModelPrice(input_per_million=100, output_per_million=100),
        },
    )
    budgets = memory_budgets(settings)

    async def body() -> float:
        reservation = await budgets.reserve(TEAM, "chat", 1000, 1000)
        await budgets.settle(reservation, Usage(1000, 1000), model="big")
        return (await team_status(budgets))["team:search cost/day"].spent

    assert run(body()) == pytest.approx(0.2)


def test_settling_twice_charges_once() -> None:
    budgets = memory_budgets(config())

    async def body() -> float:
        reservation = await budgets.reserve(TEAM, "chat", 100, 100)
        await budgets.settle(reservation, Usage(100, 100))
        await budgets.settle(reservation, Usage(100, 100))
        await budgets.release(reservation)
        return (await team_status(budgets))["team:search tokens/day"].spent

    assert run(body()) == 200


def test_disabled_budgets_hold_nothing() -> None:
    budgets = memory_budgets(config(enabled=False))

    reservation = run(budgets.reserve(TEAM, "chat", 10**6, 10**6))

    assert reservation.holds == ()


class BrokenStore(MemoryBudgetStore):
    async def reserve(self, *args: Any, **kwargs: Any) -> Any:
        raise CatalogError("the counter store is down")


def test_an_unreachable_store_refuses_requests_unless_failing_open() -> None:
    closed = Budgets(config(), BrokenStore(), clock=FakeClock())
    open_ = Budgets(config(fail_open=True), BrokenStore(), clock=FakeClock())

    with pytest.raises(CatalogError):
        run(closed.reserve(TEAM, "chat", 10, 10))
    reservation = run(open_.reserve(TEAM, "chat", 10, 10))

    assert reservation.counted is False, reservation


def test_a_store_outage_is_logged_once_per_interval_not_once_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    throttle = WarningThrottle(10.0, clock=clock)
    log = logging.getLogger("serving.gateway.budgets")

    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(5):
            throttle.warning(log, "store unreachable")
        clock.advance(10)
        throttle.warning(log, "store unreachable")

    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["store unreachable held_back=0", "store unreachable held_back=4"]


def test_an_unreachable_redis_is_reported_without_its_password() -> None:
    async def body() -> None:
        store = RedisBudgetStore(
            "redis://:hunter2-secret@127.0.0.1:1/0", key_prefix="x:", timeout_s=0.2
        )
        try:
            await Budgets(config(), store, clock=FakeClock()).reserve(
                TEAM, "chat", 1, 1
            )
        finally:
            await store.close()

    with pytest.raises(CatalogError) as caught:
        run(body())

    assert "hunter2-secret" not in str(caught.value), str(caught.value)
    assert "budgets.redis_url" in str(caught.value), str(caught.value)


def test_settings_reject_unknown_keys_and_non_positive_limits() -> None:
    with pytest.raises(ValidationError):
        BudgetLimits(tokens_per_day=0)
    with pytest.raises(ValidationError):
        BudgetsConfig.model_validate({"teams": {"a": {"tokens_per_week": 5}}})


def test_periods_are_utc_calendar_days_and_months() -> None:
    late = datetime(2024, 12, 31, 23, 30, tzinfo=UTC)

    assert period_window("day", late) == (
        "2024-12-31",
        datetime(2025, 1, 1, tzinfo=UTC),
    )
    assert period_window("month", late) == ("2024-12", datetime(2025, 1, 1, tzinfo=UTC))
    assert period_window("month", datetime(2024, 2, 10, tzinfo=UTC))[1] == datetime(
        2024, 3, 1, tzinfo=UTC
    )


# -- two OS processes sharing one store -------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from serving.gateway.budgets import (
        BudgetLimits, Budgets, BudgetsConfig, RedisBudgetStore, SqlBudgetStore,
        Subjects,
    )
    from serving.gateway.providers import Usage

    kind, target, ready, go, mode = sys.argv[1:6]

    async def main():
        settings = BudgetsConfig(teams={"search": BudgetLimits(tokens_per_day=1000)})
        if mode == "drain":
            settings = BudgetsConfig.model_validate({
                "teams": {"search": {"tokens_per_day": DRAINED}},
                "leases": {"report_interval_s": 0.1, "ttl_s": 1.0},
            })
        if kind == "sqlite":
            store = SqlBudgetStore(target)
        else:
            store = RedisBudgetStore("redis://127.0.0.1:6379/0", key_prefix=target)
        budgets = Budgets(settings, store, clock=lambda: 1741608000.0)
        subjects = Subjects(key_id="k-1", team="search")
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.01)

        async def one_call():
            try:
                reservation = await budgets.reserve(subjects, "chat", 60, 40)
            except Exception as err:
                if type(err).__name__ == "BudgetExceeded":
                    return False
                raise
            await budgets.settle(reservation, Usage(60, 40))
            return True

        async def drain():
            # Calls until refused for two seconds in a row: long enough for
            # the other process to report, or to give its slices back.
            admitted, refused = 0, 0
            while refused < 40:
                if await one_call():
                    admitted, refused = admitted + 1, 0
                else:
                    refused += 1
                    await asyncio.sleep(0.05)
            return admitted

        if mode == "drain":
            outcomes = await asyncio.gather(*(drain() for _ in range(8)))
        else:
            outcomes = await asyncio.gather(*(one_call() for _ in range(25)))
        await budgets.close()
        print(json.dumps({"admitted": sum(outcomes)}))

    asyncio.run(main())
    """
)


DRAINED = 300_000  # tokens: 3,000 calls of 100


def run_two_processes(
    kind: str, target: str, tmp_path: Path, mode: str = "burst"
) -> int:
    """Starts two processes calling at once; returns the calls admitted.

    A ``burst`` is 25 calls per process against a budget of 10; a ``drain``
    is 8 tasks per process calling until a budget of 3,000 calls is spent,
    through slices.
    """
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"DRAINED = {DRAINED}\n{CHILD}",
                kind,
                target,
                str(ready[i]),
                str(go),
                mode,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        if time.monotonic() > deadline or any(c.poll() is not None for c in children):
            break
        time.sleep(0.05)
    go.touch()
    admitted = 0
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, f"child failed:\n{err}"
        admitted += json.loads(out.strip().splitlines()[-1])["admitted"]
    return admitted


async def spent_today(store: BudgetStore, limit: int = 1000) -> float:
    budgets = Budgets(
        BudgetsConfig(teams={"search": BudgetLimits(tokens_per_day=limit)}),
        store,
        clock=lambda: 1741608000.0,
    )
    try:
        [status] = await budgets.status(Subjects(team="search"))
        return status.spent + status.held
    finally:
        await budgets.close()


@pytest.mark.slow
def test_two_processes_sharing_one_sqlite_file_never_overspend(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    run(SqlBudgetStore(url).close())  # create the tables before the race

    admitted = run_two_processes("sqlite", url, tmp_path)

    assert admitted == 10, f"{admitted} of 50 admitted across processes, room for 10"
    assert run(spent_today(SqlBudgetStore(url))) == 1000


@pytest.mark.slow
def test_two_processes_sharing_redis_never_overspend(
    tmp_path: Path, redis_prefix: str
) -> None:
    admitted = run_two_processes("redis", redis_prefix, tmp_path)

    assert admitted == 10, f"{admitted} of 50 admitted across processes, room for 10"
    used = run(spent_today(RedisBudgetStore(REDIS_URL, key_prefix=redis_prefix)))
    assert used == 1000, used


@pytest.mark.slow
def test_two_processes_on_one_sqlite_file_spend_the_whole_budget_through_slices(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    run(SqlBudgetStore(url).close())

    admitted = run_two_processes("sqlite", url, tmp_path, "drain")

    assert admitted == DRAINED // 100, f"{admitted} calls admitted, room for 3,000"
    assert run(spent_today(SqlBudgetStore(url), DRAINED)) == DRAINED


@pytest.mark.slow
def test_two_processes_on_redis_spend_the_whole_budget_through_slices(
    tmp_path: Path, redis_prefix: str
) -> None:
    admitted = run_two_processes("redis", redis_prefix, tmp_path, "drain")

    assert admitted == DRAINED // 100, f"{admitted} calls admitted, room for 3,000"
    store = RedisBudgetStore(REDIS_URL, key_prefix=redis_prefix)
    assert run(spent_today(store, DRAINED)) == DRAINED


def test_redis_keys_expire_after_their_period(redis_prefix: str) -> None:
    async def body() -> None:
        store = RedisBudgetStore(REDIS_URL, key_prefix=redis_prefix, ttl_s=60)
        budgets = Budgets(config(), store, clock=FakeClock())
        reservation = await budgets.reserve(TEAM, "chat", 10, 10)
        await budgets.settle(reservation, Usage(10, 10))
        await budgets.close()

    run(body())

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{redis_prefix}*"))
    ttls = [client.ttl(k) for k in keys]
    client.close()
    # 12 hours to the end of the day plus the reservation TTL.
    assert keys and all(0 < t <= 12 * 3600 + 60 for t in ttls), ttls
    assert max(ttls) > 12 * 3600 - 60, ttls


def test_the_sql_store_serialises_with_begin_immediate_on_sqlite(
    tmp_path: Path,
) -> None:
    store = SqlBudgetStore(f"sqlite:///{tmp_path / 'catalog.db'}")
    statements: list[str] = []

    import sqlalchemy as sa

    sa.event.listen(
        store._engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *rest: statements.append(statement),
    )
    budgets = Budgets(config(), store, clock=FakeClock())

    async def body() -> None:
        await budgets.reserve(TEAM, "chat", 1, 1)
        await budgets.close()

    run(body())

    assert statements and statements[0] == "BEGIN IMMEDIATE", statements[:3]


def test_a_midnight_settle_is_charged_to_the_day_it_was_reserved_in(
    tmp_path: Path,
) -> None:
    async def body() -> tuple[float, float]:
        clock = FakeClock(START.replace(hour=23, minute=59))
        budgets = Budgets(config(), MemoryBudgetStore(), clock=clock)
        reservation = await budgets.reserve(TEAM, "chat", 100, 100)
        clock.advance(120)
        await budgets.settle(reservation, Usage(100, 100))
        today = (await team_status(budgets))["team:search tokens/day"].spent
        clock.now = (START - timedelta(hours=1)).timestamp()
        yesterday = (await team_status(budgets))["team:search tokens/day"].spent
        return today, yesterday

    today, reserved_day = run(body())

    assert (today, reserved_day) == (0, 200), (today, reserved_day)
