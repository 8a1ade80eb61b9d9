"""Failover of the routing core between two real llama.cpp servers.

Two ``llama_cpp.server`` processes serve one virtual model under the priority
policy: ``primary`` first, ``secondary`` as its fallback, each behind an
:class:`~serving.gateway.openai_compat.OpenAICompatibleProvider`. While
traffic flows, the primary is killed with SIGKILL, as a crash would end it,
and later started again on the same port. The tests check what a client and
an operator see: no request fails, the primary's breaker opens while the
secondary answers, and once the primary is back its breaker half-opens and
closes, and the primary answers again.

Nothing here depends on how fast the machine is. Traffic is numbered and
held at gates until the phase before it has happened (the kill, the breaker
opening, the recovery), every wait is for a condition with a generous limit,
and no latency is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field

import httpx
import pytest

from ingestion.errors import RaglineError
from serving.gateway.breaker import BreakerConfig, BreakerState
from serving.gateway.openai_compat import (
    OpenAICompatibleConfig,
    OpenAICompatibleProvider,
)
from serving.gateway.providers import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    TokenDelta,
)
from serving.gateway.routing import (
    HealthCheckConfig,
    Router,
    RouterConfig,
    TargetConfig,
    TargetStatus,
    VirtualModelConfig,
)
from tests.serving.gateway.conftest import LLAMA_MODEL_ALIAS, LlamaServer

MODEL = "chat"
PRIMARY = "primary"
SECONDARY = "secondary"

TOTAL_REQUESTS = 200
IN_FLIGHT = 6
KILL_AFTER = 20
"""Answered requests before the primary is killed."""
# Gates: requests from these numbers on wait until the phase named has happened.
AFTER_KILL = 50
AFTER_BREAKER_OPENED = 100
AFTER_RECOVERY = 150

STREAMS_AT_KILL = 6
STREAMS_PER_PHASE = 6

CONDITION_TIMEOUT = 240.0
"""Seconds to wait for any one phase; far beyond what a loaded machine needs."""

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
FAILED = ("error", "timeout")
"""Outcomes of an attempt that reached a target and failed."""

Change = tuple[str, BreakerState, BreakerState]
Route = list[tuple[str, str]]


# -- the servers and the router ------------------------------------------------------


@pytest.fixture(scope="module")
def server_pair(
    llama_server_factory: Callable[..., LlamaServer],
) -> Iterator[tuple[LlamaServer, LlamaServer]]:
    """The primary and secondary servers, stopped when the module's tests end."""
    primary = llama_server_factory()
    try:
        secondary = llama_server_factory()
    except BaseException:
        primary.stop()
        raise
    try:
        yield primary, secondary
    finally:
        primary.stop()
        secondary.stop()


@pytest.fixture
def servers(
    server_pair: tuple[LlamaServer, LlamaServer],
) -> tuple[LlamaServer, LlamaServer]:
    """Both servers, running: a test that failed half-way may have left one down."""
    for server in server_pair:
        server.start()
    return server_pair


def provider_for(name: str, server: LlamaServer) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(
        OpenAICompatibleConfig(
            name=name,
            base_url=server.base_url,
            model=LLAMA_MODEL_ALIAS,
            context_window=2048,
            max_tokens=4,
            connect_timeout=5.0,
            first_token_timeout=60.0,
            total_timeout=120.0,
            # The llama.cpp server answers its model list only between two
            # generations, so a probe may wait behind a few of them.
            health_timeout=20.0,
            trust_env=False,
        )
    )


def failover_router(
    primary: LlamaServer, secondary: LlamaServer, changes: list[Change]
) -> Router:
    """The primary first, the secondary as fallback, probed five times a second."""
    config = RouterConfig(
        models=(
            VirtualModelConfig(
                name=MODEL,
                policy="priority",
                targets=(
                    TargetConfig(target=PRIMARY, priority=0),
                    TargetConfig(target=SECONDARY, priority=1),
                ),
                retries=1,
                backoff_base=0.05,
                backoff_max=0.2,
                timeout=180.0,
            ),
        ),
        breaker=BreakerConfig(
            failure_rate=0.5, window=10, min_requests=5, cooldown=1.0
        ),
        health_check=HealthCheckConfig(interval=0.2, timeout=20.0),
    )
    return Router(
        config,
        {
            PRIMARY: provider_for(PRIMARY, primary),
            SECONDARY: provider_for(SECONDARY, secondary),
        },
        rng=random.Random(1234),
        on_breaker_change=lambda *change: changes.append(change),
    )


