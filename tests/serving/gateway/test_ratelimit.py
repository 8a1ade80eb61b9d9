"""Rate limits: both stores keep one contract, and Redis shares one allowance
between processes.

Redis tests use the server at 127.0.0.1:6379 under a random key prefix,
deleted afterwards; a fake clock moves time without waiting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ingestion.errors import CatalogError, RateLimited
from serving.gateway.budgets import Subjects
from serving.gateway.ratelimit import (
    MemoryRateStore,
    RateLimit,
    RateLimiter,
    RateLimitsConfig,
    RateStore,
    RedisRateStore,
)
from tests.conftest import REPO

from ._support import REDIS_URL, FakeClock, run

T = TypeVar("T")

KEY = Subjects(key_id="k-1", team="search")


StoreFactory = Callable[[], RateStore]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    if request.param == "memory":
        return MemoryRateStore
    prefix = request.getfixturevalue("redis_prefix")
    return lambda: RedisRateStore(REDIS_URL, key_prefix=prefix)


def limits(**overrides: Any) -> RateLimitsConfig:
    values: dict[str, Any] = {
        "keys": {"k-1": RateLimit(requests_per_minute=5, tokens_per_minute=1000)}
    }
    values.update(overrides)
    return RateLimitsConfig(**values)


def scenario(
    make_store: StoreFactory,
    settings: RateLimitsConfig,
    body: Callable[[RateLimiter, FakeClock], Awaitable[T]],
) -> T:
    async def main() -> T:
        clock = FakeClock()
        limiter = RateLimiter(settings, make_store(), clock=clock)
        try:
            return await body(limiter, clock)
        finally:
            await limiter.close()

    return run(main())


# -- the contract of both stores ---------------------------------------------------


def test_a_key_gets_its_requests_per_minute_then_waits_for_one_to_refill(
    make_store: StoreFactory,
) -> None:
    async def body(limiter: RateLimiter, clock: FakeClock) -> None:
        for _ in range(5):
            await limiter.acquire(KEY)
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire(KEY)
        assert caught.value.retry_after == pytest.approx(12.0, abs=0.01)
        assert "key:k-1 requests/minute" in str(caught.value), str(caught.value)

        clock.advance(12.0)
        await limiter.acquire(KEY)
        with pytest.raises(RateLimited):
            await limiter.acquire(KEY)

    scenario(make_store, limits(), body)


def test_tokens_per_minute_count_the_estimate_before_the_call(
    make_store: StoreFactory,
) -> None:
    async def body(limiter: RateLimiter, clock: FakeClock) -> float | None:
        await limiter.acquire(KEY, tokens=600)
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire(KEY, tokens=600)
        return caught.value.retry_after

    retry_after = scenario(make_store, limits(), body)

    # 1,200 tokens against 1,000 a minute: 200 tokens, 12 s, too early.
    assert retry_after == pytest.approx(12.0, abs=0.01), retry_after


def test_tokens_used_beyond_the_estimate_put_the_key_in_debt(
    make_store: StoreFactory,
) -> None:
    async def body(limiter: RateLimiter, clock: FakeClock) -> float | None:
        await limiter.acquire(KEY, tokens=100)
        await limiter.add_tokens(KEY, 2000)
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire(KEY)
        clock.advance(caught.value.retry_after or 0)
        await limiter.acquire(KEY)
        return caught.value.retry_after

    retry_after = scenario(make_store, limits(), body)

    # 2,100 tokens against 1,000 a minute: the bucket is 66 s past full.
    assert retry_after == pytest.approx(66.0, abs=0.01), retry_after


def test_tokens_estimated_but_not_used_are_given_back(
    make_store: StoreFactory,
) -> None:
    async def body(limiter: RateLimiter, clock: FakeClock) -> None:
        await limiter.acquire(KEY, tokens=900)
        await limiter.add_tokens(KEY, -800)  # the call used only 100

        await limiter.acquire(KEY, tokens=900)
        with pytest.raises(RateLimited):
            await limiter.acquire(KEY, tokens=1)

    scenario(make_store, limits(), body)


def test_a_refused_request_takes_nothing_from_any_bucket(
    make_store: StoreFactory,
) -> None:
    settings = limits(
        keys={"k-1": RateLimit(requests_per_minute=3)},
        teams={"search": RateLimit(requests_per_minute=2)},
    )

    async def body(limiter: RateLimiter, clock: FakeClock) -> None:
        await limiter.acquire(KEY)
        await limiter.acquire(KEY)
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire(KEY)
        assert "team:search" in str(caught.value), str(caught.value)

        # The key's third request is still there, in another team.
        await limiter.acquire(Subjects(key_id="k-1", team="other"))

    scenario(make_store, settings, body)


def test_a_request_larger_than_a_minutes_tokens_is_refused_for_good(
    make_store: StoreFactory,
) -> None:
    async def body(limiter: RateLimiter, clock: FakeClock) -> RateLimited:
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire(KEY, tokens=5000)
        await limiter.acquire(KEY, tokens=10)  # nothing was taken
        return caught.value

    error = scenario(make_store, limits(), body)

    assert error.retry_after is None, error.retry_after
    assert "shorten the prompt" in str(error), str(error)


def test_keys_and_teams_without_limits_are_never_limited(
    make_store: StoreFactory,
) -> None:
    async def body(limiter: RateLimiter, clock: FakeClock) -> None:
        for _ in range(100):
            await limiter.acquire(Subjects(key_id="k-2", team="other"), tokens=10**6)

    scenario(make_store, limits(), body)


def test_the_default_limits_apply_to_each_unlisted_key_separately(
    make_store: StoreFactory,
) -> None:
    settings = limits(default_key=RateLimit(requests_per_minute=1))

    async def body(limiter: RateLimiter, clock: FakeClock) -> None:
        await limiter.acquire(Subjects(key_id="a"))
        await limiter.acquire(Subjects(key_id="b"))
        with pytest.raises(RateLimited):
            await limiter.acquire(Subjects(key_id="a"))

    scenario(make_store, settings, body)


# -- Redis specifics ---------------------------------------------------------------


def test_redis_uses_its_own_clock_when_none_is_given(redis_prefix: str) -> None:
    async def body() -> float | None:
        limiter = RateLimiter(
            limits(keys={"k-1": RateLimit(requests_per_minute=3)}),
            RedisRateStore(REDIS_URL, key_prefix=redis_prefix),
        )
        try:
            for _ in range(3):
                await limiter.acquire(KEY)
            with pytest.raises(RateLimited) as caught:
                await limiter.acquire(KEY)
            return caught.value.retry_after
        finally:
            await limiter.close()

    retry_after = run(body())

    assert retry_after is not None and 0 < retry_after <= 20, retry_after


def test_an_unreachable_redis_admits_unless_told_to_fail_closed() -> None:
    async def body(fail_open: bool) -> None:
        store = RedisRateStore("redis://127.0.0.1:1/0", timeout_s=0.2)
        limiter = RateLimiter(limits(fail_open=fail_open), store)
        try:
            await limiter.acquire(KEY)
        finally:
            await limiter.close()

    run(body(True))
    with pytest.raises(CatalogError, match=r"rate_limits\.redis_url"):
        run(body(False))


def test_disabled_rate_limits_admit_everything() -> None:
    limiter = RateLimiter(limits(enabled=False), MemoryRateStore(), clock=FakeClock())

    async def body() -> None:
        for _ in range(50):
            await limiter.acquire(KEY, tokens=10**6)

    run(body())


CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from serving.gateway.budgets import Subjects
    from serving.gateway.ratelimit import (
        RateLimit, RateLimiter, RateLimitsConfig, RedisRateStore,
    )

    prefix, ready, go = sys.argv[1:4]

    async def main():
        settings = RateLimitsConfig(keys={"k-1": RateLimit(requests_per_minute=20)})
        # Both processes read one frozen clock, so the whole test lies in one
        # instant and no request refills, however slowly the machine runs.
        limiter = RateLimiter(
            settings,
            RedisRateStore("redis://127.0.0.1:6379/0", key_prefix=prefix),
            clock=lambda: 1741608000.0,
        )
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.01)
        admitted = 0
        for _ in range(100):
            try:
                await limiter.acquire(Subjects(key_id="k-1"))
                admitted += 1
            except Exception as err:
                if type(err).__name__ != "RateLimited":
                    raise
        await limiter.close()
        print(json.dumps({"admitted": admitted}))

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_two_processes_sharing_redis_admit_the_limit_once_not_twice(
    tmp_path: Path, redis_prefix: str
) -> None:
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, redis_prefix, str(r), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        if time.monotonic() > deadline or any(c.poll() is not None for c in children):
            break
        time.sleep(0.05)
    go.touch()

    admitted = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, f"child failed:\n{err}"
        admitted.append(json.loads(out.strip().splitlines()[-1])["admitted"])

    assert sum(admitted) == 20, f"admitted {admitted}, limit 20 per minute in total"
