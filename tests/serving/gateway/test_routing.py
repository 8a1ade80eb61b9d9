"""The router: virtual models served by fake targets, with a clock moved by hand.

Targets are the scripted provider of ``providers.py`` or the small fakes
below; time comes from :class:`FakeClock`, waits between retries go through
:class:`FakeSleep` (which records them and moves the clock), and random
choices from a seeded generator, so every test is deterministic.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pydantic
import pytest

from ingestion.errors import (
    ConfigError,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    RequestError,
    UpstreamError,
)
from serving.gateway.breaker import BreakerConfig, BreakerState
from serving.gateway.providers import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Provider,
    ScriptedProvider,
    StreamEvent,
    TokenDelta,
    Usage,
)
from serving.gateway.routing import (
    MESSAGE_OVERHEAD_TOKENS,
    HealthCheckConfig,
    Router,
    RouterConfig,
    TargetConfig,
    UnknownModel,
    VirtualModelConfig,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSleep:
    """Records the waits between retries and moves the clock instead of sleeping."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0)


class FakeTarget:
    """A target that fails while ``error`` is set and waits while ``gate`` is shut."""

    def __init__(
        self,
        name: str,
        *,
        error: BaseException | None = None,
        context_window: int = 2048,
    ) -> None:
        self.name = name
        self.error = error
        self.context_window = context_window
        self.gate: asyncio.Event | None = None
        self.started: asyncio.Event | None = None
        self.fail_after_first_token = False
        self.requests: list[GenerationRequest] = []
        self.closed = False

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        await self._begin(request)
        return self._answer()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        await self._begin(request)
        yield TokenDelta(f"{self.name} ")
        if self.fail_after_first_token:
            raise UpstreamError("connection reset mid-stream", status=None)
        yield TokenDelta("says hi")
        yield self._answer()

    async def close(self) -> None:
        self.closed = True

    async def _begin(self, request: GenerationRequest) -> None:
        self.requests.append(request)
        if self.started is not None:
            self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error

    def _answer(self) -> GenerationResult:
        return GenerationResult(
            text=f"{self.name} says hi",
            usage=Usage(3, 3),
            model=f"{self.name}-model",
            finish_reason="stop",
        )