def question(number: int) -> GenerationRequest:
    return GenerationRequest(
        [ChatMessage("user", f"Name one colour. (request {number})")],
        model=MODEL,
        max_tokens=4,
        metadata={"request_id": f"failover-{number}"},
    )


# -- observing -------------------------------------------------------------------------


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Waits until ``condition()`` holds; fails naming ``what`` if it never does."""
    deadline = time.monotonic() + CONDITION_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"Waited {CONDITION_TIMEOUT:g} s for {what}, in vain.")
        await asyncio.sleep(0.05)


def route(result: GenerationResult) -> Route:
    """The targets a request tried, in order, with what happened at each."""
    return [(a.target, a.outcome) for a in result.attempts]


def failed_over_in_flight(result: GenerationResult) -> bool:
    """The primary was called and failed; the secondary answered."""
    (first_target, first_outcome), last = route(result)[0], route(result)[-1]
    return (
        first_target == PRIMARY
        and first_outcome in FAILED
        and last == (SECONDARY, "ok")
    )


def skipped_open_primary(result: GenerationResult) -> bool:
    """The primary's breaker was open, so the secondary answered without a call."""
    return route(result) == [(PRIMARY, "breaker_open"), (SECONDARY, "ok")]


def changes_of(changes: list[Change], target: str) -> list[tuple[str, str]]:
    return [(old.value, new.value) for name, old, new in changes if name == target]


def closed_again(changes: list[Change]) -> bool:
    """The primary's breaker opened, then closed again after a trial call."""
    primary = changes_of(changes, PRIMARY)
    return ("closed", "open") in primary and primary[-1] == ("half_open", "closed")


def status_of(router: Router, target: str) -> TargetStatus:
    return next(s for s in router.status() if s.name == target)


def describe_failures(failures: dict[int, BaseException]) -> str:
    return "; ".join(f"#{n}: {type(e).__name__}: {e}" for n, e in failures.items())


# -- numbered traffic --------------------------------------------------------------------


@dataclass
class Traffic:
    """Requests numbered from 0, sent by a few workers, held at gates.

    A request waits at every gate whose number it has reached until that gate
    is opened; requests that fail are kept with their error, so the run goes on.
    """

    router: Router
    total: int
    gates: dict[int, asyncio.Event]
    results: dict[int, GenerationResult] = field(default_factory=dict)
    failures: dict[int, BaseException] = field(default_factory=dict)
    answered: list[int] = field(default_factory=list)

    @classmethod
    def gated_at(cls, router: Router, total: int, *gates: int) -> Traffic:
        return cls(router, total, {gate: asyncio.Event() for gate in gates})

    def open_gate(self, gate: int) -> None:
        self.gates[gate].set()

    @contextlib.asynccontextmanager
    async def running(self, workers: int) -> AsyncIterator[Traffic]:
        """Sends the requests while the body runs, and until all have returned."""
        numbers = iter(range(self.total))
        tasks = [asyncio.create_task(self._work(numbers)) for _ in range(workers)]
        try:
            yield self
            async with asyncio.timeout(CONDITION_TIMEOUT):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _work(self, numbers: Iterator[int]) -> None:
        for number in numbers:  # shared by the workers: each number is sent once
            for gate, opened in self.gates.items():
                if number >= gate:
                    await opened.wait()
            try:
                self.results[number] = await self.router.generate(question(number))
            except (RaglineError, OSError) as err:  # kept; the run goes on
                self.failures[number] = err
            self.answered.append(number)


# -- streams -------------------------------------------------------------------------------


