"""The loop guard: fingerprints, and one contract for the memory and Redis stores.

Redis tests use the server at 127.0.0.1:6379 under a random key prefix,
deleted afterwards; a fake clock moves time without waiting.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from ingestion.errors import CatalogError, LoopDetected
from serving.gateway.loopguard import (
    LoopGuard,
    LoopGuardConfig,
    LoopStore,
    MemoryLoopStore,
    RedisLoopStore,
    fingerprint,
)

from ._support import REDIS_URL, FakeClock, run

T = TypeVar("T")

BODY = {"question": "How do I reset my password?", "collection": "docs", "top_k": 5}


StoreFactory = Callable[[], LoopStore]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    if request.param == "memory":
        return MemoryLoopStore
    prefix = request.getfixturevalue("redis_prefix")
    return lambda: RedisLoopStore(REDIS_URL, key_prefix=prefix)


def scenario(
    make_store: StoreFactory,
    body: Callable[[LoopGuard, FakeClock], Awaitable[T]],
    **settings: Any,
) -> T:
    async def main() -> T:
        clock = FakeClock()
        config = LoopGuardConfig(**{"max_repeats": 3, "window_s": 10, **settings})
        guard = LoopGuard(config, make_store(), clock=clock)
        try:
            return await body(guard, clock)
        finally:
            await guard.close()

    return run(main())


# -- fingerprints --------------------------------------------------------------------


def test_fingerprints_ignore_key_order_whitespace_and_ignored_fields() -> None:
    same = {
        "top_k": 5,
        "collection": "docs",
        "question": "  How do I reset\n my   password? ",
        "stream": True,
        "request_id": "r-2",
    }

    assert fingerprint("/ask", same, ("stream", "request_id")) == fingerprint(
        "/ask", BODY, ("stream", "request_id")
    )


def test_fingerprints_differ_by_route_and_by_content() -> None:
    base = fingerprint("/ask", BODY)

    assert fingerprint("/search", BODY) != base
    assert fingerprint("/ask", {**BODY, "top_k": 6}) != base
    assert fingerprint("/ask", {**BODY, "question": "How do I reset my PIN?"}) != base


def test_ignored_fields_are_dropped_at_every_depth() -> None:
    chat = {"messages": [{"role": "user", "content": "hi", "request_id": "a"}]}
    again = {"messages": [{"role": "user", "content": "hi", "request_id": "b"}]}

    assert fingerprint("/v1/chat/completions", chat, ("request_id",)) == fingerprint(
        "/v1/chat/completions", again, ("request_id",)
    )


# -- the contract of both stores ---------------------------------------------------


def test_the_same_request_more_than_n_times_in_the_window_is_refused(
    make_store: StoreFactory,
) -> None:
    async def body(guard: LoopGuard, clock: FakeClock) -> LoopDetected:
        for _ in range(3):
            await guard.check("k-1", "/ask", BODY)
            clock.advance(1)
        with pytest.raises(LoopDetected) as caught:
            await guard.check("k-1", "/ask", BODY)
        return caught.value

    error = scenario(make_store, body)

    # The first of the three came at t=0 and leaves the 10 s window at t=10.
    assert error.retry_after == pytest.approx(7.0, abs=0.01), error.retry_after
    assert "/ask" in str(error) and "3 times within 10 s" in str(error), str(error)


def test_waiting_as_told_admits_the_request_again(make_store: StoreFactory) -> None:
    async def body(guard: LoopGuard, clock: FakeClock) -> None:
        for _ in range(3):
            await guard.check("k-1", "/ask", BODY)
        for _ in range(5):  # refused attempts do not count
            with pytest.raises(LoopDetected):
                await guard.check("k-1", "/ask", BODY)
            clock.advance(1)

        clock.advance(5)

        await guard.check("k-1", "/ask", BODY)

    scenario(make_store, body)


def test_other_keys_and_other_requests_are_counted_apart(
    make_store: StoreFactory,
) -> None:
    async def body(guard: LoopGuard, clock: FakeClock) -> None:
        for _ in range(3):
            await guard.check("k-1", "/ask", BODY)

        await guard.check("k-2", "/ask", BODY)
        await guard.check("k-1", "/ask", {**BODY, "question": "What is the VPN?"})
        await guard.check("k-1", "/search", BODY)

    scenario(make_store, body)


def test_anonymous_callers_share_one_count(make_store: StoreFactory) -> None:
    async def body(guard: LoopGuard, clock: FakeClock) -> None:
        for _ in range(3):
            await guard.check(None, "/ask", BODY)
        with pytest.raises(LoopDetected):
            await guard.check(None, "/ask", BODY)

    scenario(make_store, body)


def test_a_disabled_guard_lets_every_repeat_through(make_store: StoreFactory) -> None:
    async def body(guard: LoopGuard, clock: FakeClock) -> None:
        for _ in range(20):
            await guard.check("k-1", "/ask", BODY)

    scenario(make_store, body, enabled=False)


# -- store specifics ---------------------------------------------------------------


def test_the_memory_store_forgets_the_least_recently_seen_first() -> None:
    store = MemoryLoopStore(max_tracked=2)

    async def body() -> None:
        async def hit(key: str) -> float | None:
            return await store.hit(key, now=0.0, window_s=60, max_repeats=1)

        await hit("a")
        await hit("b")
        assert await hit("a") is not None, "a is still tracked"
        await hit("c")  # b was seen least recently and is forgotten

        assert await hit("a") is not None, "a was seen after b and is kept"
        assert await hit("b") is None, "b was forgotten"

    run(body())


def test_redis_uses_its_own_clock_when_none_is_given(redis_prefix: str) -> None:
    async def body() -> float | None:
        config = LoopGuardConfig(max_repeats=2, window_s=30)
        guard = LoopGuard(config, RedisLoopStore(REDIS_URL, key_prefix=redis_prefix))
        try:
            await guard.check("k-1", "/ask", BODY)
            await guard.check("k-1", "/ask", BODY)
            with pytest.raises(LoopDetected) as caught:
                await guard.check("k-1", "/ask", BODY)
            return caught.value.retry_after
        finally:
            await guard.close()

    retry_after = run(body())

    assert retry_after is not None and 0 < retry_after <= 30, retry_after


def test_an_unreachable_redis_admits_unless_told_to_fail_closed() -> None:
    async def body(fail_open: bool) -> None:
        store = RedisLoopStore("redis://127.0.0.1:1/0", timeout_s=0.2)
        guard = LoopGuard(LoopGuardConfig(fail_open=fail_open), store)
        try:
            await guard.check("k-1", "/ask", BODY)
        finally:
            await guard.close()

    run(body(True))
    with pytest.raises(CatalogError, match=r"loop_guard\.redis_url"):
        run(body(False))
