"""Helpers shared by the gateway's tests of counters kept in memory and in Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

REDIS_URL = "redis://127.0.0.1:6379/0"


class FakeClock:
    """Time in seconds that moves only when told."""

    def __init__(self, start: float = 1_741_608_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]