async def read_stream(router: Router, number: int) -> tuple[str, GenerationResult]:
    """The text of a stream's deltas, joined, and its final result."""
    pieces: list[str] = []
    result: GenerationResult | None = None
    async with aclosing(router.stream(question(number))) as events:
        async for event in events:
            if isinstance(event, TokenDelta):
                pieces.append(event.text)
            else:
                result = event
    assert result is not None, f"stream #{number} ended without a result"
    return "".join(pieces), result


async def read_streams(
    router: Router, numbers: range
) -> list[tuple[str, GenerationResult]]:
    return list(await asyncio.gather(*(read_stream(router, n) for n in numbers)))


async def hold_busy(server: LlamaServer, started: asyncio.Event) -> bool:
    """Streams a long answer straight from ``server``, keeping its model busy.

    The server runs one generation at a time, so requests sent meanwhile wait
    behind this one without receiving a token. Returns True if the answer
    ended, False if the server went away first.
    """
    body = {
        "model": LLAMA_MODEL_ALIAS,
        "messages": [{"role": "user", "content": "Count from one to a thousand."}],
        "max_tokens": 1500,
        "temperature": 0.0,
        "stream": True,
        "logit_bias": {"0": -100.0, "2": -100.0},  # never end the answer early
    }
    timeout = httpx.Timeout(120.0, connect=5.0)
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            url = f"{server.base_url}/chat/completions"
            async with client.stream("POST", url, json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        started.set()
    except httpx.HTTPError:
        return False
    return True


# -- the tests -------------------------------------------------------------------------------


@dataclass
class FailoverRun:
    """What the failover run observed, for the assertions."""

    results: dict[int, GenerationResult]
    failures: dict[int, BaseException]
    before_kill: list[int]
    changes: list[Change]
    while_down: TargetStatus
    recovered: TargetStatus
    at_end: tuple[TargetStatus, ...]


async def crash_and_recover_under_load(
    primary: LlamaServer, secondary: LlamaServer
) -> FailoverRun:
    changes: list[Change] = []
    async with failover_router(primary, secondary, changes) as router:
        traffic = Traffic.gated_at(
            router, TOTAL_REQUESTS, AFTER_KILL, AFTER_BREAKER_OPENED, AFTER_RECOVERY
        )
        async with traffic.running(IN_FLIGHT):
            await eventually(
                lambda: len(traffic.answered) >= KILL_AFTER,
                f"{KILL_AFTER} requests to be answered",
            )
            before_kill = list(traffic.answered)
            await asyncio.to_thread(primary.kill)
            traffic.open_gate(AFTER_KILL)

            await eventually(
                lambda: (PRIMARY, CLOSED, OPEN) in changes,
                "the primary's breaker to open",
            )
            traffic.open_gate(AFTER_BREAKER_OPENED)
            await eventually(
                lambda: any(map(skipped_open_primary, traffic.results.values())),
                "a request to skip the open primary",
            )
            while_down = status_of(router, PRIMARY)

            await asyncio.to_thread(primary.start)
            await eventually(
                lambda: closed_again(changes), "the primary's breaker to close again"
            )
            recovered = status_of(router, PRIMARY)
            traffic.open_gate(AFTER_RECOVERY)

        return FailoverRun(
            results=traffic.results,
            failures=traffic.failures,
            before_kill=before_kill,
            changes=changes,
            while_down=while_down,
            recovered=recovered,
            at_end=router.status(),
        )


@pytest.mark.slow
def test_a_killed_primary_fails_over_to_the_secondary_and_takes_over_again(
    servers: tuple[LlamaServer, LlamaServer],
) -> None:
    run = asyncio.run(crash_and_recover_under_load(*servers))

    assert not run.failures, describe_failures(run.failures)
    assert sorted(run.results) == list(range(TOTAL_REQUESTS))
    assert all(r.text for r in run.results.values()), "an answer came back empty"

    before = [route(run.results[n]) for n in run.before_kill]
    assert all(steps == [(PRIMARY, "ok")] for steps in before), before

    failed_over = [n for n, r in run.results.items() if failed_over_in_flight(r)]
    skipped = [n for n, r in run.results.items() if skipped_open_primary(r)]
    assert failed_over, "no request in flight at the kill was answered elsewhere"
    assert skipped, "no request skipped the primary while its breaker was open"

    primary_changes = changes_of(run.changes, PRIMARY)
    assert primary_changes[0] == ("closed", "open"), primary_changes
    assert ("open", "half_open") in primary_changes, primary_changes
    assert primary_changes[-1] == ("half_open", "closed"), primary_changes
    assert changes_of(run.changes, SECONDARY) == [], run.changes

    assert run.while_down.state in (OPEN, HALF_OPEN), run.while_down
    assert run.recovered.state is CLOSED, run.recovered
    assert [s.state for s in run.at_end] == [CLOSED, CLOSED], run.at_end

    after = {n: route(run.results[n]) for n in range(AFTER_RECOVERY, TOTAL_REQUESTS)}
    assert all(steps == [(PRIMARY, "ok")] for steps in after.values()), after


@dataclass
class StreamingRun:
    """What the streaming failover observed, for the assertions."""

    before: list[tuple[str, GenerationResult]]
    at_kill: list[tuple[str, GenerationResult]]
    blocker_ended: bool
    while_down: list[tuple[str, GenerationResult]]
    after: list[tuple[str, GenerationResult]]
    changes: list[Change]


async def crash_before_the_first_token(
    primary: LlamaServer, secondary: LlamaServer
) -> StreamingRun:
    changes: list[Change] = []
    async with failover_router(primary, secondary, changes) as router:
        before = await read_streams(router, range(STREAMS_PER_PHASE))

        busy = asyncio.Event()
        blocker = asyncio.create_task(hold_busy(primary, busy))
        await eventually(busy.is_set, "the primary to start its long answer")
        numbers = range(100, 100 + STREAMS_AT_KILL)
        waiting = asyncio.create_task(read_streams(router, numbers))
        await eventually(
            lambda: status_of(router, PRIMARY).in_flight == STREAMS_AT_KILL,
            f"{STREAMS_AT_KILL} streams to wait on the primary",
        )
        assert not blocker.done(), "the long answer ended before the kill"
        await asyncio.to_thread(primary.kill)
        at_kill = await waiting
        blocker_ended = await blocker

        await eventually(
            lambda: (PRIMARY, CLOSED, OPEN) in changes,
            "the primary's breaker to open",
        )
        while_down = await read_streams(router, range(200, 200 + STREAMS_PER_PHASE))

        await asyncio.to_thread(primary.start)
        await eventually(
            lambda: closed_again(changes), "the primary's breaker to close again"
        )
        after = await read_streams(router, range(300, 300 + STREAMS_PER_PHASE))

    return StreamingRun(before, at_kill, blocker_ended, while_down, after, changes)


@pytest.mark.slow
def test_streams_waiting_on_a_killed_primary_fail_over_before_their_first_token(
    servers: tuple[LlamaServer, LlamaServer],
) -> None:
    run = asyncio.run(crash_before_the_first_token(*servers))

    every_stream = run.before + run.at_kill + run.while_down + run.after
    for text, result in every_stream:
        assert text == result.text, (text, result)
        assert text, f"a stream answered nothing: {result}"

    assert all(route(r) == [(PRIMARY, "ok")] for _, r in run.before), run.before
    assert not run.blocker_ended, "the long answer was not cut by the kill"
    at_kill = [route(r) for _, r in run.at_kill]
    assert all(map(failed_over_in_flight, (r for _, r in run.at_kill))), at_kill
    down = [route(r) for _, r in run.while_down]
    assert all(steps[-1] == (SECONDARY, "ok") for steps in down), down
    assert any(map(skipped_open_primary, (r for _, r in run.while_down))), down
    after = [route(r) for _, r in run.after]
    assert all(steps == [(PRIMARY, "ok")] for steps in after), after

    primary_changes = changes_of(run.changes, PRIMARY)
    assert primary_changes[0] == ("closed", "open"), primary_changes
    assert primary_changes[-1] == ("half_open", "closed"), primary_changes
    assert changes_of(run.changes, SECONDARY) == [], run.changes