class HealthTarget(FakeTarget):
    """A fake target with a health check of its own, as HTTP targets have."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.healthy = True
        self.probed: asyncio.Event | None = None

    async def health(self) -> bool:
        if self.probed is not None:
            self.probed.set()
        return self.healthy


def scripted(name: str, *script: Any, **options: Any) -> ScriptedProvider:
    return ScriptedProvider(script or (f"answer from {name}",), name=name, **options)


def ask(text: str = "What is a vector index?", **options: Any) -> GenerationRequest:
    options.setdefault("model", "chat")
    return GenerationRequest([ChatMessage("user", text)], **options)


def make_router(
    targets: Sequence[Provider],
    *,
    clock: FakeClock | None = None,
    sleep: FakeSleep | None = None,
    rng: random.Random | None = None,
    breaker: BreakerConfig | None = None,
    health_check: HealthCheckConfig | None = None,
    listener: Callable[[str, BreakerState, BreakerState], None] | None = None,
    entries: Sequence[dict[str, Any]] | None = None,
    **model_options: Any,
) -> Router:
    """A router with one virtual model, ``chat``, over ``targets`` in listed order."""
    clock = clock or FakeClock()
    model_options.setdefault("retries", 0)
    entries = entries or [{} for _ in targets]
    model = VirtualModelConfig(
        name="chat",
        targets=tuple(
            TargetConfig.model_validate({"target": t.name, "priority": i, **options})
            for i, (t, options) in enumerate(zip(targets, entries, strict=True))
        ),
        **model_options,
    )
    config = RouterConfig(
        models=(model,),
        breaker=breaker or BreakerConfig(),
        health_check=health_check,
    )
    return Router(
        config,
        {t.name: t for t in targets},
        clock=clock,
        rng=rng or random.Random(1234),
        sleep=sleep or FakeSleep(clock),
        on_breaker_change=listener,
    )


def outcomes(attempts: Sequence[Any]) -> list[tuple[str, str]]:
    return [(a.target, a.outcome) for a in attempts]


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def collect(router: Router, request: GenerationRequest) -> list[StreamEvent]:
    return [event async for event in router.stream(request)]


# -- choosing a target ---------------------------------------------------------------


def test_the_priority_policy_tries_the_lowest_priority_first() -> None:
    a, b = scripted("a"), scripted("b")
    router = make_router([a, b], entries=[{"priority": 5}, {"priority": 1}])

    result = run(router.generate(ask()))

    assert result.text == "answer from b"
    assert outcomes(result.attempts) == [("b", "ok")]
    assert a.requests == [], "the lower priority target was not needed"


def test_the_target_is_not_sent_the_virtual_model_name() -> None:
    a = scripted("a")
    router = make_router([a])

    result = run(router.generate(ask()))

    assert a.requests[0].model is None, "the target serves its own model"
    assert result.model == "scripted-model", "the result names the real model"


def test_the_weighted_policy_draws_first_choices_in_proportion_to_weight() -> None:
    main, canary = scripted("main"), scripted("canary")
    router = make_router(
        [main, canary], policy="weighted", entries=[{"weight": 9}, {"weight": 1}]
    )

    async def many() -> Counter[str]:
        results = [await router.generate(ask()) for _ in range(1000)]
        return Counter(r.attempts[-1].target for r in results)

    served = run(many())

    assert 850 <= served["main"] <= 950, served
    assert served["main"] + served["canary"] == 1000


def test_the_weighted_policy_falls_back_when_the_drawn_target_fails() -> None:
    canary = scripted("canary", UpstreamError("bad gateway", status=502))
    main = scripted("main")
    router = make_router(
        [main, canary], policy="weighted", entries=[{"weight": 0}, {"weight": 1}]
    )

    result = run(router.generate(ask()))

    assert outcomes(result.attempts) == [("canary", "error"), ("main", "ok")]
    assert result.attempts[0].status == 502


def test_the_least_latency_policy_tries_untried_targets_then_the_fastest() -> None:
    clock = FakeClock()

    def taking(seconds: float, name: str) -> Callable[[GenerationRequest], str]:
        def answer(request: GenerationRequest) -> str:
            clock.advance(seconds)
            return f"answer from {name}"

        return answer

    slow = scripted("slow", taking(0.8, "slow"))
    fast = scripted("fast", taking(0.1, "fast"))
    router = make_router([slow, fast], clock=clock, policy="least_latency")

    async def serve(count: int) -> list[str]:
        return [
            (await router.generate(ask())).attempts[-1].target for _ in range(count)
        ]

    served = run(serve(4))

    assert served == ["slow", "fast", "fast", "fast"], served
    latencies = {s.name: s.latency_ms for s in router.status()}
    assert latencies["slow"] == pytest.approx(800.0)
    assert latencies["fast"] == pytest.approx(100.0)


def test_the_sticky_policy_keeps_each_user_on_one_target() -> None:
    targets = [scripted(name) for name in ("a", "b", "c")]
    router = make_router(targets, policy="sticky")
    users = [f"user-{n}" for n in range(30)]

    async def serve() -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {u: set() for u in users}
        for _ in range(3):
            for user in users:
                result = await router.generate(ask(metadata={"user": user}))
                seen[user].add(result.attempts[-1].target)
        return seen

    seen = run(serve())

    assert all(len(t) == 1 for t in seen.values()), seen
    assert {next(iter(t)) for t in seen.values()} == {"a", "b", "c"}, (
        "30 users should spread over all three targets"
    )


def test_the_sticky_policy_moves_a_user_only_while_their_target_is_down() -> None:
    clock = FakeClock()
    targets = {name: FakeTarget(name) for name in ("a", "b", "c")}
    router = make_router(
        list(targets.values()),
        clock=clock,
        policy="sticky",
        breaker=BreakerConfig(window=1, min_requests=1, cooldown=30.0),
    )
    request = ask(metadata={"user": "ada"})

    async def scenario() -> tuple[str, str, str, str]:
        home = (await router.generate(request)).attempts[-1].target
        targets[home].error = UpstreamError("unavailable", status=503)
        first_fallback = (await router.generate(request)).attempts[-1].target
        second_fallback = (await router.generate(request)).attempts[-1].target
        targets[home].error = None
        clock.advance(30.0)
        back = (await router.generate(request)).attempts[-1].target
        return home, first_fallback, second_fallback, back

    home, first_fallback, second_fallback, back = run(scenario())

    assert first_fallback != home
    assert second_fallback == first_fallback, "the fallback is stable too"
    assert back == home, "the user returns once the target has recovered"


# -- failing over ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "outcome", "status"),
    [
        (UpstreamError("slow down", status=429), "rate_limited", 429),
        (UpstreamError("internal error", status=500), "error", 500),
        (UpstreamError("upstream timed out", status=504), "error", 504),
        (UpstreamError("read timed out", status=None), "error", None),
        (ProviderError("connection refused"), "error", None),
        (ConnectionResetError("connection reset by peer"), "error", None),
    ],
)
def test_a_retryable_failure_falls_back_to_the_next_target(
    error: BaseException, outcome: str, status: int | None
) -> None:
    a, b = scripted("a", error), scripted("b")
    router = make_router([a, b])

    result = run(router.generate(ask()))

    assert result.text == "answer from b"
    assert outcomes(result.attempts) == [("a", outcome), ("b", "ok")]
    assert result.attempts[0].status == status
    assert result.attempts[0].error and type(error).__name__ in result.attempts[0].error
    assert router.breaker("a").failures == 1, "the failure counts against a"


def test_a_target_that_takes_too_long_is_abandoned_for_the_next() -> None:
    a = scripted("a", delay=30.0)
    b = scripted("b")
    router = make_router([a, b], attempt_timeout=0.05)

    result = run(router.generate(ask()))

    assert outcomes(result.attempts) == [("a", "timeout"), ("b", "ok")]


def test_a_non_retryable_client_error_is_raised_at_once() -> None:
    a = scripted("a", UpstreamError("invalid max_tokens", status=400, retryable=False))
    b = scripted("b")
    router = make_router([a, b])

    with pytest.raises(UpstreamError, match="invalid max_tokens") as caught:
        run(router.generate(ask()))

    assert b.requests == [], "a 400 would fail the same way on b"
    assert outcomes(caught.value.attempts) == [("a", "error")]  # type: ignore[attr-defined]
    assert caught.value.attempts[0].status == 400  # type: ignore[attr-defined]
    assert router.breaker("a").failures == 0, "the caller's mistake is not a's failure"


def test_a_request_error_from_a_target_is_raised_at_once() -> None:
    a = scripted("a", RequestError("The grammar is not valid GBNF."))
    b = scripted("b")
    router = make_router([a, b])

    with pytest.raises(RequestError, match="GBNF"):
        run(router.generate(ask()))

    assert b.requests == []


def test_a_retry_never_waits_less_than_the_upstream_asked() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    a = scripted("a", UpstreamError("slow down", status=429, retry_after=2.5), "ok")
    router = make_router([a], clock=clock, sleep=sleep, retries=1, backoff_base=0.1)

    result = run(router.generate(ask()))

    assert outcomes(result.attempts) == [("a", "rate_limited"), ("a", "ok")]
    assert len(sleep.waits) == 1 and sleep.waits[0] >= 2.5, sleep.waits


def test_a_retry_after_beyond_the_time_budget_moves_on_without_waiting() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    a = scripted("a", UpstreamError("slow down", status=429, retry_after=120.0))
    b = scripted("b")
    router = make_router([a, b], clock=clock, sleep=sleep, retries=3, timeout=30.0)

    result = run(router.generate(ask()))

    assert sleep.waits == [], "waiting 120 s cannot fit a 30 s budget"
    assert outcomes(result.attempts) == [("a", "rate_limited"), ("b", "ok")]


def test_retries_back_off_exponentially_with_full_jitter() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    a = scripted("a", *[UpstreamError("busy", status=503)] * 4, "ok")
    router = make_router(
        [a],
        clock=clock,
        sleep=sleep,
        retries=4,
        backoff_base=1.0,
        backoff_max=3.0,
        breaker=BreakerConfig(window=10, min_requests=10),
    )

    result = run(router.generate(ask()))

    assert [o for _, o in outcomes(result.attempts)] == ["error"] * 4 + ["ok"]
    ceilings = [1.0, 2.0, 3.0, 3.0]
    assert len(sleep.waits) == 4
    assert all(0 <= w <= c for w, c in zip(sleep.waits, ceilings, strict=True)), (
        sleep.waits
    )
    assert len(set(sleep.waits)) == 4, "full jitter draws a new wait each time"


# -- breakers ------------------------------------------------------------------------


def test_an_open_breaker_skips_its_target_until_a_trial_call_closes_it() -> None:
    clock = FakeClock()
    a, b = FakeTarget("a"), FakeTarget("b")
    router = make_router(
        [a, b],
        clock=clock,
        breaker=BreakerConfig(window=2, min_requests=2, cooldown=10.0),
    )

    async def scenario() -> list[list[tuple[str, str]]]:
        seen = []
        a.error = UpstreamError("unavailable", status=503)
        for _ in range(3):
            seen.append(outcomes((await router.generate(ask())).attempts))
        a.error = None
        clock.advance(10.0)
        for _ in range(2):
            seen.append(outcomes((await router.generate(ask())).attempts))
        return seen

    seen = run(scenario())

    assert seen == [
        [("a", "error"), ("b", "ok")],
        [("a", "error"), ("b", "ok")],
        [("a", "breaker_open"), ("b", "ok")],
        [("a", "ok")],
        [("a", "ok")],
    ]
    assert router.breaker("a").state is BreakerState.CLOSED


def test_a_failed_trial_call_opens_the_breaker_again() -> None:
    clock = FakeClock()
    a, b = FakeTarget("a", error=UpstreamError("down", status=503)), FakeTarget("b")
    router = make_router(
        [a, b], clock=clock, breaker=BreakerConfig(window=1, min_requests=1)
    )

    async def scenario() -> list[tuple[str, str]]:
        await router.generate(ask())
        clock.advance(30.0)
        return outcomes((await router.generate(ask())).attempts)

    assert run(scenario()) == [("a", "error"), ("b", "ok")]
    assert router.breaker("a").state is BreakerState.OPEN
    assert router.breaker("a").retry_after() == pytest.approx(30.0)


def test_when_every_breaker_is_open_the_model_is_unavailable() -> None:
    clock = FakeClock()
    a = FakeTarget("a", error=UpstreamError("down", status=503))
    b = FakeTarget("b", error=UpstreamError("down", status=502))
    router = make_router(
        [a, b],
        clock=clock,
        breaker=BreakerConfig(window=1, min_requests=1, cooldown=30.0),
    )

    async def scenario() -> ProviderUnavailable:
        with pytest.raises(ProviderUnavailable) as first:
            await router.generate(ask())
        tried = outcomes(first.value.attempts)  # type: ignore[attr-defined]
        assert tried == [("a", "error"), ("b", "error")]
        assert isinstance(first.value.__cause__, UpstreamError), "the cause is kept"
        clock.advance(12.0)
        with pytest.raises(ProviderUnavailable) as second:
            await router.generate(ask())
        return second.value

    error = run(scenario())

    assert error.retry_after == pytest.approx(18.0), "30 s cooldown, 12 s gone"
    assert "'chat'" in str(error) and "retry after 18.0 s" in str(error), str(error)
    assert outcomes(error.attempts) == [
        ("a", "breaker_open"),
        ("b", "breaker_open"),
    ]
    assert a.requests and len(a.requests) == 1, "no call reaches an open target"


def test_breaker_states_and_latency_are_readable_for_metrics() -> None:
    a, b = scripted("a", UpstreamError("down", status=503)), scripted("b")
    router = make_router(
        [a, b],
        entries=[{"max_concurrency": 4}, {}],
        breaker=BreakerConfig(window=1, min_requests=1),
    )

    run(router.generate(ask()))
    status = {s.name: s for s in router.status()}

    assert status["a"].state is BreakerState.OPEN
    assert status["a"].retry_after > 0
    assert status["a"].latency_ms is None, "a never answered"
    assert status["a"].max_concurrency == 4 and status["a"].in_flight == 0
    assert status["b"].state is BreakerState.CLOSED
    assert status["b"].latency_ms is not None


# -- names ---------------------------------------------------------------------------


def test_an_unknown_model_is_refused_with_the_known_names() -> None:
    router = make_router([scripted("a")])

    with pytest.raises(UnknownModel, match=r"'gpt-9'.*chat") as caught:
        run(router.generate(ask(model="gpt-9")))

    assert isinstance(caught.value, RequestError) and isinstance(caught.value, NotFound)
    assert caught.value.known == ("chat",)


def test_a_request_naming_no_model_goes_to_the_default_model() -> None:
    a, b = scripted("a"), scripted("b")
    config = RouterConfig(
        models=(
            VirtualModelConfig(name="chat", targets=(TargetConfig(target="a"),)),
            VirtualModelConfig(name="judge", targets=(TargetConfig(target="b"),)),
        ),
        default_model="judge",
    )
    router = Router(config, {"a": a, "b": b})

    result = run(router.generate(ask(model=None)))

    assert result.text == "answer from b"
    assert router.models() == ("chat", "judge")
    assert router.default_model == "judge"


def test_a_virtual_model_naming_a_missing_target_is_a_config_error() -> None:
    config = RouterConfig(
        models=(
            VirtualModelConfig(name="chat", targets=(TargetConfig(target="vllm"),)),
        )
    )

    with pytest.raises(ConfigError, match=r"'vllm'.*configured targets: a"):
        Router(config, {"a": scripted("a")})


def test_one_target_with_two_concurrency_limits_is_a_config_error() -> None:
    config = RouterConfig(
        models=(
            VirtualModelConfig(
                name="chat", targets=(TargetConfig(target="a", max_concurrency=2),)
            ),
            VirtualModelConfig(
                name="judge", targets=(TargetConfig(target="a", max_concurrency=8),)
            ),
        )
    )

    with pytest.raises(ConfigError, match="same value everywhere"):
        Router(config, {"a": scripted("a")})


def test_settings_with_repeated_names_are_refused() -> None:
    target = TargetConfig(target="a")
    with pytest.raises(pydantic.ValidationError, match="more than once"):
        RouterConfig(
            models=(
                VirtualModelConfig(name="chat", targets=(target,)),
                VirtualModelConfig(name="chat", targets=(target,)),
            )
        )
    with pytest.raises(pydantic.ValidationError, match="more than once"):
        VirtualModelConfig(name="chat", targets=(target, target))


# -- fitting the context window --------------------------------------------------------


def long_conversation() -> list[ChatMessage]:
    return [
        ChatMessage("system", "Answer briefly."),
        ChatMessage("user", "word " * 60),
        ChatMessage("assistant", "reply " * 20),
        ChatMessage("user", "and what now?"),
    ]


def test_a_smaller_window_gets_the_prompt_repacked_by_the_caller() -> None:
    big = scripted("big", UpstreamError("down", status=503), context_window=4096)
    small = scripted("small", context_window=64)
    router = make_router([big, small])
    budgets: list[int] = []

    def repack(budget: int, count: Callable[[str], int]) -> list[ChatMessage]:
        budgets.append(budget)
        return [ChatMessage("system", "Answer briefly."), ChatMessage("user", "why?")]

    request = GenerationRequest(
        long_conversation(), model="chat", max_tokens=8, repack=repack
    )
    result = run(router.generate(request))

    assert outcomes(result.attempts) == [("big", "error"), ("small", "ok")]
    assert big.requests[0].messages == request.messages, "the big window took it whole"
    assert small.requests[0].messages[-1].content == "why?"
    assert budgets == [64 - 8 - 4 * MESSAGE_OVERHEAD_TOKENS], budgets


def test_without_repack_the_oldest_turns_are_dropped_until_the_prompt_fits() -> None:
    big = scripted("big", UpstreamError("down", status=503), context_window=4096)
    small = scripted("small", context_window=72)
    router = make_router([big, small])
    request = GenerationRequest(long_conversation(), model="chat", max_tokens=8)

    result = run(router.generate(request))

    kept = small.requests[0].messages
    assert [m.role for m in kept] == ["system", "assistant", "user"], kept
    assert kept[-1].content == "and what now?"
    assert outcomes(result.attempts)[-1] == ("small", "ok")


def test_a_target_too_small_for_the_last_message_is_skipped() -> None:
    small = scripted("small", context_window=16)
    big = scripted("big", context_window=4096)
    router = make_router([small, big])

    result = run(router.generate(ask("word " * 40, max_tokens=4)))

    assert outcomes(result.attempts) == [("small", "prompt_too_long"), ("big", "ok")]
    assert small.requests == []


def test_a_prompt_too_long_for_every_target_is_a_request_error() -> None:
    router = make_router([scripted("a", context_window=32)])

    with pytest.raises(RequestError, match=r"too long for every target.*'chat'") as e:
        run(router.generate(ask("word " * 40)))

    assert outcomes(e.value.attempts) == [("a", "prompt_too_long")]  # type: ignore[attr-defined]


# -- streaming ------------------------------------------------------------------------


def test_a_stream_fails_over_before_its_first_token() -> None:
    a = scripted("a", UpstreamError("unavailable", status=503))
    b = scripted("b", "streamed from b")
    router = make_router([a, b])

    events = run(collect(router, ask()))

    *deltas, result = events
    assert all(isinstance(d, TokenDelta) for d in deltas), deltas
    assert "".join(d.text for d in deltas) == "streamed from b"
    assert isinstance(result, GenerationResult)
    assert outcomes(result.attempts) == [("a", "error"), ("b", "ok")]


def test_a_stream_failing_after_its_first_token_is_not_failed_over() -> None:
    a, b = FakeTarget("a"), FakeTarget("b")
    a.fail_after_first_token = True
    router = make_router([a, b])
    received: list[StreamEvent] = []

    async def consume() -> None:
        async for event in router.stream(ask()):
            received.append(event)

    with pytest.raises(UpstreamError, match="mid-stream") as caught:
        run(consume())

    assert received == [TokenDelta("a ")], "the caller kept what it had received"
    assert b.requests == [], "the answer had begun, so b was not asked"
    assert outcomes(caught.value.attempts) == [("a", "error")]  # type: ignore[attr-defined]
    assert router.breaker("a").failures == 1
    assert router.status()[0].in_flight == 0


# -- cancellation and concurrency --------------------------------------------------------


def test_cancelling_the_caller_stops_the_call_without_blaming_the_target() -> None:
    a = FakeTarget("a")
    router = make_router([a], entries=[{"max_concurrency": 1}])

    async def scenario() -> None:
        a.gate, a.started = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(router.generate(ask()))
        await a.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        a.gate.set()
        result = await router.generate(ask())
        assert outcomes(result.attempts) == [("a", "ok")], "the slot was given back"

    run(scenario())

    breaker = router.breaker("a")
    assert (breaker.failures, breaker.calls) == (0, 1), "only the answered call counts"
    assert router.status()[0].in_flight == 0


def test_a_cancelled_trial_call_lets_the_next_request_try_the_target() -> None:
    clock = FakeClock()
    a = FakeTarget("a", error=UpstreamError("down", status=503))
    b = FakeTarget("b")
    router = make_router(
        [a, b], clock=clock, breaker=BreakerConfig(window=1, min_requests=1)
    )

    async def scenario() -> list[tuple[str, str]]:
        await router.generate(ask())
        clock.advance(30.0)
        a.error, a.gate, a.started = None, asyncio.Event(), asyncio.Event()
        trial = asyncio.create_task(router.generate(ask()))
        await a.started.wait()
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial
        a.gate.set()
        return outcomes((await router.generate(ask())).attempts)

    assert run(scenario()) == [("a", "ok")]
    assert router.breaker("a").state is BreakerState.CLOSED


def test_leaving_a_stream_early_frees_the_target() -> None:
    a = FakeTarget("a")
    router = make_router([a], entries=[{"max_concurrency": 1}])

    async def scenario() -> list[tuple[str, str]]:
        stream = router.stream(ask())
        first = await anext(stream)
        assert first == TokenDelta("a ")
        await stream.aclose()  # type: ignore[attr-defined]
        return outcomes((await router.generate(ask())).attempts)

    assert run(scenario()) == [("a", "ok")]
    assert router.breaker("a").failures == 0


def test_a_saturated_target_is_passed_over_for_the_next() -> None:
    a, b = FakeTarget("a"), FakeTarget("b")
    router = make_router([a, b], entries=[{"max_concurrency": 1}, {}])

    async def scenario() -> list[tuple[str, str]]:
        a.gate, a.started = asyncio.Event(), asyncio.Event()
        busy = asyncio.create_task(router.generate(ask()))
        await a.started.wait()
        result = await router.generate(ask())
        a.gate.set()
        await busy
        return outcomes(result.attempts)

    assert run(scenario()) == [("a", "saturated"), ("b", "ok")]


def test_the_last_candidate_is_waited_for_when_saturated() -> None:
    a = FakeTarget("a")
    router = make_router([a], entries=[{"max_concurrency": 1}])

    async def scenario() -> list[tuple[str, str]]:
        a.gate, a.started = asyncio.Event(), asyncio.Event()
        busy = asyncio.create_task(router.generate(ask()))
        await a.started.wait()
        waiting = asyncio.create_task(router.generate(ask()))
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(a.requests) == 1, "the second request waits for the slot"
        a.gate.set()
        await busy
        return outcomes((await waiting).attempts)

    assert run(scenario()) == [("a", "saturated"), ("a", "ok")]


# -- health checks --------------------------------------------------------------------


def test_health_checks_feed_the_breakers() -> None:
    clock = FakeClock()
    checked, plain = HealthTarget("checked"), FakeTarget("plain")
    router = make_router(
        [checked, plain],
        clock=clock,
        breaker=BreakerConfig(window=2, min_requests=2, cooldown=10.0),
    )

    async def scenario() -> list[dict[str, bool | None]]:
        rounds = []
        checked.healthy = False
        rounds.append(await router.check_health())
        rounds.append(await router.check_health())
        rounds.append(await router.check_health())
        checked.healthy = True
        clock.advance(10.0)
        rounds.append(await router.check_health())
        return rounds

    rounds = run(scenario())

    assert rounds == [
        {"checked": False, "plain": None},
        {"checked": False, "plain": None},
        {"checked": None, "plain": None},  # open and cooling down: not probed
        {"checked": True, "plain": None},  # the trial probe that closes it
    ]
    assert router.breaker("checked").state is BreakerState.CLOSED


class BrokenHealthTarget(HealthTarget):
    async def health(self) -> bool:
        raise RuntimeError("health endpoint parser bug")


def test_a_health_check_that_crashes_does_not_hold_the_trial_place() -> None:
    clock = FakeClock()
    broken = BrokenHealthTarget("a")
    router = make_router(
        [broken], clock=clock, breaker=BreakerConfig(window=1, min_requests=1)
    )
    breaker = router.breaker("a")
    ticket = breaker.allow()
    assert ticket is not None
    breaker.record_failure(ticket)
    clock.advance(30.0)

    with pytest.raises(RuntimeError, match="parser bug"):
        run(router.check_health())

    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() is not None, "the trial place was given back"


def test_targets_without_a_health_check_may_be_probed_with_one_token() -> None:
    a = scripted("a")
    router = make_router(
        [a], health_check=HealthCheckConfig(probe_with_generation=True)
    )

    assert run(router.check_health()) == {"a": True}
    assert a.requests[0].max_tokens == 1


def test_the_health_task_runs_between_start_and_close() -> None:
    a = HealthTarget("a")
    router = make_router([a], health_check=HealthCheckConfig(interval=0.01))

    async def scenario() -> None:
        a.probed = asyncio.Event()
        async with router:
            await asyncio.wait_for(a.probed.wait(), timeout=10)

    run(scenario())

    assert a.closed, "closing the router closes its targets"
    with pytest.raises(ProviderError, match="closed"):
        run(router.generate(ask()))


# -- many requests at once --------------------------------------------------------------


class FlakyTarget(FakeTarget):
    """Fails while the fake clock lies in ``[down_from, down_until)``.

    Every call moves the clock by 50 ms and yields to the event loop a few
    times, so that many calls are in flight at once.
    """

    def __init__(
        self, name: str, clock: FakeClock, down_from: float, down_until: float
    ) -> None:
        super().__init__(name)
        self.clock = clock
        self.window = (down_from, down_until)
        self.served = 0

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.clock.advance(0.05)
        for _ in range(10):
            await asyncio.sleep(0)
        if self.window[0] <= self.clock() < self.window[1]:
            raise UpstreamError("service unavailable", status=503)
        self.served += 1
        return self._answer()


def test_200_concurrent_requests_survive_a_target_failing_and_recovering() -> None:
    clock = FakeClock()
    primary = FlakyTarget("primary", clock, down_from=3.0, down_until=6.0)
    backup = FlakyTarget("backup", clock, down_from=0.0, down_until=0.0)
    changes: list[tuple[BreakerState, BreakerState]] = []
    router = make_router(
        [primary, backup],
        clock=clock,
        breaker=BreakerConfig(window=10, min_requests=5, cooldown=1.0),
        listener=lambda name, old, new: (
            changes.append((old, new)) if name == "primary" else None
        ),
    )

    async def one(number: int) -> GenerationResult:
        for _ in range(number // 4):  # four new requests per turn of the loop
            await asyncio.sleep(0)
        return await router.generate(ask())

    async def everything() -> list[GenerationResult | BaseException]:
        return await asyncio.gather(
            *(one(n) for n in range(200)), return_exceptions=True
        )

    results = run(everything())

    failed = [r for r in results if not isinstance(r, GenerationResult)]
    assert failed == [], failed[:3]
    assert (BreakerState.CLOSED, BreakerState.OPEN) in changes, changes
    assert changes[-1] == (BreakerState.HALF_OPEN, BreakerState.CLOSED), changes
    assert router.breaker("primary").state is BreakerState.CLOSED
    assert backup.served > 0, "the backup took over while the primary was down"
    served_last = [r.attempts[-1].target for r in results[-20:]]
    assert served_last == ["primary"] * 20, "traffic returned to the primary"


# -- a real model behind the router -----------------------------------------------------


@pytest.mark.slow
def test_the_packaged_model_takes_over_from_a_failing_target(
    llama_provider: Provider,
) -> None:
    failing = scripted("remote", UpstreamError("bad gateway", status=502))
    router = Router(
        RouterConfig(
            models=(
                VirtualModelConfig(
                    name="chat",
                    retries=0,
                    targets=(
                        TargetConfig(target="remote"),
                        TargetConfig(target="local", priority=1),
                    ),
                ),
            )
        ),
        {"remote": failing, "local": llama_provider},
    )
    request = ask("Name a primary colour.", max_tokens=8)

    result = run(router.generate(request))
    *deltas, streamed = run(collect(router, request))

    assert outcomes(result.attempts) == [("remote", "error"), ("local", "ok")]
    assert result.model == "SmolLM2-135M-Instruct" and result.text.strip(), result
    assert isinstance(streamed, GenerationResult) and deltas, streamed
    assert outcomes(streamed.attempts) == [("remote", "error"), ("local", "ok")]
    # The router is not closed here: it would close the session's shared model.
